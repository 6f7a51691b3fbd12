import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { containerTarget } from '../drivers/nspawn/index.ts';
import type { Driver, MachineIdentity, MachineSize, StartedMachine } from '../drivers/types.ts';
import { ErrorCode, MayflyError, errorText } from '../errors.ts';
import { NsenterChannel, SshChannel, generateKeyPair, type GuestChannel, type GuestEndpoint } from '../guest/index.ts';
import type { Image } from '../images/store.ts';
import type { Logger } from '../log.ts';
import type { Attachment, InstanceNetwork, NetworkMode } from '../network/index.ts';
import type { StateStore } from '../state/index.ts';
import { diskTooSmall, mountsUnder, removeInstanceDir, type StorageBackend } from '../storage/index.ts';
import { newId } from '../util/ids.ts';
import { setUpJobDisk, type JobDiskMode, type JobDiskOptions, type RootExec } from './job-disk.ts';
import { pinTemplate, type Template } from './templates.ts';

// One machine's life: clone → start → ready (a real command over SSH) → … → destroy.
// Destroy is the single path out, whatever happened before: normal end, failure, cancel.

export interface MachineDeps {
  instancesDir: string;
  state: StateStore;
  driver: Driver;
  storage: StorageBackend;
  log: Logger;
  bootTimeoutMs: number;
  bootRetries: number;
  /** Bridged networking; only needed for machines started bridged. */
  network?: InstanceNetwork;
}

/** How a machine is networked: user-mode (the default), or bridged with an optional egress allowlist. */
export interface MachineNetworkRequest {
  mode: NetworkMode;
  egressAllow?: string[];
}

// Machines this process started and has not destroyed, for a last-resort kill on exit.
const live = new Set<Machine>();

export class Machine {
  readonly id: string;
  readonly image: Image;
  readonly size: MachineSize;
  readonly dir: string;
  /** Connection as the job user (`ci`), opened during the readiness check and kept. */
  guest!: GuestChannel;
  started!: StartedMachine;
  readyAfterMs = 0;
  /** Started from a snapshot template rather than booted. */
  restored = false;
  /** How it came up, for people: "restored", "started" (a container) or "booted". */
  get startedHow(): string {
    return this.restored ? 'restored' : this.image.kind === 'container' ? 'started' : 'booted';
  }
  /** Booted by a retry without `quiet` (the first boot timed out). */
  verboseBoot = false;
  /** Where the job's working data lives (see job-disk.ts). */
  jobDisk: JobDiskMode = 'plain';
  /** Its port on the bridge, when bridged. */
  attachment: Attachment | undefined;
  readonly #deps: MachineDeps;
  #privateKey = '';
  #hostKey = '';
  #rootChannel: GuestChannel | undefined;
  /** tmpfs size for the job's /builds, mounted by the driver at start (see Driver.mountsJobTmpfs). */
  #jobTmpfs: string | undefined;
  #destroying: Promise<void> | undefined;

  private constructor(deps: MachineDeps, id: string, image: Image, size: MachineSize) {
    this.#deps = deps;
    this.id = id;
    this.image = image;
    this.size = size;
    this.dir = join(deps.instancesDir, id);
  }

