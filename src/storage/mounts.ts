import { existsSync, lstatSync, readFileSync, realpathSync, rmSync, statfsSync } from 'node:fs';
import { dirname, resolve, sep } from 'node:path';
import { ErrorCode, MayflyError } from '../errors.ts';
import { run } from '../util/exec.ts';

// What is mounted where, from /proc/self/mountinfo, and removing directory trees without ever
// descending into a mount: `rm -rf` through a mount point would delete the mounted
// filesystem's files (a bind-mounted host dir, or the merged view of an overlay).

export interface MountEntry {
  mountPoint: string;
  fsType: string;
  source: string;
}

/** Mount points in mountinfo escape space, tab, newline and backslash as \ooo. */
function unescape(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** This process's mounts, in mount order (a later entry on the same point covers an earlier one). */
export function readMounts(): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    if (!line) continue;
    // id parent major:minor root mount-point options [optional fields…] - fstype source super-options
    const fields = line.split(' ');
    const dash = fields.indexOf('-', 6);
    if (dash < 0 || fields.length < dash + 3) continue;
    out.push({ mountPoint: unescape(fields[4]!), fsType: fields[dash + 1]!, source: unescape(fields[dash + 2]!) });
  }
  return out;
}

/** The canonical form of `path` (symlinks resolved) when it exists, else its absolute form. */
function canonical(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return resolve(path);
  }
}

function isAtOrUnder(p: string, root: string): boolean {
  return p === root || p.startsWith(root === sep ? root : root + sep);
}

/** Mounts at `path` or anywhere below it, deepest first (the order to unmount them in). */
export function mountsUnder(path: string): MountEntry[] {
  const root = canonical(path);
  return readMounts()
    .filter((m) => isAtOrUnder(m.mountPoint, root))
    .sort((a, b) => b.mountPoint.length - a.mountPoint.length);
}

export function isMountPoint(path: string): boolean {
  const p = canonical(path);
  return readMounts().some((m) => m.mountPoint === p);
}

/** The mount that holds `path` (the longest mount point above it; the last one mounted wins). */
export function mountOf(path: string): MountEntry | undefined {
  const p = canonical(path);
  let best: MountEntry | undefined;
  for (const m of readMounts()) {
    if (isAtOrUnder(p, m.mountPoint) && (!best || m.mountPoint.length >= best.mountPoint.length)) best = m;
  }
  return best;
}

/** The nearest directory at or above `path` that exists (for probing a data dir not made yet). */
export function nearestExisting(path: string): string {
  let p = resolve(path);
  while (!existsSync(p) && dirname(p) !== p) p = dirname(p);
  return p;
}

export interface FilesystemInfo {
  /** As the kernel names it in mountinfo: "ext4", "btrfs", "xfs", "overlay", "tmpfs", … */
  type: string;
  /** What is mounted: a device such as /dev/vda, or "overlay", "tmpfs". */
  source: string;
  mountPoint: string;
  freeBytes: number;
  totalBytes: number;
}

/** The filesystem `path` is on (path must exist). */
export function filesystemOf(path: string): FilesystemInfo {
  const m = mountOf(path);
  const s = statfsSync(path);
  return {
    type: m?.fsType ?? `unknown (magic 0x${s.type.toString(16)})`,
    source: m?.source ?? 'unknown',
    mountPoint: m?.mountPoint ?? '/',
    freeBytes: s.bavail * s.bsize,
    totalBytes: s.blocks * s.bsize,
  };
}

/** The type of the filesystem `path` is on, for messages ("ext4 has no reflink"). */
export function fsTypeName(path: string): string {
  try {
    return filesystemOf(path).type;
  } catch {
    return `the filesystem of ${path} (not readable)`;
  }
}

/**
 * Unmounts everything at or under `path`, deepest first. A mount that is busy (a process still
 * has files open in it) is detached lazily: it disappears from the tree now and the kernel
 * frees it when the last user goes, so nothing is left mounted for a later `rm` to walk into.
 */
export async function unmountAll(path: string): Promise<void> {
  for (const m of mountsUnder(path)) {
    const r = await run('umount', [m.mountPoint]);
    if (r.code === 0) continue;
    const lazy = await run('umount', ['--lazy', m.mountPoint]);
    if (lazy.code !== 0 && isMountPoint(m.mountPoint)) {
      throw new MayflyError(ErrorCode.CLONE_REMOVE_FAILED, `cannot unmount ${m.mountPoint}: ${(lazy.stderr || r.stderr).trim()}`, {
        hint: `unmount it by hand (umount -l ${m.mountPoint}) and remove the directory`,
      });
    }
  }
  const left = mountsUnder(path);
  if (left.length > 0) {
    throw new MayflyError(ErrorCode.CLONE_REMOVE_FAILED, `${left[0]!.mountPoint} is still mounted after unmounting it`, {
      hint: `unmount it by hand (umount -l ${left[0]!.mountPoint}) and remove the directory`,
    });
  }
}

/** Removes a directory tree after unmounting whatever is mounted in it; succeeds when it is gone already. */
export async function removeTree(path: string): Promise<void> {
  try {
    lstatSync(path);
  } catch {
    return; // gone already (a dangling symlink still counts as there)
  }
  await unmountAll(path);
  rmSync(path, { recursive: true, force: true });
}
