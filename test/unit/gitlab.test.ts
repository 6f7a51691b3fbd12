import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, describe, test } from 'node:test';
import { parse as parseToml } from 'smol-toml';
import { defaultConfig, type Config } from '../../src/config/index.ts';
import { ErrorCode } from '../../src/errors.ts';
import { executorEnv, gitlabJobId, jobTimeoutSeconds } from '../../src/integrations/gitlab/executor-env.ts';
import { gitlabCleanup, gitlabConfig, gitlabPrepare, gitlabRun, type ExecutorDeps } from '../../src/integrations/gitlab/executor.ts';
import { chooseImage } from '../../src/integrations/gitlab/image-choice.ts';
import { stageArgv, sweepArgv } from '../../src/integrations/gitlab/stage.ts';
import { runnerToml } from '../../src/integrations/gitlab/toml.ts';
import { ImageStore } from '../../src/images/store.ts';
import { silentLogger } from '../../src/log.ts';
import { Engine } from '../../src/pool/index.ts';
import { catchMayfly } from '../helpers/assert.ts';

const root = mkdtempSync(join(tmpdir(), 'mayfly-gitlab-unit-'));
after(() => rmSync(root, { recursive: true, force: true }));

/** A data dir whose image store holds fake (unbootable) images with the given names. */
function dataDirWith(...images: string[]): string {
  const dir = mkdtempSync(join(root, 'data-'));
  const store = new ImageStore(dir);
  for (const [i, name] of images.entries()) {
    mkdirSync(join(store.root, '.tmp'), { recursive: true });
    const prep = mkdtempSync(join(store.root, '.tmp', 'prep-'));
    for (const f of ['disk.qcow2', 'vmlinuz', 'initrd.img']) writeFileSync(join(prep, f), f);
    store.publish(prep, {
      name, id: `sha256:${String(i + 1).repeat(64)}`, kind: 'vm', createdAt: new Date().toISOString(),
      source: { type: 'recipe', recipe: 'test', suite: 'bookworm', packages: [] }, disk: 'disk.qcow2', kernel: 'vmlinuz',
      initrd: 'initrd.img', kernelArgs: '', diskVirtualBytes: 1024 ** 3, identity: 'fw_cfg', user: 'ci',
    });
  }
  return dir;
}

describe('the executor environment', () => {
  test('exit codes come from the runner, with its values as fallbacks', () => {
    const e = executorEnv({ BUILD_FAILURE_EXIT_CODE: '17', SYSTEM_FAILURE_EXIT_CODE: '23', BUILD_EXIT_CODE_FILE: '/tmp/x/build_exit_code' });
    assert.equal(e.buildFailureExitCode, 17);
    assert.equal(e.systemFailureExitCode, 23);
    assert.equal(e.buildExitCodeFile, '/tmp/x/build_exit_code');
    const d = executorEnv({});
    assert.equal(d.buildFailureExitCode, 1);
    assert.equal(d.systemFailureExitCode, 2);
    assert.equal(catchMayfly(() => executorEnv({ SYSTEM_FAILURE_EXIT_CODE: 'two' })).code, ErrorCode.USAGE);
  });

  test('a job is keyed by runner token and job id; job variables are the CUSTOM_ENV_ ones', () => {
    const e = executorEnv({ CUSTOM_ENV_CI_JOB_ID: '4711', CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN: 'ab/cd', CUSTOM_ENV_CI_PROJECT_PATH: 'g/p', CI_JOB_ID: '1' });
    assert.deepEqual(gitlabJobId(e), { key: 'gitlab/abcd/4711', jobId: '4711', project: 'g/p' });
    assert.equal(gitlabJobId(executorEnv({ CUSTOM_ENV_CI_JOB_ID: '5' })).key, 'gitlab/runner/5');
    assert.match(catchMayfly(() => gitlabJobId(executorEnv({ CI_JOB_ID: '1' }))).message, /CUSTOM_ENV_CI_JOB_ID is not set/);
    assert.match(catchMayfly(() => gitlabJobId(executorEnv({ CUSTOM_ENV_CI_JOB_ID: '../x' }))).message, /is not a job id/);
    assert.equal(jobTimeoutSeconds(executorEnv({ CUSTOM_ENV_CI_JOB_TIMEOUT: '600' })), 600);
    assert.equal(jobTimeoutSeconds(executorEnv({ CUSTOM_ENV_CI_JOB_TIMEOUT: 'soon' })), 3600);
  });
});

