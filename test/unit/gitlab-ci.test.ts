import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ErrorCode, MayflyError } from '../../src/errors.ts';
import { parseCiFile, resolveJob } from '../../src/integrations/exec/gitlab-ci.ts';
import type { CiJob } from '../../src/integrations/exec/gitlab-ci.ts';

const FILE = '.gitlab-ci.yml';

/** Lines joined with newlines, so line numbers in the fixtures are easy to count. */
function yaml(...lines: string[]): string {
  return lines.join('\n') + '\n';
}

function job(text: string, name: string): CiJob {
  return resolveJob(parseCiFile(text, FILE), name);
}

function throwsMayfly(fn: () => unknown, code: string, message: string, hint?: string): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof MayflyError, `expected MayflyError, got ${String(e)}`);
    assert.equal(e.code, code);
    assert.equal(e.message, message);
    if (hint !== undefined) assert.equal(e.hint, hint);
    return true;
  });
}

const EMPTY: Omit<CiJob, 'name'> = {
  image: undefined,
  variables: {},
  beforeScript: [],
  script: [],
  afterScript: [],
  ignoredKeywords: [],
  file: FILE,
};

describe('parseCiFile: jobs', () => {
  test('lists runnable jobs in file order, skipping keywords, templates and trigger jobs', () => {
    const ci = parseCiFile(
      yaml(
        'stages: [build, test]',
        'variables: {A: a}',
        'workflow: {rules: [{when: always}]}',
        '.template: {script: [echo hidden]}',
        'build: {script: [make]}',
        'downstream: {trigger: {project: group/other}}',
        'test: {extends: .template}',
        'pages: {script: [make site]}',
      ),
      FILE,
    );
    assert.deepEqual(ci.jobNames, ['build', 'test', 'pages']);
    assert.deepEqual(ci.warnings, []);
  });

  test('warns about a top-level key that is neither keyword nor job', () => {
    const ci = parseCiFile(yaml('build: {script: [make]}', 'oops:', '  image: alpine'), FILE);
    assert.deepEqual(ci.jobNames, ['build']);
    assert.deepEqual(ci.warnings, [
      '.gitlab-ci.yml:2:1: "oops" is neither a keyword nor a job (it has no script or trigger); GitLab rejects this',
    ]);
  });
});

describe('extends', () => {
  const text = yaml(
    '.base:',
    '  image: alpine:3',
    '  variables: {A: base, B: base}',
    '  before_script: [echo base-before]',
    '  script: [echo base]',
    '.middle:',
    '  extends: .base',
    '  variables: {B: middle, C: middle}',
    '  script: [echo middle]',
    '.other:',
    '  image: {name: debian:12, entrypoint: [""]}',
    '  variables: {C: other}',
    'build:',
    '  extends: [.middle, .other]',
    '  variables: {D: build}',
    'lint:',
    '  extends: .base',
    '  script: echo lint',
  );

  test('multi-level and list extends deep-merge hashes; later parents and the job win', () => {
    assert.deepEqual(job(text, 'build'), {
      ...EMPTY,
      name: 'build',
      image: 'debian:12',
      variables: { A: 'base', B: 'middle', C: 'other', D: 'build' },
      beforeScript: ['echo base-before'],
      script: ['echo middle'],
    });
  });

  test('a job overriding a list replaces it rather than appending', () => {
    assert.deepEqual(job(text, 'lint').script, ['echo lint']);
    assert.deepEqual(job(text, 'lint').beforeScript, ['echo base-before']);
  });

  test('jobs made runnable only by extends are listed', () => {
    assert.deepEqual(parseCiFile(text, FILE).jobNames, ['build', 'lint']);
  });

  test('unknown target names it, the job, the position and the templates', () => {
    throwsMayfly(
      () => parseCiFile(yaml('.common: {image: a}', '.deploy: {image: b}', 'build:', '  extends: .base', '  script: [make]'), FILE),
      ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:4:12: job "build" extends ".base" which does not exist (templates: .common, .deploy)',
    );
  });

  test('cycle is reported with the whole chain', () => {
    throwsMayfly(
      () => parseCiFile(yaml('.a: {extends: .b}', '.b: {extends: .c}', '.c: {extends: .a}', 'job: {extends: .a, script: [x]}'), FILE),
      ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:3:15: extends cycle: .a -> .b -> .c -> .a',
    );
  });

  test('a job extending itself is a cycle', () => {
    throwsMayfly(
      () => parseCiFile(yaml('job: {extends: job, script: [x]}'), FILE),
      ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:1:16: extends cycle: job -> job',
    );
  });

  test('11 levels of inheritance are allowed, 12 are not', () => {
    const chain = (levels: number) => {
      const lines = ['.t0: {script: [deep]}'];
      for (let i = 1; i < levels; i++) lines.push(`.t${i}: {extends: .t${i - 1}}`);
      lines.push(`job: {extends: .t${levels - 1}}`);
      return yaml(...lines);
    };
    assert.deepEqual(job(chain(11), 'job').script, ['deep']);
    throwsMayfly(
      () => parseCiFile(chain(12), FILE),
      ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:13:16: job "job" extends 12 levels deep, more than GitLab\'s 11: ' +
        'job -> .t11 -> .t10 -> .t9 -> .t8 -> .t7 -> .t6 -> .t5 -> .t4 -> .t3 -> .t2 -> .t1 -> .t0',
    );
  });

  test('extends must be a name or a list of names', () => {
    throwsMayfly(
      () => parseCiFile(yaml('job:', '  extends: {a: 1}', '  script: [x]'), FILE),
      ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:2:12: job "job": extends must be a job name or a list of job names',
    );
  });
});

