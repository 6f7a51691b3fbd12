import { EventEmitter } from 'node:events';
import { mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Config } from '../config/index.ts';
import type { MachineSize } from '../drivers/types.ts';
import { ErrorCode, MayflyError, errorText } from '../errors.ts';
import type { Logger } from '../log.ts';
import { Engine, Machine, type JobDiskMode } from '../pool/index.ts';
import { poolSpecs } from '../pool/policy.ts';
import { PoolManager, type CapacityGuard, type PoolEvent } from '../pool/pool.ts';
import { hostLimits } from '../pool/sizes.ts';
import type { EventRecord } from '../state/index.ts';
import { holderAlive } from '../util/proc.ts';
import { Metrics } from './metrics.ts';
import { ImageRebuilds, rebuildSchedules } from './rebuilds.ts';
import { removeStaleWorkRoots } from '../images/workroot.ts';

// mayflyd's core, without HTTP: the engine, the warm pools, the reaper and the event log.

/** A pool's job_disk, or [defaults] job_disk. */
export function poolJobDisk(config: Config, pool: string): JobDiskMode {
  return config.pool.find((p) => p.name === pool)?.job_disk ?? config.defaults.job_disk;
}

export function capacityGuard(config: Config): CapacityGuard {
  const host = hostLimits(0);
  const maxCpus = host.cpus * config.capacity.cpu_overcommit;
  const maxMemory = (host.memoryMiB - config.capacity.memory_reserve) * config.capacity.memory_overcommit;
  return {
    allows(size: MachineSize, running: readonly MachineSize[]): boolean {
      const cpus = running.reduce((s, r) => s + r.cpus, size.cpus);
      const memory = running.reduce((s, r) => s + r.memoryMiB, size.memoryMiB);
      return cpus <= maxCpus && memory <= maxMemory;
    },
  };
}

/**
 * One mayflyd per data dir: a pid file, refused while the process it names still runs (two
 * daemons would reap each other's machines).
 */
export function lockDataDir(dataDir: string): () => void {
  const file = join(dataDir, 'mayflyd.pid');
  mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  try {
    const pid = Number(readFileSync(file, 'utf8').trim());
    const since = statSync(file).mtimeMs;
    if (pid && pid !== process.pid && holderAlive(pid, since)) {
      throw new MayflyError(ErrorCode.USAGE, `another mayflyd (pid ${pid}) already runs on the data dir ${dataDir}`, {
        hint: 'stop it first, or give this one another --data-dir',
      });
    }
  } catch (e) {
    if (e instanceof MayflyError) throw e;
    // no pid file yet
  }
  writeFileSync(file, `${process.pid}\n`);
  return () => rmSync(file, { force: true });
}

export class Daemon {
  readonly engine: Engine;
  readonly pools: PoolManager<Machine>;
  readonly events = new EventEmitter<{ event: [EventRecord] }>();
  readonly metrics = new Metrics();
  readonly log: Logger;
  readonly rebuilds: ImageRebuilds;
  #timers: NodeJS.Timeout[] = [];
  #reconciling = false;
  #reaping = false;

  constructor(opts: { dataDir: string; config: Config; log: Logger }) {
    this.log = opts.log;
    this.engine = new Engine(opts);
    const engine = this.engine;
    const specs = poolSpecs(opts.config, hostLimits(opts.config.capacity.memory_reserve));
    this.pools = new PoolManager<Machine>(specs, {
      log: opts.log,
      capacity: capacityGuard(opts.config),
      create: (spec, signal) => {
        const image = engine.images.resolve(spec.image);
        const pool = opts.config.pool.find((p) => p.name === spec.name);
        return engine.createMachine({
          image,
          size: spec.size,
          owner: `pool ${spec.name}: idle`,
          pool: spec.name,
          signal,
          start: pool?.start,
          jobDisk: poolJobDisk(opts.config, spec.name),
          network: pool?.network,
          egressAllow: pool?.egress_allow,
        });
      },
      onEvent: (e) => this.#record(e),
    });
    this.rebuilds = new ImageRebuilds(rebuildSchedules(opts.config), {
      images: engine.images,
      recipeDirs: opts.config.images.recipe_dirs,
      log: opts.log,
      report: (type, data) => this.#recordEvent({ type, at: Date.now(), pool: null, instance: null, lease: null, data }),
      afterPublish: (img) => this.collectImagesNow([img.name]),
    });
  }

