import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { identityMessage, sendIdentity } from '../../src/drivers/qemu/agent.ts';
import { Qmp } from '../../src/drivers/qemu/qmp.ts';
import { generateEd25519 } from '../../src/guest/keys.ts';

// The host's halves of a restore, against stand-ins for QEMU's QMP socket and the guest agent.

const dir = mkdtempSync(join(tmpdir(), 'mayfly-restore-parts-'));
after(() => rmSync(dir, { recursive: true, force: true }));

const identity = { id: 'vm-abc', hostname: 'vm-abc', hostKey: generateEd25519('root@vm-abc'), authorizedKey: generateEd25519('mayfly@vm-abc').publicKey };

test('the identity message: `key value` lines, the private key line by line, fresh randomness each time', () => {
  const a = identityMessage(identity, 1_700_000_000_123);
  const b = identityMessage(identity, 1_700_000_000_123);
  const lines = a.trimEnd().split('\n');
  const value = (k: string) => lines.filter((l) => l.startsWith(`${k} `)).map((l) => l.slice(k.length + 1));
  assert.deepEqual([...new Set(lines.map((l) => l.split(' ')[0]))], ['id', 'hostname', 'machine_id', 'time', 'seed', 'host_key_line', 'host_key_pub', 'authorized_key', 'end']);
  assert.equal(lines.at(-1), 'end');
  assert.deepEqual(value('time'), ['1700000000.123']);
  assert.match(value('machine_id')[0]!, /^[0-9a-f]{32}$/);
  assert.match(value('seed')[0]!, /^[0-9a-f]{128}$/);
  // What the agent rebuilds (each line plus a newline) is the key, byte for byte.
  assert.equal(value('host_key_line').map((l) => l + '\n').join(''), identity.hostKey.privateKey);
  assert.deepEqual(value('host_key_pub'), [identity.hostKey.publicKey]);
  assert.deepEqual(value('authorized_key'), [identity.authorizedKey]);
  const seedOf = (m: string) => /^seed (\S+)$/m.exec(m)![1];
  const midOf = (m: string) => /^machine_id (\S+)$/m.exec(m)![1];
  assert.notEqual(seedOf(a), seedOf(b));
  assert.notEqual(midOf(a), midOf(b));
  assert.throws(() => identityMessage({ ...identity, authorizedKey: 'a\nb' }), /one line/);
});

test('sendIdentity waits for the agent to acknowledge this clone, and fails clearly when it does not', async () => {
  const path = join(dir, 'agent.sock');
  let received = '';
  const server = createServer((s: Socket) => {
    s.on('data', (c: Buffer) => {
      received += c.toString();
      if (received.endsWith('end\n')) s.write('restored vm-abc\n');
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  try {
    await sendIdentity(path, identity);
    assert.match(received, /^id vm-abc\n/);
  } finally {
    server.close();
  }
  const silent = join(dir, 'silent.sock');
  const mute = createServer(() => {});
  await new Promise<void>((r) => mute.listen(silent, r));
  try {
    await assert.rejects(sendIdentity(silent, identity, undefined, 300), /no answer from the guest's restore agent within 0.3 s/);
  } finally {
    mute.close();
  }
});

test('QMP: greeting, capabilities, commands matched by id, events skipped, errors and a closed socket reported', async () => {
  const path = join(dir, 'qmp.sock');
  const seen: string[] = [];
  let migrateCalls = 0;
  const server = createServer((s: Socket) => {
    s.write('{"QMP": {"version": {}, "capabilities": []}}\n');
    let buf = '';
    s.on('data', (c: Buffer) => {
      buf += c.toString();
      for (let i; (i = buf.indexOf('\n')) >= 0; ) {
        const msg = JSON.parse(buf.slice(0, i)) as { execute: string; id: number };
        buf = buf.slice(i + 1);
        seen.push(msg.execute);
        s.write('{"event": "STOP", "timestamp": {}}\n');
        if (msg.execute === 'query-migrate') {
          migrateCalls++;
          s.write(JSON.stringify({ return: { status: migrateCalls < 3 ? 'active' : 'completed' }, id: msg.id }) + '\n');
        } else if (msg.execute === 'bogus') {
          s.write(JSON.stringify({ error: { class: 'CommandNotFound', desc: 'The command bogus has not been found' }, id: msg.id }) + '\n');
        } else if (msg.execute === 'quit') {
          s.end();
        } else {
          s.write(JSON.stringify({ return: {}, id: msg.id }) + '\n');
        }
      }
    });
  });
  await new Promise<void>((r) => server.listen(path, r));
  try {
    const q = await Qmp.connect(path);
    assert.deepEqual(await q.command('stop'), {});
    assert.deepEqual(await q.waitMigration(5000), { status: 'completed' });
    await assert.rejects(q.command('bogus'), /CommandNotFound: The command bogus has not been found/);
    await assert.rejects(q.command('quit'), /closed the QMP connection/);
    await assert.rejects(q.command('stop'), /closed the QMP connection/);
    q.close();
    assert.deepEqual(seen, ['qmp_capabilities', 'stop', 'query-migrate', 'query-migrate', 'query-migrate', 'bogus', 'quit']);
  } finally {
    server.close();
  }
  await assert.rejects(Qmp.connect(join(dir, 'nobody.sock'), 200), /cannot talk to QEMU over QMP/);
});
