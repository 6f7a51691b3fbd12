import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { makeRepo, startGitServer, type GitServer } from '../helpers/git-http.ts';
import { bashQuote, runJob, type JobResult, type RunnerConfig } from '../helpers/gitlab-runner.ts';

// Self-test of the test helpers (no mayfly, no VM): the gitlab-runner imitation drives a fake
// custom executor that runs every stage locally with bash, and get_sources fetches from the
// git smart-HTTP helper.

const root = mkdtempSync(join(tmpdir(), 'mayfly-runner-imitation-'));
after(() => rmSync(root, { recursive: true, force: true }));

const DRIVER = `#!/usr/bin/env bash
# Fake custom executor: config/prepare/run/cleanup on this machine.
state="$FAKE_STATE"
case "$1" in
  config)
    if [ "\${FAKE_MODE:-}" = garbage ]; then
      echo "starting fake driver"   # a log line on stdout: not JSON
      exit 0
    fi
    echo "config says hello on stderr" >&2
    printf '{"builds_dir":"%s","cache_dir":"%s","hostname":"fake-host","driver":{"name":"fake","version":"1.0"},"job_env":{"FAKE_JOB_ENV":"from-config"}}\\n' "$state/builds" "$state/cache"
    ;;
  prepare)
    [ "\${FAKE_JOB_ENV:-}" = from-config ] || { echo "job_env missing" >&2; exit "$SYSTEM_FAILURE_EXIT_CODE"; }
    if [ "\${FAKE_MODE:-}" = prepare-fail ]; then echo "image not allowed" >&2; exit "$BUILD_FAILURE_EXIT_CODE"; fi
    echo "fake prepare for job $CUSTOM_ENV_CI_JOB_ID"
    ;;
  run)
    script="$2" stage="$3"
    case "$stage" in
      prepare_script|get_sources|clear_worktree|restore_cache|download_artifacts|build_script|step_*|after_script|archive_cache|archive_cache_on_failure|upload_artifacts_on_success|upload_artifacts_on_failure|cleanup_file_variables) ;;
      *) echo "fake driver: unknown stage $stage" >&2; exit "$SYSTEM_FAILURE_EXIT_CODE" ;;
    esac
    [ -f "$script" ] || exit "$SYSTEM_FAILURE_EXIT_CODE"
    echo "$stage $CUSTOM_ENV_CI_JOB_STATUS" >> "$state/stages.log"
    if [ "\${FAKE_MODE:-}" = flaky-sources ] && [ "$stage" = get_sources ] && [ ! -e "$state/flaked" ]; then
      touch "$state/flaked"
      echo "fake driver: guest unreachable" >&2
      exit "$SYSTEM_FAILURE_EXIT_CODE"
    fi
    if [ "\${FAKE_MODE:-}" = ignore-term ]; then
      trap '' TERM   # ignored signals stay ignored in the script's shells and in sleep
    else
      trap 'echo "fake driver: SIGTERM" >&2' TERM
    fi
    bash < "$script"
    rc=$?
    [ "$rc" -eq 0 ] && exit 0
    printf '%d\\n' "$rc" > "$BUILD_EXIT_CODE_FILE"
    exit "$BUILD_FAILURE_EXIT_CODE"
    ;;
  cleanup)
    echo "cleanup job=$CUSTOM_ENV_CI_JOB_ID tmp=$TMPDIR" >> "$state/cleanup.log"
    ;;
  *)
    exit "$SYSTEM_FAILURE_EXIT_CODE"
    ;;
esac
`;

const driver = join(root, 'driver');
writeFileSync(driver, DRIVER, { mode: 0o755 });

function setup(name: string, env: Record<string, string> = {}): { state: string; cfg: RunnerConfig } {
  const state = join(root, name);
  mkdirSync(state);
  return {
    state,
    cfg: {
      configExec: [driver, 'config'],
      prepareExec: [driver, 'prepare'],
      runExec: [driver, 'run'],
      cleanupExec: [driver, 'cleanup'],
      env: { FAKE_STATE: state, ...env },
      prepareRetryIntervalMs: 10,
      gracefulKillTimeoutMs: 5000,
      forceKillTimeoutMs: 2000,
    },
  };
}

function lines(path: string): string[] {
  return existsSync(path) ? readFileSync(path, 'utf8').split('\n').filter((l) => l !== '') : [];
}

function assertTmpDirsGone(r: JobResult): void {
  assert.ok(r.tmpDirs.length > 0);
  for (const d of r.tmpDirs) {
    assert.match(d, /\/custom-executor[^/]+$/);
    assert.equal(existsSync(d), false, `${d} left behind`);
  }
}

