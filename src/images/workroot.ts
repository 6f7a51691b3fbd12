import { copyFileSync, existsSync, linkSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCode, MayflyError } from '../errors.ts';
import { removeTree, unmountAll } from '../storage/mounts.ts';
import { processAlive } from '../util/proc.ts';
import { run, runChecked } from '../util/exec.ts';
import { createBaseDir } from '../storage/base-dir.ts';
import { contentId, findKernel, treeId } from './build.ts';
import { CONTAINER_ID_BASE, shiftOwnership } from './id-shift.ts';
import type { Image, ImageManifest, ImageStore } from './store.ts';

// A writable copy of an image version's root filesystem, and publishing such a copy as the
// next version of the same image. The version itself is never touched: running machines are
// clones of its files. Two shapes, one per image kind:
//   vm:        disk.qcow2 → raw file in a scratch dir → loop device → mounted ext4 root;
//              back: unmount → qcow2, and kernel + initrd taken again from /boot.
//   container: rootfs/ (a directory in the version dir) → `cp -a --reflink=auto` in the scratch dir.
// Scratch dirs live in the store's .tmp (one filesystem with the store, so publish is a rename)
// and are named `work-NAME-PID-…` so a later run can clean up after a process that was killed.

/** Where a container image keeps its root filesystem inside the version dir. */
export const containerRootDir = 'rootfs';

export interface WorkRoot {
  image: Image;
  /** The scratch dir holding everything of this copy. */
  dir: string;
  /** The root directory to work in (chroot, nspawn -D). */
  root: string;
  /** Files that become the new version's (disk, kernel, …), with its manifest. */
  out: string;
  /** Loop device backing `root` (vm only). */
  loop?: string;
}

export interface RootKind {
  open(store: ImageStore, image: Image, signal?: AbortSignal): Promise<WorkRoot>;
  /** Turns the work root into the files of a new version in `w.out`; returns the manifest fields that change. */
  seal(w: WorkRoot, signal?: AbortSignal): Promise<Pick<ImageManifest, 'id'> & Partial<ImageManifest>>;
}

export function isContainerImage(image: Pick<ImageManifest, 'kind'>): boolean {
  return image.kind === 'container';
}

export function rootKind(image: Image): RootKind {
  return isContainerImage(image) ? containerRoot : vmRoot;
}

function scratchDir(store: ImageStore, image: Image): string {
  return store.tempDir(`work-${image.name}-${process.pid}`);
}

export const vmRoot: RootKind = {
  async open(store, image, signal) {
    if (process.getuid?.() !== 0) {
      throw new MayflyError(ErrorCode.NOT_ROOT, 'changing an image needs root (a loop mount of its disk)', { hint: 'run it as root, e.g. with sudo' });
    }
    const dir = scratchDir(store, image);
    const w: WorkRoot = { image, dir, root: join(dir, 'root'), out: join(dir, 'out') };
    try {
      mkdirSync(w.root);
      mkdirSync(w.out);
      const raw = join(dir, 'disk.raw');
      // A sparse raw copy: the version's qcow2 is never opened for writing.
      await runChecked('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image.diskPath, raw], {
        code: ErrorCode.IMAGE_BUILD_FAILED, what: `copying the disk of ${image.name}:${image.version}`, signal,
      });
      signal?.throwIfAborted();
      w.loop = (await runChecked('losetup', ['--find', '--show', '--partscan', raw], { code: ErrorCode.IMAGE_BUILD_FAILED })).stdout.trim();
      await mountRootFs(w.loop, w.root);
      return w;
    } catch (e) {
      await closeWorkRoot(w);
      throw e;
    }
  },

  async seal(w, signal) {
    const image = w.image;
    if (image.kernel && image.initrd) {
      // mayfly's own images boot the kernel installed in them, which an upgrade may replace;
      // an imported image keeps the kernel it was given.
      const fromBoot = image.identity === 'fw_cfg' ? findKernel(w.root, image.name) : undefined;
      if (fromBoot) {
        copyFileSync(fromBoot.kernel, join(w.out, image.kernel));
        copyFileSync(fromBoot.initrd, join(w.out, image.initrd));
      } else {
        linkSync(image.kernelPath!, join(w.out, image.kernel));
        linkSync(image.initrdPath!, join(w.out, image.initrd));
      }
    }
    // Freed blocks become holes in the raw file, so the new qcow2 does not carry deleted data.
    await run('fstrim', [w.root]);
    await unmountAll(w.root);
    if (w.loop) await detachLoop(w.loop);
    w.loop = undefined;
    signal?.throwIfAborted();
    await runChecked('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', join(w.dir, 'disk.raw'), join(w.out, image.disk)], {
      code: ErrorCode.IMAGE_BUILD_FAILED, what: 'converting the changed disk back to qcow2', signal,
    });
    rmSync(join(w.dir, 'disk.raw'), { force: true });
    const files = [image.disk, image.kernel, image.initrd].filter((f): f is string => Boolean(f)).map((f) => join(w.out, f));
    return { id: await contentId(files) };
  },
};

