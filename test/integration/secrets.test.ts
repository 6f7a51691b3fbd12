import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { generateKeyPair } from '../../src/guest/index.ts';
import { collect, ensureImage, instanceDirs, mayfly, processesMentioning, startMayfly, testDataDir, waitFor } from '../helpers/env.ts';

// Secrets are never written to logs or events. Secrets are planted where real commands carry
// them — `mayfly run` through mayflyd with --secret-env, -e values named like secrets, a
// private key, a secret in the command line itself; the GitLab stages with a job token in
// CUSTOM_ENV_CI_JOB_TOKEN and inside the repository URL — and every log line (debug level, of
// the clients and the daemon), every event and the whole state database are searched for them.
// The machines did get them (the jobs check their values), and the searches find the redaction
// marker where the secrets would otherwise have been (instance owners, the lease's job name).
// Secret files on the host are checked for their modes while a machine runs.

const secret = () => `s3cr3t-${randomBytes(12).toString('hex')}`;
const deploySecret = secret();
const apiToken = secret();
const jobToken = `glcbt-${randomBytes(16).toString('hex')}`;
const registryPassword = secret();
const privateKey = generateKeyPair('planted@test').privateKey;
const planted = [deploySecret, apiToken, jobToken, registryPassword];

describe('secrets stay out of logs, events and state', { timeout: 900_000 }, () => {
  let dir: string;
  let daemonConfig: string;
  let localConfig: string;
  let daemon: ChildProcess | undefined;
  let daemonLog = '';
  const texts: { what: string; text: string }[] = [];

  const leaks = (text: string): string[] => {
    const found = planted.filter((s) => text.includes(s));
    if (/PRIVATE KEY-----/.test(text) || text.includes(privateKey.split('\n')[1]!)) found.push('the private key');
    return found;
  };

  before(async () => {
    await ensureImage();
    dir = mkdtempSync('/var/tmp/mayfly-secrets-');
    daemonConfig = join(dir, 'daemon.toml');
    writeFileSync(daemonConfig, `[daemon]\nsocket = "${join(dir, 'mayfly.sock')}"\nreconcile_interval = 1\n\n[[pool]]\nname = "sec"\nimage = "debian-12"\nsize = "2cpu1024mb4gb"\nidle_count = 0\nmax_instances = 1\njob_disk = "encrypted"\n`);
    // The GitLab stages boot their own machine: no daemon answers there.
    localConfig = join(dir, 'local.toml');
    writeFileSync(localConfig, `[daemon]\nsocket = "${join(dir, 'none.sock')}"\n`);
    daemon = startMayfly(['--debug', '--config', daemonConfig, 'daemon']);
    daemon.stderr!.on('data', (c: Buffer) => (daemonLog += c.toString()));
    daemon.stdout!.resume();
    await waitFor(() => /mayflyd listening/.test(daemonLog), 60_000, 'mayflyd to listen');
  });

  after(async () => {
    if (daemon && daemon.exitCode === null) {
      daemon.kill('SIGTERM');
      await new Promise((r) => daemon!.once('exit', r));
    }
    await mayfly(['--config', localConfig, 'gitlab', 'cleanup'], { env: gitlabEnv() });
    rmSync(dir, { recursive: true, force: true });
  });

  const gitlabEnv = (): NodeJS.ProcessEnv => ({
    CUSTOM_ENV_CI_JOB_ID: '4242',
    CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN: 'sectest',
    CUSTOM_ENV_CI_PROJECT_PATH: 'group/project',
    CUSTOM_ENV_CI_JOB_TOKEN: jobToken,
    CUSTOM_ENV_CI_REPOSITORY_URL: `https://gitlab-ci-token:${jobToken}@gitlab.example.com/group/project.git`,
    CUSTOM_ENV_CI_REGISTRY_PASSWORD: registryPassword,
    BUILD_FAILURE_EXIT_CODE: '1',
    SYSTEM_FAILURE_EXIT_CODE: '2',
  });

  test('mayfly run through mayflyd (a pool with job_disk = "encrypted"): --secret-env, -e *_TOKEN, a private key and a secret in the command line', async () => {
    const r = await mayfly([
      '--debug', '--config', daemonConfig, 'run', '--job-disk', 'encrypted',
      '--secret-env', `DEPLOY=${deploySecret}`, '-e', `API_TOKEN=${apiToken}`, '-e', `SIGNING=${privateKey}`,
      '--', 'sh', '-c', `test "$DEPLOY" = "${deploySecret}" && test "$API_TOKEN" = "${apiToken}" && test -n "$SIGNING" && findmnt -n -o SOURCE -T /builds`,
    ]);
    assert.equal(r.code, 0, r.stderr);
    // The pool's machine, with its encrypted job disk (the job_disk match chose the pool).
    assert.equal(r.stdout, '/dev/mapper/mayfly-job[/builds]\n');
    assert.match(r.stderr, /from pool sec after/);
    texts.push({ what: 'run stderr (its log lines)', text: r.stderr });
  });

  test('the GitLab stages with a job token: prepare, a stage that uses it, cleanup', async () => {
    const env = gitlabEnv();
    const prep = await mayfly(['--debug', '--config', localConfig, 'gitlab', 'prepare'], { env });
    texts.push({ what: 'prepare output', text: prep.stdout + prep.stderr });
    assert.equal(prep.code, 0, prep.stderr);

    // While the machine runs: its secret files are 0600 in a 0700 dir; the host key handed to
    // the guest is gone from the host.
    const [id] = instanceDirs();
    assert.ok(id);
    const inst = join(testDataDir(), 'instances', id);
    assert.equal(statSync(inst).mode & 0o777, 0o700);
    assert.equal(statSync(join(testDataDir(), 'instances')).mode & 0o077, 0, 'the instances dir is not open to others');
    assert.equal(statSync(join(inst, 'id_ed25519')).mode & 0o777, 0o600);
    assert.deepEqual(readdirSync(inst).filter((f) => f.startsWith('fwcfg-') || f === 'seed.iso'), []);
    assert.equal(statSync(join(testDataDir(), 'state.db')).mode & 0o777, 0o600);

    const script = join(dir, 'build_script');
    writeFileSync(script, `export CI_JOB_TOKEN='${jobToken}'\ntest "$CI_JOB_TOKEN" = '${jobToken}' && echo token-ok\n`, { mode: 0o600 });
    const run = await mayfly(['--debug', '--config', localConfig, 'gitlab', 'run', script, 'build_script'], { env });
    texts.push({ what: 'run stage stderr', text: run.stderr });
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stdout, /token-ok/);

    const clean = await mayfly(['--debug', '--config', localConfig, 'gitlab', 'cleanup'], { env });
    texts.push({ what: 'cleanup output', text: clean.stdout + clean.stderr });
    assert.equal(clean.code, 0, clean.stderr);
    assert.deepEqual(instanceDirs(), []);
  });

  test('no log line, event or state record holds a secret', async () => {
    const events = await mayfly(['--config', daemonConfig, 'events', '--last', '1000']);
    assert.equal(events.code, 0, events.stderr);
    daemon!.kill('SIGTERM');
    await new Promise((r) => daemon!.once('exit', r));
    texts.push({ what: 'mayflyd log', text: daemonLog }, { what: 'events', text: events.stdout });
    const db = join(testDataDir(), 'state.db');
    for (const f of [db, `${db}-wal`]) if (existsSync(f)) texts.push({ what: f, text: readFileSync(f).toString('latin1') });

    for (const t of texts) assert.deepEqual(leaks(t.text), [], `${t.what} leaks`);
    // The searches were not empty: the lease's job name (the command line) was there, redacted.
    assert.match(events.stdout, /"type":\s*"leased"/);
    assert.match(events.stdout, /\[redacted\]/);
    assert.ok(daemonLog.split('\n').filter(Boolean).length > 5, 'the daemon logged at debug level');
    assert.deepEqual(processesMentioning(join(testDataDir(), 'instances')), []);
  });
});
