import type { Image } from '../images/store.ts';
import type { Logger } from '../log.ts';
import type { Attachment } from '../network/index.ts';
import type { Clone } from '../storage/types.ts';

// Every machine driver (QEMU today; nspawn, Cloud Hypervisor, Firecracker later) implements
// this. The pool and the integrations only see this interface and the guest channel.

export interface MachineSize {
  cpus: number;
  memoryMiB: number;
  diskGiB: number;
}

/** What makes one clone unique; generated on the host for each instance. */
export interface MachineIdentity {
  id: string;
  hostname: string;
  hostKey: { privateKey: string; publicKey: string };
  /** Public key the guest authorizes for root and the job user. */
  authorizedKey: string;
}

/**
 * A bridged network attachment (src/network) as a driver needs it: the host interface to use
 * (a TAP, or a veth whose other end the driver moves into the container), and the static
 * configuration the guest must apply. Absent: user-mode networking.
 */
export type GuestNetwork = Omit<Attachment, 'id' | 'kind'>;

export interface StartSpec {
  id: string;
  /** The instance's own directory: clone, console log, sockets, keys; removed on destroy. */
  dir: string;
  image: Image;
  size: MachineSize;
  disk: Clone;
  identity: MachineIdentity;
  /**
   * Mount a tmpfs of this size (mount(8)'s size=, e.g. "50%" of the machine's memory or "2g") on
   * the job's /builds; only for drivers with `mountsJobTmpfs`.
   */
  jobTmpfs?: string;
  /** Boot with full console output (no `quiet`), to diagnose a boot that timed out before. */
  verbose?: boolean;
  /**
   * Resume a saved machine instead of booting: `disk` is an overlay on the template's frozen
   * disk, `stateFile` its memory state. The driver hands the guest its new identity at once.
   */
  restore?: { stateFile: string };
  /** Bridged networking; user-mode networking when absent. */
  network?: GuestNetwork;
}

export interface StartedMachine {
  pid: number;
  /** Where the guest's sshd is reachable from the host; null for containers, which are entered with nsenter. */
  ssh: { host: string; port: number } | null;
  consoleLog: string;
  /** e.g. "kvm" or "tcg". */
  accel: string;
}

/** Something of this driver found running on the host (for `ps` and the reaper). */
export interface HostMachine {
  id: string;
  pid: number;
  dir: string;
}

export interface Driver {
  readonly name: string;
  start(spec: StartSpec, opts: { log: Logger; signal?: AbortSignal }): Promise<StartedMachine>;
  /** undefined while the machine process runs; otherwise why it is gone (with console output). */
  deadReason(pid: number, dir: string): string | undefined;
  /** Stops the machine process; succeeds when it is already gone. */
  stop(pid: number | null, dir: string): Promise<void>;
  /** Kills the machine process at once, synchronously (a last resort on exit). */
  killNow(pid: number | null, dir: string): void;
  consoleTail(dir: string, lines: number): string;
  listHost(): HostMachine[];
  /** Whether machines of this image can be saved and restored (the image's guest has the restore agent). */
  canSnapshot?(image: Image): boolean;
  /**
   * Saves a running, prepared machine's memory state to `stateFile`; the machine process ends.
   * Its disk must then stay unchanged: clones restored from the state use it as their base.
   */
  saveSnapshot?(pid: number, dir: string, stateFile: string): Promise<void>;
  /** What must be equal between a template and its clones (emulator version, accelerator, …). */
  snapshotCompat?(image: Image): Promise<Record<string, string>>;
  /**
   * Adds an empty block device of `sizeBytes` to the running machine in `dir`, for the job's
   * data (job_disk = "encrypted"); the guest finds it by `serial`. Drivers without it cannot
   * offer an encrypted job disk (see assertJobDiskSupported).
   */
  attachJobDisk?(dir: string, sizeBytes: number): Promise<{ serial: string }>;
  /** The kind of bridge port a bridged machine of this driver gets (default: a TAP). */
  readonly bridgedPort?: 'tap' | 'veth';
  /** The driver mounts `job_disk = "tmpfs"` itself at start (StartSpec.jobTmpfs) rather than the guest after it. */
  readonly mountsJobTmpfs?: boolean;
}
