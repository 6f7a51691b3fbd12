import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { GuestChannel } from '../../src/guest/index.ts';
import type { Engine, Lease } from '../../src/pool/index.ts';
import { ensureImage, processesMentioning, testEngine } from '../helpers/env.ts';

// One machine, booted once, shared by every test here: the guest channel's contract.

async function capture(ch: GuestChannel, argv: string[], env?: Record<string, string>) {
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  const r = await ch.exec(argv, { env, cwd: '/builds', stdout: (c) => out.push(c), stderr: (c) => err.push(c) });
  return { ...r, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() };
}

describe('a fresh machine and its guest channel', { timeout: 600_000 }, () => {
  let engine: Engine;
  let lease: Lease;
  let ch: GuestChannel;
  const size = { cpus: 1, memoryMiB: 768, diskGiB: 3 };

  before(async () => {
    await ensureImage();
    engine = testEngine();
    lease = await engine.lease({ owner: 'guest.test', size });
    ch = lease.machine.guest;
  });

  after(async () => {
    const dir = lease?.machine.dir;
    await lease?.release();
    engine?.close();
    if (dir) {
      assert.equal(existsSync(dir), false, 'the instance dir is removed on release');
      assert.deepEqual(processesMentioning(dir), [], 'no process of the machine is left');
    }
  });

  test('exit codes come back exactly, including death by signal', async () => {
    assert.equal((await ch.exec(['true'])).exitCode, 0);
    assert.equal((await ch.exec(['false'])).exitCode, 1);
    assert.equal((await ch.exec(['sh', '-c', 'exit 3'])).exitCode, 3);
    assert.equal((await ch.exec(['sh', '-c', 'exit 137'])).exitCode, 137);
    const killed = await ch.exec(['sh', '-c', 'kill -9 $$']);
    assert.equal(killed.exitCode, 137);
    assert.equal(killed.signal, 'KILL');
    assert.equal((await ch.exec(['no-such-command-here'])).exitCode, 127);
  });

  test('stdout and stderr stay apart', async () => {
    const r = await capture(ch, ['sh', '-c', 'echo to-out; echo to-err >&2; echo more-out']);
    assert.equal(r.stdout, 'to-out\nmore-out\n');
    assert.equal(r.stderr, 'to-err\n');
  });

  test('arguments and environment reach the command unchanged (no shell injection)', async () => {
    const tricky = `two words 'single' "double" $HOME \`id\` ; echo injected & $(whoami)\nline2 \\ end`;
    const r = await capture(ch, ['sh', '-c', 'printf "%s|" "$1" "$V1" "$V2"', 'argv0', tricky], { V1: tricky, V2: '' });
    assert.equal(r.stdout, `${tricky}|${tricky}||`);
    assert.equal(r.exitCode, 0);
  });

  test('commands run as the ci user in /builds; root is one connection away', async () => {
    const r = await capture(ch, ['sh', '-c', 'id -un; pwd; test -w /builds && echo writable']);
    assert.equal(r.stdout, 'ci\n/builds\nwritable\n');
    const root = await lease.machine.root();
    assert.equal((await capture(root, ['id', '-u'])).stdout, '0\n');
    assert.equal((await capture(ch, ['sudo', '-n', 'id', '-u'])).stdout, '0\n', 'ci has passwordless sudo');
  });

  test('the size asked for is the size the machine has', async () => {
    assert.equal((await capture(ch, ['nproc'])).stdout.trim(), String(size.cpus));
    const memKiB = Number(/MemTotal:\s+(\d+)/.exec((await capture(ch, ['cat', '/proc/meminfo'])).stdout)![1]);
    assert.ok(memKiB > (size.memoryMiB - 128) * 1024 && memKiB <= size.memoryMiB * 1024, `MemTotal ${memKiB} KiB for ${size.memoryMiB} MiB`);
    const rootBytes = Number((await capture(ch, ['lsblk', '-bdno', 'SIZE', '/dev/vda'])).stdout.trim());
    assert.equal(rootBytes, size.diskGiB * 1024 ** 3);
    const fsKiB = Number((await capture(ch, ['df', '-k', '--output=size', '/'])).stdout.split('\n')[1]);
    assert.ok(fsKiB > (size.diskGiB - 0.5) * 1024 ** 2, `root filesystem grown to the disk (${fsKiB} KiB)`);
  });

  test('the machine has its own identity and the pinned host key is the one it serves', async () => {
    const m = lease.machine;
    assert.equal((await capture(ch, ['hostname'])).stdout.trim(), m.id);
    const served = (await capture(await m.root(), ['cat', '/etc/ssh/ssh_host_ed25519_key.pub'])).stdout.trim();
    assert.equal(served.split(' ').slice(0, 2).join(' '), m.endpoint('ci').hostKey.split(' ').slice(0, 2).join(' '));
    assert.match((await capture(ch, ['cat', '/etc/machine-id'])).stdout, /^[0-9a-f]{32}\n$/);
    assert.equal(existsSync(join(m.dir, 'fwcfg-host_key')), false, 'the private host key is not left on the host disk');
  });

  test('files go in and out', async () => {
    const tmp = mkdtempSync('/var/tmp/mayfly-files-');
    try {
      const data = Buffer.alloc(300_000, 7);
      data.write('header');
      writeFileSync(join(tmp, 'in.bin'), data);
      await ch.upload(join(tmp, 'in.bin'), '/builds/in.bin');
      assert.equal((await capture(ch, ['stat', '-c', '%s %U', '/builds/in.bin'])).stdout, `${data.length} ci\n`);
      await ch.exec(['sh', '-c', 'cp /builds/in.bin /builds/out.bin && echo tail >> /builds/out.bin']);
      await ch.download('/builds/out.bin', join(tmp, 'out.bin'));
      assert.deepEqual(readFileSync(join(tmp, 'out.bin')), Buffer.concat([data, Buffer.from('tail\n')]));
      await ch.writeFile('/builds/small.txt', 'héllo\n');
      assert.equal((await ch.readFile('/builds/small.txt')).toString(), 'héllo\n');
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  });

  test('the machine is listed while leased', () => {
    const rec = engine.instances().find((i) => i.id === lease.machine.id);
    assert.ok(rec, 'listed');
    assert.equal(rec.state, 'leased');
    assert.equal(rec.running, true);
    assert.equal(rec.owner, 'guest.test');
    assert.equal(rec.cpus, size.cpus);
    assert.ok(existsSync(rec.disks[0]!));
    assert.ok(existsSync(rec.consoleLog));
  });
});
