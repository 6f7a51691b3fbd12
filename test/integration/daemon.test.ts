import assert from 'node:assert/strict';
import type { ChildProcess } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { collect, ensureImage, instanceDirs, mayfly, processesMentioning, startMayfly, testDataDir, waitFor } from '../helpers/env.ts';

// mayflyd end to end with real VMs: a pool that keeps one machine warm, jobs that take it,
// a lease killed at its max runtime, bad API input, and a kill -9 followed by a restart whose
// reaper must leave nothing behind.

interface PoolStatus {
  name: string;
  idle: number;
  leased: number;
  creating: number;
}

describe('mayflyd', { timeout: 900_000 }, () => {
  let dir: string;
  let config: string;
  let socket: string;
  let daemon: ChildProcess | undefined;
  let daemonLog = '';

  const cli = (args: string[]) => mayfly(['--config', config, ...args]);
  const startDaemon = () => {
    daemonLog = '';
    daemon = startMayfly(['--config', config, 'daemon']);
    daemon.stderr!.on('data', (c: Buffer) => (daemonLog += c.toString()));
    daemon.stdout!.resume();
  };
  const pools = async (): Promise<PoolStatus[]> => {
    const r = await cli(['pool', 'ls', '--json']);
    return r.code === 0 ? (JSON.parse(r.stdout) as PoolStatus[]) : [];
  };
  const waitIdle = async (n: number) => {
    const end = Date.now() + 180_000;
    for (;;) {
      const p = (await pools())[0];
      if (p && p.idle >= n) return;
      if (Date.now() > end) throw new Error(`the pool never had ${n} idle machine(s); daemon log:\n${daemonLog}`);
      await new Promise((r) => setTimeout(r, 500));
    }
  };
  const api = (method: string, path: string, body?: string) =>
    new Promise<{ status: number; json: { code?: string; message?: string } }>((resolve, reject) => {
      const req = request({ socketPath: socket, method, path, headers: body ? { 'content-type': 'application/json' } : {} }, (res) => {
        let text = '';
        res.on('data', (c: Buffer) => (text += c.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, json: text ? JSON.parse(text) : {} }));
      });
      req.on('error', reject);
      req.end(body);
    });

  before(async () => {
    await ensureImage();
    dir = mkdtempSync('/var/tmp/mayfly-daemon-');
    socket = join(dir, 'mayfly.sock');
    config = join(dir, 'config.toml');
    writeFileSync(
      config,
      [
        '[daemon]',
        `socket = "${socket}"`,
        'reconcile_interval = 1',
        '',
        '[[pool]]',
        'name = "warm"',
        'image = "debian-12"',
        'size = "2cpu1024mb4gb"',
        'idle_count = 1',
        'max_instances = 2',
      ].join('\n') + '\n',
    );
    startDaemon();
  });

  after(async () => {
    if (daemon && daemon.exitCode === null) {
      daemon.kill('SIGTERM');
      await new Promise((r) => daemon!.once('close', r));
    }
    rmSync(dir, { recursive: true, force: true });
  });

  test('a job takes the warm machine; the pool refills', async () => {
    await waitIdle(1);
    const r = await cli(['run', '--', 'sh', '-c', 'echo from-pool; hostname; exit 5']);
    assert.equal(r.code, 5, r.stderr);
    const [line, host] = r.stdout.trim().split('\n');
    assert.equal(line, 'from-pool');
    assert.match(r.stderr, new RegExp(`machine ${host} \\(debian-12:\\d+\\) from pool warm after 0\\.\\d\\d s`));
    await waitIdle(1);
    const p = (await pools())[0]!;
    assert.equal(p.leased, 0);
    assert.ok(!instanceDirs().includes(host!), 'the used machine is destroyed (max_use_count 1)');
  });

  test('mayfly exec takes a pool machine too, working tree and scripts through the daemon', async () => {
    await waitIdle(1);
    const repo = join(dir, 'repo');
    mkdirSync(repo);
    execFileSync('git', ['-C', repo, 'init', '-q']);
    writeFileSync(join(repo, '.gitlab-ci.yml'), 'job:\n  script:\n    - cat data.txt\n    - exit 6\n  after_script:\n    - echo "after $CI_JOB_STATUS"\n');
    writeFileSync(join(repo, 'data.txt'), 'copied through mayflyd\n');
    const r = await mayfly(['--config', config, 'exec', 'job'], { cwd: repo });
    assert.equal(r.code, 6, r.stderr);
    assert.match(r.stderr, /machine vm-[a-z2-7]+ \(debian-12:\d+\) from pool warm after \d+\.\d\d s/);
    const out = r.stdout.replace(/\x1b\[[0-9;]*m/g, '');
    assert.match(out, /^copied through mayflyd$/m);
    assert.match(out, /^after failed$/m);
  });

  test('a lease past its max runtime has its machine killed', async () => {
    await waitIdle(1);
    const acq = await cli(['lease', 'acquire', '--pool', 'warm', '--max-runtime', '2', '--job', 'slow']);
    assert.equal(acq.code, 0, acq.stderr);
    const lease = JSON.parse(acq.stdout) as { id: string; instance: { id: string } };
    await waitFor(() => !instanceDirs().includes(lease.instance.id), 30_000, 'the overdue machine to be destroyed');
    const rel = await cli(['lease', 'release', lease.id]);
    assert.equal(rel.code, 0, rel.stderr);
    assert.deepEqual(JSON.parse(rel.stdout), { released: lease.id, expired: true });
    const events = (await cli(['events'])).stdout.trim().split('\n').map((l) => JSON.parse(l) as { type: string; lease: string | null });
    assert.ok(events.some((e) => e.type === 'expired' && e.lease === lease.id), 'an expired event');
    const all = JSON.parse((await cli(['lease', 'ls', '--all', '--json'])).stdout) as { id: string; state: string; releasedAt: number | null; job: unknown }[];
    const rec = all.find((l) => l.id === lease.id);
    assert.equal(rec?.state, 'expired');
    assert.ok(rec.releasedAt !== null);
    assert.deepEqual(rec.job, { name: 'slow' });
  });

  test('bad API input gets a 4xx with a message and the daemon keeps serving', async () => {
    const bad = await api('POST', '/v1/leases', '{"pool": 7}');
    assert.equal(bad.status, 400);
    assert.equal(bad.json.code, 'MAYFLY_ERR_BAD_REQUEST');
    assert.match(bad.json.message ?? '', /pool/);
    const unknownKey = await api('POST', '/v1/leases', '{"pool": "warm", "bogus": 1}');
    assert.equal(unknownKey.status, 400);
    const noPool = await api('POST', '/v1/leases', '{"pool": "nope", "timeout": 1}');
    assert.equal(noPool.status, 400);
    assert.match(noPool.json.message ?? '', /no pool named 'nope'/);
    const noLease = await api('DELETE', '/v1/leases/lease-nothere');
    assert.equal(noLease.status, 404);
    const garbage = await api('POST', '/v1/leases', '{not json');
    assert.equal(garbage.status, 400);
    const health = await api('GET', '/v1/health');
    assert.equal(health.status, 200);
    const metrics = await new Promise<string>((resolve) =>
      request({ socketPath: socket, path: '/metrics' }, (res) => {
        let t = '';
        res.on('data', (c: Buffer) => (t += c.toString()));
        res.on('end', () => resolve(t));
      }).end(),
    );
    assert.match(metrics, /^mayfly_boot_seconds_count\{pool="warm"\} [1-9]/m);
    assert.match(metrics, /^mayfly_instances\{pool="warm",state="idle"\} \d/m);
  });

  test('kill -9 of mayflyd while two jobs run, then a restart: nothing is left', async () => {
    await waitIdle(1);
    const t0 = Date.now();
    const jobs = [startMayfly(['--config', config, 'run', '--', 'sleep', '300']), startMayfly(['--config', config, 'run', '--', 'sleep', '300'])];
    const results = jobs.map(collect);
    const end = Date.now() + 180_000;
    while (((await pools())[0]?.leased ?? 0) < 2) {
      if (Date.now() > end) throw new Error(`the two jobs never both held a machine; daemon log:\n${daemonLog}`);
      await new Promise((r) => setTimeout(r, 500));
    }
    daemon!.kill('SIGKILL');
    await new Promise((r) => daemon!.once('close', r));
    for (const r of await Promise.all(results)) assert.notEqual(r.code, 0, 'the jobs fail with their daemon gone');

    startDaemon();
    await waitFor(() => /reaped an orphaned machine/.test(daemonLog), 60_000, 'the reaper');
    const leases = (JSON.parse((await cli(['lease', 'ls', '--all', '--json'])).stdout) as { state: string; leasedAt: number }[]).filter(
      (l) => l.leasedAt >= t0,
    );
    assert.equal(leases.filter((l) => l.state === 'lost').length, 2, 'the two leases held when mayflyd died are marked lost');
    assert.equal(leases.filter((l) => l.state === 'leased').length, 0);
    // Everything that existed before the restart is gone; only the new pool machine may exist.
    await waitIdle(1);
    const live = instanceDirs();
    assert.equal(live.length, 1, `only the new warm machine: ${live.join(', ')}`);
    const qemus = processesMentioning(join(testDataDir(), 'instances'));
    assert.equal(qemus.length, 1, 'one qemu process: the new warm machine');
  });

  test('SIGTERM stops mayflyd and destroys its machines', async () => {
    daemon!.kill('SIGTERM');
    const code = await new Promise<number | null>((r) => daemon!.once('close', r));
    assert.equal(code, 0, daemonLog);
    assert.deepEqual(instanceDirs(), []);
    assert.deepEqual(processesMentioning(join(testDataDir(), 'instances')), []);
    assert.equal(existsSync(socket), false, 'the socket is removed');
    assert.deepEqual(readdirSync(dir).sort(), ['config.toml', 'repo']);
  });
});
