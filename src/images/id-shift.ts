import { chmodSync, lchownSync, lstatSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

// Container images are stored with their owners shifted into a user namespace range: a file
// the image's root owns belongs to host uid CONTAINER_ID_BASE, the image's uid 1000 to BASE+1000.
// Containers then run in a user namespace mapping 0..65535 inside to that range (nspawn
// --private-users=BASE:65536), so root in a container, and every command entered into it, has
// no privilege on the host, and no clone backend (overlayfs, snapshot, reflink, copy) has to
// shift owners per instance.

/** Start of the host uid/gid range container images and containers use (outside nspawn's own "pick" range). */
export const CONTAINER_ID_BASE = 0x70000000;
export const CONTAINER_ID_RANGE = 0x10000;

/**
 * Shifts every owner in the tree below 65536 (an unshifted file: a fresh build, or one that image
 * maintenance created as the host's root) by `base`; already shifted ones stay. chown clears
 * set-uid and set-gid bits, so they are put back.
 */
export function shiftOwnership(root: string, base: number): number {
  let changed = 0;
  const visit = (path: string): void => {
    const st = lstatSync(path);
    if (st.uid < CONTAINER_ID_RANGE || st.gid < CONTAINER_ID_RANGE) {
      lchownSync(path, st.uid < CONTAINER_ID_RANGE ? st.uid + base : st.uid, st.gid < CONTAINER_ID_RANGE ? st.gid + base : st.gid);
      if (!st.isSymbolicLink() && st.mode & 0o6000) chmodSync(path, st.mode & 0o7777);
      changed++;
    }
    // Only what is in the tree itself: never through a mount point into another filesystem.
    if (st.isDirectory()) for (const name of readdirSync(path)) visit(join(path, name));
  };
  visit(root);
  return changed;
}