describe('YAML features', () => {
  test('anchors, aliases and merge keys', () => {
    const text = yaml(
      '.defaults: &defaults',
      '  image: ruby:3',
      '  variables: &vars',
      '    RAILS_ENV: test',
      '.setup: &setup',
      '  - bundle install',
      '  - bundle exec rake db:setup',
      'rspec:',
      '  <<: *defaults',
      '  variables:',
      '    <<: *vars',
      '    EXTRA: "1"',
      '  script:',
      '    - *setup',
      '    - bundle exec rspec',
    );
    assert.deepEqual(job(text, 'rspec'), {
      ...EMPTY,
      name: 'rspec',
      image: 'ruby:3',
      variables: { RAILS_ENV: 'test', EXTRA: '1' },
      script: ['bundle install', 'bundle exec rake db:setup', 'bundle exec rspec'],
    });
  });

  test('many aliases of one anchor are not mistaken for an alias bomb', () => {
    const lines = ['.s: &s {image: alpine, script: [x]}'];
    for (let i = 0; i < 150; i++) lines.push(`job${i}: *s`);
    assert.equal(parseCiFile(yaml(...lines), FILE).jobNames.length, 150);
  });

  test('malformed YAML names file, line and column', () => {
    throwsMayfly(
      () => parseCiFile(yaml('build:', '  script:', '    - make', '   bad: [unclosed'), FILE),
      ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:4:1: invalid YAML: All mapping items must start at the same column',
    );
  });

  test('an undefined alias is a YAML error', () => {
    assert.throws(
      () => parseCiFile(yaml('build:', '  script: *nope'), FILE),
      (e: unknown) => e instanceof MayflyError && e.code === ErrorCode.CI_FILE_INVALID && e.message === '.gitlab-ci.yml:2:11: invalid YAML: alias *nope has no anchor &nope before it',
    );
  });

  test('top level must be a mapping', () => {
    throwsMayfly(
      () => parseCiFile(yaml('- build', '- test'), FILE),
      ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:1:1: the top level must be a mapping of jobs and keywords, not a list',
    );
    throwsMayfly(() => parseCiFile('just text\n', FILE), ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:1:1: the top level must be a mapping of jobs and keywords, not a scalar');
    throwsMayfly(() => parseCiFile('# nothing\n', FILE), ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml: the file is empty; it needs at least one job with a script');
  });
});

describe('!reference', () => {
  test('in scripts: array results are flattened in, nested references resolve', () => {
    const text = yaml(
      '.setup:',
      '  script: [apt-get update, apt-get install -y make]',
      '.vars:',
      '  variables: {REGION: eu-west-1, TIER: gold}',
      '.tools:',
      '  before_script:',
      '    - !reference [.setup, script]',
      '    - echo tools',
      'build:',
      '  variables:',
      '    REGION: !reference [.vars, variables, REGION]',
      '  before_script: !reference [.tools, before_script]',
      '  script:',
      '    - !reference [.setup, script]',
      '    - make',
      '  after_script:',
      '    - - echo nested',
      '      - - echo deeper',
    );
    assert.deepEqual(job(text, 'build'), {
      ...EMPTY,
      name: 'build',
      variables: { REGION: 'eu-west-1' },
      beforeScript: ['apt-get update', 'apt-get install -y make', 'echo tools'],
      script: ['apt-get update', 'apt-get install -y make', 'make'],
      afterScript: ['echo nested', 'echo deeper'],
    });
  });

  test('a whole variables mapping can be referenced', () => {
    const text = yaml('.vars:', '  variables: {A: 1, B: two}', 'job:', '  variables: !reference [.vars, variables]', '  script: [x]');
    assert.deepEqual(job(text, 'job').variables, { A: '1', B: 'two' });
  });

  test('sees keys the referenced job gets through extends', () => {
    const text = yaml('.base: {script: [from-base]}', '.child: {extends: .base}', 'job:', '  script: [!reference [.child, script], own]');
    assert.deepEqual(job(text, 'job').script, ['from-base', 'own']);
  });

  test('unknown job or key is reported at the tag', () => {
    throwsMayfly(
      () => parseCiFile(yaml('job:', '  script:', '    - !reference [.setup, script]'), FILE),
      ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:3:7: !reference [.setup, script] cannot be resolved: there is no top-level ".setup"',
    );
    throwsMayfly(
      () => parseCiFile(yaml('.setup: {image: a}', 'job:', '  script: !reference [.setup, script]'), FILE),
      ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:3:11: !reference [.setup, script] cannot be resolved: ".setup" has no key "script"',
    );
  });

  test('a reference to itself stops at the nesting limit', () => {
    throwsMayfly(
      () => parseCiFile(yaml('.a:', '  script: [!reference [.a, script]]', 'job: {script: [x]}'), FILE),
      ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:2:12: !reference [.a, script] nests references more than 10 levels deep (does it refer to itself?)',
    );
  });

  test('must be a list of names', () => {
    throwsMayfly(
      () => parseCiFile(yaml('job:', '  script: !reference []'), FILE),
      ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:2:11: invalid YAML: !reference needs a list of plain names, like !reference [.setup, script]',
    );
  });
});

describe('default: and global keywords', () => {
  const text = yaml(
    'image: old-global',
    'before_script: [echo global-before]',
    'variables: {GLOBAL: g, SHARED: top}',
    'default:',
    '  image: node:22',
    '  after_script: [echo cleanup]',
    '  services: [postgres:16]',
    '  retry: 2',
    'inherits:',
    '  script: [npm test]',
    'overrides:',
    '  image: node:20',
    '  before_script: [echo own-before]',
    '  after_script: []',
    '  variables: {SHARED: job}',
    '  script: [npm test]',
    'no-defaults:',
    '  inherit: {default: false, variables: false}',
    '  script: [make]',
    'some-defaults:',
    '  inherit: {default: [before_script, image], variables: [SHARED]}',
    '  script: ["true"]',
  );

  test('jobs get default: keys, falling back to top-level ones; default: beats top-level', () => {
    assert.deepEqual(job(text, 'inherits'), {
      ...EMPTY,
      name: 'inherits',
      image: 'node:22',
      variables: { GLOBAL: 'g', SHARED: 'top' },
      beforeScript: ['echo global-before'],
      script: ['npm test'],
      afterScript: ['echo cleanup'],
      ignoredKeywords: ['retry', 'services'],
    });
  });

  test('job keys replace defaults, including with an empty list', () => {
    assert.deepEqual(job(text, 'overrides'), {
      ...EMPTY,
      name: 'overrides',
      image: 'node:20',
      variables: { GLOBAL: 'g', SHARED: 'job' },
      beforeScript: ['echo own-before'],
      script: ['npm test'],
      afterScript: [],
      ignoredKeywords: ['retry', 'services'],
    });
  });

  test('inherit: false drops defaults and top-level variables', () => {
    assert.deepEqual(job(text, 'no-defaults'), { ...EMPTY, name: 'no-defaults', script: ['make'] });
  });

  test('inherit lists pick what is inherited', () => {
    assert.deepEqual(job(text, 'some-defaults'), {
      ...EMPTY,
      name: 'some-defaults',
      image: 'node:22',
      variables: { SHARED: 'top' },
      beforeScript: ['echo global-before'],
      script: ['true'],
    });
  });

});

describe('variables and scripts', () => {
  test('scalar and {value:} forms become strings, YAML 1.1 booleans as GitLab reads them', () => {
    const text = yaml(
      'variables:',
      '  STR: hello',
      '  INT: 42',
      '  FLOAT: 1.5',
      '  BOOL: true',
      '  ANSWER: yes',
      '  SWITCH: Off',
      '  LETTER: y',
      '  EMPTY:',
      '  QUOTED: "007"',
      '  DATE: 2024-01-02',
      '  DEPLOY_ENV:',
      '    value: staging',
      '    description: Where to deploy',
      '    options: [staging, production]',
      '  DESCRIBED_ONLY: {description: set me}',
      'job:',
      '  variables:',
      '    STR: from-job',
      '    NUM: {value: 3, expand: false}',
      '  script: [env]',
    );
    assert.deepEqual(job(text, 'job').variables, {
      STR: 'from-job',
      INT: '42',
      FLOAT: '1.5',
      BOOL: 'true',
      ANSWER: 'true',
      SWITCH: 'false',
      LETTER: 'y',
      EMPTY: '',
      QUOTED: '007',
      DATE: '2024-01-02',
      DEPLOY_ENV: 'staging',
      DESCRIBED_ONLY: '',
      NUM: '3',
    });
  });

  test('a list value is rejected with its name', () => {
    throwsMayfly(
      () => job(yaml('job:', '  variables:', '    LIST: [a, b]', '  script: [x]'), 'job'),
      ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:3:5: job "job": variables: LIST must be a string, number or boolean (or {value: ...}), not a list',
    );
  });

  test('script as a string, block strings as one entry, nested arrays flattened', () => {
    const text = yaml(
      'single:',
      '  script: make all',
      'multi:',
      '  script:',
      '    - |',
      '      if true; then',
      '        echo yes',
      '      fi',
      '    - >',
      '      echo folded',
      '      line',
      '    - [echo a, [echo b]]',
    );
    assert.deepEqual(job(text, 'single').script, ['make all']);
    assert.deepEqual(job(text, 'multi').script, ['if true; then\n  echo yes\nfi\n', 'echo folded line\n', 'echo a', 'echo b']);
  });

  test('a non-string script line is rejected', () => {
    throwsMayfly(
      () => job(yaml('job:', '  script: [make, true]'), 'job'),
      ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:2:11: job "job": script line 2 is a boolean, not a string (quote it)',
    );
  });

  test('a later duplicate key wins, as in GitLab', () => {
    assert.deepEqual(job(yaml('job:', '  script: [first]', 'job:', '  script: [second]'), 'job').script, ['second']);
  });

  test('an unquoted "key: value" script line is explained', () => {
    throwsMayfly(
      () => job(yaml('job:', '  script:', '    - echo ok', '    - echo a: b'), 'job'),
      ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:3:5: job "job": script line 2 is a mapping, not a string (a line containing ": " must be quoted)',
    );
  });
});

describe('resolveJob', () => {
  const text = yaml(
    '.hidden: {script: [x]}',
    'build: {script: [make], stage: build, tags: [docker], artifacts: {paths: [out]}, cache: {key: k}, rules: [{when: always}],',
    '  needs: [], when: manual, allow_failure: true, timeout: 1h, environment: prod, interruptible: true, retry: 1}',
    'test: {script: [make test]}',
    'bridge: {trigger: other/project}',
  );
  const ci = parseCiFile(text, FILE);

  test('lists ignored keywords sorted, without stage', () => {
    assert.deepEqual(resolveJob(ci, 'build').ignoredKeywords, [
      'allow_failure', 'artifacts', 'cache', 'environment', 'interruptible', 'needs', 'retry', 'rules', 'tags', 'timeout', 'when',
    ]);
  });

  test('unknown job lists the runnable jobs', () => {
    throwsMayfly(() => resolveJob(ci, 'biuld'), ErrorCode.CI_JOB_NOT_FOUND, 'no job "biuld" in .gitlab-ci.yml; jobs: build, test');
  });

  test('hidden jobs cannot be run, and say so', () => {
    throwsMayfly(
      () => resolveJob(ci, '.hidden'),
      ErrorCode.CI_JOB_NOT_FOUND,
      '".hidden" is a hidden job (its name starts with "."), which GitLab never runs, so mayfly exec cannot either; jobs: build, test',
      'Run a job that extends it, or copy it to a name without the leading ".".',
    );
  });

  test('keywords and trigger jobs are not runnable', () => {
    throwsMayfly(() => resolveJob(parseCiFile(yaml('variables: {A: b}', 'j: {script: [x]}'), FILE), 'variables'),
      ErrorCode.CI_JOB_NOT_FOUND, '"variables" is a top-level keyword in .gitlab-ci.yml, not a job; jobs: j');
    throwsMayfly(() => resolveJob(ci, 'bridge'), ErrorCode.CI_JOB_NOT_FOUND,
      '"bridge" is a trigger job: it starts a downstream pipeline and has no script to run; jobs: build, test');
  });

  test('names inherited from Object are not jobs', () => {
    throwsMayfly(() => resolveJob(ci, 'constructor'), ErrorCode.CI_JOB_NOT_FOUND, 'no job "constructor" in .gitlab-ci.yml; jobs: build, test');
  });
});

describe('include', () => {
  test('is not fetched without a reader, with a warning naming each include', () => {
    const ci = parseCiFile(
      yaml(
        'include:',
        '  - local: /ci/build.yml',
        '  - remote: https://example.com/ci.yml',
        '  - project: group/templates',
        '    file: /deploy.yml',
        '  - template: Auto-DevOps.gitlab-ci.yml',
        'job: {script: [x]}',
      ),
      FILE,
    );
    assert.deepEqual(ci.jobNames, ['job']);
    assert.deepEqual(ci.unfetchedIncludes, [
      'local: /ci/build.yml',
      'remote: https://example.com/ci.yml',
      'project: group/templates, file: /deploy.yml',
      'template: Auto-DevOps.gitlab-ci.yml',
    ]);
    assert.deepEqual(ci.warnings, [
      '.gitlab-ci.yml:1:1: mayfly exec does not fetch these includes, so jobs, templates and variables defined in them are missing: ' +
        'local: /ci/build.yml; remote: https://example.com/ci.yml; project: group/templates, file: /deploy.yml; template: Auto-DevOps.gitlab-ci.yml',
    ]);
  });

  test('a missing job or template hints at unfetched includes', () => {
    const text = yaml('include: ci/templates.yml', 'job: {extends: .tpl}');
    throwsMayfly(() => parseCiFile(text, FILE), ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:2:16: job "job" extends ".tpl" which does not exist (the file defines no templates)',
      'It may be defined in an include, which mayfly exec does not fetch.');
  });

  test('local includes are read through readLocal and merged under the including file', () => {
    const files: Record<string, string> = {
      'ci/templates.yml': yaml('include: ci/more.yml', '.tpl:', '  image: alpine', '  script: [from-template]', 'variables: {A: included, B: included}'),
      'ci/more.yml': yaml('extra: {script: [more]}'),
    };
    const read: string[] = [];
    const ci = parseCiFile(yaml('include: [/ci/templates.yml, ci/templates.yml]', 'variables: {A: main}', 'job: {extends: .tpl}'), FILE, {
      readLocal: (path) => {
        read.push(path);
        const text = files[path];
        if (text === undefined) throw new Error('ENOENT');
        return text;
      },
    });
    assert.deepEqual(read, ['ci/templates.yml', 'ci/more.yml']);
    assert.deepEqual(ci.warnings, []);
    assert.deepEqual(ci.jobNames, ['extra', 'job']);
    assert.deepEqual(resolveJob(ci, 'job'), {
      ...EMPTY,
      name: 'job',
      image: 'alpine',
      variables: { A: 'main', B: 'included' },
      script: ['from-template'],
    });
  });

  test('errors in an included file name that file', () => {
    const opts = { readLocal: () => yaml('bad: [') };
    assert.throws(
      () => parseCiFile(yaml('include: {local: ci/x.yml}', 'job: {script: [x]}'), FILE, opts),
      (e: unknown) => e instanceof MayflyError && e.code === ErrorCode.CI_FILE_INVALID && e.message.startsWith('ci/x.yml:2:1: invalid YAML: '),
    );
    throwsMayfly(
      () => parseCiFile(yaml('include: {local: ci/x.yml}'), FILE, { readLocal: () => { throw new Error('ENOENT: no such file'); } }),
      ErrorCode.CI_FILE_INVALID,
      '.gitlab-ci.yml:1:1: cannot read included file "ci/x.yml": ENOENT: no such file',
    );
  });
});
