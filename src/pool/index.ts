import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { Config } from '../config/index.ts';
import { NspawnDriver, QemuDriver, type Driver, type MachineSize } from '../drivers/index.ts';
import type { START_MODES } from '../config/schema.ts';
import { ErrorCode, MayflyError, errorText } from '../errors.ts';
import { collectImages, type GcPlan } from '../images/gc.ts';
import { ImageStore, type Image } from '../images/store.ts';
import type { Logger } from '../log.ts';
import { BridgedNetwork, networkSettings, type NetworkMode } from '../network/index.ts';
import { openStateStore, type InstanceRecord, type StateStore } from '../state/index.ts';
import { detectStorage, qcow2Overlay, type StorageBackend } from '../storage/index.ts';
import { attachInstance, type AttachedMachine } from './attached.ts';
import { Machine, type MachineDeps, type MachineNetworkRequest } from './machine.ts';
import { reap, removeInstance, type ReapResult } from './reaper.ts';
import { checkSize, hostLimits } from './sizes.ts';
import { assertJobDiskSupported, type JobDiskMode } from './job-disk.ts';
import { Templates, type Template } from './templates.ts';

export type StartMode = (typeof START_MODES)[number];

export { Machine } from './machine.ts';
export { assertJobDiskSupported, type JobDiskMode } from './job-disk.ts';
export type { AttachedMachine } from './attached.ts';

// The engine: everything under the integrations, as one library. Today a lease boots a machine
// on demand and release destroys it; the warm pool (mayflyd) hands out ready ones instead.

export interface LeaseRequest {
  /** Image reference (NAME, NAME:VERSION, content id); the configured default when absent. */
  image?: string;
  size?: Partial<MachineSize>;
  /** Who holds the lease, for `ps` (e.g. "run: make test"). */
  owner: string;
  signal?: AbortSignal;
  /** restore | boot; default from the config. */
  start?: StartMode;
  /** plain | encrypted | tmpfs; default from the config. */
  jobDisk?: JobDiskMode;
  /** user | bridged; default from the config ([defaults] network). */
  network?: NetworkMode;
}

export interface Lease {
  machine: Machine;
  release(): Promise<void>;
}

export class Engine {
  readonly dataDir: string;
  readonly config: Config;
  readonly log: Logger;
  readonly state: StateStore;
  readonly images: ImageStore;
  /** The VM driver (snapshot templates are VMs). */
  readonly driver: Driver;
  readonly containers: NspawnDriver;
  /** VM disks' backend; container roots use `dirStorage()`. */
  readonly storage: StorageBackend;
  readonly templates: Templates;
  #dirStorage: Promise<StorageBackend> | undefined;
  /** Bridged networking; touches the host only when a machine is started bridged. */
  readonly network: BridgedNetwork;

  constructor(opts: { dataDir: string; config: Config; log: Logger }) {
    if (opts.dataDir.includes(',')) {
      // QEMU splits option values at commas; a path with one would break (or inject) options.
      throw new MayflyError(ErrorCode.USAGE, `the data dir ${opts.dataDir} contains a ',', which QEMU's option syntax cannot take`, {
        hint: 'choose a data dir path without commas (--data-dir or MAYFLY_DATA_DIR)',
      });
    }
    this.dataDir = opts.dataDir;
    this.config = opts.config;
    this.log = opts.log;
    this.state = openStateStore(join(opts.dataDir, 'state.db'));
    this.images = new ImageStore(opts.dataDir);
    this.driver = new QemuDriver({
      binary: opts.config.qemu.binary,
      accel: opts.config.qemu.accel,
      tcgTbSize: opts.config.qemu.tcg_tb_size,
      accelCacheFile: join(opts.dataDir, 'host', 'accel.json'),
    });
    this.containers = new NspawnDriver({
      binary: opts.config.nspawn.binary,
      privateNetwork: opts.config.nspawn.private_network,
      startTimeoutMs: opts.config.nspawn.start_timeout * 1000,
      pidsMax: opts.config.nspawn.pids_max,
    });
    this.storage = qcow2Overlay;
    // Checked now, so that a bad [network] section fails before anything starts.
    this.network = new BridgedNetwork({ dataDir: opts.dataDir, settings: networkSettings(opts.config), log: opts.log });
    this.templates = new Templates(this.machineDeps());
  }

