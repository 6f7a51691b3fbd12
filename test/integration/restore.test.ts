import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, truncateSync } from 'node:fs';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { defaultConfig } from '../../src/config/index.ts';
import { ImageStore } from '../../src/images/store.ts';
import { createLogger } from '../../src/log.ts';
import { Engine, type Lease } from '../../src/pool/index.ts';
import { ensureImage, instanceDirs, mayfly, processesMentioning, publishImageCopy, testDataDir } from '../helpers/env.ts';

// Snapshot restore with real machines: the template is made once (a boot and a save), then
// every clone resumes from it. Clones must work, differ from each other in everything that
// makes a machine unique, and never write into the template.

const size = { cpus: 2, memoryMiB: 1024, diskGiB: 4 };

function capturingEngine(): { engine: Engine; log: () => string } {
  let text = '';
  const sink = new Writable({
    write(c: Buffer, _e, cb) {
      text += c.toString();
      cb();
    },
  });
  const engine = new Engine({ dataDir: testDataDir(), config: defaultConfig(), log: createLogger({ level: 'debug', json: true, destination: sink }) });
  return { engine, log: () => text };
}

async function capture(lease: Lease, script: string): Promise<string> {
  let out = '';
  const r = await lease.machine.guest.exec(['bash', '-c', script], { stdout: (c) => (out += c.toString()) });
  assert.equal(r.exitCode, 0, `${script} failed in ${lease.machine.id}`);
  return out;
}

const sha256 = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');

describe('snapshot restore', { timeout: 900_000 }, () => {
  let engine: Engine;
  let log: () => string;
  let server: Server;
  let port: number;
  const leases: Lease[] = [];

  before(async () => {
    await ensureImage();
    ({ engine, log } = capturingEngine());
    server = createServer((_req, res) => res.end('hello from the host\n'));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    port = (server.address() as AddressInfo).port;
  });

  after(async () => {
    for (const l of leases) await l.release().catch(() => {});
    const store = new ImageStore(testDataDir());
    for (const v of store.versions('restore-copy')) store.remove('restore-copy', v);
    engine.close();
    server.close();
  });

  const lease = async (): Promise<Lease> => {
    const l = await engine.lease({ owner: 'restore test', size, start: 'restore' });
    leases.push(l);
    return l;
  };

  test('a restored clone runs commands, reaches the network and writes its own disk', async () => {
    const a = await lease();
    assert.equal(a.machine.restored, true, log());
    assert.equal(await capture(a, `curl -s http://10.0.2.2:${port}/`), 'hello from the host\n');
    assert.equal(await capture(a, 'echo mine > /home/ci/mine && cat /home/ci/mine && grep -c ^VERSION_CODENAME=bookworm /etc/os-release'), 'mine\n1\n');
    assert.equal(await capture(a, 'cat /run/mayfly-instance-id; hostname'), `${a.machine.id}\n${a.machine.id}\n`);
  });

  test('two clones differ in host key, machine-id, hostname and randomness; clocks are the host\'s', async () => {
    const t = (await engine.templates.find(engine.images.resolve('debian-12'), size))!;
    const before = sha256(t.disk);
    const [a, b] = [leases[0]!, await lease()];
    assert.equal(b.machine.restored, true);
    const probe = 'cat /etc/ssh/ssh_host_ed25519_key.pub | cut -d" " -f2; cat /etc/machine-id; hostname; head -c 32 /dev/urandom | od -An -tx1 | tr -d " \\n"; echo; date +%s.%N';
    const [ia, ib] = await Promise.all([capture(a, probe), capture(b, probe)]);
    const host = Date.now() / 1000;
    const [keyA, midA, nameA, rndA, clockA] = ia.trim().split('\n');
    const [keyB, midB, nameB, rndB, clockB] = ib.trim().split('\n');
    // Each host key is the one mayfly made and pinned for that clone.
    assert.equal(keyA, readFileSync(join(a.machine.dir, 'known_host_key.pub'), 'utf8').split(' ')[1]);
    assert.equal(keyB, readFileSync(join(b.machine.dir, 'known_host_key.pub'), 'utf8').split(' ')[1]);
    assert.notEqual(keyA, keyB);
    assert.match(midA!, /^[0-9a-f]{32}$/);
    assert.notEqual(midA, midB);
    assert.deepEqual([nameA, nameB], [a.machine.id, b.machine.id]);
    assert.match(rndA!, /^[0-9a-f]{64}$/);
    assert.notEqual(rndA, rndB);
    for (const c of [clockA, clockB]) assert.ok(Math.abs(Number(c) - host) < 2, `guest clock ${c} vs host ${host}`);

    // Writes stay in each clone's overlay: not in the other clone, not in the template.
    await capture(a, 'echo a-was-here | sudo tee /var/tmp/marker >/dev/null; sync');
    assert.equal(await capture(b, 'cat /var/tmp/marker 2>/dev/null || echo absent'), 'absent\n');
    assert.equal(sha256(t.disk), before, 'the template disk is unchanged');
  });

  test('a corrupted state file falls back to a cold boot, says so, and the template is made again next time', async () => {
    const image = engine.images.resolve('debian-12');
    const t = (await engine.templates.find(image, size))!;
    truncateSync(t.state, Math.floor(readFileSync(t.state).length / 3));
    const c = await lease();
    assert.equal(c.machine.restored, false);
    assert.match(log(), /restoring from the snapshot template failed; booting instead/);
    assert.match(log(), /MAYFLY_ERR_RESTORE_FAILED|restoring vm-[a-z0-9]+ from .* failed/);
    assert.equal(await capture(c, 'echo works'), 'works\n');
    assert.equal(await engine.templates.find(image, size), undefined, 'the broken template is gone');
  });

  test('removing an image removes its snapshot templates', async () => {
    // A second image: the default image's files published again under another name.
    const copy = publishImageCopy('restore-copy', '2');
    const l = await engine.lease({ owner: 'restore test', image: 'restore-copy', size, start: 'restore' });
    await l.release();
    const dir = engine.templates.dirFor(copy, size);
    assert.equal(existsSync(join(dir, 'state')), true);
    const rm = await mayfly(['image', 'rm', 'restore-copy']);
    assert.equal(rm.code, 0, rm.stderr);
    assert.equal(existsSync(dir), false);
    assert.equal(existsSync(copy.dir), false);
  });

  test('nothing is left once the clones are released', async () => {
    for (const l of leases.splice(0)) await l.release();
    assert.deepEqual(instanceDirs(), []);
    assert.deepEqual(processesMentioning(join(testDataDir(), 'instances')), []);
  });
});
