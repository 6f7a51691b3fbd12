import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { ErrorCode, MayflyError } from '../../src/errors.ts';
import { remoteCommand } from '../../src/guest/channel.ts';
import { isValidEnvName, shellJoin, shellQuote } from '../../src/util/shell.ts';

// Every check goes through a real /bin/sh (dash on Debian, the shell sshd uses for most users):
// what matters is what a shell makes of the quoted text, not what the text looks like.

const dir = realpathSync(mkdtempSync(join(tmpdir(), 'mayfly-shell-test-')));
after(() => rmSync(dir, { recursive: true, force: true }));

/** Runs `script` with `sh -c` in `cwd` and returns its stdout. The environment is minimal and known. */
function sh(script: string, cwd = dir): string {
  return execFileSync('/bin/sh', ['-c', script], {
    cwd,
    encoding: 'utf8',
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: '/home-should-not-appear', LANG: 'C.UTF-8' },
  });
}

const nasty: readonly string[] = [
  'plain',
  'with space',
  '  leading and trailing  ',
  "it's",
  "''",
  "'",
  '"double"',
  '"',
  '$HOME',
  '${HOME}',
  '$(echo injected)',
  '`echo injected`',
  'a;echo injected',
  'a && echo injected',
  'a|cat',
  'line1\nline2',
  '\n',
  'tab\there',
  '',
  'ünïcödé ✓ 日本語 😀',
  '*',
  '~',
  '~/x',
  '!',
  '#not a comment',
  'back\\slash',
  '-n',
  '--',
  'a=b',
  '%s',
  '\\n',
  'mixed \'"$`\\ all',
];

describe('shellQuote', () => {
  test('leaves safe words alone and single-quotes everything else', () => {
    assert.equal(shellQuote('abc'), 'abc');
    assert.equal(shellQuote('/usr/bin/env'), '/usr/bin/env');
    assert.equal(shellQuote('a=b,c:d@e%f+g.h-i_j'), 'a=b,c:d@e%f+g.h-i_j');
    assert.equal(shellQuote(''), "''");
    assert.equal(shellQuote('a b'), "'a b'");
    assert.equal(shellQuote("it's"), "'it'\\''s'");
    assert.equal(shellQuote('$HOME'), "'$HOME'");
    assert.equal(shellQuote('~'), "'~'");
    assert.equal(shellQuote('*'), "'*'");
    assert.equal(shellQuote('ü'), "'ü'");
  });

  for (const arg of nasty) {
    test(`round-trips ${JSON.stringify(arg)} through sh`, () => {
      assert.equal(sh(`printf '%s' ${shellQuote(arg)}`), arg);
    });
  }

  test('a word next to another word stays one argument', () => {
    // Concatenation is how quoted pieces get embedded (e.g. `--opt=` + value).
    assert.equal(sh(`printf '[%s]' --opt=${shellQuote("a b'c")}`), "[--opt=a b'c]");
  });
});

describe('shellJoin', () => {
  test('keeps every argument separate and exact through sh', () => {
    const out = sh(`printf '%s\\n' ${shellJoin(nasty)}`);
    assert.equal(out, nasty.map((a) => `${a}\n`).join(''));
  });

  test('keeps the argument count: one printf conversion per argument', () => {
    // `[%s]` per argument shows the boundaries even for empty and newline-only arguments.
    const out = sh(`printf '[%s]' ${shellJoin(nasty)}`);
    assert.equal(out, nasty.map((a) => `[${a}]`).join(''));
  });

  test('joins with single spaces', () => {
    assert.equal(shellJoin(['a', 'b c', '']), "a 'b c' ''");
    assert.equal(shellJoin([]), '');
  });
});

describe('isValidEnvName', () => {
  test('accepts shell identifiers', () => {
    for (const n of ['A', '_', 'a1', 'CI_PROJECT_DIR', '_x_9']) assert.equal(isValidEnvName(n), true, n);
  });
  test('rejects everything else', () => {
    for (const n of ['', '1A', 'A-B', 'A.B', 'A B', 'A=B', '$A', 'A;B', 'É', 'A\n']) {
      assert.equal(isValidEnvName(n), false, JSON.stringify(n));
    }
  });
});