  #recordEvent(rec: Omit<EventRecord, 'id'>): void {
    try {
      const id = this.engine.state.addEvent(rec);
      this.events.emit('event', { id, ...rec });
    } catch (err) {
      this.log.error({ err: errorText(err) }, 'could not record an event');
    }
  }

  /** Removes unused old image versions; each removal is logged and recorded as an event. */
  collectImagesNow(names?: readonly string[]): void {
    try {
      const plan = this.engine.collectImages({ names });
      for (const d of plan.remove) {
        this.#recordEvent({ type: 'image_removed', at: Date.now(), pool: null, instance: null, lease: null, data: { image: `${d.name}:${d.version}`, why: d.why } });
      }
    } catch (e) {
      this.log.error({ err: errorText(e) }, 'image garbage collection failed');
    }
  }

  #record(e: PoolEvent): void {
    this.metrics.observe(e);
    try {
      this.#recordLease(e);
      const rec = { at: e.at, type: e.type, pool: e.pool, instance: e.instance ?? null, lease: e.lease ?? null, data: e.data ?? {} };
      const id = this.engine.state.addEvent(rec);
      this.events.emit('event', { id, ...rec });
    } catch (err) {
      this.log.error({ err: errorText(err) }, 'could not record an event');
    }
  }

  /** Keeps the leases table in step with the pool's lease events. */
  #recordLease(e: PoolEvent): void {
    const state = this.engine.state;
    if (!e.lease) return;
    if (e.type === 'leased') {
      const l = this.pools.lease(e.lease);
      if (!l) return;
      state.insertLease({
        id: l.id, pool: l.pool, instance: l.machine.id, job: l.job, state: 'leased', queuedAt: l.queuedAt, leasedAt: l.leasedAt,
        deadline: l.deadline, releasedAt: null,
      });
    } else if (e.type === 'expired') {
      state.updateLease(e.lease, { state: 'expired' });
    } else if (e.type === 'released') {
      const expired = state.listLeases(['expired']).some((l) => l.id === e.lease);
      state.updateLease(e.lease, { state: expired ? 'expired' : 'released', releasedAt: e.at });
    }
  }

  /** Reaps what an earlier run left, then starts the autoscaler and reaper loops. */
  async start(): Promise<void> {
    // Leases held when an earlier mayflyd died ended with it; their machines go to the reaper.
    for (const l of this.engine.state.listLeases(['leased'])) this.engine.state.updateLease(l.id, { state: 'lost', releasedAt: Date.now() });
    await this.reapNow();
    await this.reconcileNow();
    const d = this.engine.config.daemon;
    this.#timers.push(setInterval(() => void this.reconcileNow(), d.reconcile_interval * 1000));
    this.#timers.push(setInterval(() => void this.reapNow(), d.reap_interval * 1000));
    this.collectImagesNow();
    this.#timers.push(setInterval(() => this.collectImagesNow(), this.engine.config.images.gc_interval * 1000));
    this.rebuilds.start();
  }

  async reconcileNow(): Promise<void> {
    if (this.#reconciling) return;
    this.#reconciling = true;
    try {
      await this.pools.reconcile();
      this.metrics.setPools(this.pools.status());
    } catch (e) {
      this.log.error({ err: errorText(e) }, 'autoscaler pass failed');
    } finally {
      this.#reconciling = false;
    }
  }

  async reapNow(): Promise<void> {
    if (this.#reaping) return;
    this.#reaping = true;
    try {
      const r = await this.engine.reap(this.log);
      // Copies of images that a killed `image maintain`/`image shell` left mounted.
      for (const dir of await removeStaleWorkRoots(this.engine.images)) this.log.warn({ dir }, 'removed an image work dir whose process is gone');
      for (const x of r.removed) {
        this.metrics.reaped.inc();
        this.#record({ type: 'reaped', at: Date.now(), pool: '', instance: x.id, data: { why: x.why } });
      }
    } catch (e) {
      this.log.error({ err: errorText(e) }, 'reaper pass failed');
    } finally {
      this.#reaping = false;
    }
  }

  /**
   * SIGTERM: stop creating, fail waiting lease requests, destroy machines as configured, then
   * close the API (`closeApi`) and the store.
   */
  async stop(closeApi: () => Promise<void> = async () => {}): Promise<void> {
    for (const t of this.#timers) clearInterval(t);
    this.#timers = [];
    await this.rebuilds.stop();
    const destroy = this.engine.config.daemon.delete_instances_on_shutdown;
    await this.pools.shutdown({ destroyIdle: destroy, destroyLeased: destroy });
    await closeApi();
    this.engine.close();
  }
}