/**
 * Mounts the root filesystem of a loop device: the whole device (mayfly's images), else the
 * partition that holds /etc (a cloud image with a partition table).
 */
async function mountRootFs(loop: string, at: string): Promise<void> {
  const base = loop.replace(/^\/dev\//, '');
  const parts = existsSync(`/sys/block/${base}`) ? readdirSync(`/sys/block/${base}`).filter((p) => p.startsWith(`${base}p`)).sort() : [];
  if (parts.length === 0) {
    await runChecked('mount', [loop, at], { code: ErrorCode.IMAGE_BUILD_FAILED, what: `mounting the image's disk (${loop})` });
    return;
  }
  for (const p of parts) {
    if ((await run('mount', [`/dev/${p}`, at])).code !== 0) continue;
    if (existsSync(join(at, 'etc'))) return;
    await unmountAll(at);
  }
  throw new MayflyError(ErrorCode.IMAGE_BUILD_FAILED, `no partition of the image's disk holds a root filesystem (/etc)`);
}

async function detachLoop(loop: string): Promise<void> {
  for (let i = 0; i < 20; i++) {
    if ((await run('losetup', ['--detach', loop])).code === 0) return;
    // udev or a partition scan may hold it a moment after the unmount.
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new MayflyError(ErrorCode.IMAGE_BUILD_FAILED, `cannot detach the loop device ${loop}`, { hint: `detach it by hand: losetup -d ${loop}` });
}

export const containerRoot: RootKind = {
  async open(store, image, signal) {
    if (process.getuid?.() !== 0) {
      throw new MayflyError(ErrorCode.NOT_ROOT, 'changing an image needs root (its files belong to many users)', { hint: 'run it as root, e.g. with sudo' });
    }
    const dir = scratchDir(store, image);
    const out = join(dir, 'out');
    const w: WorkRoot = { image, dir, root: join(out, containerRootDir), out };
    try {
      mkdirSync(out);
      // Made as the build makes it (a subvolume on btrfs), so that clones of the new version are snapshots.
      await createBaseDir(w.root);
      await runChecked('cp', ['-a', '--reflink=auto', '-T', join(image.dir, containerRootDir), w.root], {
        code: ErrorCode.IMAGE_BUILD_FAILED, what: `copying the root of ${image.name}:${image.version}`, signal,
      });
      return w;
    } catch (e) {
      await closeWorkRoot(w);
      throw e;
    }
  },

  async seal(w) {
    await unmountAll(w.root);
    // What the work created as the host's root (a chroot is not in the containers' user
    // namespace) is shifted like the rest of the image.
    const idShift = w.image.idShift ?? CONTAINER_ID_BASE;
    shiftOwnership(w.root, idShift);
    // The same content id and size measure as a container build (build.ts).
    const used = Number((await runChecked('du', ['-sxb', w.root])).stdout.split(/\s/)[0]);
    return { id: await treeId(w.root), diskVirtualBytes: used, idShift };
  },
};

/** Unmounts, detaches and removes everything of a work root; safe to call twice or half-way. */
export async function closeWorkRoot(w: Pick<WorkRoot, 'dir' | 'loop'>): Promise<void> {
  if (!existsSync(w.dir)) return;
  await unmountAll(w.dir);
  // Every loop device on the raw copy, not only the one remembered: a process killed between
  // losetup and saving its answer leaves one nobody knows by name.
  const raw = join(w.dir, 'disk.raw');
  const loops = new Set(w.loop ? [w.loop] : []);
  if (existsSync(raw)) {
    for (const l of (await run('losetup', ['--list', '--noheadings', '--output', 'NAME', '--associated', raw])).stdout.split('\n')) if (l.trim()) loops.add(l.trim());
  }
  for (const l of loops) await detachLoop(l);
  w.loop = undefined;
  await removeTree(w.dir);
}

/**
 * Work dirs of processes that died (kill -9) without cleaning up: unmounted, loops detached,
 * removed. Run before making a new one.
 */
export async function removeStaleWorkRoots(store: ImageStore): Promise<string[]> {
  const tmp = join(store.root, '.tmp');
  if (!existsSync(tmp)) return [];
  const removed: string[] = [];
  for (const d of readdirSync(tmp)) {
    const m = /^work-.+-(\d+)-[^-]+$/.exec(d);
    if (!m || processAlive(Number(m[1]))) continue;
    const dir = join(tmp, d);
    await closeWorkRoot({ dir });
    removed.push(dir);
  }
  return removed;
}
