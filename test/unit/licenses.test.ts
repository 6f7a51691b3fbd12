import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { shippedLicenses } from '../../src/cli/commands/licenses.ts';

const projectRoot = join(import.meta.dirname, '..', '..');
const pkg = JSON.parse(readFileSync(join(projectRoot, 'package.json'), 'utf8')) as {
  version: string;
  dependencies: Record<string, string>;
  devDependencies: Record<string, string>;
};

describe('shippedLicenses', () => {
  const list = shippedLicenses();
  const byName = new Map(list.map((p) => [p.name, p]));

  test('mayfly itself comes first, MIT, with its LICENSE file', () => {
    const first = list[0]!;
    assert.equal(first.name, 'mayfly');
    assert.equal(first.version, pkg.version);
    assert.equal(first.license, 'MIT');
    assert.equal(first.licenseFile, join(projectRoot, 'LICENSE'));
    assert.equal(first.text, readFileSync(join(projectRoot, 'LICENSE'), 'utf8'));
    assert.match(first.text ?? '', /^MIT License/);
  });

  test('every direct dependency is there, with the installed version', () => {
    for (const name of ['ssh2', 'commander', 'pino', 'yaml', 'zod', 'smol-toml']) {
      assert.ok(name in pkg.dependencies, `${name} is a dependency`);
      const p = byName.get(name);
      assert.ok(p, `${name} is listed`);
      const installed = JSON.parse(readFileSync(join(projectRoot, 'node_modules', name, 'package.json'), 'utf8')) as { version: string };
      assert.equal(p.version, installed.version, name);
    }
    assert.equal(byName.get('ssh2')?.license, 'MIT');
    assert.equal(byName.get('commander')?.license, 'MIT');
    assert.equal(byName.get('pino')?.license, 'MIT');
    assert.equal(byName.get('yaml')?.license, 'ISC');
    assert.equal(byName.get('zod')?.license, 'MIT');
    assert.equal(byName.get('smol-toml')?.license, 'BSD-3-Clause');
  });

  test('transitive dependencies are included', () => {
    // ssh2 -> asn1, bcrypt-pbkdf -> tweetnacl; pino -> sonic-boom, thread-stream.
    for (const name of ['asn1', 'bcrypt-pbkdf', 'tweetnacl', 'sonic-boom', 'thread-stream', 'pino-std-serializers']) {
      assert.ok(byName.has(name), `${name} is listed`);
    }
  });

  test('no devDependencies (they are not shipped)', () => {
    for (const name of [...Object.keys(pkg.devDependencies), 'typescript', '@types/node', '@types/ssh2', 'undici-types']) {
      assert.equal(byName.has(name), false, `${name} must not be listed`);
    }
  });

  test('each package version once (two versions of one package both ship); the rest sorted by name', () => {
    const ids = list.map((p) => `${p.name}@${p.version}`);
    assert.equal(new Set(ids).size, ids.length, 'no duplicates');
    const names = list.map((p) => p.name);
    const rest = names.slice(1);
    assert.deepEqual(rest, [...rest].sort((a, b) => a.localeCompare(b)));
  });

  test('every entry has a real license and, when it has a file, its text', () => {
    for (const p of list) {
      assert.equal(typeof p.license, 'string', p.name);
      assert.notEqual(p.license, 'UNKNOWN', p.name);
      assert.notEqual(p.license.trim(), '', p.name);
      assert.match(p.version, /^\d+\.\d+\.\d+/, p.name);
      if (p.licenseFile !== null) {
        assert.equal(existsSync(p.licenseFile), true, p.licenseFile);
        assert.equal(p.text, readFileSync(p.licenseFile, 'utf8'), p.name);
      } else {
        assert.equal(p.text, null, p.name);
      }
    }
  });
});