describe('choosing the image', () => {
  const images = new ImageStore(dataDirWith('debian-12', 'debian-12', 'tools'));
  const rules = { map: { 'debian:bookworm': 'debian-12:1', 'ruby:3.3': 'ruby' }, defaultImage: 'debian-12' };

  test('no image: the default; a mapped image; a mayfly image named directly', () => {
    assert.equal(chooseImage(undefined, rules, images).image.version, 2);
    assert.equal(chooseImage('  ', rules, images).why, 'the job names no image: default');
    const mapped = chooseImage('debian:bookworm', rules, images);
    assert.deepEqual([mapped.image.name, mapped.image.version], ['debian-12', 1]);
    assert.match(mapped.why, /debian:bookworm → debian-12:1/);
    assert.equal(chooseImage('tools', rules, images).image.name, 'tools');
    assert.equal(chooseImage('debian-12:1', rules, images).image.version, 1);
  });

  test('an unknown image lists what there is and how to map it', () => {
    const e = catchMayfly(() => chooseImage('alpine:3.20', rules, images));
    assert.equal(e.code, ErrorCode.IMAGE_NOT_FOUND);
    assert.match(e.message, /'alpine:3.20' is not a mayfly image/);
    assert.match(e.message, /debian-12 \(versions 1, 2\), tools \(versions 1\)/);
    assert.match(e.message, /"ruby:3.3" → ruby/);
    assert.match(e.hint!, /\[gitlab.images\]\n    "alpine:3.20" = /);
  });

  test('a mapping to an image that is not built says how to build it', () => {
    const e = catchMayfly(() => chooseImage('ruby:3.3', rules, images));
    assert.match(e.message, /image ruby \(mapped from ruby:3.3\) is not built/);
    assert.match(e.hint!, /mayfly image build ruby/);
    assert.match(catchMayfly(() => chooseImage('debian-12:9', rules, images)).hint!, /versions: 1, 2/);
  });
});

describe('config_exec and the runner snippet', () => {
  test('config prints one JSON document with what the runner reads', () => {
    const doc = JSON.parse(gitlabConfig(defaultConfig())) as Record<string, unknown>;
    assert.equal(doc.builds_dir, '/builds');
    assert.equal(doc.cache_dir, '/cache');
    assert.equal(doc.builds_dir_is_shared, false);
    assert.equal(doc.shell, 'bash');
    assert.equal((doc.driver as { name: string }).name, 'mayfly');
    assert.equal(typeof doc.hostname, 'string');
  });

  test('toml is valid TOML with absolute execs and the four commands', () => {
    const config: Config = { ...defaultConfig(), gitlab: { ...defaultConfig().gitlab, builds_dir: '/work', kill_grace: 20 } };
    const text = runnerToml({
      name: 'host "a"', url: 'https://gitlab.test/', token: 'glrt-x', exe: '/usr/local/bin/mayfly',
      globalArgs: ['--data-dir', '/srv/mayfly'], pool: 'warm', config,
    });
    const doc = parseToml(text) as { runners: Record<string, unknown>[] };
    assert.equal(doc.runners.length, 1);
    const r = doc.runners[0]!;
    assert.equal(r.name, 'host "a"');
    assert.equal(r.executor, 'custom');
    assert.equal(r.builds_dir, '/work');
    assert.equal(r.url, 'https://gitlab.test/');
    const c = r.custom as Record<string, unknown>;
    for (const k of ['config', 'prepare', 'run', 'cleanup']) assert.equal(c[`${k}_exec`], '/usr/local/bin/mayfly');
    assert.deepEqual(c.prepare_args, ['--data-dir', '/srv/mayfly', 'gitlab', 'prepare', '--pool', 'warm']);
    assert.deepEqual(c.run_args, ['--data-dir', '/srv/mayfly', 'gitlab', 'run']);
    assert.ok((c.graceful_kill_timeout as number) > 20, 'the runner must wait longer than mayfly\'s own grace');
  });
});

describe('a stage in its own session', () => {
  /** Processes whose session id is `sid`. */
  function sessionMembers(sid: number): number[] {
    const out: number[] = [];
    for (const p of readdirSync('/proc')) {
      if (!/^\d+$/.test(p)) continue;
      try {
        const stat = readFileSync(`/proc/${p}/stat`, 'utf8');
        const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
        if (f[0] !== 'Z' && Number(f[3]) === sid) out.push(Number(p));
      } catch {
        // gone meanwhile
      }
    }
    return out;
  }

  function run(argv: string[], stdin = ''): Promise<{ code: number | null; out: string }> {
    const child = spawn(argv[0]!, argv.slice(1), { stdio: ['pipe', 'pipe', 'inherit'] });
    let out = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    child.stdin.end(stdin);
    return new Promise((resolve) => child.on('close', (code) => resolve({ code, out })));
  }

  test('the sweep ends the whole tree: background jobs, and with KILL what ignores TERM', { timeout: 30_000 }, async () => {
    const file = join(root, 'stage.sid');
    // Like a job script: a background service, one that ignores TERM, and a foreground command.
    const stage = run(stageArgv(file), 'sleep 301 &\n(trap "" TERM; exec sleep 302) &\nsleep 303\necho not reached\n');
    let sid = 0;
    for (let i = 0; i < 100 && !sid; i++) {
      await sleep(50);
      if (existsSync(file)) sid = Number(readFileSync(file, 'utf8'));
    }
    assert.ok(sid > 0, 'the stage wrote its session id');
    for (let i = 0; i < 100 && sessionMembers(sid).length < 4; i++) await sleep(50);
    assert.equal(sessionMembers(sid).length, 4, 'bash and three sleeps');

    const term = await run(sweepArgv('TERM', file));
    assert.equal(term.code, 0);
    assert.equal(term.out.trim(), '4');
    for (let i = 0; i < 40 && sessionMembers(sid).length > 1; i++) await sleep(50);
    assert.equal(sessionMembers(sid).length, 1, 'only the process that ignores TERM is left');

    // It still holds the stage's stdout, so the stage has not ended for its reader yet.
    assert.equal((await run(sweepArgv('KILL', file))).out.trim(), '1');
    const ended = await stage;
    assert.ok(!ended.out.includes('not reached'));
    assert.equal(ended.code, 143, 'the stage reports a signal as a shell does: 128 + SIGTERM');
    assert.deepEqual(sessionMembers(sid), []);
    assert.equal(existsSync(file), false, 'the KILL sweep removed the session file');
  });

  test('a stage that ends normally removes its session file and keeps its exit status', async () => {
    const file = join(root, 'normal.sid');
    const r = await run(stageArgv(file), 'echo "in $(cat ' + file + ')"\nexit 7\n');
    assert.equal(r.code, 7);
    assert.match(r.out, /^in \d+\n$/);
    assert.equal(existsSync(file), false);
  });

  test('a sweep without a recorded session signals nothing', async () => {
    assert.equal((await run(sweepArgv('TERM', join(root, 'no-such.sid')))).out.trim(), '0');
    const junk = join(root, 'junk.sid');
    writeFileSync(junk, '1; rm -rf /\n');
    assert.equal((await run(sweepArgv('TERM', junk))).out.trim(), '0');
  });
});