/** Processes whose command line contains `needle`. */
function processesWith(needle: string): number[] {
  const found: number[] = [];
  for (const p of readdirSync('/proc')) {
    if (!/^\d+$/.test(p) || Number(p) === process.pid) continue;
    try {
      if (readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0').includes(needle)) found.push(Number(p));
    } catch {
      // gone
    }
  }
  return found;
}

describe('bashQuote', () => {
  test('bash reads back exactly what was quoted', () => {
    const samples = [
      '',
      'plain',
      "it's",
      'back\\slash \\n not a newline',
      'new\nline\tand tab',
      'ctrl \x01\x1b[0m \x7f and \r',
      '$HOME `id` $(id) "double" ${x} !',
      'ünïcødé € 😀',
      "\\'",
      '\x01a\x1fF',
    ];
    for (const s of samples) {
      const out = execFileSync('bash', ['-c', `printf %s ${bashQuote(s)}`], { encoding: 'utf8' });
      assert.equal(out, s, `round trip of ${JSON.stringify(s)}`);
    }
  });
});

describe('gitlab-runner imitation with a fake executor', () => {
  const token = 'glcbt-64_secret-job-token';
  let server: GitServer;
  let repo: { sha: string; ref: string };

  before(async () => {
    const repos = join(root, 'repos');
    repo = await makeRepo(repos, { 'hello.txt': 'hello from the repo\n', 'sub/dir.txt': 'nested\n' });
    server = await startGitServer(repos, { user: 'gitlab-ci-token', password: token });
  });
  after(async () => {
    await server.close();
  });

  test('a passing job fetches over HTTP with the job token and runs script and after_script', async () => {
    const { state, cfg } = setup('pass');
    const r = await runJob(cfg, {
      id: 101,
      token,
      image: 'debian-12',
      repoUrl: `http://127.0.0.1:${server.port}/group/project.git`,
      sha: repo.sha,
      ref: repo.ref,
      gitDepth: 5,
      variables: [
        { key: 'FILE_VAR', value: 'content of a file variable\n', file: true },
        { key: 'SECRET', value: 'supersecret-value', masked: true },
        { key: 'DERIVED', value: 'dir=$CI_PROJECT_DIR' },
      ],
      script: [
        'cat hello.txt sub/dir.txt',
        'cat "$FILE_VAR"',
        'echo "secret=$SECRET"',
        'test "$(pwd)" = "$CI_PROJECT_DIR" && echo "in project dir"',
        'test "$DERIVED" = "dir=$CI_PROJECT_DIR" && echo "expanded ok"',
        '! grep -q gitlab-ci-token .git/config && echo "no token in .git/config"',
        'echo "head=$(git rev-parse HEAD)"',
      ],
      afterScript: ['echo "after status=$CI_JOB_STATUS"'],
    });
    assert.equal(r.status, 'success', r.rawLog);
    assert.deepEqual(r.stagesRun, ['prepare_script', 'get_sources', 'build_script', 'after_script', 'cleanup_file_variables']);
    assert.deepEqual(
      r.calls.map((c) => c.kind),
      ['config', 'prepare', 'run', 'run', 'run', 'run', 'run', 'cleanup'],
    );
    assert.equal(r.prepareAttempts, 1);
    for (const text of [
      'Using Custom executor with driver fake 1.0...',
      'config says hello on stderr',
      'fake prepare for job 101',
      'via fake-host...',
      'Fetching changes with git depth set to 5...',
      `Checking out ${repo.sha.slice(0, 8)} as detached HEAD (ref is main)...`,
      '$ cat hello.txt sub/dir.txt',
      'hello from the repo\nnested\n',
      'content of a file variable',
      'secret=[MASKED]',
      'in project dir',
      'expanded ok',
      'no token in .git/config',
      `head=${repo.sha}`,
      'after status=success',
      'Job succeeded',
    ]) {
      assert.ok(r.log.includes(text), `log lacks ${JSON.stringify(text)}:\n${r.log}`);
    }
    assert.ok(!r.log.includes('supersecret-value'));
    assert.ok(!r.log.includes(token));
    assert.ok(r.rawLog.includes('secret=supersecret-value'));
    assert.ok(server.authorizedRequests > 0, 'the git server was not used');

    const [config, prepare] = r.calls;
    assert.equal(config!.env.CUSTOM_ENV_CI_PROJECT_DIR, '');
    assert.equal(config!.env.CUSTOM_ENV_CI_BUILDS_DIR, '');
    assert.equal(config!.env.FAKE_JOB_ENV, undefined);
    const proj = join(state, 'builds', 'group', 'project');
    assert.equal(r.projectDir, proj);
    assert.equal(prepare!.env.CUSTOM_ENV_CI_PROJECT_DIR, proj);
    assert.equal(prepare!.env.FAKE_JOB_ENV, 'from-config');
    assert.equal(prepare!.env.CUSTOM_ENV_CI_JOB_IMAGE, 'debian-12');
    assert.equal(prepare!.env.CUSTOM_ENV_CI_JOB_SERVICES, '');
    assert.equal(prepare!.env.CUSTOM_ENV_FILE_VAR, 'content of a file variable\n');
    assert.equal(prepare!.env.CUSTOM_ENV_SECRET, 'supersecret-value');
    assert.equal(prepare!.env.CUSTOM_ENV_CI_REPOSITORY_URL, `http://gitlab-ci-token:${token}@127.0.0.1:${server.port}/group/project.git`);
    assert.equal(prepare!.env.CUSTOM_ENV_CI_PROJECT_PATH, 'group/project');
    assert.equal(prepare!.env.BUILD_EXIT_CODE_FILE, join(prepare!.cwd, 'build_exit_code'));
    assert.equal(prepare!.env.TMPDIR, prepare!.cwd);
    const run = r.calls[2]!;
    assert.deepEqual(run.argv.slice(0, 2), [driver, 'run']);
    assert.match(run.argv[2]!, /\/custom-executor[^/]+\/script[^/]+\/script$/);
    assert.equal(run.argv[3], 'prepare_script');

    assert.deepEqual(lines(join(state, 'stages.log')), [
      'prepare_script running',
      'get_sources running',
      'build_script running',
      'after_script success',
      'cleanup_file_variables success',
    ]);
    assert.equal(readFileSync(join(proj, 'hello.txt'), 'utf8'), 'hello from the repo\n');
    assert.equal(existsSync(`${proj}.tmp/FILE_VAR`), false, 'file variable not removed');
    assert.equal(existsSync(`${proj}.tmp/.gitlab-runner.ext.conf`), false, 'git credentials not removed');
    assert.equal(lines(join(state, 'cleanup.log')).length, 1);
    assertTmpDirsGone(r);
  });

  test('exit 3 in the script: failed with exit code 3, after_script sees CI_JOB_STATUS=failed', async () => {
    const { state, cfg } = setup('fail');
    const r = await runJob(cfg, {
      id: 102,
      token,
      repoUrl: `http://127.0.0.1:${server.port}/group/project.git`,
      sha: repo.sha,
      ref: repo.ref,
      gitStrategy: 'none',
      script: ['echo before', 'exit 3', 'echo never-printed'],
      afterScript: ['echo "after status=$CI_JOB_STATUS"'],
    });
    assert.equal(r.status, 'failed', r.rawLog);
    assert.equal(r.exitCode, 3);
    assert.equal(r.failureReason, 'script_failure');
    assert.ok(r.log.includes('after status=failed'), r.log);
    assert.ok(r.log.includes('ERROR: Job failed: exit code 3'));
    assert.ok(!r.log.includes('never-printed'));
    assert.deepEqual(r.stagesRun, ['prepare_script', 'get_sources', 'build_script', 'after_script', 'cleanup_file_variables']);
    assert.deepEqual(lines(join(state, 'stages.log')).slice(-2), ['after_script failed', 'cleanup_file_variables failed']);
    assert.equal(lines(join(state, 'cleanup.log')).length, 1);
    assertTmpDirsGone(r);
  });

  test('cancel during sleep: SIGTERM to the group, after_script with canceled, cleanup runs', async () => {
    const { state, cfg } = setup('cancel');
    const started = Date.now();
    const r = await runJob(cfg, {
      id: 103,
      token,
      repoUrl: `http://127.0.0.1:${server.port}/group/project.git`,
      sha: repo.sha,
      ref: repo.ref,
      gitStrategy: 'none',
      script: ['echo "mark-$((40 + 2))"', 'sleep 29.123', 'echo never-printed'],
      afterScript: ['echo "after status=$CI_JOB_STATUS"'],
      cancel: { stage: 'build_script', whenOutputIncludes: 'mark-42' },
    });
    assert.equal(r.status, 'canceled', r.rawLog);
    assert.ok(Date.now() - started < 10_000, 'cancel took too long');
    const build = r.calls.find((c) => c.stage === 'build_script')!;
    assert.ok(build.termSentAt !== undefined, 'no SIGTERM sent');
    assert.equal(build.killSentAt, undefined, 'needed SIGKILL');
    assert.ok(r.log.includes('after status=canceled'), r.log);
    assert.ok(!r.log.includes('never-printed'));
    assert.deepEqual(r.stagesRun, ['prepare_script', 'get_sources', 'build_script', 'after_script', 'cleanup_file_variables']);
    assert.equal(r.calls[r.calls.length - 1]!.kind, 'cleanup');
    assert.equal(lines(join(state, 'cleanup.log')).length, 1);
    assert.deepEqual(processesWith('29.123'), [], 'sleep left running');
    assertTmpDirsGone(r);
  });

  test('a run_exec ignoring SIGTERM is SIGKILLed after graceful_kill_timeout', async () => {
    const { cfg } = setup('ignore-term', { FAKE_MODE: 'ignore-term' });
    const r = await runJob(
      { ...cfg, gracefulKillTimeoutMs: 300 },
      {
        id: 106,
        token,
        repoUrl: `http://127.0.0.1:${server.port}/group/project.git`,
        sha: repo.sha,
        ref: repo.ref,
        gitStrategy: 'none',
        script: ['echo "mark-$((40 + 2))"', 'sleep 28.456'],
        cancel: { stage: 'build_script', whenOutputIncludes: 'mark-42' },
      },
    );
    assert.equal(r.status, 'canceled', r.rawLog);
    const build = r.calls.find((c) => c.stage === 'build_script')!;
    assert.ok(build.termSentAt !== undefined && build.killSentAt !== undefined);
    assert.ok(build.killSentAt - build.termSentAt >= 290);
    assert.equal(build.signal, 'SIGKILL');
    assert.deepEqual(processesWith('28.456'), [], 'sleep left running');
    assertTmpDirsGone(r);
  });

  test('get_sources is retried after clear_worktree when GET_SOURCES_ATTEMPTS allows', async () => {
    const { cfg } = setup('flaky-sources', { FAKE_MODE: 'flaky-sources' });
    const r = await runJob(cfg, {
      id: 107,
      token,
      repoUrl: `http://127.0.0.1:${server.port}/group/project.git`,
      sha: repo.sha,
      ref: repo.ref,
      getSourcesAttempts: 2,
      script: ['cat hello.txt'],
    });
    assert.equal(r.status, 'success', r.rawLog);
    assert.deepEqual(r.stagesRun, ['prepare_script', 'get_sources', 'clear_worktree', 'get_sources', 'build_script', 'cleanup_file_variables']);
    assert.ok(r.log.includes('hello from the repo'));
    assertTmpDirsGone(r);
  });

  test('config_exec printing garbage: 3 attempts, cleanup after each, system failure', async () => {
    const { state, cfg } = setup('garbage', { FAKE_MODE: 'garbage' });
    const r = await runJob(cfg, {
      id: 104,
      token,
      repoUrl: `http://127.0.0.1:${server.port}/group/project.git`,
      sha: repo.sha,
      ref: repo.ref,
      script: ['echo never'],
    });
    assert.equal(r.status, 'system_failure', r.rawLog);
    assert.equal(r.failureReason, 'runner_system_failure');
    assert.equal(r.prepareAttempts, 3);
    assert.deepEqual(
      r.calls.map((c) => c.kind),
      ['config', 'cleanup', 'config', 'cleanup', 'config', 'cleanup'],
    );
    assert.deepEqual(r.stagesRun, []);
    assert.equal(new Set(r.tmpDirs).size, 3);
    const cleanups = lines(join(state, 'cleanup.log'));
    assert.equal(cleanups.length, 3);
    // each cleanup ran in its own attempt's temp dir
    assert.deepEqual(
      cleanups.map((l) => l.replace(/^.*tmp=/, '')),
      r.tmpDirs,
    );
    assert.ok(!r.log.includes('starting fake driver'), 'config_exec stdout must not reach the job log');
    assert.match(r.log, /ERROR: Job failed \(system failure\): error while parsing JSON output of config_exec/);
    assertTmpDirsGone(r);
  });

  test('prepare_exec exiting with BUILD_FAILURE: no retry, cleanup, failed', async () => {
    const { state, cfg } = setup('prepare-fail', { FAKE_MODE: 'prepare-fail' });
    const r = await runJob(cfg, {
      id: 105,
      token,
      repoUrl: `http://127.0.0.1:${server.port}/group/project.git`,
      sha: repo.sha,
      ref: repo.ref,
      script: ['echo never'],
    });
    assert.equal(r.status, 'failed', r.rawLog);
    assert.equal(r.exitCode, 1);
    assert.equal(r.prepareAttempts, 1);
    assert.deepEqual(
      r.calls.map((c) => c.kind),
      ['config', 'prepare', 'cleanup'],
    );
    assert.ok(r.log.includes('image not allowed'));
    assert.equal(lines(join(state, 'cleanup.log')).length, 1);
    assertTmpDirsGone(r);
  });
});
