import { mkdirSync } from 'node:fs';
import { dirname, isAbsolute } from 'node:path';
import { ErrorCode, MayflyError } from '../errors.ts';
import { createSubvolume, deleteSubvolume, isSubvolume, onBtrfs, requireBtrfsProgs } from './btrfs.ts';
import { lstatOrUndefined } from './dir-common.ts';
import { removeTree } from './mounts.ts';

// An image's root directory (a container image's base). On btrfs it must be a subvolume, since
// only a subvolume can be snapshotted; elsewhere a plain directory serves every backend.

export interface BaseDir {
  path: string;
  subvolume: boolean;
}

/** Makes the (new, empty) root directory of an image at `path`: a subvolume on btrfs, else a plain dir. */
export async function createBaseDir(path: string): Promise<BaseDir> {
  if (!isAbsolute(path)) throw new MayflyError(ErrorCode.CLONE_FAILED, `an image dir must be an absolute path, got '${path}'`);
  const parent = lstatOrUndefined(dirname(path));
  if (!parent?.isDirectory()) throw new MayflyError(ErrorCode.CLONE_FAILED, `cannot make ${path}: ${dirname(path)} is not a directory`);
  if (lstatOrUndefined(path)) throw new MayflyError(ErrorCode.CLONE_FAILED, `cannot make ${path}: it exists already`);
  if (onBtrfs(dirname(path))) {
    // A plain dir would work today (reflink) but could never be snapshotted, so insist.
    requireBtrfsProgs(`the image dir ${path} is on btrfs and must be a subvolume; making it`);
    await createSubvolume(path);
    return { path, subvolume: true };
  }
  mkdirSync(path, { mode: 0o755 });
  return { path, subvolume: false };
}

/** Removes an image root made by createBaseDir (subvolume or not); succeeds when it is gone. */
export async function removeBaseDir(path: string): Promise<void> {
  if (isSubvolume(path)) await deleteSubvolume(path);
  else await removeTree(path);
}
