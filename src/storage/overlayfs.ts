import { chownSync, chmodSync, existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCode, MayflyError, errorText } from '../errors.ts';
import { run } from '../util/exec.ts';
import { checkDirRequest, lstatOrUndefined, output, withScratch } from './dir-common.ts';
import { fsTypeName, removeTree, unmountAll } from './mounts.ts';
import type { Clone, CloneRequest, Probe, StorageBackend } from './types.ts';

/**
 * An overlayfs mount at `<instanceDir>/root`: the image's root is the read-only lower layer,
 * writes go to `<instanceDir>/root.overlay/upper` (work dir beside it). Instant on any
 * filesystem that can hold an upper dir (ext4, xfs, btrfs, tmpfs; not overlayfs itself), but
 * it is a mount: it needs root, and the clone is only removable by unmounting it first.
 */
export const overlayfs: StorageBackend = {
  name: 'overlayfs',
  kind: 'dir',

  async probe(dir: string): Promise<Probe> {
    if (process.getuid?.() !== 0) return { usable: false, reason: 'mounting overlayfs needs root' };
    const type = fsTypeName(dir);
    const badPath = unmountablePath(dir);
    if (badPath) return { usable: false, reason: badPath };
    return withScratch(dir, this.name, async (scratch) => {
      const [lower, upper, work, merged] = ['lower', 'upper', 'work', 'merged'].map((d) => join(scratch, d)) as [string, string, string, string];
      for (const d of [lower, upper, work, merged]) mkdirSync(d);
      writeFileSync(join(lower, 'file'), 'lower');
      const r = await mountOverlay(lower, upper, work, merged);
      if (r.code !== 0) {
        // mount(8) only says "wrong fs type, bad option, …" for this common case (a data dir inside a container).
        if (type === 'overlay') return { usable: false, reason: "the data dir is on overlayfs, which cannot hold an overlay's upper dir" };
        return { usable: false, reason: `a test overlay mount on ${type} failed: ${output(r)}` };
      }
      try {
        writeFileSync(join(merged, 'new'), 'upper');
        if (readFileSync(join(merged, 'file'), 'utf8') !== 'lower' || !existsSync(join(upper, 'new')) || existsSync(join(lower, 'new'))) {
          return { usable: false, reason: `a test overlay mount on ${type} did not keep its writes apart from the lower dir` };
        }
      } finally {
        await unmountAll(merged);
      }
      return { usable: true, reason: `a test overlay mount worked (upper dir on ${type})` };
    });
  },

  async clone(req: CloneRequest): Promise<Clone> {
    const { base, root } = checkDirRequest(req, this.name);
    const layers = `${root}.overlay`;
    const upper = join(layers, 'upper');
    const work = join(layers, 'work');
    for (const p of [base, root, upper, work]) {
      const why = unmountablePath(p);
      if (why) throw new MayflyError(ErrorCode.CLONE_FAILED, `overlayfs: ${why}`, { hint: 'choose a data dir path without "," ":" or "\\"' });
    }
    if (lstatOrUndefined(layers)) {
      throw new MayflyError(ErrorCode.CLONE_FAILED, `overlayfs: ${layers} already exists`, { hint: 'an instance dir holds one clone; remove the old one first' });
    }
    try {
      mkdirSync(upper, { recursive: true });
      mkdirSync(work);
      mkdirSync(root);
      // The merged root directory shows the upper dir's owner and mode, so give it the image's.
      const st = statSync(base);
      chownSync(upper, st.uid, st.gid);
      chmodSync(upper, st.mode & 0o7777);
      const r = await mountOverlay(base, upper, work, root);
      if (r.code !== 0) {
        throw new MayflyError(ErrorCode.CLONE_FAILED, `overlayfs: mounting ${root} failed: ${output(r)}`, {
          hint: process.getuid?.() === 0 ? '`mayfly doctor` shows which storage backends work here' : 'mounting overlayfs needs root',
        });
      }
    } catch (e) {
      // Never leave a mount or half a clone behind.
      await removeOverlay(root).catch((ce: unknown) => {
        throw new MayflyError(ErrorCode.CLONE_FAILED, `overlayfs: ${errorText(e)}; cleaning up failed too: ${errorText(ce)}`);
      });
      throw e;
    }
    return { backend: this.name, path: root };
  },

  async remove(clone: Clone): Promise<void> {
    await removeOverlay(clone.path);
  },
};

function mountOverlay(lower: string, upper: string, work: string, target: string) {
  return run('mount', ['-t', 'overlay', 'overlay', '-o', `lowerdir=${lower},upperdir=${upper},workdir=${work}`, target]);
}

/** Unmounts the merged root (and anything mounted inside it), then removes it and its layers. */
async function removeOverlay(root: string): Promise<void> {
  await unmountAll(root);
  // Only an empty mount point is left at root now; rmdir-like removal cannot touch the image.
  if (lstatOrUndefined(root)) rmSync(root, { recursive: true, force: true });
  await removeTree(`${root}.overlay`);
}

/** overlayfs takes its dirs inside one comma- and colon-separated option string. */
function unmountablePath(p: string): string | undefined {
  return /[,:\\]/.test(p) ? `the path ${p} contains "," ":" or "\\", which overlayfs mount options cannot take` : undefined;
}
