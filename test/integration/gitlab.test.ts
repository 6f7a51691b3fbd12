import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ImageStore } from '../../src/images/store.ts';
import { makeRepo, startGitServer, type GitServer, type MadeRepo } from '../helpers/git-http.ts';
import { mayflyStages, runJob, type JobResult, type JobSpec, type RunnerConfig } from '../helpers/gitlab-runner.ts';
import { collect, ensureImage, instanceDirs, mayfly, mayflyBin, processesMentioning, publishImageCopy, startMayfly, testDataDir, testEngine } from '../helpers/env.ts';

// mayfly behind an imitation of gitlab-runner's custom executor (test/helpers/gitlab-runner.ts,
// written from the protocol reference), with real machines and a git smart-HTTP server on the
// host's loopback, which the guests reach as 10.0.2.2 through QEMU's user-mode network.

const token = 'job-token-s3cret';

describe('mayfly gitlab (custom executor)', { timeout: 1_200_000 }, () => {
  let dir: string;
  let config: string;
  let git: GitServer;
  let repo: MadeRepo;
  let repoUrl: string;
  let nextJobId = 100;

  const runner = (extra: string[] = []): RunnerConfig => {
    return {
      ...mayflyStages(mayflyBin, ['--data-dir', testDataDir(), '--config', config], extra),
      // Long enough that only mayfly's own handling of SIGTERM can end a cancelled stage.
      gracefulKillTimeoutMs: 120_000,
      prepareRetryIntervalMs: 200,
    };
  };
  const job = (over: Partial<JobSpec>): JobSpec => ({
    id: nextJobId++,
    token,
    repoUrl,
    sha: repo.sha,
    ref: repo.ref,
    script: ['cat README.md'],
    ...over,
  });
  const machineOf = (r: JobResult): string => {
    const m = /mayfly: machine (vm-[a-z0-9]+): /.exec(r.log);
    assert.ok(m, `no machine line in the job log:\n${r.log}`);
    return m[1]!;
  };
  /** Nothing of any job may remain: machines, their processes and files, job records, temp dirs. */
  const assertNothingLeft = (r?: JobResult) => {
    assert.deepEqual(instanceDirs(), []);
    assert.deepEqual(processesMentioning(join(testDataDir(), 'instances')), []);
    const engine = testEngine();
    try {
      assert.deepEqual(engine.state.listJobs(), []);
      assert.deepEqual(engine.state.listInstances(), []);
    } finally {
      engine.close();
    }
    for (const d of r?.tmpDirs ?? []) assert.equal(existsSync(d), false, `the runner's temp dir ${d} is gone`);
  };
  const stagesOf = (r: JobResult) => r.stagesRun.join(' ');

  before(async () => {
    await ensureImage();
    dir = mkdtempSync('/var/tmp/mayfly-gitlab-');
    // A second image, so that the job's image: visibly picks one: the default image's files
    // published again under another name (hard links; clones only read them).
    if (new ImageStore(testDataDir()).versions('other-image').length === 0) publishImageCopy('other-image', '1');
    config = join(dir, 'config.toml');
    writeFileSync(
      config,
      [
        '[daemon]',
        // Never a daemon that may run on this host: only the one a test starts.
        `socket = "${join(dir, 'mayfly.sock')}"`,
        'reconcile_interval = 1',
        '[gitlab]',
        'kill_grace = 5',
        '[gitlab.images]',
        '"registry.example.com/ci/tools:2" = "other-image"',
        '"debian:bookworm" = "debian-12"',
        '[[pool]]',
        'name = "warm"',
        'image = "debian-12"',
        'size = "2cpu1024mb4gb"',
        'idle_count = 1',
        'max_instances = 2',
      ].join('\n') + '\n',
    );
    const gitRoot = join(dir, 'git');
    repo = await makeRepo(gitRoot, { 'README.md': 'hello from the repository\n', 'src/app.sh': 'echo app\n' });
    git = await startGitServer(gitRoot, { user: 'gitlab-ci-token', password: token });
    repoUrl = `http://10.0.2.2:${git.port}/group/project.git`;
  });

  after(async () => {
    await git?.close();
    rmSync(dir, { recursive: true, force: true });
    const store = new ImageStore(testDataDir());
    if (store.versions('other-image').length > 0) store.remove('other-image', 1);
  });

  test('a passing job: sources over git on the host loopback, script, after_script, nothing left', async () => {
    const r = await runJob(runner(), job({ script: ['cat README.md', 'sh src/app.sh', 'git log --format=%H -1'], afterScript: ['echo "after: $CI_JOB_STATUS"'] }));
    assert.equal(r.status, 'success', r.log);
    assert.equal(stagesOf(r), 'prepare_script get_sources build_script after_script cleanup_file_variables');
    assert.match(r.log, /Using Custom executor with driver mayfly /);
    assert.match(r.log, /mayfly: machine vm-[a-z0-9]+: debian-12:\d+ \(the job names no image: default\), 2 CPU, 1024 MiB, 4 GiB disk, (booted|restored) in [\d.]+ s/);
    assert.match(r.log, /\nhello from the repository\n\$ sh src\/app.sh\napp\n/);
    assert.ok(r.log.includes(repo.sha), 'the checkout is the job\'s commit');
    assert.match(r.log, /after: success/);
    assert.ok(git.authorizedRequests > 0, 'the machine fetched from the git server with the job token');
    assert.ok(!r.log.includes(token), 'the job token never shows in the job log');
    assertNothingLeft(r);
  });

  test('exit 3: a build failure with 3 in BUILD_EXIT_CODE_FILE; after_script still runs; the job image picks the machine image', async () => {
    const r = await runJob(runner(), job({ image: 'registry.example.com/ci/tools:2', script: ['echo before', 'exit 3', 'echo not reached'], afterScript: ['echo "after: $CI_JOB_STATUS"'] }));
    assert.equal(r.status, 'failed', r.log);
    assert.equal(r.exitCode, 3);
    const build = r.calls.find((c) => c.stage === 'build_script')!;
    assert.equal(build.exitCode, 1, 'BUILD_FAILURE_EXIT_CODE, not the script\'s own code');
    assert.match(r.log, /mayfly: machine vm-[a-z0-9]+: other-image:1 \(registry.example.com\/ci\/tools:2 → other-image \(gitlab.images\)\)/);
    assert.ok(!r.log.includes('not reached'));
    assert.match(r.log, /after: failed/);
    assert.equal(stagesOf(r), 'prepare_script get_sources build_script after_script cleanup_file_variables');
    assertNothingLeft(r);
  });

  test('an unknown or unbuilt image is a system failure with a clear message; cleanup still runs', async () => {
    const r = await runJob(runner(), job({ image: 'alpine:3.20' }));
    assert.equal(r.status, 'system_failure', r.log);
    assert.match(r.log, /mayfly: system failure: the job's image 'alpine:3.20' is not a mayfly image and is not mapped to one\. Images on this runner: .*debian-12/);
    assert.match(r.log, /"debian:bookworm" → debian-12/);
    assert.equal(r.prepareAttempts, 3, 'a system failure of prepare is retried by the runner');
    assert.equal(r.calls.filter((c) => c.kind === 'cleanup').length, 3, 'cleanup after every attempt');
    assert.deepEqual(r.stagesRun, []);

    const missing = await runJob(runner(['--default-image', 'never-built']), job({}));
    assert.equal(missing.status, 'system_failure');
    assert.match(missing.log, /the default image never-built is not built on this runner host/);
    assert.match(missing.log, /hint: build it on the runner host: mayfly image build never-built/);
    assertNothingLeft(missing);
  });

  test('cancelled mid-script: the whole process tree in the machine stops at once, after_script sees none of it', async () => {
    const r = await runJob(
      runner(),
      job({
        script: ['sleep 600 &', '(trap "" TERM; exec sleep 601) &', 'echo "mark-$((40+2))"', 'sleep 602'],
        // /proc rather than ps: the check must not depend on procps being in the image.
        afterScript: ['n=0; for f in /proc/[0-9]*/comm; do [ "$(cat $f 2>/dev/null)" = sleep ] && n=$((n+1)); done; echo "sleepers=$n status=$CI_JOB_STATUS"'],
        cancel: { stage: 'build_script', whenOutputIncludes: 'mark-42' },
      }),
    );
    assert.equal(r.status, 'canceled', r.log);
    const build = r.calls.find((c) => c.stage === 'build_script')!;
    assert.ok(build.termSentAt, 'the runner sent SIGTERM');
    assert.equal(build.killSentAt, undefined, 'mayfly ended the stage itself: the runner never had to SIGKILL it');
    assert.equal(build.signal, null);
    assert.match(r.log, /sleepers=0 status=canceled/, 'the background sleeps, even the one ignoring SIGTERM, are gone');
    assert.equal(stagesOf(r), 'prepare_script get_sources build_script after_script cleanup_file_variables');
    assertNothingLeft(r);
  });

  test('two jobs at once get different machines and cannot see each other\'s files', async () => {
    const script = (id: string, other: string) => [
      `echo ${id} > /builds/marker-${id}`,
      'sleep 2',
      `ls /builds/marker-${other} 2>/dev/null && echo "SEES ${other}" || echo "alone ${id}"`,
    ];
    const [a, b] = await Promise.all([
      runJob(runner(), job({ script: script('a', 'b') })),
      runJob(runner(), job({ script: script('b', 'a') })),
    ]);
    assert.equal(a.status, 'success', a.log);
    assert.equal(b.status, 'success', b.log);
    assert.notEqual(machineOf(a), machineOf(b));
    // Output lines, not the runner's "$ command" echo lines.
    assert.match(a.log, /^alone a$/m);
    assert.match(b.log, /^alone b$/m);
    assert.doesNotMatch(a.log + b.log, /^SEES/m);
    assertNothingLeft(a);
  });

  test('prepare is safe to repeat for one job: the second attempt replaces the first machine', async () => {
    const tmp = mkdtempSync(join(dir, 'custom-executor'));
    const env = {
      ...process.env, TMPDIR: tmp, BUILD_FAILURE_EXIT_CODE: '1', SYSTEM_FAILURE_EXIT_CODE: '2',
      BUILD_EXIT_CODE_FILE: join(tmp, 'build_exit_code'), CUSTOM_ENV_CI_JOB_ID: String(nextJobId++), CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN: 'abcd1234',
    };
    const gl = (args: string[]) => mayfly(['--config', config, 'gitlab', ...args], { cwd: tmp, env });
    const first = await gl(['prepare']);
    assert.equal(first.code, 0, first.stderr);
    const second = await gl(['prepare']);
    assert.equal(second.code, 0, second.stderr);
    assert.match(second.stderr, /mayfly: before preparing: destroyed machine vm-/);
    const engine = testEngine();
    try {
      assert.equal(engine.state.listInstances().length, 1);
      assert.equal(engine.state.listJobs().length, 1);
    } finally {
      engine.close();
    }
    const clean = await gl(['cleanup']);
    assert.equal(clean.code, 0, clean.stderr);
    assert.equal((await gl(['cleanup'])).code, 0, 'cleanup twice is fine');
    rmSync(tmp, { recursive: true, force: true });
    assertNothingLeft();
  });

  describe('with mayflyd', () => {
    let daemon: ChildProcess | undefined;
    let daemonLog = '';
    before(async () => {
      daemon = startMayfly(['--config', config, 'daemon']);
      daemon.stderr!.on('data', (c: Buffer) => (daemonLog += c.toString()));
      daemon.stdout!.resume();
      const end = Date.now() + 240_000;
      for (;;) {
        const r = await mayfly(['--config', config, 'pool', 'ls', '--json']);
        if (r.code === 0 && (JSON.parse(r.stdout) as { idle: number }[])[0]!.idle >= 1) break;
        if (Date.now() > end) throw new Error(`the pool never had an idle machine; daemon log:\n${daemonLog}`);
        await new Promise((res) => setTimeout(res, 500));
      }
    });
    // Leases held now (the shared state also lists expired ones from other test files).
    const heldLeases = async () => {
      const r = await mayfly(['--config', config, 'lease', 'ls', '--json']);
      return (JSON.parse(r.stdout) as { id: string; state: string }[]).filter((l) => l.state === 'leased').map((l) => l.id);
    };
    after(async () => {
      if (daemon && daemon.exitCode === null) {
        daemon.kill('SIGTERM');
        await collect(daemon);
      }
    });

    test('a job takes the warm machine from the pool; cleanup releases the lease', async () => {
      const r = await runJob(runner(), job({ image: 'debian:bookworm', script: ['cat README.md', 'hostname'] }));
      assert.equal(r.status, 'success', r.log);
      assert.match(r.log, /mayfly: machine vm-[a-z0-9]+: debian-12:\d+ \(debian:bookworm → debian-12 \(gitlab.images\)\), 2 CPU, 1024 MiB, 4 GiB disk, from pool warm after [\d.]+ s/);
      assert.match(r.log, /hello from the repository/);
      assert.match(r.runnerLog, /released lease /);
      assert.deepEqual(await heldLeases(), [], 'no lease is held after cleanup');
    });

    test('a cancelled job on a pool machine is stopped the same way', async () => {
      const r = await runJob(
        runner(['--pool', 'warm']),
        job({
          script: ['sleep 600 &', 'echo "mark-$((40+2))"', 'sleep 601'],
          afterScript: ['n=0; for f in /proc/[0-9]*/comm; do [ "$(cat $f 2>/dev/null)" = sleep ] && n=$((n+1)); done; echo "sleepers=$n"'],
          cancel: { stage: 'build_script', whenOutputIncludes: 'mark-42' },
        }),
      );
      assert.equal(r.status, 'canceled', r.log);
      assert.equal(r.calls.find((c) => c.stage === 'build_script')!.killSentAt, undefined);
      assert.match(r.log, /sleepers=0/);
      assert.deepEqual(await heldLeases(), []);
    });
  });
});
