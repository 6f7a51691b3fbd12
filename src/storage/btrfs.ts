import { lstatSync, readdirSync, statfsSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCode, MayflyError } from '../errors.ts';
import { findOnPath, run } from '../util/exec.ts';
import { output } from './dir-common.ts';
import { unmountAll } from './mounts.ts';

// btrfs subvolumes through btrfs-progs. A subvolume's root directory always has inode 256,
// which tells one apart from a plain directory without running anything.

export const BTRFS_MAGIC = 0x9123683e;
const SUBVOLUME_ROOT_INODE = 256;

export const BTRFS_PROGS_MISSING = 'btrfs-progs is not installed: apt-get install btrfs-progs';

export function onBtrfs(path: string): boolean {
  try {
    return statfsSync(path).type === BTRFS_MAGIC;
  } catch {
    return false;
  }
}

export function isSubvolume(path: string): boolean {
  try {
    const st = lstatSync(path);
    return st.isDirectory() && st.ino === SUBVOLUME_ROOT_INODE && onBtrfs(path);
  } catch {
    return false;
  }
}

export function requireBtrfsProgs(what: string): void {
  if (!findOnPath('btrfs')) {
    throw new MayflyError(ErrorCode.MISSING_TOOL, `${what} needs the btrfs command, which is not installed`, {
      hint: 'install it with: apt-get install btrfs-progs',
    });
  }
}

export async function createSubvolume(path: string): Promise<void> {
  requireBtrfsProgs(`making the subvolume ${path}`);
  const r = await run('btrfs', ['subvolume', 'create', path]);
  if (r.code !== 0) throw new MayflyError(ErrorCode.CLONE_FAILED, `btrfs subvolume create ${path} failed: ${output(r)}`);
}

/** Subvolumes nested anywhere inside `path` (not crossing mounts), deepest first. */
function nestedSubvolumes(path: string): string[] {
  const found: string[] = [];
  const dev = lstatSync(path).dev;
  const walk = (dir: string) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      if (!e.isDirectory()) continue;
      const p = join(dir, e.name);
      const st = lstatSync(p);
      // Each subvolume has a device number of its own; a mounted filesystem would too, but
      // mounts are gone by now (unmountAll), so a new device here is a nested subvolume.
      if (st.ino === SUBVOLUME_ROOT_INODE && st.dev !== dev) {
        found.push(...nestedSubvolumes(p), p);
      } else {
        walk(p);
      }
    }
  };
  walk(path);
  return found;
}

/**
 * Deletes a subvolume and any subvolumes made inside it (a container may create some, e.g.
 * systemd-nspawn or docker in a container). The nested ones are looked for only when the plain
 * delete refuses, so the usual case costs one command.
 */
export async function deleteSubvolume(path: string): Promise<void> {
  requireBtrfsProgs(`deleting the subvolume ${path}`);
  await unmountAll(path);
  let r = await run('btrfs', ['subvolume', 'delete', path]);
  if (r.code !== 0 && /not empty/i.test(r.stderr)) {
    for (const inner of nestedSubvolumes(path)) {
      const ri = await run('btrfs', ['subvolume', 'delete', inner]);
      if (ri.code !== 0) throw deleteFailed(inner, ri.stderr);
    }
    r = await run('btrfs', ['subvolume', 'delete', path]);
  }
  if (r.code !== 0) throw deleteFailed(path, output(r));
}

function deleteFailed(path: string, why: string): MayflyError {
  return new MayflyError(ErrorCode.CLONE_REMOVE_FAILED, `btrfs subvolume delete ${path} failed: ${why.trim()}`, {
    hint: `delete it by hand (btrfs subvolume delete ${path}) once nothing uses it`,
  });
}
