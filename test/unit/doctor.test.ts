import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { accessSync, constants, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { release, tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import type { DoctorReport } from '../../src/cli/commands/doctor.ts';
import { chooseAccel } from '../../src/drivers/index.ts';
import { silentLogger } from '../../src/log.ts';
import { findOnPath } from '../../src/util/exec.ts';

// `mayfly doctor` as a user runs it: bin/mayfly with a fresh data dir and an empty config.

const projectRoot = join(import.meta.dirname, '..', '..');
const tmp = mkdtempSync(join(tmpdir(), 'mayfly-doctor-test-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

const emptyConfig = join(tmp, 'config.toml');
writeFileSync(emptyConfig, '');

function doctor(dataDir: string, args: string[] = ['--json'], config = emptyConfig) {
  const env = { ...process.env };
  delete env.MAYFLY_CONFIG;
  delete env.MAYFLY_DATA_DIR;
  const r = spawnSync(join(projectRoot, 'bin', 'mayfly'), ['--data-dir', dataDir, '--config', config, 'doctor', ...args], {
    encoding: 'utf8',
    env,
  });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

function doctorJson(dataDir: string, config = emptyConfig): DoctorReport {
  const r = doctor(dataDir, ['--json'], config);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout) as DoctorReport;
}

function freshDir(name: string): string {
  const d = join(tmp, name);
  mkdirSync(d);
  return d;
}

const kvmOpens = (() => {
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
})();

describe('mayfly doctor', () => {
  test('--json has every section, probes every backend, and leaves the data dir as it was', () => {
    const dataDir = freshDir('data');
    const r = doctorJson(dataDir);
    assert.deepEqual(Object.keys(r), ['host', 'dataDir', 'kvm', 'storage', 'nspawn', 'network', 'advice']);
    assert.equal(r.host.kernel, release());
    assert.equal(r.host.root, process.getuid?.() === 0);
    assert.equal(r.dataDir.path, dataDir);
    assert.equal(r.dataDir.exists, true);
    assert.equal(r.dataDir.probedIn, dataDir);
    assert.ok(r.dataDir.filesystem.length > 0 && r.dataDir.freeBytes > 0 && r.dataDir.totalBytes >= r.dataDir.freeBytes);

    assert.equal(r.storage.setting, 'auto');
    assert.deepEqual(r.storage.dir.backends.map((b) => b.name), ['btrfs-snapshot', 'reflink', 'overlayfs', 'copy']);
    for (const b of r.storage.dir.backends) {
      assert.equal(typeof b.usable, 'boolean');
      assert.ok(b.reason.length > 0, b.name);
      assert.equal(typeof b.ms, 'number');
    }
    assert.equal(r.storage.dir.chosen, r.storage.dir.backends.find((b) => b.usable)?.name ?? null);
    assert.equal(r.storage.dir.error, null);
    assert.equal(r.storage.dir.backends.find((b) => b.name === 'copy')?.usable, true, 'a plain copy works anywhere writable');
    if (r.host.root && r.dataDir.filesystem === 'ext4') assert.equal(r.storage.dir.chosen, 'overlayfs');
    assert.deepEqual(r.storage.disk.backends.map((b) => b.name), ['qcow2-overlay']);

    const nspawn = findOnPath('systemd-nspawn');
    assert.equal(r.nspawn.available, Boolean(nspawn));
    if (nspawn) assert.match(r.nspawn.version ?? '', /^systemd \d+/);
    else assert.deepEqual(r.nspawn, { available: false, path: null, version: null, reason: 'not installed: apt-get install systemd-container' });
    assert.equal(r.network.mode, 'user');
    const bridgedTools = Boolean(findOnPath('ip') && findOnPath('nft')) && existsSync('/dev/net/tun') && process.getuid?.() === 0;
    assert.equal(r.network.bridged, bridgedTools, r.network.reason);
    assert.ok(Array.isArray(r.advice) && r.advice.every((a) => typeof a === 'string'));
    if (r.storage.dir.chosen !== 'btrfs-snapshot') assert.ok(r.advice.some((a) => a.startsWith('put the data dir on btrfs')), r.advice.join('\n'));

    // Only looked and probed: no state, no host cache, no probe dirs.
    assert.deepEqual(readdirSync(dataDir), []);
  });

  test('a data dir that does not exist is probed in its parent and not made', () => {
    const parent = freshDir('parent');
    const r = doctorJson(join(parent, 'not', 'yet'));
    assert.equal(r.dataDir.exists, false);
    assert.equal(r.dataDir.probedIn, parent);
    assert.deepEqual(readdirSync(parent), []);
  });

  test('KVM: what the QEMU driver cached, "not probed yet" without a cache, "stale" for another kernel', { skip: kvmOpens ? false : '/dev/kvm cannot be opened here' }, () => {
    const dataDir = freshDir('kvm');
    const none = doctorJson(dataDir).kvm;
    assert.equal(none.status, 'not-probed');
    assert.equal(none.usable, null);
    assert.match(none.reason, /`mayfly run -- true` probes it/);

    mkdirSync(join(dataDir, 'host'));
    const qemuVersion = findOnPath('qemu-system-x86_64')
      ? spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0]
      : '';
    const cache = (key: string) =>
      writeFileSync(join(dataDir, 'host', 'accel.json'), JSON.stringify({ accel: 'tcg', reason: 'the probe guest hung', key }) + '\n');
    cache(`${release()}|${qemuVersion}`);
    assert.deepEqual(doctorJson(dataDir).kvm, { usable: false, status: 'unusable', reason: 'the probe guest hung' });
    cache('4.19.0-old|QEMU emulator version 5.2.0');
    const stale = doctorJson(dataDir).kvm;
    assert.equal(stale.status, 'stale');
    assert.equal(stale.usable, null);
    assert.match(stale.reason, /probed for another kernel or QEMU \(then: the probe guest hung\)/);
  });

  test('doctor reads the cache the way the QEMU driver writes it (same key)', { skip: kvmOpens && findOnPath('qemu-system-x86_64') ? false : 'needs /dev/kvm and QEMU' }, async () => {
    const dataDir = freshDir('kvm-key');
    const cacheFile = join(dataDir, 'host', 'accel.json');
    mkdirSync(join(dataDir, 'host'));
    const version = spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0];
    writeFileSync(cacheFile, JSON.stringify({ accel: 'kvm', reason: 'cached answer', key: `${release()}|${version}` }));
    // With a matching key chooseAccel answers from the cache; with any other it would run a
    // probe, which fails at once here (the kernel file does not exist) and says something else.
    const choice = await chooseAccel({
      setting: 'auto',
      qemu: 'qemu-system-x86_64',
      kernel: join(dataDir, 'no-kernel'),
      initrd: join(dataDir, 'no-initrd'),
      cacheFile,
      log: silentLogger,
    });
    assert.deepEqual(choice, { accel: 'kvm', reason: 'cached answer' });
    assert.deepEqual(doctorJson(dataDir).kvm, { usable: true, status: 'usable', reason: 'cached answer' });
  });

  test('a configured backend that cannot work here is reported, not fatal', (t) => {
    const dataDir = freshDir('forced');
    const unusable = doctorJson(dataDir).storage.dir.backends.find((b) => !b.usable);
    if (!unusable) {
      t.skip('every directory backend works in this temp dir');
      return;
    }
    const config = join(tmp, 'forced.toml');
    writeFileSync(config, `[storage]\nbackend = "${unusable.name}"\n`);
    const r = doctorJson(dataDir, config);
    assert.equal(r.storage.setting, unusable.name);
    assert.equal(r.storage.dir.chosen, null);
    assert.match(r.storage.dir.error ?? '', new RegExp(`^storage.backend = "${unusable.name}" cannot be used in`));
    assert.ok(r.advice[0]?.startsWith(`storage.backend = "${unusable.name}" cannot be used`), r.advice.join('\n'));
    assert.deepEqual(readdirSync(dataDir), []);
  });

  test('the human report has one aligned line per fact and marks the backend in use', () => {
    const dataDir = freshDir('human');
    const json = doctorJson(dataDir);
    const r = doctor(dataDir, []);
    assert.equal(r.code, 0, r.stderr);
    const lines = r.stdout.split('\n');
    for (const label of ['host', 'data dir', 'KVM', 'VM disks', 'containers', 'nspawn', 'network']) {
      assert.ok(lines.some((l) => l.startsWith(label.padEnd(12))), `a '${label}' line:\n${r.stdout}`);
    }
    for (const b of json.storage.dir.backends) {
      const line = lines.find((l) => l.slice(12).startsWith(`${b.name} `));
      assert.ok(line, b.name);
      assert.equal(line.includes('<- used'), b.name === json.storage.dir.chosen, line);
      assert.match(line.slice(12), new RegExp(`^${b.name} +${b.usable ? 'yes' : 'no '}  `));
    }
    assert.ok(lines.every((l) => l.length <= 160), 'short lines');
  });
});
