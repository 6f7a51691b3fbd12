import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ImageStore } from '../../src/images/store.ts';
import type { Engine, Lease } from '../../src/pool/index.ts';
import { collect, ensureImage, instanceDirs, mayfly, processesMentioning, publishImageCopy, startMayfly, testDataDir, testEngine, waitFor } from '../helpers/env.ts';

// Image maintenance on real images and machines: `image maintain` and `image shell` work on a
// copy and publish it as a new version, a machine running on the old version sees nothing of
// it, and `image gc` never removes a version in use. Two VM boots in all.

async function sha256(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(file)) h.update(c as Buffer);
  return h.digest('hex');
}

function leftovers(): { mounts: string[]; loops: string[]; scratch: string[] } {
  const data = testDataDir();
  const scratch = join(data, 'images', '.tmp');
  return {
    mounts: readFileSync('/proc/self/mountinfo', 'utf8').split('\n').filter((l) => l.split(' ')[4]?.startsWith(data)),
    loops: readdirSync('/sys/block').filter((d) => d.startsWith('loop') && readFileOr(`/sys/block/${d}/loop/backing_file`).startsWith(data)),
    scratch: existsSync(scratch) ? readdirSync(scratch).filter((d) => d.startsWith('work-')) : [],
  };
}

function readFileOr(path: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return '';
  }
}

