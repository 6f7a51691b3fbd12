import assert from 'node:assert/strict';
import { generateKeyPairSync } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { after, beforeEach, describe, test } from 'node:test';
import { generateKeyPair } from '../../src/guest/index.ts';
import { createLogger } from '../../src/log.ts';
import { clearSecrets, isSecretName, redactData, redactSecrets, registerSecret, registerSecretsFromEnv } from '../../src/secrets.ts';
import { SqliteStateStore } from '../../src/state/index.ts';

// Secrets never reach a log line or the state store. (With real commands and a real machine:
// test/integration/secrets.test.ts.)

const token = 'glcbt-64_' + 'Zx9Qw7ErTy3UiOp1AsDf';
const password = 'pa"ss\\word with spaces';
const opensshKey = generateKeyPair('test').privateKey;
const pemKey = generateKeyPairSync('rsa', { modulusLength: 1024 }).privateKey.export({ type: 'pkcs8', format: 'pem' }).toString();

function capture(): { log: ReturnType<typeof createLogger>; text: () => string } {
  let out = '';
  const dest = new Writable({ write: (c: Buffer, _e, cb) => ((out += c.toString()), cb()) });
  return { log: createLogger({ json: true, level: 'debug', destination: dest }), text: () => out };
}

describe('secrets', () => {
  beforeEach(clearSecrets);

  test('names that hold secrets', () => {
    for (const n of ['CI_JOB_TOKEN', 'CI_REGISTRY_PASSWORD', 'AWS_SECRET_ACCESS_KEY', 'SSH_PRIVATE_KEY', 'API_KEY', 'NPM_AUTH', 'DEPLOY_KEY']) assert.ok(isSecretName(n), n);
    for (const n of ['CI_JOB_ID', 'PATH', 'HOME', 'CI_COMMIT_SHA', 'KEYBOARD']) assert.ok(!isSecretName(n), n);
  });

  test('a registered value is cut wherever it appears, also JSON-escaped; private keys and URL passwords always', () => {
    registerSecret(token);
    registerSecret(password);
    registerSecret('abc'); // too short to register: would cut ordinary words
    const text = `url https://gitlab-ci-token:${token}@gitlab.example/x.git ${JSON.stringify({ p: password })} abc\n${opensshKey}\n${pemKey}`;
    const r = redactSecrets(text);
    for (const s of [token, password, JSON.stringify(password).slice(1, -1), 'OPENSSH PRIVATE KEY-----\n', 'BEGIN PRIVATE KEY', opensshKey.split('\n')[1]!]) {
      assert.ok(!r.includes(s), `${s} is cut from: ${r}`);
    }
    assert.match(r, /abc/);
    assert.match(redactSecrets('https://user:hunter22@example.org/'), /^https:\/\/\[redacted\]@example\.org\/$/);
    assert.deepEqual(redactData({ a: [`x ${token} y`], n: 3 }), { a: ['x [redacted] y'], n: 3 });
  });

  test('registerSecretsFromEnv takes secret-looking names and values that are private keys', () => {
    registerSecretsFromEnv({ CUSTOM_ENV_CI_JOB_TOKEN: token, CUSTOM_ENV_CI_JOB_ID: '123456789', CUSTOM_ENV_KEYFILE: pemKey, OTHER_TOKEN: 'not-with-prefix' }, 'CUSTOM_ENV_');
    assert.equal(redactSecrets(`${token} 123456789 not-with-prefix`), '[redacted] 123456789 not-with-prefix');
  });

  test('the logger cuts registered values, key fields and private keys from every line', () => {
    registerSecret(token);
    const { log, text } = capture();
    log.info({ env: { CI_JOB_TOKEN: token }, token: 'field-named-token-value', url: `https://x:${token}@h/` }, `message with ${token}`);
    log.debug({ nested: { deeper: { value: password } } }, 'password not registered yet');
    registerSecret(password);
    log.warn({ nested: { deeper: { value: password } } }, 'now registered');
    log.error({ err: `ssh failed with key ${opensshKey}` }, 'a key in an error');
    log.info({ privateKey: pemKey }, 'a key field');
    const lines = text().trim().split('\n');
    assert.equal(lines.length, 5);
    const all = text();
    assert.ok(!all.includes(token), all);
    assert.ok(!all.includes('field-named-token-value'));
    assert.ok(!all.includes('PRIVATE KEY'), all);
    // The line logged before the password was registered still has it: registration is what protects.
    assert.ok(lines[1]!.includes(JSON.stringify(password).slice(1, -1)));
    assert.ok(!lines[2]!.includes(JSON.stringify(password).slice(1, -1)));
  });

  test('events, leases, jobs and instance owners are stored without registered secrets', () => {
    const dir = mkdtempSync(join(tmpdir(), 'mayfly-secrets-'));
    after(() => rmSync(dir, { recursive: true, force: true }));
    registerSecret(token);
    const state = new SqliteStateStore(join(dir, 'state.db'));
    try {
      const now = Date.now();
      state.insertInstance({
        id: 'vm-a', driver: 'qemu', imageName: 'debian-12', imageVersion: 1, imageId: 'sha256:x', state: 'creating', createdAt: now, updatedAt: now,
        pid: null, dir: '/x', disks: [], consoleLog: '', sshPort: null, sshHost: null, cpus: 1, memoryMiB: 512, diskGiB: 4, accel: null,
        owner: `run: curl -H 'PRIVATE-TOKEN: ${token}'`, holderPid: null, pool: null,
      });
      state.updateInstance('vm-a', { owner: `lease-1: ${token}` });
      state.addEvent({ at: now, type: 'leased', pool: 'p', instance: 'vm-a', lease: 'lease-1', data: { job: { name: `deploy ${token}` } } });
      state.insertLease({ id: 'lease-1', pool: 'p', instance: 'vm-a', job: { name: token }, state: 'leased', queuedAt: now, leasedAt: now, deadline: null, releasedAt: null });
      state.putJob({ key: 'gitlab/x/1', integration: 'gitlab', instance: 'vm-a', lease: null, createdAt: now, expiresAt: now + 1000, data: { url: `https://gitlab-ci-token:${token}@h/r.git` } });
    } finally {
      state.close();
    }
    const bytes = readFileSync(join(dir, 'state.db'));
    assert.equal(bytes.includes(token), false, 'the token is nowhere in the database file');
    assert.equal(bytes.includes('[redacted]'), true);
  });
});
