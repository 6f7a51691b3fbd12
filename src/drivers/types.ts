import type { Image } from '../images/store.ts';
import type { Logger } from '../log.ts';
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
 * A bridged network attachment (src/network) as a driver needs it: the host interface to use,
 * and the static configuration the guest must apply. Absent: user-mode networking.
 */
export interface GuestNetwork {
  /** The TAP on the bridge (QEMU) or the veth's host end (containers). */
  hostIf: string;
  mac: string;
  address: string;
  prefixLength: number;
  gateway: string;
  dns: string[];
}

export interface StartSpec {
  id: string;
  /** The instance's own directory: clone, console log, sockets, keys; removed on destroy. */
  dir: string;
  image: Image;
  size: MachineSize;
  disk: Clone;
  identity: MachineIdentity;
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
  /** Where the guest's sshd is reachable from the host. */
  ssh: { host: string; port: number };
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
  killNow(pid: number, dir: string): void;
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
}
