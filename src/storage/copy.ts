import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCode, MayflyError } from '../errors.ts';
import { run } from '../util/exec.ts';
import { checkDirRequest, output, withScratch } from './dir-common.ts';
import { fsTypeName, removeTree } from './mounts.ts';
import type { Clone, CloneRequest, Probe, StorageBackend } from './types.ts';

/**
 * A plain copy of the image's root (`cp -a`): works on any filesystem and costs seconds per
 * root filesystem, so it is the last resort. coreutils' cp shares blocks by itself where the
 * filesystem can (--reflink=auto), but then the reflink backend would have been picked anyway.
 */
export const copy: StorageBackend = {
  name: 'copy',
  kind: 'dir',

  async probe(dir: string): Promise<Probe> {
    const type = fsTypeName(dir);
    return withScratch(dir, this.name, async (scratch) => {
      writeFileSync(join(scratch, 'src'), 'copy probe');
      const r = await run('cp', ['-a', join(scratch, 'src'), join(scratch, 'dst')]);
      if (r.code !== 0) return { usable: false, reason: `a test copy on ${type} failed: ${output(r)}` };
      if (readFileSync(join(scratch, 'dst'), 'utf8') !== 'copy probe') return { usable: false, reason: `a test copy on ${type} read back different data` };
      return { usable: true, reason: 'copies the whole tree: seconds per root filesystem' };
    });
  },

  async clone(req: CloneRequest): Promise<Clone> {
    const { base, root } = checkDirRequest(req, this.name);
    const r = await run('cp', ['-a', '-T', base, root]);
    if (r.code !== 0) {
      await removeTree(root);
      throw new MayflyError(ErrorCode.CLONE_FAILED, `copy: copying ${base} to ${root} failed: ${output(r)}`, {
        hint: /No space left/i.test(r.stderr) ? 'the data dir is full: free some space (mayfly image rm old versions)' : 'see the message above',
      });
    }
    return { backend: this.name, path: root };
  },

  async remove(clone: Clone): Promise<void> {
    await removeTree(clone.path);
  },
};
