import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import ssh2 from 'ssh2';
import { generateEd25519 } from '../../src/guest/keys.ts';

test('every generated key parses, and its public half matches the private one', () => {
  // ssh2's generator broke about one key in 300; 3000 keys make a regression all but certain to show.
  for (let i = 0; i < 3000; i++) {
    const kp = generateEd25519(`mayfly@vm-${i}`);
    const priv = ssh2.utils.parseKey(kp.privateKey);
    assert.ok(!(priv instanceof Error), `key ${i}: ${priv instanceof Error ? priv.message : ''}\n${kp.privateKey}`);
    const pub = ssh2.utils.parseKey(kp.publicKey);
    assert.ok(!(pub instanceof Error));
    const p = Array.isArray(priv) ? priv[0]! : priv;
    const q = Array.isArray(pub) ? pub[0]! : pub;
    assert.deepEqual(p.getPublicSSH(), q.getPublicSSH());
    assert.equal(p.comment, `mayfly@vm-${i}`);
    const data = Buffer.from(`sign me ${i}`);
    assert.ok(q.verify(data, p.sign(data)), `key ${i} does not verify its own signature`);
  }
});

test('OpenSSH reads the private key and derives the same public key', () => {
  const dir = mkdtempSync(join(tmpdir(), 'mayfly-keys-'));
  try {
    for (let i = 0; i < 5; i++) {
      const kp = generateEd25519('root@vm-x');
      const file = join(dir, `k${i}`);
      writeFileSync(file, kp.privateKey, { mode: 0o600 });
      const derived = execFileSync('ssh-keygen', ['-y', '-f', file], { encoding: 'utf8' }).trim();
      assert.equal(derived.split(' ').slice(0, 2).join(' '), kp.publicKey.split(' ').slice(0, 2).join(' '));
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