describe('remoteCommand', () => {
  /** The NAME=VALUE pairs `env -0` printed, as a map (values may contain newlines). */
  function envOf(output: string): Map<string, string> {
    const m = new Map<string, string>();
    for (const entry of output.split('\0')) {
      if (!entry) continue;
      const i = entry.indexOf('=');
      m.set(entry.slice(0, i), entry.slice(i + 1));
    }
    return m;
  }

  test('without env or cwd it is exec env -- plus the quoted argv', () => {
    assert.equal(remoteCommand(['echo', 'a b']), "exec env -- echo 'a b'");
    assert.equal(remoteCommand(['true'], { env: {} }), 'exec env -- true');
  });

  test('with env and cwd: cd, then env -- with each assignment quoted as one word', () => {
    assert.equal(
      remoteCommand(['ls', '-l'], { env: { A: 'x y', B: "it's" }, cwd: '/tmp/a b' }),
      "cd -- '/tmp/a b' && exec env -- 'A=x y' 'B=it'\\''s' ls -l",
    );
  });

  test('argv arrives exact through sh', () => {
    const out = sh(remoteCommand(['printf', '[%s]', ...nasty]));
    assert.equal(out, nasty.map((a) => `[${a}]`).join(''));
  });

  test('env values arrive exact, in the given cwd', () => {
    const values: Record<string, string> = {
      SPACES: 'a b  c',
      QUOTES: `it's "quoted"`,
      DOLLAR: '$HOME and ${HOME}',
      BACKTICK: '`echo injected`',
      SUBST: '$(echo injected)',
      SEMI: 'a;echo injected',
      NEWLINE: 'one\ntwo\n',
      EMPTY: '',
      UNICODE: 'ünïcödé ✓ 😀',
      EQUALS: 'a=b=c',
      BACKSLASH: 'c:\\dir\\n',
    };
    const work = mkdtempSync(join(dir, 'cwd with space '));
    const out = sh(remoteCommand(['env', '-0'], { env: values, cwd: work }));
    const env = envOf(out);
    for (const [k, v] of Object.entries(values)) assert.equal(env.get(k), v, k);
    // HOME is the caller's, untouched by the values that mention it.
    assert.equal(env.get('HOME'), '/home-should-not-appear');

    // The command ran in `work`: env's own PWD is the shell's, so ask pwd itself.
    assert.equal(sh(remoteCommand(['pwd'], { cwd: work })), `${work}\n`);
    assert.equal(sh(remoteCommand(['sh', '-c', 'printf %s "$PWD"'], { env: { X: '1' }, cwd: work })), work);
  });

  test('nothing in an env value or argument is executed', () => {
    const marker = join(dir, 'pwned');
    const evil = `$(touch ${marker})\`touch ${marker}\`;touch ${marker}`;
    sh(remoteCommand(['true', evil], { env: { EVIL: evil }, cwd: dir }));
    assert.equal(existsSync(marker), false, 'the marker file must not exist');
  });

  test('a failing cd does not run the command in the wrong directory', () => {
    assert.throws(
      () => sh(remoteCommand(['touch', join(dir, 'should-not-exist')], { cwd: join(dir, 'missing') })),
      (e: { status?: number }) => typeof e.status === 'number' && e.status !== 0,
    );
    assert.equal(existsSync(join(dir, 'should-not-exist')), false);
  });

  test('rejects invalid environment names with a usage MayflyError', () => {
    for (const name of ['1A', 'A-B', 'A B', 'A=B', '', 'A;rm -rf /', '$(x)']) {
      assert.throws(
        () => remoteCommand(['true'], { env: { OK: '1', [name]: 'v' } }),
        (e: unknown) => {
          assert.ok(e instanceof MayflyError, `expected a MayflyError for ${JSON.stringify(name)}`);
          assert.equal(e.code, ErrorCode.USAGE);
          assert.equal(e.message, `'${name}' is not a valid environment variable name`);
          assert.equal(e.hint, 'names are letters, digits and _, not starting with a digit');
          return true;
        },
      );
    }
  });

  test('rejects an empty argv', () => {
    assert.throws(
      () => remoteCommand([]),
      (e: unknown) => e instanceof MayflyError && e.code === ErrorCode.USAGE && e.message === 'no command given to run in the machine',
    );
  });
});
