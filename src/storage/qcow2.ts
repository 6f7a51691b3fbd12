import { rmSync } from 'node:fs';
import { isAbsolute, join } from 'node:path';
import { ErrorCode, MayflyError } from '../errors.ts';
import { findOnPath, runChecked } from '../util/exec.ts';
import type { Clone, CloneRequest, Probe, StorageBackend } from './types.ts';

/** qcow2 overlay on the image's disk: a few ms and a few hundred KiB, on any filesystem. */
export const qcow2Overlay: StorageBackend = {
  name: 'qcow2-overlay',
  kind: 'disk',

  async probe(): Promise<Probe> {
    return findOnPath('qemu-img')
      ? { usable: true, reason: 'qemu-img is installed; works on any filesystem' }
      : { usable: false, reason: 'qemu-img is missing (apt-get install qemu-utils)' };
  },

  async clone(req: CloneRequest): Promise<Clone> {
    // A relative backing path would be resolved from the overlay's own directory.
    if (!isAbsolute(req.base)) throw new Error(`qcow2 overlay needs an absolute base path, got ${req.base}`);
    const path = join(req.instanceDir, 'disk.qcow2');
    const args = ['create', '-q', '-f', 'qcow2', '-b', req.base, '-F', 'qcow2', path];
    if (req.sizeBytes !== undefined) args.push(String(req.sizeBytes));
    await runChecked('qemu-img', args, { code: ErrorCode.CLONE_FAILED, what: `creating the overlay ${path}` });
    return { backend: this.name, path };
  },

  async remove(clone: Clone): Promise<void> {
    rmSync(clone.path, { force: true });
  },
};

export function diskTooSmall(wantBytes: number, baseBytes: number, image: string): MayflyError {
  return new MayflyError(
    ErrorCode.SIZE_INVALID,
    `a ${(wantBytes / 1024 ** 3).toFixed(0)} GiB disk is smaller than image ${image}'s ${(baseBytes / 1024 ** 3).toFixed(0)} GiB`,
    { hint: `ask for --disk ${Math.ceil(baseBytes / 1024 ** 3)} or more` },
  );
}
