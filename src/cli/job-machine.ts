import { Option } from 'commander';
import { DaemonClient } from '../daemon/client.ts';
import type { MachineSize } from '../drivers/index.ts';
import type { JobDiskMode, StartMode } from '../pool/index.ts';
import { JOB_DISK_MODES } from '../config/schema.ts';
import type { NetworkMode } from '../network/index.ts';
import { ErrorCode, MayflyError } from '../errors.ts';
import { bootJobMachine, leaseJobMachine, type JobMachine } from '../integrations/job-machine.ts';
import type { Context } from './context.ts';

export interface MachineChoice {
  image?: string;
  cpus?: number;
  memory?: number;
  disk?: number;
  pool?: string;
  /** false with --no-daemon. */
  daemon: boolean;
  /** Only a machine of this process can be kept after the job. */
  keep?: boolean;
  /** restore | boot, for a machine this process starts (pool machines start as their pool says). */
  start?: StartMode;
  /** plain | encrypted | tmpfs; from a pool only when the pool's job_disk is this. */
  jobDisk?: JobDiskMode;
  /** user | bridged, for a machine this process starts (pool machines are networked as their pool says). */
  network?: NetworkMode;
}

export function jobDiskOption(): Option {
  return new Option('--job-disk <mode>', 'where the job\'s data (/builds, docker) lives: plain, encrypted (dm-crypt, key only in guest RAM) or tmpfs; default from the config')
    .choices([...JOB_DISK_MODES]);
}

export function networkOption(): Option {
  return new Option('--network <mode>', 'user (QEMU user-mode networking) or bridged (a TAP on mayfly\'s bridge, nftables isolation); default from the config; a machine started here, not from a pool').choices(['user', 'bridged']);
}

export function startOption(): Option {
  return new Option('--start <mode>', 'restore (from a snapshot template, made on first use) or boot; default from the config').choices(['restore', 'boot']);
}

/**
 * A machine for one job: from mayflyd's pool when the daemon answers and a pool serves the image
 * and size (or --pool names one), else booted here.
 */
export async function obtainJobMachine(ctx: Context, o: MachineChoice, owner: string, signal: AbortSignal): Promise<JobMachine> {
  const size: Partial<MachineSize> = { cpus: o.cpus, memoryMiB: o.memory, diskGiB: o.disk };
  if (o.pool && o.network) {
    throw new MayflyError(ErrorCode.USAGE, `--network and --pool do not go together: pool ${o.pool}'s machines are networked as its config says`, {
      hint: 'drop --network, or drop --pool to start a machine here',
    });
  }
  // An explicit network asks for a machine started here: pools are networked by their config.
  const client = o.daemon && !o.keep && !o.network ? await DaemonClient.find(ctx.config.daemon.socket) : undefined;
  if (o.pool && !client) {
    throw new MayflyError(ErrorCode.DAEMON, `--pool ${o.pool} needs mayflyd, and none answers on ${ctx.config.daemon.socket}`, {
      hint: 'start it with: mayfly daemon (or systemctl start mayflyd)',
    });
  }
  if (client) {
    const image = o.image ?? ctx.config.defaults.image;
    const sized = o.cpus !== undefined || o.memory !== undefined || o.disk !== undefined;
    const s = sized ? ctx.engine().resolveSize(size) : undefined;
    try {
      return await leaseJobMachine(client, { pool: o.pool, image, size: s, owner, jobDisk: o.jobDisk, signal });
    } catch (e) {
      if (!(e instanceof MayflyError && e.code === ErrorCode.NO_MATCHING_POOL)) throw e;
      ctx.log.info('no mayflyd pool serves this image and size; booting a machine here');
    }
  }
  return bootJobMachine(ctx.engine(), { image: o.image, size, owner, signal, start: o.start, jobDisk: o.jobDisk, network: o.network });
}