  /** Creates and boots a machine, returning once it runs commands. Cleans up after itself on failure. */
  static async create(
    deps: MachineDeps,
    req: {
      image: Image;
      size: MachineSize;
      owner?: string;
      pool?: string;
      signal?: AbortSignal;
      /** Restore from this snapshot template instead of booting; a failed restore falls back to a boot. */
      template?: Template;
      /** Told when restoring from `template` failed, so that it can be made again. */
      onRestoreFailed?: (t: Template, why: string) => void;
      /** The job's data storage; plain (the root disk) when absent. */
      jobDisk?: Omit<JobDiskOptions, 'user' | 'diskBytes'>;
      /** User-mode networking when absent. */
      network?: MachineNetworkRequest;
    },
  ): Promise<Machine> {
    const { image, size } = req;
    const wantBytes = size.diskGiB * 1024 ** 3;
    if (wantBytes < image.diskVirtualBytes) throw diskTooSmall(wantBytes, image.diskVirtualBytes, `${image.name}:${image.version}`);
    const container = image.kind === 'container';
    const m = new Machine(deps, newId(container ? 'ct' : 'vm'), image, size);
    live.add(m);
    const t0 = Date.now();
    try {
      // The record first: a reaper must never find this dir without a record that explains it.
      deps.state.insertInstance({
        id: m.id, driver: deps.driver.name, imageName: image.name, imageVersion: image.version, imageId: image.id,
        state: 'creating', createdAt: t0, updatedAt: t0, pid: null, dir: m.dir, disks: [join(m.dir, container ? 'root' : 'disk.qcow2')],
        consoleLog: join(m.dir, 'console.log'), sshPort: null, sshHost: null, cpus: size.cpus, memoryMiB: size.memoryMiB,
        diskGiB: size.diskGiB, accel: null, owner: req.owner ?? null, holderPid: process.pid, pool: req.pool ?? null,
      });
      mkdirSync(m.dir, { recursive: true, mode: 0o700 });
      // A driver that mounts the job tmpfs itself (containers cannot mount one from inside) gets it at start.
      if (req.jobDisk?.mode === 'tmpfs' && deps.driver.mountsJobTmpfs) m.#jobTmpfs = req.jobDisk.tmpfsSize;
      if (req.network?.mode === 'bridged') {
        if (!deps.network) throw new MayflyError(ErrorCode.NETWORK, 'bridged networking is not available to this engine');
        // The port exists before the machine opens it; its rules are in place before the guest runs.
        m.attachment = await deps.network.attachInstance({ id: m.id, kind: deps.driver.bridgedPort ?? 'tap', egressAllow: req.network.egressAllow });
      }
      await m.#start(req);
      if (m.#jobTmpfs !== undefined) {
        m.jobDisk = 'tmpfs';
      } else if (req.jobDisk && req.jobDisk.mode !== 'plain') {
        // mayfly's images give the job user passwordless sudo: through the connection that is
        // already open, that saves a second SSH handshake and session (~1.5 s under TCG).
        const viaSudo = image.identity === 'fw_cfg' && image.user !== 'root';
        const asRoot: RootExec = viaSudo
          ? (argv, o) => m.guest.exec(['sudo', '-n', '--', ...argv], o)
          : async (argv, o) => (await m.root()).exec(argv, o);
        const how = await setUpJobDisk(deps.driver, m.dir, asRoot, { ...req.jobDisk, user: image.user, diskBytes: wantBytes }, req.signal);
        m.jobDisk = req.jobDisk.mode;
        deps.log.debug({ instance: m.id, jobDisk: how }, 'job disk set up');
      }
      m.readyAfterMs = Date.now() - t0;
      deps.state.updateInstance(m.id, { state: 'ready' });
      deps.log.info(
        { instance: m.id, image: `${image.name}:${image.version}`, accel: m.started.accel, start: m.restored ? 'restore' : 'boot', jobDisk: m.jobDisk, seconds: +(m.readyAfterMs / 1000).toFixed(1) },
        'machine ready',
      );
      return m;
    } catch (e) {
      await m.destroy().catch((de: unknown) => deps.log.error({ instance: m.id, err: errorText(de) }, 'cleanup after a failed start failed'));
      throw e;
    }
  }

