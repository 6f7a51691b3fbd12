import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCode, MayflyError } from '../errors.ts';
import { findOnPath, run } from '../util/exec.ts';
import { BTRFS_PROGS_MISSING, createSubvolume, deleteSubvolume, isSubvolume, onBtrfs } from './btrfs.ts';
import { checkDirRequest, lstatOrUndefined, output, withScratch } from './dir-common.ts';
import { fsTypeName, removeTree } from './mounts.ts';
import type { Clone, CloneRequest, Probe, StorageBackend } from './types.ts';

/**
 * A writable btrfs snapshot of the image's root subvolume: ~5 ms for a whole root filesystem,
 * whatever its size, and blocks are shared until written. The image root must be a subvolume
 * (createBaseDir makes one on btrfs) on the same btrfs filesystem as the instance dir.
 */
export const btrfsSnapshot: StorageBackend = {
  name: 'btrfs-snapshot',
  kind: 'dir',

  async probe(dir: string): Promise<Probe> {
    if (!onBtrfs(dir)) return { usable: false, reason: `${fsTypeName(dir)} is not btrfs` };
    if (!findOnPath('btrfs')) return { usable: false, reason: BTRFS_PROGS_MISSING };
    return withScratch(
      dir,
      this.name,
      async (scratch) => {
        const base = join(scratch, 'base');
        const snap = join(scratch, 'snap');
        await createSubvolume(base);
        writeFileSync(join(base, 'file'), 'base');
        const r = await run('btrfs', ['subvolume', 'snapshot', base, snap]);
        if (r.code !== 0) return { usable: false, reason: `a test snapshot failed: ${output(r)}` };
        writeFileSync(join(snap, 'file'), 'snapshot');
        if (readFileSync(join(base, 'file'), 'utf8') !== 'base') {
          return { usable: false, reason: 'a write to a test snapshot changed its base' };
        }
        return { usable: true, reason: 'a test subvolume snapshot worked' };
      },
      async (scratch) => {
        for (const name of ['snap', 'base']) if (isSubvolume(join(scratch, name))) await deleteSubvolume(join(scratch, name));
      },
    );
  },

  async clone(req: CloneRequest): Promise<Clone> {
    const { base, root } = checkDirRequest(req, this.name);
    if (!isSubvolume(base)) {
      throw new MayflyError(ErrorCode.CLONE_FAILED, `btrfs-snapshot: the image root ${base} is not a btrfs subvolume`, {
        hint: 'images built while the data dir is on btrfs have subvolume roots: rebuild the image, or set storage.backend = "reflink"',
      });
    }
    const r = await run('btrfs', ['subvolume', 'snapshot', base, root]);
    if (r.code !== 0) {
      // A snapshot is made whole or not at all; anything found at root is removed all the same.
      if (isSubvolume(root)) await deleteSubvolume(root).catch(() => {});
      const crossDevice = /cross-device/i.test(r.stderr);
      throw new MayflyError(ErrorCode.CLONE_FAILED, `btrfs-snapshot: snapshotting ${base} to ${root} failed: ${output(r)}`, {
        hint: crossDevice
          ? 'the image and the instance dir must be on the same btrfs filesystem (keep the whole data dir on one)'
          : 'see the message above; `mayfly doctor` shows which storage backends work here',
      });
    }
    return { backend: this.name, path: root };
  },

  async remove(clone: Clone): Promise<void> {
    if (!lstatOrUndefined(clone.path)) return;
    // A clone that is not (or no longer) a subvolume is removed as a plain tree.
    if (isSubvolume(clone.path)) await deleteSubvolume(clone.path);
    else await removeTree(clone.path);
  },
};

