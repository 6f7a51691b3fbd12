import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import {
  chmodSync,
  chownSync,
  existsSync,
  lchownSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { STORAGE_BACKENDS } from '../../src/config/schema.ts';
import { ErrorCode, MayflyError } from '../../src/errors.ts';
import {
  DIR_BACKENDS,
  backendByName,
  copy,
  createBaseDir,
  detectStorage,
  overlayfs,
  probeStorage,
  removeBaseDir,
  type Clone,
  type StorageBackend,
} from '../../src/storage/index.ts';
import { findOnPath } from '../../src/util/exec.ts';

// Every directory backend on real filesystems: the test makes a btrfs, an xfs with reflink, an
// xfs without, and an ext4 in loop-mounted image files, and checks detection, clones (content,
// modes, owners, symlinks), isolation from the base, and that removal leaves nothing mounted
// and nothing on disk. Loop mounts need root; the mkfs tools come with scripts/setup.sh.

const isRoot = process.getuid?.() === 0;

describe('directory storage backends on loop-mounted filesystems', { skip: isRoot ? false : 'loop mounts need root' }, () => {
  let tmp = '';
  const images: string[] = [];

  /** Mount points in this process's namespace (unescaped), straight from the kernel. */
  function mountPoints(): string[] {
    return readFileSync('/proc/self/mountinfo', 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => l.split(' ')[4]!.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8))));
  }
  const mountsUnder = (dir: string) => mountPoints().filter((m) => m === dir || m.startsWith(dir + '/'));

  function makeFs(name: string, sizeMiB: number, mkfs: string[]): string {
    const img = join(tmp, `${name}.img`);
    const mnt = join(tmp, name);
    execFileSync('truncate', ['-s', `${sizeMiB}M`, img]);
    images.push(img);
    execFileSync(mkfs[0]!, [...mkfs.slice(1), img], { stdio: ['ignore', 'ignore', 'pipe'] });
    mkdirSync(mnt);
    execFileSync('mount', ['-o', 'loop', img, mnt]);
    return mnt;
  }

  const fs = { btrfs: '', xfs: '', xfsNoReflink: '', ext4: '' };

  before(() => {
    const missing = ['mkfs.btrfs', 'mkfs.xfs', 'mkfs.ext4', 'btrfs', 'losetup'].filter((t) => !findOnPath(t));
    assert.deepEqual(missing, [], 'scripts/setup.sh installs these (apt-get install btrfs-progs xfsprogs e2fsprogs mount)');
    tmp = mkdtempSync(join(tmpdir(), 'mayfly-storage-test-'));
    fs.btrfs = makeFs('btrfs', 256, ['mkfs.btrfs', '-q', '-f']);
    // mkfs.xfs refuses filesystems under 300 MiB.
    fs.xfs = makeFs('xfs', 320, ['mkfs.xfs', '-q', '-f', '-m', 'reflink=1']);
    fs.xfsNoReflink = makeFs('xfs-noreflink', 320, ['mkfs.xfs', '-q', '-f', '-m', 'reflink=0']);
    fs.ext4 = makeFs('ext4', 128, ['mkfs.ext4', '-q', '-F']);
  });

  after(() => {
    if (!tmp) return;
    // Whatever a failed test left: every mount under tmp (clones inside the filesystems first),
    // then the loop devices, then the files. Done with plain commands, not the code under test.
    for (const m of mountsUnder(tmp).sort((a, b) => b.length - a.length)) {
      if (spawnSync('umount', [m]).status !== 0) spawnSync('umount', ['--lazy', m]);
    }
    for (const img of images) {
      const loops = spawnSync('losetup', ['-j', img], { encoding: 'utf8' }).stdout;
      for (const line of loops.split('\n').filter(Boolean)) spawnSync('losetup', ['-d', line.split(':')[0]!]);
    }
    rmSync(tmp, { recursive: true, force: true });
    assert.deepEqual(mountsUnder(tmp), [], 'nothing mounted is left');
    const losetup = spawnSync('losetup', ['-a'], { encoding: 'utf8' }).stdout;
    assert.equal(losetup.split('\n').filter((l) => l.includes(tmp)).length, 0, `no loop device is left:\n${losetup}`);
    assert.equal(existsSync(tmp), false);
  });

  /**
   * A small root tree: files, a symlink, an empty dir, a 0750 file owned by uid 1000. The root
   * itself has an unusual mode and owner, which a clone's root must show too.
   */
  function populate(base: string): void {
    chmodSync(base, 0o751);
    chownSync(base, 1000, 1000);
    mkdirSync(join(base, 'etc'));
    mkdirSync(join(base, 'bin'));
    mkdirSync(join(base, 'empty'), { mode: 0o700 });
    writeFileSync(join(base, 'etc', 'hostname'), 'base\n');
    writeFileSync(join(base, 'etc', 'secret'), 's3cret\n');
    chmodSync(join(base, 'etc', 'secret'), 0o750);
    chownSync(join(base, 'etc', 'secret'), 1000, 1000);
    writeFileSync(join(base, 'bin', 'tool'), '#!/bin/sh\necho hi\n', { mode: 0o755 });
    writeFileSync(join(base, 'big.bin'), randomBytes(1024 * 1024));
    symlinkSync('etc/hostname', join(base, 'link'));
    lchownSync(join(base, 'link'), 1000, 1000);
  }

  /** Every entry under `root`: type, mode, owner, and content hash or link target. */
  function describeTree(root: string): Record<string, string> {
    const out: Record<string, string> = {};
    const walk = (rel: string) => {
      const p = join(root, rel);
      const st = lstatSync(p);
      const head = `${(st.mode & 0o7777).toString(8)} ${st.uid}:${st.gid}`;
      if (st.isSymbolicLink()) out[rel] = `link ${head} -> ${readlinkSync(p)}`;
      else if (st.isFile()) out[rel] = `file ${head} ${createHash('sha256').update(readFileSync(p)).digest('hex').slice(0, 16)}`;
      else if (st.isDirectory()) {
        out[rel] = `dir ${head}`;
        for (const e of readdirSync(p).sort()) walk(rel === '.' ? e : join(rel, e));
      } else out[rel] = `other ${head}`;
    };
    walk('.');
    return out;
  }

  /** Writes into a clone: change, add, delete, chmod, symlink removal, new dir. */
  function scribble(root: string): void {
    writeFileSync(join(root, 'etc', 'hostname'), 'clone\n');
    writeFileSync(join(root, 'new-file'), 'new\n');
    rmSync(join(root, 'bin', 'tool'));
    chmodSync(join(root, 'etc', 'secret'), 0o600);
    rmSync(join(root, 'link'));
    mkdirSync(join(root, 'empty', 'sub'));
  }

  async function cloneFailure(fn: () => Promise<unknown>): Promise<MayflyError> {
    try {
      await fn();
    } catch (e) {
      assert.ok(e instanceof MayflyError, `expected a MayflyError, got ${String(e)}`);
      return e;
    }
    assert.fail('expected an error');
  }

  /** Clones a fresh base on `mnt` with `b`, checks the clone, writes to it, removes it. */
  async function roundTrip(b: StorageBackend, mnt: string, t: { diagnostic(s: string): void }): Promise<void> {
    mkdirSync(join(mnt, 'images'), { recursive: true });
    const base = (await createBaseDir(join(mnt, 'images', `${b.name}-base`))).path;
    populate(base);
    const before = describeTree(base);
    const instanceDir = join(mnt, 'instances', b.name);
    mkdirSync(instanceDir, { recursive: true });

    const started = performance.now();
    const clone = await b.clone({ base, instanceDir });
    t.diagnostic(`${b.name} clone of a 1 MiB tree: ${(performance.now() - started).toFixed(1)} ms`);
    assert.deepEqual(clone, { backend: b.name, path: join(instanceDir, 'root') });
    assert.deepEqual(describeTree(clone.path), before, 'the clone has the same files, modes, owners and links');
    if (b.name === 'btrfs-snapshot') assert.equal(statSync(clone.path).ino, 256, 'the clone is a subvolume');
    if (b.name === 'overlayfs') assert.deepEqual(mountsUnder(instanceDir), [clone.path], 'the clone is a mount');
    else assert.deepEqual(mountsUnder(instanceDir), []);

    scribble(clone.path);
    assert.equal(readFileSync(join(clone.path, 'etc', 'hostname'), 'utf8'), 'clone\n');
    assert.deepEqual(describeTree(base), before, 'writes to the clone do not reach the base');

    await b.remove(clone);
    assert.deepEqual(mountsUnder(instanceDir), [], 'no mount is left');
    assert.deepEqual(readdirSync(instanceDir), [], 'nothing is left in the instance dir');
    await b.remove(clone); // already gone: still fine
    assert.deepEqual(describeTree(base), before);
    await removeBaseDir(base);
    assert.equal(existsSync(base), false);
    rmSync(instanceDir, { recursive: true });
  }

  const expected: { fs: keyof typeof fs; label: string; pick: string; unusable: Record<string, RegExp> }[] = [
    { fs: 'btrfs', label: 'btrfs', pick: 'btrfs-snapshot', unusable: {} },
    { fs: 'xfs', label: 'xfs with reflink', pick: 'reflink', unusable: { 'btrfs-snapshot': /^xfs is not btrfs$/ } },
    {
      fs: 'xfsNoReflink',
      label: 'xfs without reflink',
      pick: 'overlayfs',
      unusable: { 'btrfs-snapshot': /^xfs is not btrfs$/, reflink: /made without reflink \(mkfs\.xfs -m reflink=1/ },
    },
    { fs: 'ext4', label: 'ext4', pick: 'overlayfs', unusable: { 'btrfs-snapshot': /^ext4 is not btrfs$/, reflink: /^ext4 has no reflink$/ } },
  ];

  for (const e of expected) {
    describe(e.label, () => {
      test(`detection picks ${e.pick} and leaves nothing behind`, async () => {
        const mnt = fs[e.fs];
        const d = await detectStorage(mnt, 'dir');
        assert.equal(d.backend.name, e.pick);
        assert.deepEqual(d.probes.map((p) => p.name), ['btrfs-snapshot', 'reflink', 'overlayfs', 'copy']);
        for (const p of d.probes) {
          if (e.unusable[p.name]) {
            assert.equal(p.usable, false, p.name);
            assert.match(p.reason, e.unusable[p.name]!, p.name);
          } else {
            assert.equal(p.usable, true, `${p.name}: ${p.reason}`);
          }
        }
        assert.equal(d.filesystem.type, e.fs === 'btrfs' ? 'btrfs' : e.fs === 'ext4' ? 'ext4' : 'xfs');
        assert.equal(d.filesystem.mountPoint, mnt);
        assert.deepEqual(readdirSync(mnt).filter((n) => n.startsWith('.mayfly-probe')), [], 'no probe dir is left');
        assert.deepEqual(mountsUnder(mnt), [mnt], 'no probe mount is left');
      });

      for (const b of DIR_BACKENDS) {
        if (e.unusable[b.name]) {
          test(`${b.name} fails clearly and leaves nothing`, async () => {
            const mnt = fs[e.fs];
            const base = (await createBaseDir(join(mnt, `${b.name}-unusable-base`))).path;
            populate(base);
            const instanceDir = join(mnt, `${b.name}-unusable-instance`);
            mkdirSync(instanceDir);
            const err = await cloneFailure(() => b.clone({ base, instanceDir }));
            assert.equal(err.code, ErrorCode.CLONE_FAILED);
            assert.match(err.message, new RegExp(`^${b.name}: `));
            assert.deepEqual(readdirSync(instanceDir), []);
            assert.deepEqual(mountsUnder(instanceDir), []);
            await removeBaseDir(base);
            rmSync(instanceDir, { recursive: true });
          });
        } else {
          test(`${b.name} clones a tree, keeps the base unchanged, and removes completely`, (t) => roundTrip(b, fs[e.fs], t));
        }
      }
    });
  }

  test('forcing an unusable backend is an error saying why and what to use instead', async () => {
    const ext4 = await cloneFailure(() => detectStorage(fs.ext4, 'dir', 'btrfs-snapshot'));
    assert.equal(ext4.code, ErrorCode.STORAGE_UNUSABLE);
    assert.equal(ext4.message, `storage.backend = "btrfs-snapshot" cannot be used in ${fs.ext4} (ext4): ext4 is not btrfs`);
    assert.equal(ext4.hint, 'set storage.backend = "overlayfs" (the fastest that works here) or "auto"');
    assert.equal(ext4.exitCode, 2);

    const xfs = await cloneFailure(() => detectStorage(fs.xfsNoReflink, 'dir', 'reflink'));
    assert.match(xfs.message, /"reflink" cannot be used in .*\(xfs\): this xfs was made without reflink/);
    assert.match(xfs.hint ?? '', /"overlayfs"/);
    assert.deepEqual(readdirSync(fs.xfsNoReflink).filter((n) => n.startsWith('.mayfly-probe')), []);
  });

  test('forcing a usable backend takes it over a faster one', async () => {
    const d = await detectStorage(fs.btrfs, 'dir', 'copy');
    assert.equal(d.backend.name, 'copy');
    assert.deepEqual(d.probes.map((p) => p.name), ['copy'], 'only the forced backend is probed');
    assert.equal((await detectStorage(fs.btrfs, 'dir', 'reflink')).backend.name, 'reflink');
  });

  test('VM disks have one backend, and a directory backend cannot be forced on them', async () => {
    const d = await probeStorage(fs.ext4, 'disk');
    assert.deepEqual(d.probes.map((p) => p.name), ['qcow2-overlay']);
    const err = await cloneFailure(() => detectStorage(fs.ext4, 'disk', 'copy'));
    assert.match(err.message, /is for container roots; VM disks always use qcow2-overlay/);
  });

  test('a data dir that does not exist yet is probed in its nearest parent and not made', async () => {
    const missing = join(fs.xfs, 'not', 'yet');
    const d = await probeStorage(missing, 'dir');
    assert.equal(d.probedIn, fs.xfs);
    assert.equal(d.probes.find((p) => p.name === 'reflink')?.usable, true);
    assert.equal(existsSync(join(fs.xfs, 'not')), false);
  });

  test('createBaseDir: a subvolume on btrfs, a plain dir elsewhere; never over an existing path', async () => {
    const sub = await createBaseDir(join(fs.btrfs, 'image-root'));
    assert.deepEqual(sub, { path: join(fs.btrfs, 'image-root'), subvolume: true });
    assert.equal(statSync(sub.path).ino, 256);
    const plain = await createBaseDir(join(fs.ext4, 'image-root'));
    assert.equal(plain.subvolume, false);
    assert.notEqual(statSync(plain.path).ino, 256);
    assert.equal(statSync(plain.path).mode & 0o777, 0o755);
    const again = await cloneFailure(() => createBaseDir(sub.path));
    assert.match(again.message, /it exists already/);
    assert.match((await cloneFailure(() => createBaseDir('relative/dir'))).message, /must be an absolute path/);
    assert.match((await cloneFailure(() => createBaseDir(join(fs.ext4, 'no', 'parent')))).message, /is not a directory/);
    await removeBaseDir(sub.path);
    await removeBaseDir(plain.path);
    assert.equal(existsSync(sub.path) || existsSync(plain.path), false);
  });

  test('btrfs-snapshot refuses a base that is a plain directory', async () => {
    const base = join(fs.btrfs, 'plain-base');
    mkdirSync(base);
    const instanceDir = join(fs.btrfs, 'plain-instance');
    mkdirSync(instanceDir);
    const err = await cloneFailure(() => backendByName('btrfs-snapshot').clone({ base, instanceDir }));
    assert.equal(err.message, `btrfs-snapshot: the image root ${base} is not a btrfs subvolume`);
    assert.match(err.hint ?? '', /rebuild the image, or set storage.backend = "reflink"/);
    assert.deepEqual(readdirSync(instanceDir), []);
    rmSync(base, { recursive: true });
    rmSync(instanceDir, { recursive: true });
  });

  test('btrfs-snapshot removes a clone in which subvolumes were made', async () => {
    const base = (await createBaseDir(join(fs.btrfs, 'nested-base'))).path;
    populate(base);
    const instanceDir = join(fs.btrfs, 'nested-instance');
    mkdirSync(instanceDir);
    const b = backendByName('btrfs-snapshot');
    const clone = await b.clone({ base, instanceDir });
    execFileSync('btrfs', ['subvolume', 'create', join(clone.path, 'etc', 'inner')], { stdio: 'ignore' });
    execFileSync('btrfs', ['subvolume', 'create', join(clone.path, 'etc', 'inner', 'deeper')], { stdio: 'ignore' });
    await b.remove(clone);
    assert.deepEqual(readdirSync(instanceDir), []);
    await removeBaseDir(base);
    rmSync(instanceDir, { recursive: true });
  });

  test('removing a clone unmounts what is mounted inside it and never deletes through the mount', async () => {
    const precious = join(fs.ext4, 'precious');
    mkdirSync(precious);
    writeFileSync(join(precious, 'keep'), 'keep me');
    for (const b of [copy, overlayfs]) {
      const base = (await createBaseDir(join(fs.ext4, `bind-base-${b.name}`))).path;
      populate(base);
      const instanceDir = join(fs.ext4, `bind-instance-${b.name}`);
      mkdirSync(instanceDir);
      const clone = await b.clone({ base, instanceDir });
      execFileSync('mount', ['--bind', precious, join(clone.path, 'empty')]);
      await b.remove(clone);
      assert.deepEqual(mountsUnder(instanceDir), [], b.name);
      assert.deepEqual(readdirSync(instanceDir), [], b.name);
      assert.equal(readFileSync(join(precious, 'keep'), 'utf8'), 'keep me', `${b.name}: the bind-mounted dir is untouched`);
      await removeBaseDir(base);
      rmSync(instanceDir, { recursive: true });
    }
    rmSync(precious, { recursive: true });
  });

  test('overlayfs: a failed mount leaves no mount and no dirs; the probe says why', async () => {
    // An overlay's upper dir cannot be on overlayfs: an instance dir inside another overlay clone.
    const base = (await createBaseDir(join(fs.ext4, 'ovl-base'))).path;
    populate(base);
    const outerDir = join(fs.ext4, 'ovl-outer');
    mkdirSync(outerDir);
    const outer = await overlayfs.clone({ base, instanceDir: outerDir });
    const innerDir = join(outer.path, 'instance');
    mkdirSync(innerDir);
    const err = await cloneFailure(() => overlayfs.clone({ base, instanceDir: innerDir }));
    assert.equal(err.code, ErrorCode.CLONE_FAILED);
    assert.match(err.message, /^overlayfs: mounting .* failed/);
    assert.deepEqual(readdirSync(innerDir), [], 'no root and no root.overlay left');
    assert.deepEqual(mountsUnder(outerDir), [outer.path], 'only the outer clone is mounted');
    const probe = await overlayfs.probe(innerDir);
    assert.deepEqual(probe, { usable: false, reason: "the data dir is on overlayfs, which cannot hold an overlay's upper dir" });
    assert.deepEqual(readdirSync(innerDir), [], 'the probe left nothing');
    await overlayfs.remove(outer);
    assert.deepEqual(mountsUnder(outerDir), []);
    assert.deepEqual(readdirSync(outerDir), []);
    await removeBaseDir(base);
    rmSync(outerDir, { recursive: true });
  });

  test('bad clone requests are clear errors and change nothing', async () => {
    const base = (await createBaseDir(join(fs.ext4, 'bad-base'))).path;
    populate(base);
    const instanceDir = join(fs.ext4, 'bad-instance');
    mkdirSync(instanceDir);
    for (const b of DIR_BACKENDS) {
      const msg = async (req: { base: string; instanceDir: string }) => (await cloneFailure(() => b.clone(req))).message;
      assert.equal(await msg({ base: 'rel/base', instanceDir }), `${b.name}: the image root must be an absolute path, got 'rel/base'`);
      assert.equal(await msg({ base, instanceDir: 'rel' }), `${b.name}: the instance dir must be an absolute path, got 'rel'`);
      assert.equal(await msg({ base: join(base, 'nope'), instanceDir }), `${b.name}: the image root ${join(base, 'nope')} does not exist`);
      assert.equal(await msg({ base: join(base, 'big.bin'), instanceDir }), `${b.name}: the image root ${join(base, 'big.bin')} is not a directory`);
      const noDir = join(fs.ext4, 'no-such-instance');
      assert.equal(await msg({ base, instanceDir: noDir }), `${b.name}: the instance dir ${noDir} does not exist or is not a directory`);
      mkdirSync(join(instanceDir, 'root'));
      assert.equal(await msg({ base, instanceDir }), `${b.name}: ${join(instanceDir, 'root')} already exists`);
      rmSync(join(instanceDir, 'root'), { recursive: true });
    }
    const comma = join(fs.ext4, 'a,b');
    mkdirSync(comma);
    assert.match((await cloneFailure(() => overlayfs.clone({ base, instanceDir: comma }))).message, /contains "," ":" or "\\"/);
    assert.deepEqual(readdirSync(comma), []);
    assert.deepEqual(readdirSync(instanceDir), []);
    await removeBaseDir(base);
    rmSync(instanceDir, { recursive: true });
    rmSync(comma, { recursive: true });
  });
});

describe('storage backend names', () => {
  test('the config offers exactly the directory backends, fastest first, plus auto', () => {
    assert.deepEqual([...STORAGE_BACKENDS], ['auto', ...DIR_BACKENDS.map((b) => b.name)]);
  });

  test('backendByName finds every backend and refuses others', () => {
    for (const b of DIR_BACKENDS) assert.equal(backendByName(b.name), b);
    assert.equal(backendByName('qcow2-overlay').kind, 'disk');
    assert.throws(() => backendByName('zfs'), /no storage backend is called 'zfs'/);
  });

  test('removing a clone that is already gone succeeds for every backend', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'mayfly-storage-gone-'));
    try {
      for (const b of DIR_BACKENDS) {
        const clone: Clone = { backend: b.name, path: join(dir, 'root') };
        await b.remove(clone);
      }
      assert.deepEqual(readdirSync(dir), []);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
