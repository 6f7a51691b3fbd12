import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { collectImages, formatGc, holders, parseImageRef, planGc, type VersionRef } from '../../src/images/gc.ts';
import { ImageStore, type ImageManifest } from '../../src/images/store.ts';
import { openStateStore, type InstanceRecord } from '../../src/state/index.ts';

const root = mkdtempSync(join(tmpdir(), 'mayfly-gc-test-'));
after(() => rmSync(root, { recursive: true, force: true }));

const vs = (name: string, ...versions: number[]): VersionRef[] => versions.map((version) => ({ name, version }));
const refs = (list: readonly VersionRef[]) => list.map((d) => `${d.name}:${d.version}`).sort();

describe('planGc: which image versions may go', () => {
  test('keeps the newest N of each image and removes older unused ones', () => {
    const plan = planGc([...vs('a', 1, 2, 3, 4, 5), ...vs('b', 7)], [], 3);
    assert.deepEqual(refs(plan.remove), ['a:1', 'a:2']);
    assert.deepEqual(refs(plan.keep), ['a:3', 'a:4', 'a:5', 'b:7']);
    assert.equal(plan.keep.find((k) => k.name === 'a' && k.version === 5)!.why, 'newest');
    assert.match(plan.remove[0]!.why, /older than the newest 3 and unused/);
  });

  test('newest means the highest version number, whatever order they come in', () => {
    const plan = planGc(vs('a', 10, 2, 9, 1), [], 2);
    assert.deepEqual(refs(plan.remove), ['a:1', 'a:2']);
  });

  test('an instance, a job record or a pinned pool keeps an old version, and says who', () => {
    const plan = planGc(vs('a', 1, 2, 3, 4, 5, 6), [
      { image: 'a:1', by: 'instance vm-1' },
      { image: 'a:1', by: 'job gitlab/x/1' },
      { image: 'a:2', by: 'pool old' },
      { image: 'a:3', by: 'job gitlab/x/2' },
    ], 2);
    assert.deepEqual(refs(plan.remove), ['a:4']);
    const why = (v: number) => plan.keep.find((k) => k.version === v)!.why;
    assert.equal(why(1), 'in use by instance vm-1, job gitlab/x/1');
    assert.equal(why(2), 'in use by pool old');
    assert.equal(why(3), 'in use by job gitlab/x/2');
  });

  test('a pool naming the image without a version holds only the newest, which is kept anyway', () => {
    const plan = planGc(vs('a', 1, 2, 3), [{ image: 'a', by: 'pool default' }], 1);
    assert.deepEqual(refs(plan.remove), ['a:1', 'a:2']);
  });

  test('holders of other images, of versions that do not exist, or malformed refs change nothing', () => {
    const plan = planGc(vs('a', 1, 2), [{ image: 'b:1', by: 'x' }, { image: 'a:9', by: 'y' }, { image: 'Not Valid', by: 'z' }], 1);
    assert.deepEqual(refs(plan.remove), ['a:1']);
  });

  test('keep 1 keeps only the newest; keep below 1 still keeps the newest', () => {
    assert.deepEqual(refs(planGc(vs('a', 1, 2, 3), [], 1).remove), ['a:1', 'a:2']);
    assert.deepEqual(refs(planGc(vs('a', 1, 2, 3), [], 0).keep), ['a:3']);
  });

  test('nothing to do: fewer versions than keep', () => {
    const plan = planGc(vs('a', 1, 2), [], 3);
    assert.deepEqual(plan.remove, []);
    assert.equal(plan.keep.length, 2);
  });

  test('image refs parse as NAME or NAME:VERSION only', () => {
    assert.deepEqual(parseImageRef('debian-12:3'), { name: 'debian-12', version: 3 });
    assert.deepEqual(parseImageRef('debian-12'), { name: 'debian-12', version: null });
    assert.equal(parseImageRef('sha256:abc'), undefined);
    assert.equal(parseImageRef('Debian'), undefined);
  });

  test('the report names every version with what happened to it', () => {
    const text = formatGc(planGc(vs('a', 1, 2), [], 1), true);
    assert.match(text, /^would remove a:1 \(older than the newest 1 and unused\)$/m);
    assert.match(text, /^kept a:2 \(newest\)$/m);
    assert.equal(formatGc({ remove: [], keep: [] }), 'no image versions\n');
  });
});

