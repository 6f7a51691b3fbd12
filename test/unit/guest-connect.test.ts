import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { ErrorCode, MayflyError } from '../../src/errors.ts';
import { SshChannel, generateKeyPair, remoteCommand } from '../../src/guest/index.ts';

// Connection attempts must always settle, whatever the peer does, or readiness waits forever.

describe('SshChannel.connectOnce against broken peers', { timeout: 20_000 }, () => {
  let server: Server;
  let port = 0;
  const keys = generateKeyPair('test');
  const host = generateKeyPair('host');

  before(async () => {
    // Answers with an SSH banner, then hangs up: a guest whose sshd dies mid-handshake.
    server = createServer((sock) => {
      sock.write('SSH-2.0-OpenSSH_9.2p1 test\r\n');
      setTimeout(() => sock.destroy(), 50);
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    port = (server.address() as { port: number }).port;
  });
  after(() => server.close());

  const ep = () => ({ host: '127.0.0.1', port, user: 'ci', privateKey: keys.privateKey, hostKey: host.publicKey });

  test('a peer that closes after its banner rejects the attempt (no hang)', async () => {
    const t0 = Date.now();
    await assert.rejects(SshChannel.connectOnce(ep(), 5000), /closed|handshake|ECONNRESET/i);
    assert.ok(Date.now() - t0 < 4000, 'rejected well before the ready timeout');
  });

  test('waitReady keeps retrying such a peer until its deadline, then says so', async () => {
    await assert.rejects(SshChannel.waitReady(ep(), { timeoutMs: 1500 }), (e: unknown) => {
      assert.ok(e instanceof MayflyError);
      assert.equal(e.code, ErrorCode.BOOT_TIMEOUT);
      assert.match(e.message, /did not answer over SSH within 2 s/);
      return true;
    });
  });

  test('waitReady stops at once when the machine process is gone', async () => {
    await assert.rejects(SshChannel.waitReady(ep(), { timeoutMs: 60_000, alive: () => 'the QEMU process exited' }), /the QEMU process exited/);
  });

  test('an aborted signal ends the attempt', async () => {
    const ac = new AbortController();
    const p = SshChannel.waitReady(ep(), { timeoutMs: 60_000, signal: ac.signal });
    setTimeout(() => ac.abort(new Error('stop now')), 100);
    await assert.rejects(p, /stop now/);
  });
});

test('an argv[0] that looks like an assignment is refused, not run by env', () => {
  assert.throws(() => remoteCommand(['FOO=x', 'ls']), (e: unknown) => {
    assert.ok(e instanceof MayflyError);
    assert.equal(e.code, ErrorCode.USAGE);
    assert.equal(e.message, "'FOO=x' looks like a variable assignment, not a command");
    return true;
  });
});
