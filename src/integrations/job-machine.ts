import type { Readable } from 'node:stream';
import type { DaemonClient } from '../daemon/client.ts';
import type { MachineSize } from '../drivers/index.ts';
import { ErrorCode, MayflyError } from '../errors.ts';
import { customSizeLabel } from '../pool/sizes.ts';
import type { ExecResult } from '../guest/index.ts';
import { redactData } from '../secrets.ts';
import type { AttachedMachine, Engine, JobDiskMode, Lease, StartMode } from '../pool/index.ts';
import type { NetworkMode } from '../network/index.ts';

// What an integration needs from a machine for one job, whether it was booted in this
// process or leased from mayflyd's warm pool: run commands (with input, output and
// cancellation), then give the machine back.

export interface JobExecOptions {
  env?: Record<string, string>;
  cwd?: string;
  root?: boolean;
  /** Input for the command. Streams are read whole first when the machine is the daemon's. */
  stdin?: Buffer | Readable;
  stdout?: (c: Buffer) => void;
  stderr?: (c: Buffer) => void;
  signal?: AbortSignal;
}

export interface JobMachine {
  readonly id: string;
  /** NAME:VERSION of its image. */
  readonly image: string;
  /** How it was obtained, for the job log: "booted in 11.8 s" or "from pool default after 0.00 s". */
  readonly origin: string;
  exec(argv: readonly string[], opts?: JobExecOptions): Promise<ExecResult>;
  release(): Promise<void>;
  /** Closes this process's connections and leaves the machine running (for another process to use). */
  disconnect?(): void;
  /** The underlying local lease, when there is one (run --keep). */
  readonly local?: Lease;
}

export interface JobMachineRequest {
  image?: string;
  size?: Partial<MachineSize>;
  owner: string;
  signal?: AbortSignal;
  start?: StartMode;
  jobDisk?: JobDiskMode;
  network?: NetworkMode;
}

/** A fresh machine started by this process. */
export async function bootJobMachine(engine: Engine, req: JobMachineRequest): Promise<JobMachine> {
  return localJobMachine(await engine.lease({ image: req.image, size: req.size, owner: req.owner, signal: req.signal, start: req.start, jobDisk: req.jobDisk, network: req.network }));
}

/** A machine this process holds through an engine lease. */
export function localJobMachine(lease: Lease): JobMachine {
  const m = lease.machine;
  return {
    id: m.id,
    image: `${m.image.name}:${m.image.version}`,
    origin: `${m.startedHow} in ${(m.readyAfterMs / 1000).toFixed(1)} s`,
    local: lease,
    async exec(argv, o = {}) {
      const ch = o.root ? await m.root() : m.guest;
      return ch.exec(argv, { env: o.env, cwd: o.cwd, stdin: o.stdin, stdout: o.stdout, stderr: o.stderr, signal: o.signal });
    },
    release: () => lease.release(),
  };
}

/** The largest command input sent through the daemon (it travels in one JSON body). */
export const maxDaemonStdin = 160 * 1024 * 1024; // base64 in JSON: ~213 MiB, under mayflyd's body limit

async function readAll(stdin: Buffer | Readable | undefined): Promise<Buffer | undefined> {
  if (stdin === undefined || Buffer.isBuffer(stdin)) return stdin;
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of stdin) {
    size += (c as Buffer).length;
    if (size > maxDaemonStdin) {
      throw new MayflyError(ErrorCode.USAGE, `more than ${maxDaemonStdin / 2 ** 20} MiB of input for one command through mayflyd`, {
        hint: 'use --no-daemon to boot a machine locally, which streams any size',
      });
    }
    chunks.push(c as Buffer);
  }
  return Buffer.concat(chunks);
}

/** mayflyd's answer to a lease request. */
export interface DaemonLease {
  id: string;
  pool: string;
  waited_ms: number;
  deadline: number | null;
  instance: { id: string; image: string; cpus: number; memory: number; disk: number };
}

export interface DaemonLeaseRequest {
  pool?: string;
  image?: string;
  /** The size wanted; any size of a pool serving the image when absent. */
  size?: MachineSize;
  owner: string;
  job?: Record<string, string>;
  /** Seconds; mayflyd kills the machine after this (the pool's max_runtime is the ceiling). */
  maxRuntime?: number;
  /** Only a pool with this job_disk; any when absent. */
  jobDisk?: JobDiskMode;
  signal?: AbortSignal;
}

/** A ready machine from one of mayflyd's pools; commands run on the daemon's open connection. */
export async function leaseJobMachine(client: DaemonClient, req: DaemonLeaseRequest): Promise<JobMachine & { lease: DaemonLease }> {
  const lease = await client.call<DaemonLease>(
    'POST',
    '/v1/leases',
    {
      pool: req.pool,
      image: req.pool ? undefined : req.image,
      size: req.pool || !req.size ? undefined : customSizeLabel(req.size),
      // mayflyd keeps this in its events and leases; it does not know this process's secrets.
      job: redactData({ name: req.owner, ...req.job }),
      max_runtime: req.maxRuntime,
      // If this process dies without releasing, mayflyd releases the lease for it.
      holder_pid: process.pid,
      job_disk: req.jobDisk,
    },
    undefined,
    req.signal,
  );
  return { ...daemonLeaseMachine(client, lease), lease };
}

/** A machine behind a lease mayflyd granted, possibly to another process (a GitLab job's prepare). */
export function daemonLeaseMachine(
  client: DaemonClient,
  lease: Pick<DaemonLease, 'id' | 'pool' | 'waited_ms'> & { instance: { id: string; image: string } },
): JobMachine {
  return {
    id: lease.instance.id,
    image: lease.instance.image,
    origin: `from pool ${lease.pool} after ${(lease.waited_ms / 1000).toFixed(2)} s`,
    async exec(argv, o = {}) {
      const stdin = await readAll(o.stdin);
      return client.exec(
        lease.id,
        { argv: [...argv], env: o.env, cwd: o.cwd, user: o.root ? 'root' : 'job', stdin: stdin?.toString('base64') },
        { stdout: o.stdout ?? (() => {}), stderr: o.stderr ?? (() => {}), signal: o.signal },
      );
    },
    release: async () => {
      await client.call('DELETE', `/v1/leases/${encodeURIComponent(lease.id)}`);
    },
  };
}

/**
 * A machine another process booted and handed over (a GitLab job's prepare); each command runs
 * on a connection this process opens. Releasing it destroys it.
 */
export function attachedJobMachine(engine: Engine, m: AttachedMachine): JobMachine {
  return {
    id: m.record.id,
    image: `${m.image.name}:${m.image.version}`,
    origin: 'booted for this job',
    async exec(argv, o = {}) {
      const dead = m.deadReason();
      if (dead) throw new MayflyError(ErrorCode.GUEST_CHANNEL, `machine ${m.record.id} is gone: ${dead}`);
      const ch = await m.channel(o.root ? 'root' : m.image.user);
      return ch.exec(argv, { env: o.env, cwd: o.cwd, stdin: o.stdin, stdout: o.stdout, stderr: o.stderr, signal: o.signal });
    },
    async release() {
      m.close();
      await engine.destroyInstance(m.record.id);
    },
    disconnect: () => m.close(),
  };
}
