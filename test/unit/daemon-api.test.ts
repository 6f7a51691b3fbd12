import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ConfigSchema } from '../../src/config/schema.ts';
import { DaemonClient } from '../../src/daemon/client.ts';
import { buildApp } from '../../src/daemon/http.ts';
import { MayflyError } from '../../src/errors.ts';
import { Daemon } from '../../src/daemon/service.ts';
import { silentLogger } from '../../src/log.ts';

// mayflyd's HTTP layer without machines: validation, errors, auth. The pool has idle_count 0,
// so nothing is ever booted here.

describe('mayflyd API', () => {
  let dir: string;
  let daemon: Daemon;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'mayfly-api-'));
    const config = ConfigSchema.parse({ pool: [{ name: 'p', image: 'debian-12', size: '1cpu512mb4gb', idle_count: 0, max_instances: 1 }] });
    daemon = new Daemon({ dataDir: dir, config, log: silentLogger });
  });
  after(async () => {
    await daemon.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  test('health and pools', async () => {
    const app = buildApp(daemon);
    const h = await app.inject({ method: 'GET', url: '/v1/health' });
    assert.equal(h.statusCode, 200);
    assert.equal(h.json().ok, true);
    const p = await app.inject({ method: 'GET', url: '/v1/pools' });
    assert.deepEqual(
      p.json().map((x: { name: string; idle: number; size: unknown }) => [x.name, x.idle, x.size]),
      [['p', 0, { cpus: 1, memoryMiB: 512, diskGiB: 4 }]],
    );
  });

  test('bad bodies are refused with a code and a message, never coerced', async () => {
    const app = buildApp(daemon);
    for (const [body, pattern] of [
      [{ pool: 7 }, /pool/],
      [{ pool: 'p', bogus: true }, /additional properties|bogus/i],
      [{ pool: 'p', timeout: -1 }, /timeout/],
    ] as const) {
      const r = await app.inject({ method: 'POST', url: '/v1/leases', payload: body });
      assert.equal(r.statusCode, 400, JSON.stringify(body));
      assert.equal(r.json().code, 'MAYFLY_ERR_BAD_REQUEST');
      assert.match(r.json().message, pattern);
    }
    const exec = await app.inject({ method: 'POST', url: '/v1/leases/x/exec', payload: { argv: [] } });
    assert.equal(exec.statusCode, 400);
    const notJson = await app.inject({ method: 'POST', url: '/v1/leases', headers: { 'content-type': 'application/json' }, payload: '{oops' });
    assert.equal(notJson.statusCode, 400);
  });

  test('errors from the engine keep their code; unknown routes say so', async () => {
    const app = buildApp(daemon);
    const noPool = await app.inject({ method: 'POST', url: '/v1/leases', payload: { pool: 'nope' } });
    assert.equal(noPool.statusCode, 400);
    assert.deepEqual([noPool.json().code, noPool.json().message], ['MAYFLY_ERR_USAGE', "no pool named 'nope'"]);
    assert.equal(noPool.json().hint, 'pools: p');
    const noMatch = await app.inject({ method: 'POST', url: '/v1/leases', payload: { image: 'other' } });
    assert.equal(noMatch.statusCode, 400);
    assert.match(noMatch.json().message, /no pool serves image other/);
    // A lease for a job_disk no pool keeps is refused, naming it; a pool asked for by name must keep it.
    const noDisk = await app.inject({ method: 'POST', url: '/v1/leases', payload: { image: 'debian-12', job_disk: 'encrypted' } });
    assert.equal(noDisk.statusCode, 400);
    assert.match(noDisk.json().message, /no pool serves image debian-12 with size \(any\) and job_disk encrypted/);
    const wrongDisk = await app.inject({ method: 'POST', url: '/v1/leases', payload: { pool: 'p', job_disk: 'tmpfs' } });
    assert.equal(wrongDisk.statusCode, 400);
    assert.match(wrongDisk.json().message, /pool p keeps job data plain, not tmpfs/);
    const badDisk = await app.inject({ method: 'POST', url: '/v1/leases', payload: { pool: 'p', job_disk: 'luks' } });
    assert.equal(badDisk.statusCode, 400);
    assert.match(badDisk.json().message, /job_disk/);
    const noLease = await app.inject({ method: 'DELETE', url: '/v1/leases/lease-x' });
    assert.equal(noLease.statusCode, 404);
    assert.equal(noLease.json().code, 'MAYFLY_ERR_LEASE_NOT_FOUND');
    const noDetach = await app.inject({ method: 'PATCH', url: '/v1/leases/lease-x', payload: { holder_pid: null } });
    assert.equal(noDetach.statusCode, 404);
    assert.equal(noDetach.json().code, 'MAYFLY_ERR_LEASE_NOT_FOUND');
    // Only detaching is supported: a new holder or another field is refused.
    for (const payload of [{ holder_pid: 123 }, {}, { holder_pid: null, pool: 'p' }]) {
      const bad = await app.inject({ method: 'PATCH', url: '/v1/leases/lease-x', payload });
      assert.equal(bad.statusCode, 400, JSON.stringify(payload));
    }
    const route = await app.inject({ method: 'GET', url: '/v2/nothing' });
    assert.equal(route.statusCode, 404);
    assert.match(route.json().message, /no route GET \/v2\/nothing/);
  });

  test('a lease that cannot be served times out with 503 and the reason', async () => {
    const app = buildApp(daemon);
    // This data dir has no image, so the creation the request starts fails at once: the request
    // waits out its timeout and is told why.
    const r = await app.inject({ method: 'POST', url: '/v1/leases', payload: { pool: 'p', timeout: 0.5 } });
    assert.equal(r.statusCode, 503);
    assert.equal(r.json().code, 'MAYFLY_ERR_POOL_TIMEOUT');
    assert.match(r.json().hint, /creating machines fails: no image 'debian-12'/);
    const [p] = (await app.inject({ method: 'GET', url: '/v1/pools' })).json();
    assert.deepEqual([p.creating, p.failures], [0, 1]);
  });

  test('with a token, requests without it get 401', async () => {
    const app = buildApp(daemon, { token: 'a-long-enough-test-token' });
    const no = await app.inject({ method: 'GET', url: '/v1/health' });
    assert.equal(no.statusCode, 401);
    assert.equal(no.json().code, 'MAYFLY_ERR_UNAUTHORIZED');
    const wrong = await app.inject({ method: 'GET', url: '/v1/health', headers: { authorization: 'Bearer nope' } });
    assert.equal(wrong.statusCode, 401);
    const ok = await app.inject({ method: 'GET', url: '/v1/health', headers: { authorization: 'Bearer a-long-enough-test-token' } });
    assert.equal(ok.statusCode, 200);
  });

  test('through a real socket, a lease request waits its timeout, and hanging up leaves the queue', async () => {
    // fastify's inject does not show how a request's events behave on a real connection.
    const app = buildApp(daemon);
    const socket = join(dir, 'api.sock');
    await app.listen({ path: socket });
    try {
      const client = new DaemonClient(socket);
      const t0 = Date.now();
      await assert.rejects(client.call('POST', '/v1/leases', { pool: 'p', timeout: 0.6 }), (e: unknown) => {
        assert.ok(e instanceof MayflyError);
        assert.equal(e.code, 'MAYFLY_ERR_POOL_TIMEOUT');
        return true;
      });
      assert.ok(Date.now() - t0 >= 500, `waited ${Date.now() - t0} ms`);

      const ac = new AbortController();
      const pending = client.call('POST', '/v1/leases', { pool: 'p', timeout: 30 }, undefined, ac.signal).catch((e: unknown) => e);
      const waiting = async () => (await client.call<{ waiting: number }[]>('GET', '/v1/pools'))[0]!.waiting;
      for (let i = 0; i < 50 && (await waiting()) === 0; i++) await new Promise((r) => setTimeout(r, 20));
      assert.equal(await waiting(), 1);
      ac.abort(new Error('user hung up'));
      await pending;
      for (let i = 0; i < 50 && (await waiting()) === 1; i++) await new Promise((r) => setTimeout(r, 20));
      assert.equal(await waiting(), 0, 'the hung-up request left the queue');
    } finally {
      await app.close();
    }
  });

  test('metrics are in the Prometheus text format', async () => {
    const app = buildApp(daemon);
    const m = await app.inject({ method: 'GET', url: '/metrics' });
    assert.equal(m.statusCode, 200);
    assert.match(m.headers['content-type'] as string, /^text\/plain/);
    assert.match(m.body, /^# TYPE mayfly_boot_seconds histogram$/m);
    assert.match(m.body, /^mayfly_instances\{pool="p",state="idle"\} 0$/m);
  });
});

test('one mayflyd per data dir: a live holder of the pid file refuses a second', async () => {
  const { spawn } = await import('node:child_process');
  const { writeFileSync, existsSync } = await import('node:fs');
  const { lockDataDir } = await import('../../src/daemon/service.ts');
  const d = mkdtempSync(join(tmpdir(), 'mayfly-lock-'));
  const other = spawn('sleep', ['30'], { stdio: 'ignore' });
  try {
    await new Promise((r) => setTimeout(r, 100));
    writeFileSync(join(d, 'mayflyd.pid'), `${other.pid}\n`);
    assert.throws(() => lockDataDir(d), new RegExp(`another mayflyd \\(pid ${other.pid}\\) already runs on the data dir`));
    other.kill();
    await new Promise((r) => other.once('close', r));
    const unlock = lockDataDir(d);
    assert.equal(readFileSync(join(d, 'mayflyd.pid'), 'utf8'), `${process.pid}\n`);
    unlock();
    assert.equal(existsSync(join(d, 'mayflyd.pid')), false);
  } finally {
    other.kill();
    rmSync(d, { recursive: true, force: true });
  }
});