describe('collectImages against a data dir', () => {
  const data = join(root, 'data');
  const store = new ImageStore(data);
  const state = openStateStore(join(data, 'state.db'));
  after(() => state.close());

  const publish = (name: string): number => {
    const dir = store.tempDir(name);
    writeFileSync(join(dir, 'disk.qcow2'), 'disk');
    mkdirSync(join(dir, 'templates', '2cpu-1024mb-4gb'), { recursive: true });
    const m: Omit<ImageManifest, 'version'> = {
      name, id: `sha256:${'1'.repeat(64)}`, kind: 'vm', createdAt: new Date().toISOString(),
      source: { type: 'recipe', recipe: 'builtin:debian-12', suite: 'bookworm', packages: [] },
      disk: 'disk.qcow2', kernel: null, initrd: null, kernelArgs: null, diskVirtualBytes: 1, identity: 'fw_cfg', user: 'ci',
    };
    return store.publish(dir, m).version;
  };
  const instance = (id: string, version: number): InstanceRecord => ({
    id, driver: 'qemu', imageName: 'img', imageVersion: version, imageId: 'sha256:x', state: 'leased', createdAt: Date.now(),
    updatedAt: Date.now(), pid: null, dir: join(data, 'instances', id), disks: [], consoleLog: '', sshPort: null, sshHost: null, cpus: 1,
    memoryMiB: 512, diskGiB: 4, accel: null, owner: null, holderPid: null, pool: null,
  });

  test('removes only unused versions beyond keep, never one in use; a dry run removes nothing', () => {
    for (let i = 0; i < 6; i++) publish('img');
    publish('other');
    state.insertInstance(instance('vm-on-1', 1));
    state.putJob({ key: 'gitlab/t/9', integration: 'gitlab', instance: null, lease: null, createdAt: Date.now(), expiresAt: Date.now() + 60_000, data: { image: 'img:2' } });
    const pools = [{ name: 'pinned', image: 'img:3' }, { name: 'latest', image: 'other' }];

    const dry = collectImages({ images: store, state, pools, keep: 2 }, { dryRun: true });
    assert.deepEqual(refs(dry.remove), ['img:4']);
    assert.deepEqual(store.versions('img'), [1, 2, 3, 4, 5, 6], 'a dry run removes nothing');

    const done = collectImages({ images: store, state, pools, keep: 2 });
    assert.deepEqual(refs(done.remove), ['img:4']);
    assert.deepEqual(store.versions('img'), [1, 2, 3, 5, 6]);
    assert.deepEqual(store.versions('other'), [1]);

    // Once the machine, the job and the pin are gone, their versions go too.
    state.deleteInstance('vm-on-1');
    state.deleteJob('gitlab/t/9');
    const later = collectImages({ images: store, state, pools: [], keep: 2 }, { names: ['img'] });
    assert.deepEqual(refs(later.remove), ['img:1', 'img:2', 'img:3']);
    assert.deepEqual(store.versions('img'), [5, 6]);
  });

  test('a machine started on a version after the plan was made still keeps it', () => {
    const v = store.versions('img');
    for (let i = 0; i < 2; i++) publish('img');
    const oldest = v[0]!;
    // The holders are read again before each removal: simulate a machine appearing between
    // the plan and the removal by recording it before the collection's removal loop reaches it.
    let calls = 0;
    const racing = {
      ...state,
      listInstances: () => (++calls > 1 ? [instance('vm-late', oldest)] : []),
      listJobs: () => [],
    } as unknown as typeof state;
    const r = collectImages({ images: store, state: racing, pools: [], keep: 2 });
    assert.ok(!refs(r.remove).includes(`img:${oldest}`), `img:${oldest} was removed though a machine uses it`);
    assert.ok(store.versions('img').includes(oldest));
  });

  test('holders come from instance records, job records and pools', () => {
    state.insertInstance(instance('vm-h', 5));
    const h = holders(state, [{ name: 'p', image: 'img:6' }]);
    assert.deepEqual(h.map((x) => `${x.image} ${x.by}`).sort(), ['img:5 instance vm-h', 'img:6 pool p']);
    state.deleteInstance('vm-h');
  });
});
