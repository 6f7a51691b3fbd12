import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ensureImage, instanceDirs, mayfly } from '../helpers/env.ts';

// `mayfly exec JOB` on a real git repository, each job in a fresh VM.

const ciFile = `
variables:
  GREETING: "hello world"
  DERIVED: "$GREETING from $CI_PROJECT_NAME"

.defaults: &defaults
  image: debian-12
  before_script:
    - echo "before $GREETING"

.common-script:
  script:
    - echo "from a reference"

.base:
  <<: *defaults
  variables:
    LEVEL: base
  after_script:
    - echo "after status=$CI_JOB_STATUS level=$LEVEL"

.middle:
  extends: .base
  variables:
    LEVEL: middle

build:
  extends: .middle
  stage: build
  services: [postgres]
  cache:
    paths: [vendor]
  variables:
    QUOTED: "it's \\"quoted\\" $$ literal"
  script:
    - !reference [.common-script, script]
    - echo "derived=$DERIVED level=$LEVEL quoted=$QUOTED override=$OVERRIDE"
    - test "$(pwd)" = "$CI_PROJECT_DIR"
    - cat tracked.txt untracked.txt
    - test ! -e ignored.txt && echo "ignored file not copied"
    - git log -1 --format=%s
    - echo "job=$CI_JOB_NAME stage=$CI_JOB_STAGE sha=$CI_COMMIT_SHORT_SHA branch=$CI_COMMIT_REF_NAME ci=$CI"

test-fail:
  extends: .base
  script:
    - echo "step one"
    - echo piped | cat
    - sh -c 'exit 3'
    - echo "never printed"
`;

describe('mayfly exec', { timeout: 900_000 }, () => {
  let repo: string;

  before(async () => {
    await ensureImage();
    repo = mkdtempSync('/var/tmp/mayfly-exec-repo-');
    const git = (...args: string[]) => execFileSync('git', ['-C', repo, ...args], { stdio: 'pipe' });
    git('init', '-q', '-b', 'feature/x');
    writeFileSync(join(repo, '.gitlab-ci.yml'), ciFile);
    writeFileSync(join(repo, 'tracked.txt'), 'tracked content\n');
    writeFileSync(join(repo, '.gitignore'), 'ignored.txt\n');
    git('add', '.');
    git('-c', 'user.name=t', '-c', 'user.email=t@example.invalid', 'commit', '-q', '-m', 'first commit title');
    writeFileSync(join(repo, 'untracked.txt'), 'untracked content\n');
    writeFileSync(join(repo, 'ignored.txt'), 'must not be copied\n');
  });

  after(() => {
    if (repo) rmSync(repo, { recursive: true, force: true });
  });

  test('a job with extends, anchors, !reference and variables runs in the working tree copy', async () => {
    const r = await mayfly(['exec', 'build', '--var', 'OVERRIDE=from cli'], { cwd: repo });
    assert.equal(r.code, 0, r.stderr);
    const lines = r.stdout.replace(/\x1b\[[0-9;]*m/g, '').split('\n');
    const name = repo.split('/').at(-1);
    assert.ok(lines.includes('before hello world'), r.stdout);
    assert.ok(lines.includes('from a reference'));
    assert.ok(lines.includes(`derived=hello world from ${name} level=middle quoted=it's "quoted" $ literal override=from cli`), r.stdout);
    assert.ok(lines.includes('tracked content'));
    assert.ok(lines.includes('untracked content'));
    assert.ok(lines.includes('ignored file not copied'));
    assert.ok(lines.includes('first commit title'));
    assert.match(r.stdout, /job=build stage=build sha=[0-9a-f]{8} branch=feature\/x ci=true/);
    assert.ok(lines.includes('after status=success level=middle'));
    assert.match(r.stderr, /does not run: cache, services/, 'ignored keywords are listed, not silently dropped');
    assert.deepEqual(instanceDirs(), []);
  });

  test('a failing script stops at the first failure, after_script still runs, the exit code is the job\'s', async () => {
    const r = await mayfly(['exec', 'test-fail'], { cwd: repo });
    assert.equal(r.code, 3, r.stderr);
    const out = r.stdout.replace(/\x1b\[[0-9;]*m/g, '');
    assert.match(out, /^before hello world$/m);
    assert.match(out, /^step one$/m);
    assert.match(out, /^piped$/m);
    assert.doesNotMatch(out, /^never printed$/m);
    assert.match(out, /^after status=failed level=base$/m);
    assert.match(r.stderr, /job failed: exit code 3/);
    assert.deepEqual(instanceDirs(), []);
  });

  test('bad inputs give a clear error and a non-zero exit before any machine starts', async () => {
    const unknown = await mayfly(['exec', 'nope'], { cwd: repo });
    assert.notEqual(unknown.code, 0);
    assert.match(unknown.stderr, /no job "nope" in \.gitlab-ci\.yml; jobs: build, test-fail/);

    const hidden = await mayfly(['exec', '.base'], { cwd: repo });
    assert.notEqual(hidden.code, 0);
    assert.match(hidden.stderr, /hidden/);

    const bad = mkdtempSync('/var/tmp/mayfly-exec-bad-');
    try {
      execFileSync('git', ['-C', bad, 'init', '-q']);
      writeFileSync(join(bad, '.gitlab-ci.yml'), 'job:\n  script:\n    - echo ok\n  variables: [unclosed\n');
      const malformed = await mayfly(['exec', 'job'], { cwd: bad });
      assert.notEqual(malformed.code, 0);
      assert.match(malformed.stderr, /\.gitlab-ci\.yml:\d+:\d+/);

      const missing = await mayfly(['exec', '--file', 'nowhere.yml', 'job'], { cwd: bad });
      assert.notEqual(missing.code, 0);
      assert.match(missing.stderr, /no CI file at .*nowhere\.yml/);

      const noGit = join(bad, 'plain');
      mkdirSync(noGit);
      writeFileSync(join(noGit, '.gitlab-ci.yml'), 'job:\n  script: [true]\n');
      const notRepo = await mayfly(['exec', 'job'], { cwd: noGit, env: { GIT_CEILING_DIRECTORIES: bad } });
      assert.notEqual(notRepo.code, 0);
      assert.match(notRepo.stderr, /is not inside a git repository/);

      writeFileSync(join(bad, 'secret.yml'), 'creds:\n  token: s3cr3t\n');
      mkdirSync(join(bad, 'repo'));
      execFileSync('git', ['-C', join(bad, 'repo'), 'init', '-q']);
      writeFileSync(join(bad, 'repo', '.gitlab-ci.yml'), 'include:\n  - local: ../secret.yml\njob:\n  script: [true]\n');
      const escape = await mayfly(['exec', 'job'], { cwd: join(bad, 'repo') });
      assert.notEqual(escape.code, 0);
      assert.match(escape.stderr, /include: local file '\.\.\/secret\.yml' is outside the repository/);

      const badVar = await mayfly(['exec', 'job', '--var', 'NOT-VALID=1'], { cwd: noGit });
      assert.equal(badVar.code, 2);
      assert.match(badVar.stderr, /'NOT-VALID' is not a valid variable name/);
    } finally {
      rmSync(bad, { recursive: true, force: true });
    }
    assert.deepEqual(instanceDirs(), []);
  });
});
