import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { ErrorCode, MayflyError } from '../errors.ts';
import { createProgress } from '../progress.ts';
import { requireTool, runChecked } from '../util/exec.ts';
import { contentId } from './build.ts';
import { imageNamePattern } from './recipe.ts';
import type { Image, ImageStore } from './store.ts';

export interface ImportRequest {
  name: string;
  /** A cloud image disk, qcow2 or raw (any format qemu-img reads). */
  disk: string;
  /** Optional kernel and initrd for direct boot; without them the disk boots through firmware. */
  kernel?: string;
  initrd?: string;
  kernelArgs?: string;
  /** The unprivileged user cloud-init creates for jobs. */
  user?: string;
}

/**
 * Imports a cloud image the way VM-pool tools use Ubuntu/Debian cloud images: the disk is
 * converted to qcow2 once and every clone gets its keys and hostname from a NoCloud seed.
 */
export async function importImage(store: ImageStore, req: ImportRequest): Promise<Image> {
  requireTool('qemu-img');
  requireTool('genisoimage');
  if (!imageNamePattern.test(req.name)) {
    throw new MayflyError(ErrorCode.USAGE, `'${req.name}' is not a valid image name`, {
      hint: 'use lower-case letters, digits, ".", "_" and "-", starting with a letter or digit',
    });
  }
  for (const [what, p] of [['disk', req.disk], ['kernel', req.kernel], ['initrd', req.initrd]] as const) {
    if (p !== undefined && !existsSync(p)) throw new MayflyError(ErrorCode.USAGE, `the ${what} file ${p} does not exist`);
  }
  if (req.user !== undefined && !/^[a-z_][a-z0-9_-]{0,31}$/.test(req.user)) {
    throw new MayflyError(ErrorCode.USAGE, `'${req.user}' is not a valid user name`, {
      hint: 'use lower-case letters, digits, "_" and "-", starting with a letter or "_" (at most 32)',
    });
  }
  if (Boolean(req.kernel) !== Boolean(req.initrd)) {
    throw new MayflyError(ErrorCode.USAGE, 'give both --kernel and --initrd, or neither (to boot the disk through firmware)');
  }
  const progress = createProgress(`import ${req.name}`, 3);
  const work = store.tempDir(`import-${req.name}`);
  const out = join(work, 'out');
  mkdirSync(out);
  try {
    progress.step('convert the disk to qcow2');
    const disk = join(out, 'disk.qcow2');
    await runChecked('qemu-img', ['convert', '-O', 'qcow2', resolve(req.disk), disk], {
      code: ErrorCode.IMAGE_IMPORT_FAILED,
      what: `converting ${req.disk}`,
    });
    const info = JSON.parse((await runChecked('qemu-img', ['info', '--output=json', disk])).stdout) as { 'virtual-size': number };

    progress.step('copy kernel and initrd');
    const files = [disk];
    if (req.kernel && req.initrd) {
      await runChecked('cp', [req.kernel, join(out, 'vmlinuz')]);
      await runChecked('cp', [req.initrd, join(out, 'initrd.img')]);
      files.push(join(out, 'vmlinuz'), join(out, 'initrd.img'));
    }

    progress.step('content id and publish');
    const image = store.publish(out, {
      name: req.name,
      id: await contentId(files),
      kind: 'vm',
      createdAt: new Date().toISOString(),
      source: { type: 'import', disk: resolve(req.disk) },
      disk: 'disk.qcow2',
      kernel: req.kernel ? 'vmlinuz' : null,
      initrd: req.initrd ? 'initrd.img' : null,
      kernelArgs: req.kernel ? (req.kernelArgs ?? 'console=ttyS0 root=/dev/vda1 rw') : null,
      diskVirtualBytes: info['virtual-size'],
      identity: 'cloud-init',
      user: req.user ?? 'ci',
    });
    progress.done(`imported ${image.name}:${image.version} ${image.id.slice(0, 19)}`);
    return image;
  } catch (e) {
    progress.fail();
    throw e;
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}
