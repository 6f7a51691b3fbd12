import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { jobScript } from '../../src/integrations/exec/run-job.ts';
import { expandVariables, refSlug } from '../../src/integrations/exec/variables.ts';

describe('expandVariables', () => {
  test('$A and ${A} take earlier values', () => {
    assert.deepEqual(expandVariables({ A: 'one', B: '$A-x', C: '${A}x', D: 'pre${B}post' }), {
      A: 'one',
      B: 'one-x',
      C: 'onex',
      D: 'preone-xpost',
    });
  });

  test('a name runs as far as identifier characters go', () => {
    // `$Ax` is the variable Ax (unknown, so empty), not $A followed by x.
    assert.deepEqual(expandVariables({ A: '1', B: '$Ax', C: '$A.x', D: '$A_' }), { A: '1', B: '', C: '1.x', D: '' });
  });

  test('$$ is a literal $ and is not expanded again', () => {
    assert.deepEqual(expandVariables({ A: 'v', B: '$$', C: '$$A', D: 'cost: $$5', E: '$$$A', F: '$${A}' }), {
      A: 'v',
      B: '$',
      C: '$A',
      D: 'cost: $5',
      E: '$v',
      F: '${A}',
    });
  });

  test('unknown variables become empty', () => {
    assert.deepEqual(expandVariables({ A: '[$NOPE]', B: '[${NOPE}]' }), { A: '[]', B: '[]' });
  });

  test('what is not a reference is kept as written', () => {
    assert.deepEqual(expandVariables({ A: '$', B: 'a$', C: '$1', D: '${A', E: '${}', F: '$-x', G: '${A B}' }), {
      A: '$',
      B: 'a$',
      C: '$1',
      D: '${A',
      E: '${}',
      F: '$-x',
      G: '${A B}',
    });
  });

  test('order matters: only variables defined earlier are seen', () => {
    assert.deepEqual(expandVariables({ A: '<$B>', B: 'b' }), { A: '<>', B: 'b' });
    assert.deepEqual(expandVariables({ B: 'b', A: '<$B>' }), { B: 'b', A: '<b>' });
  });

  test('base variables are visible and may be overridden; a variable may extend the base one', () => {
    const base = { CI_PROJECT_DIR: '/builds/p', PATH: '/usr/bin' };
    assert.deepEqual(expandVariables({ OUT: '$CI_PROJECT_DIR/out', PATH: '$PATH:/opt/bin', CI_PROJECT_DIR: 'x' }, base), {
      CI_PROJECT_DIR: 'x',
      OUT: '/builds/p/out',
      PATH: '/usr/bin:/opt/bin',
    });
    // The base object is not modified.
    assert.deepEqual(base, { CI_PROJECT_DIR: '/builds/p', PATH: '/usr/bin' });
  });

  test('expansion is one level deep', () => {
    // B holds the text "$$A" expanded to "$A"; C uses B's value as is and does not expand it again.
    assert.deepEqual(expandVariables({ A: 'a', B: '$$A', C: '$B' }), { A: 'a', B: '$A', C: '$A' });
  });

  test('a value with replacement patterns is inserted literally', () => {
    // String.replace would interpret `$&` or `$1` in a replacement string; a function must be used.
    assert.deepEqual(expandVariables({ A: "$& $1 $' $`", B: 'x${A}y' }), { A: "$& $1 $' $`", B: "x$& $1 $' $`y" });
  });
});

describe('refSlug', () => {
  const cases: [string, string][] = [
    ['main', 'main'],
    ['Feature/Add-New_Thing', 'feature-add-new-thing'],
    ['v1.2.3', 'v1-2-3'],
    ['--weird--', 'weird'],
    ['/leading/and/trailing/', 'leading-and-trailing'],
    ['a  b', 'a--b'],
    ['UPPER', 'upper'],
    ['ünï', 'n'],
    ['', ''],
    ['---', ''],
    // 63 characters at most, cut before the trailing dashes are removed.
    ['a'.repeat(70), 'a'.repeat(63)],
    [`${'a'.repeat(62)}/bcd`, 'a'.repeat(62)],
    [`${'a'.repeat(61)}xy-z`, `${'a'.repeat(61)}xy`],
    [`-${'b'.repeat(70)}`, 'b'.repeat(62)],
  ];
  for (const [ref, slug] of cases) {
    test(`${JSON.stringify(ref.length > 30 ? `${ref.slice(0, 8)}…(${ref.length})` : ref)} → ${JSON.stringify(slug.length > 30 ? `…(${slug.length})` : slug)}`, () => {
      assert.equal(refSlug(ref), slug);
    });
  }

  // GitLab's Gitlab::Utils.slugify is `downcase.gsub(/[^a-z0-9]/, '-')[0..62].gsub(/(\A-+|-+\z)/, '')`
  // in Ruby, which works on characters: a character outside the BMP (an emoji) is one '-'.
  // refSlug's regex has no `u` flag, so it replaces each UTF-16 half with its own '-'.
  test('a character outside the BMP is one dash, as in GitLab', () => {
    assert.equal(refSlug('fix-😀-bug'), 'fix---bug');
    assert.equal(refSlug('a😀b'), 'a-b');
  });
});

// ---------------------------------------------------------------------------------------------

