import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { after, describe, test } from 'node:test';
import { imageShell } from '../../src/images/maintain.ts';
import { ImageStore, type ImageManifest } from '../../src/images/store.ts';
import { readMounts } from '../../src/storage/mounts.ts';

// The container shape of an image copy (a `rootfs/` directory in the version dir, copied with
// cp -a --reflink=auto): a tiny root made of the host's dash, touch, cat and rm with their
// libraries stands in for a container image. Needs root (chroot, mounts).

const isRoot = process.getuid?.() === 0;
const root = mkdtempSync(join(tmpdir(), 'mayfly-ct-root-test-'));
after(() => rmSync(root, { recursive: true, force: true }));

function tinyRoot(dir: string): void {
  const bins = ['/usr/bin/dash', '/usr/bin/touch', '/usr/bin/cat', '/usr/bin/rm'];
  const libs = new Set<string>();
  for (const b of bins) {
    for (const m of execFileSync('ldd', [b], { encoding: 'utf8' }).matchAll(/(\/\S+\.so[^\s]*)/g)) libs.add(m[1]!);
  }
  for (const f of [...bins, ...libs]) {
    mkdirSync(join(dir, dirname(f)), { recursive: true });
    copyFileSync(f, join(dir, f));
  }
  execFileSync('chmod', ['755', ...bins.map((b) => join(dir, b))]);
  mkdirSync(join(dir, 'bin'), { recursive: true });
  copyFileSync('/usr/bin/dash', join(dir, 'bin/sh'));
  execFileSync('chmod', ['755', join(dir, 'bin/sh')]);
  mkdirSync(join(dir, 'etc'), { recursive: true });
  writeFileSync(join(dir, 'etc/resolv.conf'), 'nameserver 10.0.2.3\n');
}

describe('image shell on a container image', { skip: isRoot ? false : 'needs root' }, () => {
  const store = new ImageStore(join(root, 'data'));
  const prep = store.tempDir('ct');
  tinyRoot(join(prep, 'rootfs'));
  const manifest = {
    name: 'ct', id: `sha256:${'3'.repeat(64)}`, kind: 'container', createdAt: new Date().toISOString(),
    source: { type: 'recipe', recipe: 'builtin:none', suite: 'bookworm', packages: [] },
    disk: '', kernel: null, initrd: null, kernelArgs: null, diskVirtualBytes: 0, identity: 'fw_cfg', user: 'ci', features: ['x'],
  } as unknown as Omit<ImageManifest, 'version'>;
  const v1 = store.publish(prep, manifest);
  const say = () => {};

  test('--commit publishes a copy of rootfs/ with the change; the old version keeps its files', async () => {
    const r = await imageShell(store, v1, { commit: true, command: ['/usr/bin/touch', '/x'], say });
    assert.equal(r.exitCode, 0);
    assert.equal(r.published?.version, 2);
    const v2 = store.get('ct', 2)!;
    assert.ok(existsSync(join(v2.dir, 'rootfs', 'x')));
    assert.equal(existsSync(join(v1.dir, 'rootfs', 'x')), false);
    assert.equal(v2.source.maintainedFrom, 1);
    assert.deepEqual(v2.features, ['x']);
    assert.notEqual(v2.id, v1.id);
    // The command worked with the host's resolver; the published root has its own back.
    assert.equal(readFileSync(join(v2.dir, 'rootfs/etc/resolv.conf'), 'utf8'), 'nameserver 10.0.2.3\n');
  });

  test('without --commit, or when the command fails, nothing is published and nothing is left', async () => {
    const r = await imageShell(store, v1, { command: ['/usr/bin/touch', '/y'], say });
    assert.equal(r.published, null);
    const failed = await imageShell(store, v1, { commit: true, command: ['/bin/sh', '-c', 'exit 4'], say });
    assert.equal(failed.exitCode, 4);
    assert.equal(failed.published, null);
    assert.deepEqual(store.versions('ct'), [1, 2]);
    assert.deepEqual(readdirSync(join(store.root, '.tmp')).filter((d) => d.startsWith('work-')), []);
    assert.deepEqual(readMounts().filter((m) => m.mountPoint.startsWith(root)), []);
  });
});