describe('image maintenance', { timeout: 900_000 }, () => {
  const name = 'test-maint';
  let tmp: string;
  let engine: Engine | undefined;
  let lease: Lease | undefined;
  const store = () => new ImageStore(testDataDir());

  before(async () => {
    await ensureImage();
    tmp = mkdtempSync('/var/tmp/mayfly-maint-recipes-');
    // The default image's files under another name, with a recipe whose command has not run
    // on them yet: maintenance must run it.
    const recipe = join(tmp, 'test-maint.toml');
    writeFileSync(recipe, `name = "${name}"\npackages = ["git"]\ncommands = ["echo maintained > /etc/mayfly-maintained"]\n`);
    publishImageCopy(name, '8', { source: { type: 'recipe', recipe, suite: 'bookworm', packages: [] } });
  });

  after(async () => {
    await lease?.release().catch(() => {});
    engine?.close();
    if (existsSync(join(testDataDir(), 'images', name))) await mayfly(['image', 'rm', '--force', name]);
    rmSync(tmp, { recursive: true, force: true });
    assert.deepEqual(leftovers(), { mounts: [], loops: [], scratch: [] }, 'no mount, loop device or scratch dir is left');
  });

  test('maintain publishes a new version; a machine running on the old one does not change', async () => {
    const v1 = store().resolve(`${name}:1`);
    const diskBefore = await sha256(v1.diskPath);
    engine = testEngine();
    lease = await engine.lease({ image: `${name}:1`, owner: 'image-maintain.test', start: 'boot', size: { cpus: 1, memoryMiB: 768 } });
    const guest = lease.machine.guest;
    await guest.capture(['sh', '-c', 'echo job > /tmp/job-file']);

    const r = await mayfly(['image', 'maintain', name]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, new RegExp(`^${name}:2 sha256:[0-9a-f]{64}$`, 'm'));
    assert.match(r.stderr, /maintain test-maint:1: step 3\/7: apt-get update/);
    assert.match(r.stderr, /step 7\/7: publish/);

    const v2 = store().resolve(`${name}:2`);
    assert.equal(v2.source.maintainedFrom, 1);
    assert.equal(v2.source.maintainedBy, 'maintain');
    assert.deepEqual(v2.features, v1.features, 'the guest feature flags are kept');
    assert.equal(v2.identity, 'fw_cfg');
    assert.notEqual(v2.id, v1.id);
    assert.ok(existsSync(v2.kernelPath!) && existsSync(v2.initrdPath!), 'kernel and initrd come with the new version');

    // The running machine: its files are what they were, the recipe's command is not there.
    assert.equal(await guest.capture(['cat', '/tmp/job-file']), 'job\n');
    const seen = await guest.exec(['test', '-e', '/etc/mayfly-maintained']);
    assert.equal(seen.exitCode, 1, 'the running machine does not see the maintained version');
    assert.equal(await sha256(v1.diskPath), diskBefore, 'the old version\'s disk is unchanged');
    assert.deepEqual(leftovers(), { mounts: [], loops: [], scratch: [] });
  });

  test('image shell: one command in a copy; --commit publishes it, without --commit or on failure nothing is published', async () => {
    const noCommit = await mayfly(['image', 'shell', name, '--', 'touch', '/not-kept']);
    assert.equal(noCommit.code, 0, noCommit.stderr);
    assert.match(noCommit.stderr, /changes to the copy of test-maint:2 thrown away \(no --commit\)/);
    assert.deepEqual(store().versions(name), [1, 2]);

    const failed = await mayfly(['image', 'shell', name, '--commit', '--', 'sh', '-c', 'touch /x; exit 3']);
    assert.equal(failed.code, 3, 'the command\'s exit code');
    assert.match(failed.stderr, /exit 3: changes to the copy of test-maint:2 thrown away, nothing published/);
    assert.deepEqual(store().versions(name), [1, 2]);

    const commit = await mayfly(['image', 'shell', name, '--commit', '--', 'touch', '/x']);
    assert.equal(commit.code, 0, commit.stderr);
    assert.match(commit.stdout, new RegExp(`^${name}:3 sha256:[0-9a-f]{64}$`, 'm'));
    assert.equal(store().resolve(`${name}:3`).source.maintainedBy, 'shell');
    assert.equal(store().resolve(`${name}:3`).source.maintainedFrom, 2);

    const has = await mayfly(['image', 'shell', `${name}:3`, '--', 'sh', '-c', 'test -e /x && test ! -e /not-kept && cat /etc/mayfly-maintained']);
    assert.equal(has.code, 0, has.stderr);
    assert.equal(has.stdout, 'maintained\n');
    const old = await mayfly(['image', 'shell', `${name}:2`, '--', 'test', '-e', '/x']);
    assert.equal(old.code, 1, 'version 2 does not have /x');
    assert.deepEqual(store().versions(name), [1, 2, 3]);

    const bad = await mayfly(['image', 'shell', 'no-such-image', '--', 'true']);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /no image 'no-such-image'/);
  });

  test('image gc keeps what a machine uses and the newest, removes the rest', async () => {
    const cfg = join(tmp, 'keep1.toml');
    writeFileSync(cfg, '[images]\nkeep_versions = 1\n');
    const dry = await mayfly(['--config', cfg, 'image', 'gc', '--dry-run', name]);
    assert.equal(dry.code, 0, dry.stderr);
    assert.match(dry.stdout, /^would remove test-maint:2 \(older than the newest 1 and unused\)$/m);
    assert.match(dry.stdout, new RegExp(`^kept test-maint:1 \\(in use by instance ${lease!.machine.id}\\)$`, 'm'));
    assert.match(dry.stdout, /^kept test-maint:3 \(newest\)$/m);
    assert.deepEqual(store().versions(name), [1, 2, 3]);

    const gc = await mayfly(['--config', cfg, 'image', 'gc', name]);
    assert.equal(gc.code, 0, gc.stderr);
    assert.match(gc.stdout, /^removed test-maint:2 /m);
    assert.deepEqual(store().versions(name), [1, 3]);

    // The machine on version 1 still works after all this.
    assert.equal(await lease!.machine.guest.capture(['cat', '/tmp/job-file']), 'job\n');
    await lease!.release();
    lease = undefined;
    const again = await mayfly(['--config', cfg, 'image', 'gc', name]);
    assert.match(again.stdout, /^removed test-maint:1 /m);
    assert.deepEqual(store().versions(name), [3]);
  });

  test('an interrupted maintain unmounts, detaches its loop device, removes its scratch dir and publishes nothing', async () => {
    const before = store().versions(name);
    const child = startMayfly(['image', 'maintain', name]);
    const result = collect(child);
    // Interrupt while the recipe's work runs in the mounted copy.
    await waitFor(() => leftovers().mounts.length >= 3, 60_000, 'maintain to mount the copy and enter it');
    child.kill('SIGINT');
    const r = await result;
    assert.equal(r.code, 130, r.stderr);
    assert.match(r.stderr, /cancelled by SIGINT/);
    assert.deepEqual(leftovers(), { mounts: [], loops: [], scratch: [] });
    assert.deepEqual(processesMentioning(join(testDataDir(), 'images', '.tmp')), [], 'no apt or chroot process is left');
    assert.deepEqual(store().versions(name), before);

    // kill -9: nothing can clean up at once; the next maintain or shell (or mayflyd's reaper) does.
    const killed = startMayfly(['image', 'maintain', name]);
    const killedResult = collect(killed);
    await waitFor(() => leftovers().mounts.length >= 3, 60_000, 'maintain to mount the copy and enter it');
    killed.kill('SIGKILL');
    await killedResult;
    await waitFor(() => processesMentioning(join(testDataDir(), 'images', '.tmp')).length === 0, 10_000, 'the chroot\'s processes to end with mayfly');
    assert.notDeepEqual(leftovers().scratch, [], 'a killed maintain leaves its copy');
    const next = await mayfly(['image', 'shell', name, '--', 'true']);
    assert.equal(next.code, 0, next.stderr);
    assert.deepEqual(leftovers(), { mounts: [], loops: [], scratch: [] });
    assert.deepEqual(store().versions(name), before);
  });

  test('a fresh machine of the new version has the maintained files', async () => {
    const r = await mayfly(['run', '--image', name, '--start', 'boot', '--', 'sh', '-c', 'cat /etc/mayfly-maintained; test -e /x && echo has-x']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'maintained\nhas-x\n');
    assert.deepEqual(instanceDirs(), []);
    assert.deepEqual(processesMentioning(join(testDataDir(), 'instances')), []);
  });
});