describe('the execs without a machine', () => {
  const dataDir = dataDirWith('debian-12');
  const tmp = mkdtempSync(join(root, 'custom-executor'));
  const env = (extra: Record<string, string> = {}): NodeJS.ProcessEnv => ({
    BUILD_FAILURE_EXIT_CODE: '11', SYSTEM_FAILURE_EXIT_CODE: '22', BUILD_EXIT_CODE_FILE: join(tmp, 'build_exit_code'),
    CUSTOM_ENV_CI_JOB_ID: '99', CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN: 'tok', ...extra,
  });
  let engine: Engine | undefined;
  after(() => engine?.close());
  function deps(e: NodeJS.ProcessEnv): ExecutorDeps & { output: () => string } {
    let output = '';
    const config = { ...defaultConfig(), daemon: { ...defaultConfig().daemon, socket: join(root, 'no-daemon.sock') } };
    return {
      config, log: silentLogger, env: e,
      engine: () => (engine ??= new Engine({ dataDir, config, log: silentLogger })),
      out: (s) => (output += s), err: (s) => (output += s), output: () => output,
    };
  }
  const signal = new AbortController().signal;

  test('an unknown job image is a system failure that lists the images, and nothing is created', async () => {
    const d = deps(env({ CUSTOM_ENV_CI_JOB_IMAGE: 'alpine:3.20' }));
    assert.equal(await gitlabPrepare(d, { signal }), 22);
    assert.match(d.output(), /system failure: the job's image 'alpine:3.20' is not a mayfly image.*debian-12 \(versions 1\)/s);
    assert.deepEqual(d.engine().state.listInstances(), []);
    assert.deepEqual(d.engine().state.listJobs(), []);
  });

  test('a bad size variable fails the build (no retry) and names the variable', async () => {
    const d = deps(env({ CUSTOM_ENV_MAYFLY_SIZE: 'huge' }));
    assert.equal(await gitlabPrepare(d, { signal }), 11);
    assert.match(d.output(), /error: the job variable MAYFLY_SIZE: 'huge' is not a size/);
    const big = deps(env({ CUSTOM_ENV_MAYFLY_SIZE: '999cpu1gb10gb' }));
    assert.equal(await gitlabPrepare(big, { signal }), 11);
    assert.match(big.output(), /MAYFLY_SIZE=999cpu1gb10gb: 999 CPUs asked for/);
  });

  test('a pool without mayflyd is a system failure that says so', async () => {
    const d = deps(env());
    assert.equal(await gitlabPrepare(d, { pool: 'warm', signal }), 22);
    assert.match(d.output(), /pool warm needs mayflyd, and none answers/);
  });

  test('run without a prepared machine is a system failure and leaves the exit code file alone', async () => {
    const script = join(tmp, 'script');
    writeFileSync(script, 'echo hi\n');
    const d = deps(env());
    const code = await gitlabRun(d, { scriptPath: script, stage: 'build_script', signal, stdout: () => {}, stderr: () => {} });
    assert.equal(code, 22);
    assert.match(d.output(), /no machine is recorded for gitlab\/tok\/99/);
    assert.equal(existsSync(join(tmp, 'build_exit_code')), false);
  });

  test('cleanup with nothing to clean succeeds, twice', async () => {
    for (let i = 0; i < 2; i++) {
      const d = deps(env());
      assert.equal(await gitlabCleanup(d), 0);
      assert.match(d.output(), /gitlab\/tok\/99: nothing to clean up/);
    }
  });
});
