import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import { collect, ensureImage, instanceDirs, mayfly, processesMentioning, startMayfly, testDataDir, waitFor } from '../helpers/env.ts';

// `mayfly run` end to end, through the real CLI, each run in its own fresh VM.

function assertNothingLeft(): void {
  assert.deepEqual(instanceDirs(), [], 'no instance dir (clone, keys, sockets) is left');
  assert.deepEqual(processesMentioning(join(testDataDir(), 'instances')), [], 'no qemu process is left');
}

describe('mayfly run', { timeout: 900_000 }, () => {
  before(() => ensureImage());

  test('exit code and streams come back; a second run does not see the first one\'s files', async () => {
    const first = await mayfly(['run', '--', 'sh', '-c', 'echo secret > /builds/marker; echo out; echo err >&2; exit 3']);
    assert.equal(first.code, 3, first.stderr);
    assert.equal(first.stdout, 'out\n');
    assert.match(first.stderr, /^err$/m);
    assert.doesNotMatch(first.stderr, /^out$/m);
    assertNothingLeft();

    const second = await mayfly(['run', '--', 'sh', '-c', 'if test -e /builds/marker; then echo dirty; exit 1; fi; echo clean']);
    assert.equal(second.code, 0, second.stderr);
    assert.equal(second.stdout, 'clean\n');
    assertNothingLeft();
  });

  test('SIGTERM mid-command destroys the machine and leaves nothing behind', async () => {
    const child = startMayfly(['run', '--', 'sh', '-c', 'echo started; sleep 600']);
    const result = collect(child);
    let out = '';
    child.stdout!.on('data', (c: Buffer) => (out += c.toString()));
    await waitFor(() => out.includes('started'), 300_000, 'the command to start in the machine');
    assert.equal(instanceDirs().length, 1, 'one machine exists while the command runs');
    child.kill('SIGTERM');
    const r = await result;
    assert.equal(r.code, 143, r.stderr);
    assertNothingLeft();
    const ps = await mayfly(['ps', '--json']);
    assert.deepEqual(JSON.parse(ps.stdout), []);
  });

  test('SIGINT while the machine is still booting also cleans up', async () => {
    const child = startMayfly(['--debug', 'run', '--start', 'boot', '--', 'true']);
    const result = collect(child);
    let err = '';
    child.stderr!.on('data', (c: Buffer) => (err += c.toString()));
    await waitFor(() => /machine process started/.test(err), 120_000, 'the machine process to start');
    child.kill('SIGINT');
    const r = await result;
    assert.equal(r.code, 130, r.stderr);
    assertNothingLeft();
  });

  test('--keep leaves the machine reachable; ps lists it; rm removes it', async () => {
    const kept = await mayfly(['run', '--keep', '--', 'sh', '-c', 'echo kept > /builds/state']);
    assert.equal(kept.code, 0, kept.stderr);
    const id = /machine (vm-[a-z2-7]+) is kept running/.exec(kept.stderr)?.[1];
    assert.ok(id, `the kept machine is named in: ${kept.stderr}`);
    const sshLine = /reach it: (ssh .*)$/m.exec(kept.stderr)?.[1];
    assert.ok(sshLine);

    const ps = JSON.parse((await mayfly(['ps', '--json'])).stdout) as { id: string; running: boolean; state: string }[];
    assert.deepEqual(ps.map((i) => [i.id, i.running]), [[id, true]]);

    // The printed ssh command works as printed, with the pinned host key.
    const { spawnSync } = await import('node:child_process');
    const args = sshLine.split(' ').slice(1);
    const r = spawnSync('ssh', ['-o', 'BatchMode=yes', '-o', 'StrictHostKeyChecking=yes', ...args, 'cat /builds/state'], { encoding: 'utf8' });
    assert.equal(r.stdout, 'kept\n', r.stderr);

    const inUse = await mayfly(['image', 'rm', 'debian-12']);
    assert.equal(inUse.code, 2);
    assert.match(inUse.stderr, new RegExp(`debian-12:\\d+ is used by ${id}`));

    const rm = await mayfly(['rm', id]);
    assert.equal(rm.code, 0, rm.stderr);
    assertNothingLeft();
  });

  test('a boot timeout fails with the console lines and leaves nothing behind', async () => {
    const tmp = mkdtempSync('/var/tmp/mayfly-cfg-');
    try {
      const cfg = join(tmp, 'config.toml');
      // Under TCG a boot takes ~11 s, so 5 s always times out (with KVM it may not). The retry
      // boots without 'quiet', so its console has lines to show.
      writeFileSync(cfg, '[qemu]\nboot_timeout = 5\nboot_retries = 1\n');
      const r = await mayfly(['--config', cfg, 'run', '--start', 'boot', '--', 'true']);
      if (r.code === 0) return; // a host fast enough to boot in 5 s proves nothing here
      assert.equal(r.code, 125, r.stderr);
      assert.match(r.stderr, /did not answer over SSH within 5 s/);
      assert.match(r.stderr, /boot timed out; retrying/);
      assert.match(r.stderr, /last console lines:\n[\s\S]*^\[ *\d+\.\d+\] /m);
      assert.match(r.stderr, /raise qemu\.boot_timeout/);
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
    assertNothingLeft();
  });

  test('bad inputs fail before anything starts, with a clear message', async () => {
    const noImage = await mayfly(['run', '--image', 'no-such-image', '--', 'true']);
    assert.equal(noImage.code, 125);
    assert.match(noImage.stderr, /no image 'no-such-image'/);
    assert.match(noImage.stderr, /available images: debian-12/);

    const tmp = mkdtempSync('/var/tmp/mayfly-cfg-');
    try {
      const cfg = join(tmp, 'config.toml');
      writeFileSync(cfg, '[qemu]\naccel = "tcg"\nboot_timout = 30\n');
      const badKey = await mayfly(['--config', cfg, 'run', '--', 'true']);
      assert.equal(badKey.code, 2);
      assert.match(badKey.stderr, new RegExp(`${cfg.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}:3: qemu\\.boot_timout: unknown key`));
      assert.match(badKey.stderr, /did you mean 'boot_timeout'/);

      const missing = await mayfly(['--config', join(tmp, 'nope.toml'), 'ps']);
      assert.equal(missing.code, 2);
      assert.match(missing.stderr, /nope\.toml/);
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }

    const badCpus = await mayfly(['run', '--cpus', 'zero', '--', 'true']);
    assert.equal(badCpus.code, 2);
    assert.match(badCpus.stderr, /--cpus must be a whole number/);

    const tooBig = await mayfly(['run', '--cpus', '999', '--', 'true']);
    assert.equal(tooBig.code, 125);
    assert.match(tooBig.stderr, /999 CPUs asked for, but this host has \d+/);

    const smallDisk = await mayfly(['run', '--disk', '1', '--', 'true']);
    assert.equal(smallDisk.code, 125);
    assert.match(smallDisk.stderr, /smaller than image debian-12/);
    assertNothingLeft();
    assert.equal(existsSync(join(testDataDir(), 'state.db')), true);
  });
});
