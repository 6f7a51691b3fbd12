import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCode, MayflyError } from '../errors.ts';
import { createBaseDir } from '../storage/base-dir.ts';
import { runChecked } from '../util/exec.ts';
import { imageNamePattern } from './recipe.ts';

// Images live on disk, one directory per version, each self-describing through manifest.json:
//   DATA/images/NAME/VERSION/{manifest.json, disk.qcow2, vmlinuz, initrd.img, build.log}
// A version directory is published by an atomic rename, so a half-built image is never seen.

export interface ImageManifest {
  name: string;
  version: number;
  /** Content id: sha256 over the disk, kernel and initrd. */
  id: string;
  /** A VM image (disk, kernel, initrd) or a container image (a root directory, `disk` names it). */
  kind: 'vm' | 'container';
  createdAt: string;
  source: ({ type: 'recipe'; recipe: string; suite: string; packages: string[] } | { type: 'import'; disk: string }) & {
    /** Set on a version made from an earlier one by `image maintain` or `image shell --commit`. */
    maintainedFrom?: number;
    maintainedBy?: 'maintain' | 'shell';
  };
  /** File names inside the version directory. */
  disk: string;
  kernel: string | null;
  initrd: string | null;
  /** Kernel command line for direct kernel boot (null: boot from the disk through firmware). */
  kernelArgs: string | null;
  diskVirtualBytes: number;
  /**
   * How a clone receives its keys and name: mayfly's fw_cfg guest hook, a cloud-init NoCloud
   * seed, or (containers) files the driver writes into the clone before it starts.
   */
  identity: 'fw_cfg' | 'cloud-init' | 'files';
  /** The unprivileged user jobs run as. */
  user: string;
  /**
   * Containers only: the host uid/gid the image's owners are shifted by (its files belong to
   * BASE+uid on the host); containers run in a user namespace mapping 0..65535 there.
   */
  idShift?: number;
  /** What the guest can do beyond booting: "restore-agent" (snapshot restore; images built since it exists). */
  features?: string[];
}

export interface Image extends ImageManifest {
  dir: string;
  diskPath: string;
  kernelPath: string | null;
  initrdPath: string | null;
  sizeBytes: number;
}

export class ImageStore {
  readonly root: string;

  constructor(dataDir: string) {
    this.root = join(dataDir, 'images');
  }

  /** A scratch directory on the same filesystem as the store, so publishing is a rename. */
  tempDir(prefix: string): string {
    const tmp = join(this.root, '.tmp');
    mkdirSync(tmp, { recursive: true, mode: 0o700 });
    return mkdtempSync(join(tmp, `${prefix}-`));
  }

