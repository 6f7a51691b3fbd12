import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCode, MayflyError } from '../errors.ts';
import { run } from '../util/exec.ts';
import { checkDirRequest, output, withScratch } from './dir-common.ts';
import { fsTypeName, removeTree } from './mounts.ts';
import type { Clone, CloneRequest, Probe, StorageBackend } from './types.ts';

/**
 * A reflink copy of the image's root (`cp -a --reflink=always`): every file shares its blocks
 * with the image until written. Needs btrfs, or xfs made with reflink=1 (mkfs.xfs's default
 * since xfsprogs 5.1), with the image on the same filesystem. The time grows with the number of
 * files (every inode is copied), not with their size.
 */
export const reflink: StorageBackend = {
  name: 'reflink',
  kind: 'dir',

  async probe(dir: string): Promise<Probe> {
    const type = fsTypeName(dir);
    return withScratch(dir, this.name, async (scratch) => {
      const data = randomBytes(64 * 1024);
      const src = join(scratch, 'src');
      const dst = join(scratch, 'dst');
      writeFileSync(src, data);
      const r = await run('cp', ['--reflink=always', src, dst]);
      if (r.code !== 0) return { usable: false, reason: noReflinkReason(type, output(r)) };
      if (!readFileSync(dst).equals(data)) return { usable: false, reason: `a test reflink copy on ${type} read back different data` };
      return { usable: true, reason: `a test reflink copy worked (${type})` };
    });
  },

  async clone(req: CloneRequest): Promise<Clone> {
    const { base, root } = checkDirRequest(req, this.name);
    const r = await run('cp', ['-a', '--reflink=always', '-T', base, root]);
    if (r.code !== 0) {
      await removeTree(root); // cp stops at the first file it cannot clone, leaving a partial tree
      throw new MayflyError(ErrorCode.CLONE_FAILED, `reflink: copying ${base} to ${root} failed: ${output(r)}`, {
        hint: 'reflink needs btrfs or xfs with reflink=1, and the image on the same filesystem as the instance dir; `mayfly doctor` shows which backends work here',
      });
    }
    return { backend: this.name, path: root };
  },

  async remove(clone: Clone): Promise<void> {
    await removeTree(clone.path);
  },
};

function noReflinkReason(type: string, cpOutput: string): string {
  if (type === 'xfs') return 'this xfs was made without reflink (mkfs.xfs -m reflink=1 makes one with it)';
  if (/^ext[234]$|^tmpfs$|^overlay$|^ramfs$|^vfat$|^nfs4?$/.test(type)) return `${type} has no reflink`;
  return `${type}: a test reflink copy failed: ${cpOutput}`;
}