  /** Every driver, for the reaper and `ps`. */
  get drivers(): readonly Driver[] {
    return [this.driver, this.containers];
  }

  driverNamed(name: string): Driver | undefined {
    return this.drivers.find((d) => d.name === name);
  }

  /**
   * The directory clone backend for container roots: the one the config forces, or the fastest
   * that really works in this data dir (probed once per process).
   */
  dirStorage(): Promise<StorageBackend> {
    this.#dirStorage ??= (async () => {
      mkdirSync(this.instancesDir, { recursive: true, mode: 0o700 });
      const d = await detectStorage(this.instancesDir, 'dir', this.config.storage.backend);
      this.log.debug({ backend: d.backend.name }, 'container roots are cloned with this backend');
      return d.backend;
    })();
    this.#dirStorage.catch(() => (this.#dirStorage = undefined));
    return this.#dirStorage;
  }

  /** The driver that runs machines of this image. */
  driverFor(image: Image): Driver {
    return image.kind === 'container' ? this.containers : this.driver;
  }

  /** Driver and clone backend for machines of this image. */
  async machineDepsFor(image: Image): Promise<MachineDeps> {
    if (image.kind !== 'container') return this.machineDeps();
    return { ...this.machineDeps(), driver: this.containers, storage: await this.dirStorage() };
  }

  get instancesDir(): string {
    return this.config.storage.instances_dir || join(this.dataDir, 'instances');
  }

  /** Fills a partial size from the config's defaults and checks it against the host. */
  resolveSize(partial: Partial<MachineSize> = {}): MachineSize {
    const d = this.config.defaults;
    const size = { cpus: partial.cpus ?? d.cpus, memoryMiB: partial.memoryMiB ?? d.memory, diskGiB: partial.diskGiB ?? d.disk };
    return checkSize(size, hostLimits(this.config.capacity.memory_reserve));
  }

  machineDeps(): MachineDeps {
    return {
      instancesDir: this.instancesDir,
      state: this.state,
      driver: this.driver,
      storage: this.storage,
      log: this.log,
      bootTimeoutMs: this.config.qemu.boot_timeout * 1000,
      bootRetries: this.config.qemu.boot_retries,
      network: this.network,
    };
  }

  async lease(req: LeaseRequest): Promise<Lease> {
    const image = this.images.resolve(req.image ?? this.config.defaults.image);
    const size = this.resolveSize(req.size);
    this.log.info(
      { image: `${image.name}:${image.version}`, cpus: size.cpus, memory: size.memoryMiB, disk: size.diskGiB },
      'starting a fresh machine',
    );
    const machine = await this.createMachine({ image, size, owner: req.owner, signal: req.signal, start: req.start, jobDisk: req.jobDisk, network: req.network });
    try {
      machine.setOwner(req.owner);
    } catch (e) {
      await machine.destroy();
      throw e;
    }
    return { machine, release: () => machine.destroy() };
  }

  /** How machines of this image start unless told otherwise (a pool's or the caller's start mode wins). */
  startMode(image: Image): StartMode {
    return this.config.images.start[image.name] ?? this.config.defaults.start;
  }

  /**
   * A new machine, restored from the image's snapshot template (made now if there is none)
   * when the start mode says so and the image can be restored, else booted.
   */
  async createMachine(req: {
    image: Image;
    size: MachineSize;
    owner: string;
    pool?: string;
    signal?: AbortSignal;
    start?: StartMode;
    jobDisk?: JobDiskMode;
    network?: NetworkMode;
    egressAllow?: string[];
  }): Promise<Machine> {
    const jobDisk = req.jobDisk ?? this.config.defaults.job_disk;
    // Before a template is made or a machine started: an unsupported mode fails at once.
    assertJobDiskSupported(this.driverFor(req.image), jobDisk);
    const mode = req.start ?? this.startMode(req.image);
    const netMode = req.network ?? this.config.defaults.network;
    const network: MachineNetworkRequest | undefined = netMode === 'bridged' ? { mode: netMode, egressAllow: req.egressAllow } : undefined;
    let template: Template | undefined;
    if (mode === 'restore' && this.templates.canSnapshot(req.image)) {
      try {
        template = await this.templates.ensure(req.image, req.size, req.signal);
      } catch (e) {
        if (req.signal?.aborted) throw e;
        this.log.warn({ image: `${req.image.name}:${req.image.version}`, err: errorText(e) }, 'could not make a snapshot template; booting instead');
      }
    } else if (mode === 'restore' && req.image.kind !== 'container') {
      this.log.debug({ image: req.image.name }, 'this image cannot be restored from a snapshot (imported images boot)');
    }
    return Machine.create(await this.machineDepsFor(req.image), {
      image: req.image, size: req.size, owner: req.owner, pool: req.pool, signal: req.signal, template,
      onRestoreFailed: (t, why) => this.templates.drop(t, why),
      jobDisk: { mode: jobDisk, tmpfsSize: this.config.defaults.job_tmpfs_size },
      network,
    });
  }

  /**
   * Removes image versions nothing needs any more ([images] keep_versions newest are kept, and
   * any version an instance, a job record or a pool pinned to NAME:V refers to).
   */
  collectImages(opts: { dryRun?: boolean; names?: readonly string[] } = {}): GcPlan {
    return collectImages(
      { images: this.images, state: this.state, pools: this.config.pool, keep: this.config.images.keep_versions, log: this.log },
      opts,
    );
  }

  /** Removes what no live mayfly process, kept machine or job explains (see reaper.ts). */
  reap(log: Logger = this.log): Promise<ReapResult> {
    return reap({ state: this.state, drivers: this.drivers, instancesDir: this.instancesDir, log, network: this.network });
  }

  /** Instances in the state store, each with whether its process still runs. */
  instances(): (InstanceRecord & { running: boolean })[] {
    return this.state.listInstances().map((r) => {
      const driver = this.driverNamed(r.driver);
      return { ...r, running: r.pid !== null && driver !== undefined && driver.deadReason(r.pid, r.dir) === undefined };
    });
  }

  /** Reaches a running machine that another mayfly process handed over (Machine.handOver). */
  attach(id: string): AttachedMachine {
    const rec = this.state.getInstance(id);
    if (!rec) {
      throw new MayflyError(ErrorCode.INSTANCE_NOT_FOUND, `no instance '${id}'`, { hint: 'it was removed (mayfly rm, the reaper, or a cleanup)' });
    }
    const image = this.images.get(rec.imageName, rec.imageVersion);
    if (!image) {
      throw new MayflyError(ErrorCode.IMAGE_NOT_FOUND, `instance ${id} runs image ${rec.imageName}:${rec.imageVersion}, which is gone`, {
        hint: 'an image in use should not be removed; remove the instance with: mayfly rm ' + id,
      });
    }
    const driver = this.driverNamed(rec.driver);
    return attachInstance(rec, image, () => {
      if (rec.pid === null) return 'it never started';
      return driver ? driver.deadReason(rec.pid, rec.dir) : `it was started by an unknown driver '${rec.driver}'`;
    });
  }

  /** Destroys an instance from its record (e.g. one kept with --keep, or left by a crash). */
  async destroyInstance(id: string): Promise<void> {
    const rec = this.state.getInstance(id);
    if (!rec) {
      throw new MayflyError(ErrorCode.INSTANCE_NOT_FOUND, `no instance '${id}'`, { hint: 'list them with: mayfly ps' });
    }
    await removeInstance(this, id, rec.driver, rec.pid, rec.dir);
  }

  close(): void {
    this.state.close();
  }
}