  /** Moves a prepared directory (with manifest fields except name/version) in as the next version. */
  publish(preparedDir: string, manifest: Omit<ImageManifest, 'version'>): Image {
    const nameDir = join(this.root, manifest.name);
    mkdirSync(nameDir, { recursive: true });
    let floor = 0;
    for (let attempt = 0; attempt < 100; attempt++) {
      // A directory without a manifest (a crashed publish) is not listed but still taken.
      const version = Math.max(floor, this.#nextVersion(manifest.name));
      floor = version + 1;
      const full: ImageManifest = { ...manifest, version };
      writeFileSync(join(preparedDir, 'manifest.json'), JSON.stringify(full, null, 2) + '\n');
      try {
        renameSync(preparedDir, join(nameDir, String(version)));
        return this.get(manifest.name, version)!;
      } catch (e) {
        // Another build published this version number first; take the next one.
        if ((e as NodeJS.ErrnoException).code !== 'ENOTEMPTY' && (e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      }
    }
    throw new MayflyError(ErrorCode.IMAGE_BUILD_FAILED, `could not allocate a version number for ${manifest.name}`);
  }

  #nextVersion(name: string): number {
    return Math.max(0, ...this.versions(name)) + 1;
  }

  versions(name: string): number[] {
    const dir = join(this.root, name);
    if (!existsSync(dir)) return [];
    return readdirSync(dir)
      .filter((v) => /^\d+$/.test(v) && existsSync(join(dir, v, 'manifest.json')))
      .map(Number)
      .sort((a, b) => a - b);
  }

  names(): string[] {
    if (!existsSync(this.root)) return [];
    return readdirSync(this.root).filter((n) => imageNamePattern.test(n) && this.versions(n).length > 0).sort();
  }

  get(name: string, version: number): Image | undefined {
    const dir = join(this.root, name, String(version));
    const mf = join(dir, 'manifest.json');
    if (!existsSync(mf)) return undefined;
    const m = JSON.parse(readFileSync(mf, 'utf8')) as ImageManifest;
    const files = readdirSync(dir);
    // A container's root is a tree: its size was measured when it was built (walking it here would be slow).
    const sizeBytes = files.reduce((sum, f) => sum + (m.kind === 'container' && f === m.disk ? m.diskVirtualBytes : statSync(join(dir, f)).blocks * 512), 0);
    return {
      ...m,
      dir,
      diskPath: join(dir, m.disk),
      kernelPath: m.kernel ? join(dir, m.kernel) : null,
      initrdPath: m.initrd ? join(dir, m.initrd) : null,
      sizeBytes,
    };
  }

  list(): Image[] {
    return this.names().flatMap((n) => this.versions(n).map((v) => this.get(n, v)!));
  }

  /**
   * Resolves `NAME` (newest version), `NAME:VERSION`, or a content id prefix (`sha256:ab12…` or `ab12…`, 8+ hex).
   */
  resolve(ref: string): Image {
    const m = /^([^:]+)(?::(\d+))?$/.exec(ref);
    if (m && imageNamePattern.test(m[1]!)) {
      const name = m[1]!;
      const versions = this.versions(name);
      if (m[2] !== undefined) {
        const img = this.get(name, Number(m[2]));
        if (img) return img;
        if (versions.length > 0) {
          throw new MayflyError(ErrorCode.IMAGE_NOT_FOUND, `image ${name} has no version ${m[2]}`, {
            hint: `versions: ${versions.join(', ')}`,
          });
        }
      } else if (versions.length > 0) {
        return this.get(name, versions.at(-1)!)!;
      }
    }
    const hex = ref.replace(/^sha256:/, '');
    if (/^[0-9a-f]{8,64}$/.test(hex)) {
      const hits = this.list().filter((i) => i.id.replace(/^sha256:/, '').startsWith(hex));
      if (hits.length === 1) return hits[0]!;
    }
    throw this.notFound(ref);
  }

  notFound(ref: string): MayflyError {
    const names = this.names();
    return new MayflyError(ErrorCode.IMAGE_NOT_FOUND, `no image '${ref}' in ${this.root}`, {
      hint:
        names.length > 0
          ? `available images: ${names.join(', ')}; build another with: mayfly image build RECIPE`
          : `no image has been built yet; build the default one with: mayfly image build debian-12`,
    });
  }

  /**
   * Publishes a copy of an image version from another data dir as the next version here (same
   * manifest and content id). Files are reflinked where the filesystem can; a container root
   * becomes a subvolume on btrfs, so that clones of it are snapshots.
   */
  async importCopy(image: Image): Promise<Image> {
    const prep = this.tempDir(`copy-${image.name}`);
    try {
      for (const f of readdirSync(image.dir)) {
        if (f === 'manifest.json' || f === 'templates') continue;
        const to = join(prep, f);
        if (image.kind === 'container' && f === image.disk) await createBaseDir(to);
        else if (statSync(join(image.dir, f)).isDirectory()) continue;
        await runChecked('cp', ['-a', '--reflink=auto', '-T', join(image.dir, f), to], { code: ErrorCode.CLONE_FAILED });
      }
      const { dir: _d, diskPath: _p, kernelPath: _k, initrdPath: _i, sizeBytes: _s, version: _v, ...manifest } = image;
      return this.publish(prep, manifest);
    } catch (e) {
      rmSync(prep, { recursive: true, force: true });
      throw e;
    }
  }

  remove(name: string, version: number): void {
    const dir = join(this.root, name, String(version));
    // Rename first so a concurrent resolve never sees a half-deleted version.
    const trash = join(this.root, '.tmp', `rm-${name}-${version}-${Date.now().toString(36)}`);
    mkdirSync(join(this.root, '.tmp'), { recursive: true });
    renameSync(dir, trash);
    rmSync(trash, { recursive: true, force: true });
    if (this.versions(name).length === 0) rmSync(join(this.root, name), { recursive: true, force: true });
  }
}
