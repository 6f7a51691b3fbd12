import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import type { Driver, HostMachine } from '../../src/drivers/types.ts';
import { silentLogger } from '../../src/log.ts';
import { reap } from '../../src/pool/reaper.ts';
import { SqliteStateStore as StateStore, type InstanceRecord } from '../../src/state/index.ts';

// The reaper's decisions, with a driver that only records what it is asked to stop.

const dir = mkdtempSync(join(tmpdir(), 'mayfly-reaper-'));
after(() => rmSync(dir, { recursive: true, force: true }));

test('the reaper removes exactly what nothing explains', async () => {
  const instancesDir = join(dir, 'instances');
  const state = new StateStore(join(dir, 'state.db'));
  const holder = spawn('sleep', ['30'], { stdio: 'ignore' });
  try {
    await new Promise((r) => setTimeout(r, 100));
    const now = Date.now();
    const rec = (id: string, over: Partial<InstanceRecord>): void => {
      mkdirSync(join(instancesDir, id), { recursive: true });
      state.insertInstance({
        id, driver: 'fake', imageName: 'debian-12', imageVersion: 1, imageId: 'sha256:x', state: 'leased', createdAt: now,
        updatedAt: now, pid: null, dir: join(instancesDir, id), disks: [], consoleLog: '', sshPort: null, sshHost: null, cpus: 1, memoryMiB: 512,
        diskGiB: 4, accel: null, owner: null, holderPid: holder.pid!, pool: null, ...over,
      });
    };
    rec('vm-held', {});
    rec('vm-reused-pid', { createdAt: now - 3_600_000 }); // its holder's pid now belongs to a newer process
    rec('vm-dead-holder', { holderPid: 2 ** 22 + 7 });
    rec('vm-kept', { state: 'kept', holderPid: null });
    // GitLab jobs: a machine handed over to a job record (no holder) lives until the record expires.
    rec('vm-job', { holderPid: null });
    rec('vm-job-expired', { holderPid: null });
    const job = { integration: 'gitlab', lease: null, createdAt: now, data: {} };
    state.putJob({ ...job, key: 'gitlab/t/1', instance: 'vm-job', expiresAt: now + 60_000 });
    state.putJob({ ...job, key: 'gitlab/t/2', instance: 'vm-job-expired', expiresAt: now - 1 });
    state.putJob({ ...job, key: 'gitlab/t/3', instance: 'vm-never-made', expiresAt: now - 1 });
    mkdirSync(join(instancesDir, 'vm-stray-files'));

    const stopped: string[] = [];
    const host: HostMachine[] = [
      { id: 'vm-unrecorded', pid: 4_000_000, dir: join(instancesDir, 'vm-unrecorded') },
      { id: 'vm-elsewhere', pid: 4_000_001, dir: '/somewhere/else/vm-elsewhere' },
    ];
    const driver: Driver = {
      name: 'fake',
      start: () => Promise.reject(new Error('not used')),
      deadReason: () => undefined,
      stop: async (_pid, d) => {
        stopped.push(d.split('/').at(-1)!);
      },
      consoleTail: () => '',
      killNow: () => {},
      listHost: () => host,
    };

    const r = await reap({ state, drivers: [driver], instancesDir, log: silentLogger });
    const gone = ['vm-dead-holder', 'vm-job-expired', 'vm-reused-pid', 'vm-stray-files', 'vm-unrecorded'];
    assert.deepEqual(r.removed.map((x) => x.id).sort(), gone);
    assert.deepEqual(stopped.sort(), gone);
    assert.deepEqual(state.listInstances().map((i) => i.id).sort(), ['vm-held', 'vm-job', 'vm-kept']);
    // Expired job records go with their machines; the live one stays.
    assert.deepEqual(state.listJobs().map((j) => j.key), ['gitlab/t/1']);
    assert.equal(existsSync(join(instancesDir, 'vm-held')), true);
    assert.equal(existsSync(join(instancesDir, 'vm-dead-holder')), false);
    assert.equal(existsSync(join(instancesDir, 'vm-stray-files')), false);
    assert.match(r.removed.find((x) => x.id === 'vm-dead-holder')!.why, /its mayfly process \(pid \d+\) is gone/);

    // A second pass finds nothing more to do.
    stopped.length = 0;
    host.length = 0;
    assert.deepEqual((await reap({ state, drivers: [driver], instancesDir, log: silentLogger })).removed, []);
    assert.deepEqual(stopped, []);
  } finally {
    holder.kill();
    state.close();
  }
});

test('a machine created while the reaper works is left alone', async () => {
  const d2 = mkdtempSync(join(tmpdir(), 'mayfly-reaper-race-'));
  const instancesDir = join(d2, 'instances');
  const state = new StateStore(join(d2, 'state.db'));
  try {
    const now = Date.now();
    const rec = (id: string, holderPid: number): InstanceRecord => ({
      id, driver: 'fake', imageName: 'debian-12', imageVersion: 1, imageId: 'sha256:x', state: 'creating', createdAt: now,
      updatedAt: now, pid: null, dir: join(instancesDir, id), disks: [], consoleLog: '', sshPort: null, sshHost: null, cpus: 1, memoryMiB: 512,
      diskGiB: 4, accel: null, owner: null, holderPid, pool: null,
    });
    state.insertInstance(rec('vm-orphan', 2 ** 22 + 9));
    mkdirSync(join(instancesDir, 'vm-orphan'), { recursive: true });
    const driver: Driver = {
      name: 'fake',
      start: () => Promise.reject(new Error('not used')),
      deadReason: () => undefined,
      // While the orphan is being stopped, this process starts a new machine: record first, then dir.
      stop: async () => {
        state.insertInstance(rec('vm-new', process.pid));
        mkdirSync(join(instancesDir, 'vm-new'), { recursive: true });
      },
      consoleTail: () => '',
      killNow: () => {},
      listHost: () => [],
    };
    const r = await reap({ state, drivers: [driver], instancesDir, log: silentLogger });
    assert.deepEqual(r.removed.map((x) => x.id), ['vm-orphan']);
    assert.equal(existsSync(join(instancesDir, 'vm-new')), true);
    assert.equal(state.getInstance('vm-new')?.id, 'vm-new');
  } finally {
    state.close();
    rmSync(d2, { recursive: true, force: true });
  }
});
