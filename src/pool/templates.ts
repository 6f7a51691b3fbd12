import { copyFileSync, existsSync, linkSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { MachineSize } from '../drivers/types.ts';
import { ErrorCode, MayflyError, errorText } from '../errors.ts';
import type { Image } from '../images/store.ts';
import { takeDirLock } from '../util/lock.ts';
import { processAlive } from '../util/proc.ts';
import { Machine, type MachineDeps } from './machine.ts';

// Snapshot templates: for an image version and a machine size, one machine booted once,
// brought to a clean idle state (sshd stopped, a restore agent waiting, caches dropped) and
// saved — its memory state next to its frozen disk. A clone is a new overlay on that disk plus
// a QEMU that loads the state: about a second instead of a boot. Templates live inside the
// image's version directory, so removing the image removes them.

export interface TemplateMeta {
  imageId: string;
  size: MachineSize;
  /** What must match for a restore to work (emulator version, accelerator, …). */
  compat: Record<string, string>;
  createdAt: string;
  stateBytes: number;
  /** Seconds the template took to make (boot + save). */
  seconds: number;
}

export interface Template {
  dir: string;
  disk: string;
  state: string;
  meta: TemplateMeta;
}

const sizeKey = (s: MachineSize) => `${s.cpus}cpu-${s.memoryMiB}mb-${s.diskGiB}gb`;

export class Templates {
  readonly #deps: MachineDeps;

  constructor(deps: MachineDeps) {
    this.#deps = deps;
  }

  dirFor(image: Image, size: MachineSize): string {
    return join(image.dir, 'templates', sizeKey(size));
  }

  canSnapshot(image: Image): boolean {
    return Boolean(this.#deps.driver.canSnapshot?.(image) && this.#deps.driver.saveSnapshot && this.#deps.driver.snapshotCompat);
  }

  /** The valid template for the image and size, if one exists; a stale one is removed (with a log line). */
  async find(image: Image, size: MachineSize): Promise<Template | undefined> {
    const dir = this.dirFor(image, size);
    const metaFile = join(dir, 'meta.json');
    if (!existsSync(metaFile)) return undefined;
    let meta: TemplateMeta;
    try {
      meta = JSON.parse(readFileSync(metaFile, 'utf8')) as TemplateMeta;
    } catch (e) {
      this.#drop(dir, `its meta.json is unreadable (${errorText(e)})`);
      return undefined;
    }
    const compat = await this.#deps.driver.snapshotCompat!(image);
    const mismatch = Object.keys({ ...compat, ...meta.compat }).filter((k) => compat[k] !== meta.compat[k]);
    if (meta.imageId !== image.id) mismatch.push('image content');
    if (mismatch.length > 0) {
      this.#drop(dir, `it was made with another ${mismatch.join(', ')} (${mismatch.map((k) => `${meta.compat[k] ?? '?'} → ${compat[k] ?? '?'}`).join('; ')})`);
      return undefined;
    }
    return { dir, disk: join(dir, 'disk.qcow2'), state: join(dir, 'state'), meta };
  }

  /**
   * The template, made now when there is none (one maker at a time per image and size; others
   * wait for it). A make that failed is not tried again for an hour (or until the image or the
   * emulator changes), so every start does not pay a failed template boot first.
   */
  async ensure(image: Image, size: MachineSize, signal?: AbortSignal): Promise<Template> {
    const found = await this.find(image, size);
    if (found) return found;
    const dir = this.dirFor(image, size);
    const failed = await this.#recentFailure(image, dir);
    if (failed) {
      throw new MayflyError(ErrorCode.SNAPSHOT_FAILED, `making the snapshot template failed ${Math.round((Date.now() - failed.at) / 60_000)} min ago (${failed.reason}); next try after an hour`, {
        hint: `remove ${dir}.failed.json to try again now`,
      });
    }
    mkdirSync(join(dir, '..'), { recursive: true });
    let made: Template | undefined;
    const release = await takeDirLock(`${dir}.lock`, {
      // Waiting longer than a maker can take means something is wrong: boot instead.
      timeoutMs: 15 * 60_000,
      timeout: () => new MayflyError(ErrorCode.SNAPSHOT_FAILED, `waited 15 min for another process to make ${dir}`),
      pollMs: 500,
      // A pid file still empty after 10 s belongs to a maker killed as it took the lock.
      emptyStaleMs: 10_000,
      signal,
      stopWaiting: async () => (made = await this.find(image, size)) !== undefined,
    });
    if (!release) return made!;
    try {
      return (await this.find(image, size)) ?? (await this.#make(image, size, signal));
    } catch (e) {
      if (!signal?.aborted) {
        const record: FailureRecord = { imageId: image.id, compat: await this.#deps.driver.snapshotCompat!(image), at: Date.now(), reason: errorText(e) };
        writeFileSync(`${dir}.failed.json`, JSON.stringify(record) + '\n');
      }
      throw e;
    } finally {
      release();
    }
  }

  async #recentFailure(image: Image, dir: string): Promise<FailureRecord | undefined> {
    let f: FailureRecord;
    try {
      f = JSON.parse(readFileSync(`${dir}.failed.json`, 'utf8')) as FailureRecord;
    } catch {
      return undefined;
    }
    const compat = await this.#deps.driver.snapshotCompat!(image);
    const same = f.imageId === image.id && JSON.stringify(f.compat) === JSON.stringify(compat);
    return same && Date.now() - f.at < 3_600_000 ? f : undefined;
  }

  async #make(image: Image, size: MachineSize, signal?: AbortSignal): Promise<Template> {
    const d = this.#deps;
    const t0 = Date.now();
    const ref = `${image.name}:${image.version}`;
    d.log.info({ image: ref, cpus: size.cpus, memory: size.memoryMiB }, 'making a snapshot template (once per image and size)');
    const dir = this.dirFor(image, size);
    const tmp = `${dir}.tmp-${process.pid}`;
    // Leftovers of makers of this template that died (kill -9) half-way.
    const parent = join(dir, '..');
    const prefix = `${basename(dir)}.tmp-`;
    for (const f of readdirSync(parent)) {
      if (f.startsWith(prefix) && !processAlive(Number(f.slice(prefix.length)))) rmSync(join(parent, f), { recursive: true, force: true });
    }
    rmSync(tmp, { recursive: true, force: true });
    const m = await Machine.create(d, { image, size, owner: `snapshot template of ${ref}`, signal });
    try {
      // Clones start with the normal (quiet) kernel command line; a template must have it too.
      if (m.verboseBoot) throw new MayflyError(ErrorCode.SNAPSHOT_FAILED, 'the template machine needed a second, verbose boot');
      const root = await m.root();
      // The kernel modules an encrypted job disk needs (SCSI disk, device mapper, dm-crypt, XTS),
      // loaded once here rather than at every clone's job disk setup (~1 s of module loading
      // under TCG). Harmless when a module is missing: the setup then fails with its own error.
      await root.exec(['sh', '-c', 'modprobe -qa sd_mod dm_mod dm_crypt xts 2>/dev/null; true'], { signal });
      let err = '';
      const prep = await root.exec(['/usr/local/sbin/mayfly-guest-snapshot'], { stderr: (c) => (err += c.toString()), signal });
      if (prep.exitCode !== 0) {
        throw new MayflyError(ErrorCode.SNAPSHOT_FAILED, `preparing ${ref} for a snapshot failed (exit ${prep.exitCode}): ${err.trim()}`, {
          hint: 'images built before snapshot support lack the restore agent: rebuild the image (mayfly image build)',
        });
      }
      m.closeConnections();
      // Let the session's sshd process go before the state is saved.
      await sleep(300);
      mkdirSync(tmp, { recursive: true, mode: 0o700 });
      await d.driver.saveSnapshot!(m.started.pid, m.dir, join(tmp, 'state'));
      renameSync(join(m.dir, 'disk.qcow2'), join(tmp, 'disk.qcow2'));
      const meta: TemplateMeta = {
        imageId: image.id,
        size,
        compat: await d.driver.snapshotCompat!(image),
        createdAt: new Date().toISOString(),
        stateBytes: statSync(join(tmp, 'state')).size,
        seconds: +((Date.now() - t0) / 1000).toFixed(1),
      };
      writeFileSync(join(tmp, 'meta.json'), JSON.stringify(meta, null, 2) + '\n');
      // The image may have been removed meanwhile (image rm --force): leave nothing behind then.
      if (!existsSync(join(image.dir, 'manifest.json'))) throw new MayflyError(ErrorCode.SNAPSHOT_FAILED, `image ${ref} was removed while its template was made`);
      // Clones hold hard links of the old generation's files (pin), so removing it is safe.
      rmSync(dir, { recursive: true, force: true });
      renameSync(tmp, dir);
      rmSync(`${dir}.failed.json`, { force: true });
      d.log.info({ image: ref, seconds: meta.seconds, stateMiB: Math.round(meta.stateBytes / 2 ** 20) }, 'snapshot template ready');
      return { dir, disk: join(dir, 'disk.qcow2'), state: join(dir, 'state'), meta };
    } catch (e) {
      rmSync(tmp, { recursive: true, force: true });
      throw e;
    } finally {
      await m.destroy().catch((e: unknown) => d.log.error({ err: errorText(e) }, 'removing the template machine failed'));
    }
  }

  /** Removes a template that failed to restore, so the next start makes a new one. */
  drop(t: Template, why: string): void {
    this.#drop(t.dir, why);
  }

  #drop(dir: string, why: string): void {
    this.#deps.log.warn({ template: dir, why }, 'removing a snapshot template');
    // Running clones hold hard links of its files (pin): nothing is pulled from under them.
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * Hard links of the template's disk and state in a clone's instance dir, taken from one
 * generation of the template: the clone's overlay and its memory state then always match,
 * even when the template is remade meanwhile, and removing the template never pulls the base
 * from under a running clone. When the instance dir is on another filesystem than the data dir
 * (storage.instances_dir on a tmpfs), hard links are impossible: the files are copied instead,
 * which costs their size in that filesystem per clone; `copied` then says why.
 */
export function pinTemplate(t: Template, instanceDir: string): { disk: string; state: string; copied?: string } {
  const disk = join(instanceDir, 'template-disk.qcow2');
  const state = join(instanceDir, 'template-state');
  let copied: string | undefined;
  for (let attempt = 0; attempt < 3; attempt++) {
    rmSync(disk, { force: true });
    rmSync(state, { force: true });
    try {
      if (copied) {
        copyFileSync(t.disk, disk);
        copyFileSync(t.state, state);
      } else {
        linkSync(t.disk, disk);
        linkSync(t.state, state);
      }
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EXDEV' && !copied) {
        copied = `the instance dir ${instanceDir} is on another filesystem than the template ${t.dir}, so it cannot be hard-linked; copied instead`;
        attempt--;
        continue;
      }
      throw new MayflyError(ErrorCode.RESTORE_FAILED, `the snapshot template ${t.dir} is gone: ${errorText(e)}`);
    }
    // Still the generation the clone was given (the make publishes a new one by rename)?
    if (sameGeneration(readFileOr(join(t.dir, 'meta.json'), ''), t.meta)) return { disk, state, ...(copied ? { copied } : {}) };
  }
  throw new MayflyError(ErrorCode.RESTORE_FAILED, `the snapshot template ${t.dir} keeps changing under this clone`);
}

function sameGeneration(metaText: string, meta: TemplateMeta): boolean {
  try {
    const now = JSON.parse(metaText) as TemplateMeta;
    return now.createdAt === meta.createdAt && now.stateBytes === meta.stateBytes && now.imageId === meta.imageId;
  } catch {
    return false;
  }
}

interface FailureRecord {
  imageId: string;
  compat: Record<string, string>;
  at: number;
  reason: string;
}

function readFileOr(path: string, fallback: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return fallback;
  }
}
