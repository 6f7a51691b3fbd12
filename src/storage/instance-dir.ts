import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { deleteSubvolume, isSubvolume } from './btrfs.ts';
import { CLONE_ROOT } from './dir-common.ts';
import { unmountAll } from './mounts.ts';

/**
 * Removes an instance dir whatever clone it holds, without knowing which backend made it (the
 * reaper meets dirs of crashed processes): the overlayfs mount is unmounted and the btrfs
 * subvolume deleted first, since a recursive delete would walk through a mount (and can be
 * refused) and is far slower than deleting a subvolume. qcow2 overlays, reflink and plain
 * copies are ordinary files.
 */
export async function removeInstanceDir(dir: string): Promise<void> {
  await unmountAll(dir);
  const root = join(dir, CLONE_ROOT);
  if (isSubvolume(root)) await deleteSubvolume(root);
  rmSync(dir, { recursive: true, force: true });
}