describe('jobScript', () => {
  const root = realpathSync(mkdtempSync(join(tmpdir(), 'mayfly-jobscript-test-')));
  after(() => rmSync(root, { recursive: true, force: true }));
  let n = 0;

  const green = (s: string) => `\x1b[32m$ ${s}\x1b[0m\n`;

  /** Writes the script and runs it with bash, in a project dir (with a space in its path) of its own. */
  function runScript(env: Record<string, string>, lines: string[], failFast = true) {
    n++;
    const project = mkdtempSync(join(root, `project ${n} `));
    const script = jobScript({ CI_PROJECT_DIR: project, ...env }, lines, failFast);
    const path = join(root, `script-${n}.sh`);
    writeFileSync(path, script);
    // Run from elsewhere so that ending up in the project dir is the script's doing.
    const r = spawnSync('bash', [path], {
      cwd: root,
      encoding: 'utf8',
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: root, LANG: 'C.UTF-8' },
    });
    return { code: r.status, stdout: r.stdout, stderr: r.stderr, project, script };
  }

  test('the script text: shebang, shell options, exports, cd, then echo + line pairs', () => {
    assert.equal(
      jobScript({ A: 'x y', B: "it's" }, ['echo hi', 'make test'], true),
      [
        '#!/usr/bin/env bash',
        'set -eo pipefail',
        "export A='x y'",
        "export B='it'\\''s'",
        'cd "$CI_PROJECT_DIR"',
        "printf '\\033[32m$ %s\\033[0m\\n' 'echo hi'",
        'echo hi',
        "printf '\\033[32m$ %s\\033[0m\\n' 'make test'",
        'make test',
        '',
      ].join('\n'),
    );
    assert.equal(jobScript({}, [], false), '#!/usr/bin/env bash\nset +e\ncd "$CI_PROJECT_DIR"\n');
  });

  test('exports every variable with its exact value', () => {
    const values: Record<string, string> = {
      SPACES: 'a  b ',
      QUOTES: `it's "quoted"`,
      DOLLAR: '$HOME ${HOME} $(echo no) `echo no`',
      NEWLINES: 'one\ntwo\n',
      EMPTY: '',
      UNICODE: 'ünïcödé ✓ 😀',
      GLOB: '*',
      BACKSLASH: 'a\\nb\\',
      PERCENT: '100% %s',
    };
    const dump = join(root, 'env-dump');
    const r = runScript(values, [`env -0 > ${JSON.stringify(dump)}`]);
    assert.equal(r.code, 0, r.stderr);
    const env = new Map(
      readFileSync(dump, 'utf8')
        .split('\0')
        .filter(Boolean)
        .map((e) => [e.slice(0, e.indexOf('=')), e.slice(e.indexOf('=') + 1)] as const),
    );
    for (const [k, v] of Object.entries(values)) assert.equal(env.get(k), v, k);
    assert.equal(env.get('CI_PROJECT_DIR'), r.project);
    assert.equal(env.get('HOME'), root, 'values mentioning $HOME did not change HOME');
  });

  test('runs in CI_PROJECT_DIR and echoes each command prefixed by "$ "', () => {
    const r = runScript({ GREETING: 'hello world' }, ['pwd', 'echo "$GREETING"', "printf '%s\\n' '100%' 'a\\b'"]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(
      r.stdout,
      green('pwd') + `${r.project}\n` + green('echo "$GREETING"') + 'hello world\n' + green("printf '%s\\n' '100%' 'a\\b'") + '100%\na\\b\n',
    );
    assert.equal(r.stderr, '');
  });

  test('a multi-line command echoes its first line and runs whole', () => {
    const r = runScript({}, ['echo one\necho two', 'if true; then\n  echo three\nfi']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, green('echo one') + 'one\ntwo\n' + green('if true; then') + 'three\n');
  });

  test('stops at the first failing command with its exit code', () => {
    const r = runScript({}, ['echo before', 'sh -c "exit 7"', 'echo after']);
    assert.equal(r.code, 7);
    assert.equal(r.stdout, green('echo before') + 'before\n' + green('sh -c "exit 7"'));
  });

  test('false stops the job with 1', () => {
    const r = runScript({}, ['false', 'echo after']);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, green('false'));
  });

  test('pipefail: a failure anywhere in a pipeline fails the job with that status', () => {
    const r = runScript({}, ['sh -c "exit 3" | cat', 'echo after']);
    assert.equal(r.code, 3);
    assert.equal(r.stdout, green('sh -c "exit 3" | cat'));
    const r2 = runScript({}, ['true | sh -c "exit 5" | true', 'echo after']);
    assert.equal(r2.code, 5);
  });

  test('errexit: a failure inside a multi-line command stops it there', () => {
    const r = runScript({}, ['echo a\nfalse\necho b', 'echo c']);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, green('echo a') + 'a\n');
  });

  test('a missing project dir fails before any command runs', () => {
    const r = runScript({ CI_PROJECT_DIR: join(root, 'does-not-exist') }, ['echo ran']);
    assert.equal(r.code, 1);
    assert.equal(r.stdout, '');
  });

  test('succeeds with 0 when every command does', () => {
    const r = runScript({}, ['true', 'echo ok | cat']);
    assert.equal(r.code, 0);
    assert.equal(r.stdout, green('true') + green('echo ok | cat') + 'ok\n');
  });

  test('failFast=false runs every command; the exit code is the last one', () => {
    const r = runScript({}, ['false', 'sh -c "exit 4"', 'echo still here'], false);
    assert.equal(r.code, 0);
    assert.equal(r.stdout, green('false') + green('sh -c "exit 4"') + green('echo still here') + 'still here\n');
    const r2 = runScript({}, ['echo x', 'sh -c "exit 4"'], false);
    assert.equal(r2.code, 4);
    assert.equal(r2.stdout, green('echo x') + 'x\n' + green('sh -c "exit 4"'));
  });

  // Variable names come from .gitlab-ci.yml and --var, and jobScript writes them unquoted.
  test('a variable name cannot inject commands', () => {
    const marker = join(root, 'injected');
    try {
      runScript({ [`A=1; touch ${marker}; B`]: 'x' }, ['true']);
    } catch {
      // refusing the name by throwing is fine too
    }
    assert.equal(existsSync(marker), false);
  });
});