  async #start(req: { signal?: AbortSignal; template?: Template; onRestoreFailed?: (t: Template, why: string) => void }): Promise<void> {
    const user = generateKeyPair(`mayfly@${this.id}`);
    const host = generateKeyPair(`root@${this.id}`);
    this.#privateKey = user.privateKey;
    this.#hostKey = host.publicKey;
    // Kept (0600, in a 0700 dir) so `mayfly ssh`/--keep can reach the machine; removed on destroy.
    writeFileSync(join(this.dir, 'id_ed25519'), user.privateKey, { mode: 0o600 });
    writeFileSync(join(this.dir, 'known_host_key.pub'), host.publicKey + '\n');
    const identity = { id: this.id, hostname: this.id, hostKey: host, authorizedKey: user.publicKey };
    if (req.template) {
      try {
        await this.#restore(req.template, identity, req.signal);
        return;
      } catch (e) {
        if (req.signal?.aborted) throw e;
        const why = errorText(e);
        this.#deps.log.warn({ instance: this.id, err: why }, 'restoring from the snapshot template failed; booting instead');
        // Only a state that does not load condemns the template; a busy host or a full disk does not.
        if (e instanceof MayflyError && e.code === ErrorCode.SNAPSHOT_CORRUPT) req.onRestoreFailed?.(req.template, why);
      }
    }
    await this.#boot(identity, req.signal);
  }

  /** A clone of the template's saved machine: overlay on its frozen disk, memory state loaded, identity handed over. */
  async #restore(t: Template, identity: MachineIdentity, signal: AbortSignal | undefined): Promise<void> {
    const d = this.#deps;
    d.log.debug({ instance: this.id }, 'restoring from the snapshot template');
    const pinned = pinTemplate(t, this.dir);
    if (pinned.copied) d.log.info({ instance: this.id, why: pinned.copied }, 'template copied into the instance dir');
    const disk = await d.storage.clone({ base: pinned.disk, instanceDir: this.dir, sizeBytes: this.size.diskGiB * 1024 ** 3 });
    try {
      d.state.updateInstance(this.id, { state: 'booting' });
      this.started = await d.driver.start(
        { id: this.id, dir: this.dir, image: this.image, size: this.size, disk, identity, restore: { stateFile: pinned.state }, network: this.attachment },
        { log: d.log, signal },
      );
      d.state.updateInstance(this.id, { pid: this.started.pid, sshPort: this.started.ssh?.port ?? null, sshHost: this.started.ssh?.host ?? null, accel: this.started.accel });
      // sshd starts only once the guest has its identity (the driver waited for that): this is quick.
      this.guest = await SshChannel.waitReady(this.endpoint(this.image.user), {
        timeoutMs: 30_000,
        signal,
        alive: () => d.driver.deadReason(this.started.pid, this.dir),
        networkUp: true,
      });
      d.log.debug({ instance: this.id }, 'restored machine answers over SSH');
      this.restored = true;
    } catch (e) {
      if (this.started) await d.driver.stop(this.started.pid, this.dir);
      await d.storage.remove(disk);
      throw e;
    }
  }

  async #boot(identity: MachineIdentity, signal: AbortSignal | undefined): Promise<void> {
    const d = this.#deps;
    for (let attempt = 0; ; attempt++) {
      const disk = await d.storage.clone({ base: this.image.diskPath, instanceDir: this.dir, sizeBytes: this.size.diskGiB * 1024 ** 3 });
      d.state.updateInstance(this.id, { state: 'booting' });
      this.started = await d.driver.start(
        {
          id: this.id,
          dir: this.dir,
          image: this.image,
          size: this.size,
          disk,
          identity,
          verbose: attempt > 0,
          jobTmpfs: this.#jobTmpfs,
          network: this.attachment,
        },
        { log: d.log, signal },
      );
      d.state.updateInstance(this.id, { pid: this.started.pid, sshPort: this.started.ssh?.port ?? null, sshHost: this.started.ssh?.host ?? null, accel: this.started.accel });
      d.log.debug({ instance: this.id, pid: this.started.pid, port: this.started.ssh?.port }, 'machine process started');
      try {
        this.guest = this.started.ssh
          ? await SshChannel.waitReady(this.endpoint(this.image.user), {
              timeoutMs: d.bootTimeoutMs,
              signal,
              alive: () => d.driver.deadReason(this.started.pid, this.dir),
            })
          : await this.#enterContainer(this.image.user, signal);
        this.verboseBoot = attempt > 0;
        return;
      } catch (e) {
        const timedOut = e instanceof MayflyError && e.code === ErrorCode.BOOT_TIMEOUT;
        const tail = d.driver.consoleTail(this.dir, 15);
        await d.driver.stop(this.started.pid, this.dir);
        await d.storage.remove(disk);
        if (timedOut && attempt < d.bootRetries) {
          d.log.warn({ instance: this.id, attempt: attempt + 1 }, 'boot timed out; retrying with a fresh clone and a verbose console');
          continue;
        }
        if (timedOut) {
          const console = tail
            ? `\nlast console lines:\n${tail}`
            : `\nthe console printed nothing${attempt === 0 ? " (the first boot runs with 'quiet'; set qemu.boot_retries >= 1 for a verbose retry)" : ''}`;
          throw new MayflyError(ErrorCode.BOOT_TIMEOUT, `${e.message}${console}`, {
            hint: 'raise qemu.boot_timeout in the config if the host is busy; see the README section on TCG',
          });
        }
        throw e;
      }
    }
  }

  endpoint(user: string): GuestEndpoint {
    const ssh = this.started.ssh;
    if (!ssh) throw new MayflyError(ErrorCode.GUEST_CHANNEL, `${this.id} is a container: it has no SSH endpoint`);
    return { host: ssh.host, port: ssh.port, user, privateKey: this.#privateKey, hostKey: this.#hostKey };
  }

  /** The readiness rule for containers: opening the channel runs a real command in the container. */
  #enterContainer(user: string, signal: AbortSignal | undefined): Promise<GuestChannel> {
    return NsenterChannel.open(containerTarget(this.started.pid, this.dir), user, signal);
  }

  /** A root connection, opened on first use (one more handshake for VMs) and kept. */
  async root(): Promise<GuestChannel> {
    if (!this.#rootChannel || this.#rootChannel.closed) {
      this.#rootChannel = this.started.ssh
        ? await SshChannel.connectOnce(this.endpoint('root'), 20_000)
        : await NsenterChannel.open(containerTarget(this.started.pid, this.dir), 'root');
    }
    return this.#rootChannel;
  }

  /** Marks who uses the machine (shown by `ps`). */
  setOwner(owner: string, state: 'leased' | 'ready' = 'leased'): void {
    this.#deps.state.updateInstance(this.id, { owner, state });
  }

  /** undefined while the machine's process runs; why it is gone otherwise. */
  deadReason(): string | undefined {
    return this.started ? this.#deps.driver.deadReason(this.started.pid, this.dir) : 'the machine never started';
  }

  /** Leaves the machine running after this process exits (run --keep); the reaper spares it. */
  keep(): void {
    this.#deps.state.updateInstance(this.id, { state: 'kept', holderPid: null });
    this.disconnect();
  }

  /**
   * Leaves the running machine to a job record (GitLab's later stages run in other processes):
   * no process holds it any more; the record's expiry bounds it.
   */
  handOver(owner: string): void {
    this.#deps.state.updateInstance(this.id, { state: 'leased', owner, holderPid: null });
    this.disconnect();
  }

  /** Ids of the machines this process manages right now (creating, ready, leased). */
  static liveIds(): Set<string> {
    return new Set([...live].map((m) => m.id));
  }

  /**
   * Synchronous last resort (a second Ctrl-C): SIGKILL every machine this process started and
   * remove its files. The state rows stay; `mayfly ps` shows them as gone, `mayfly rm` clears them.
   */
  static killAllNow(): void {
    for (const m of live) {
      m.#deps.driver.killNow(m.started?.pid ?? null, m.dir);
      // A mounted clone (overlayfs) cannot be unmounted synchronously, and a container's dir
      // names its cgroups: both are left to the reaper (the record stays and explains them).
      if (m.image.kind !== 'container' && mountsUnder(m.dir).length === 0) rmSync(m.dir, { recursive: true, force: true });
    }
    live.clear();
  }

  /** Closes the guest connections this process holds; the machine keeps running and stays ours. */
  closeConnections(): void {
    this.#closeChannels();
  }

  /** Closes mayfly's connections but leaves the machine running (run --keep). */
  disconnect(): void {
    live.delete(this);
    this.#closeChannels();
  }

  #closeChannels(): void {
    this.guest?.close();
    this.#rootChannel?.close();
  }

  /** Stops the machine and removes its clone, keys, sockets and record. Safe to call twice. */
  destroy(): Promise<void> {
    // One destroy at a time; a failed one may be tried again.
    this.#destroying ??= this.#destroy().catch((e: unknown) => {
      this.#destroying = undefined;
      throw e;
    });
    return this.#destroying;
  }

  async #destroy(): Promise<void> {
    const d = this.#deps;
    // The process and the files go first: a state store that is busy must not keep a VM alive.
    this.#noteState(() => d.state.updateInstance(this.id, { state: 'destroying' }));
    this.#closeChannels();
    await d.driver.stop(this.started?.pid ?? null, this.dir);
    if (this.attachment) {
      // A failure here leaves the port to the reaper (its instance has no record by then).
      await d.network?.detachInstance(this.id).catch((e: unknown) => d.log.error({ instance: this.id, err: errorText(e) }, 'removing the network port failed'));
    }
    await removeInstanceDir(this.dir);
    live.delete(this);
    this.#noteState(() => d.state.deleteInstance(this.id));
    d.log.debug({ instance: this.id }, 'machine destroyed');
  }

  #noteState(write: () => void): void {
    try {
      write();
    } catch (e) {
      this.#deps.log.error({ instance: this.id, err: errorText(e) }, 'could not record the machine in the state store');
    }
  }
}
