import { existsSync, mkdirSync, readFileSync, readdirSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { MachineSize } from '../drivers/types.ts';
import { ErrorCode, MayflyError, errorText } from '../errors.ts';
import type { Image } from '../images/store.ts';
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

  /** The template, made now when there is none (one maker at a time per image and size; others wait for it). */
  async ensure(image: Image, size: MachineSize, signal?: AbortSignal): Promise<Template> {
    const found = await this.find(image, size);
    if (found) return found;
    const dir = this.dirFor(image, size);
    mkdirSync(join(dir, '..'), { recursive: true });
    const lock = `${dir}.lock`;
    for (;;) {
      signal?.throwIfAborted();
      try {
        mkdirSync(lock);
        writeFileSync(join(lock, 'pid'), String(process.pid));
        break;
      } catch {
        // Another process makes it; take over only when that process is gone.
        const holder = Number(readFileOr(join(lock, 'pid'), '0'));
        if (holder > 0 && !processAlive(holder)) rmSync(lock, { recursive: true, force: true });
        await sleep(500);
        const made = await this.find(image, size);
        if (made) return made;
      }
    }
    try {
      return (await this.find(image, size)) ?? (await this.#make(image, size, signal));
    } finally {
      rmSync(lock, { recursive: true, force: true });
    }
  }

  async #make(image: Image, size: MachineSize, signal?: AbortSignal): Promise<Template> {
    const d = this.#deps;
    const t0 = Date.now();
    const ref = `${image.name}:${image.version}`;
    d.log.info({ image: ref, cpus: size.cpus, memory: size.memoryMiB }, 'making a snapshot template (once per image and size)');
    const dir = this.dirFor(image, size);
    const tmp = `${dir}.tmp-${process.pid}`;
    // Leftovers of makers that died (kill -9) half-way.
    const parent = join(dir, '..');
    for (const f of readdirSync(parent)) {
      const m = /\.tmp-(\d+)$/.exec(f);
      if (m && (Number(m[1]) === process.pid || !processAlive(Number(m[1])))) rmSync(join(parent, f), { recursive: true, force: true });
    }
    const m = await Machine.create(d, { image, size, owner: `snapshot template of ${ref}`, signal });
    try {
      const root = await m.root();
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
      rmSync(dir, { recursive: true, force: true });
      renameSync(tmp, dir);
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
    // Clones restored from it keep using its disk as their base: move it aside, never delete under them.
    rmSync(join(dir, 'meta.json'), { force: true });
    rmSync(join(dir, 'state'), { force: true });
  }
}

function readFileOr(path: string, fallback: string): string {
  try {
    return readFileSync(path, 'utf8');
  } catch {
    return fallback;
  }
}
