import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { after, test } from 'node:test';
import type { Driver } from '../../src/drivers/types.ts';
import type { Image } from '../../src/images/store.ts';
import { createLogger } from '../../src/log.ts';
import { Templates, pinTemplate, type TemplateMeta } from '../../src/pool/templates.ts';
import { SqliteStateStore } from '../../src/state/index.ts';
import { qcow2Overlay } from '../../src/storage/index.ts';

// Which saved templates may be restored: only those made from the same image content with the
// same emulator setup. (Making and restoring them needs real machines: test/integration/restore.)

const dir = mkdtempSync(join(tmpdir(), 'mayfly-templates-'));
after(() => rmSync(dir, { recursive: true, force: true }));

let compat: Record<string, string> = { qemu: 'QEMU emulator version 7.2.0', accel: 'tcg' };
const driver: Driver = {
  name: 'fake',
  start: () => Promise.reject(new Error('not used')),
  deadReason: () => undefined,
  stop: async () => {},
  killNow: () => {},
  consoleTail: () => '',
  listHost: () => [],
  canSnapshot: (i) => (i.features ?? []).includes('restore-agent'),
  saveSnapshot: async () => {},
  snapshotCompat: async () => compat,
};
let logged = '';
const log = createLogger({ json: true, destination: new Writable({ write: (c: Buffer, _e, cb) => ((logged += c.toString()), cb()) }) });
const state = new SqliteStateStore(join(dir, 'state.db'));
after(() => state.close());
const templates = new Templates({ instancesDir: join(dir, 'instances'), state, driver, storage: qcow2Overlay, log, bootTimeoutMs: 1000, bootRetries: 0 });

const image = { name: 'debian-12', version: 1, id: 'sha256:aaa', dir: join(dir, 'images', 'debian-12', '1'), features: ['restore-agent'], identity: 'fw_cfg' } as unknown as Image;
const size = { cpus: 2, memoryMiB: 1024, diskGiB: 4 };

function saved(meta: Partial<TemplateMeta> = {}): string {
  const d = templates.dirFor(image, size);
  mkdirSync(d, { recursive: true });
  writeFileSync(join(d, 'state'), 'state');
  writeFileSync(join(d, 'disk.qcow2'), 'disk');
  const full: TemplateMeta = { imageId: image.id, size, compat: { ...compat }, createdAt: '', stateBytes: 5, seconds: 1, ...meta };
  writeFileSync(join(d, 'meta.json'), JSON.stringify(full));
  return d;
}

test('a template of the same image and emulator is found, per size', async () => {
  const d = saved();
  assert.equal(d, join(image.dir, 'templates', '2cpu-1024mb-4gb'));
  const t = await templates.find(image, size);
  assert.equal(t?.state, join(d, 'state'));
  assert.equal(await templates.find(image, { ...size, memoryMiB: 2048 }), undefined);
  assert.equal(templates.canSnapshot(image), true);
  assert.equal(templates.canSnapshot({ ...image, features: [] } as Image), false, 'images without the restore agent boot');
});

test('another QEMU, accelerator or image content makes it stale: removed with a log line saying why', async () => {
  for (const [change, pattern] of [
    [() => (compat = { ...compat, qemu: 'QEMU emulator version 8.0.0' }), /another qemu \(QEMU emulator version 7.2.0 → QEMU emulator version 8.0.0\)/],
    [() => (compat = { ...compat, accel: 'kvm' }), /another accel \(tcg → kvm\)/],
  ] as const) {
    const d = saved();
    change();
    logged = '';
    assert.equal(await templates.find(image, size), undefined);
    assert.match(logged, pattern);
    assert.equal(existsSync(d), false, 'removed whole: running clones hold hard links of its files');
  }
  saved({ imageId: 'sha256:other' });
  logged = '';
  assert.equal(await templates.find(image, size), undefined);
  assert.match(logged, /image content/);
  const d = saved();
  writeFileSync(join(d, 'meta.json'), '{not json');
  logged = '';
  assert.equal(await templates.find(image, size), undefined);
  assert.match(logged, /its meta.json is unreadable/);
});

test('a template that failed to restore is dropped so the next start makes a new one', async () => {
  saved();
  const t = (await templates.find(image, size))!;
  templates.drop(t, 'the memory state did not load');
  assert.equal(await templates.find(image, size), undefined);
});

test('a clone pins the template: hard links of one generation, which survive the removal of the template', async () => {
  saved();
  const t = (await templates.find(image, size))!;
  const inst = mkdtempSync(join(dir, 'vm-'));
  const p = pinTemplate(t, inst);
  templates.drop(t, 'test');
  assert.equal(readFileSync(p.state, 'utf8'), 'state');
  assert.equal(readFileSync(p.disk, 'utf8'), 'disk');
  assert.throws(() => pinTemplate(t, inst), /the snapshot template .* is gone/);
});

test('a clone on another filesystem (instances_dir on a tmpfs) gets copies of the template, and says why', async (t) => {
  // tmpdir() is on the host's root filesystem here; /dev/shm is a tmpfs on Linux.
  if (!existsSync('/dev/shm') || statSync('/dev/shm').dev === statSync(dir).dev) return t.skip('no second filesystem at /dev/shm');
  saved();
  const tpl = (await templates.find(image, size))!;
  const inst = mkdtempSync('/dev/shm/mayfly-pin-test-');
  try {
    const p = pinTemplate(tpl, inst);
    assert.match(p.copied ?? '', /on another filesystem than the template .* cannot be hard-linked; copied instead/);
    assert.equal(readFileSync(p.disk, 'utf8'), 'disk');
    assert.equal(readFileSync(p.state, 'utf8'), 'state');
    // Copies, not links: removing the template leaves them whole.
    templates.drop(tpl, 'test');
    assert.equal(readFileSync(p.state, 'utf8'), 'state');
    // The same filesystem still links (no copy, no reason given).
    saved();
    const same = pinTemplate((await templates.find(image, size))!, mkdtempSync(join(dir, 'vm-')));
    assert.equal(same.copied, undefined);
    assert.equal(statSync(same.disk).nlink, 2);
  } finally {
    rmSync(inst, { recursive: true, force: true });
  }
});

test('a failed make is remembered for an hour (per image and emulator), so starts do not retry it each time', async () => {
  const d = templates.dirFor(image, size);
  rmSync(d, { recursive: true, force: true });
  mkdirSync(join(d, '..'), { recursive: true });
  writeFileSync(`${d}.failed.json`, JSON.stringify({ imageId: image.id, compat, at: Date.now() - 5 * 60_000, reason: 'sshd did not move' }));
  await assert.rejects(templates.ensure(image, size), /making the snapshot template failed 5 min ago \(sshd did not move\); next try after an hour/);
  compat = { ...compat, qemu: 'QEMU emulator version 9.0.0' };
  // Another emulator: the failure says nothing about it. (Making would boot a machine: the
  // fake driver cannot, which shows the make was attempted.)
  await assert.rejects(templates.ensure(image, size), (e: Error) => !/ago/.test(e.message));
  rmSync(`${d}.failed.json`, { force: true });
});
