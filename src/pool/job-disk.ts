import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { JOB_DISK_MODES } from '../config/schema.ts';
import type { Driver } from '../drivers/types.ts';
import { ErrorCode, MayflyError } from '../errors.ts';
import type { ExecOptions, ExecResult } from '../guest/index.ts';

/** Runs a command as root in the machine. */
export type RootExec = (argv: readonly string[], opts: ExecOptions) => Promise<ExecResult>;

// Job data protection: where a job's working data (/builds, docker's data root) lives.
// - plain:     on the machine's root disk (a qcow2 overlay in the instance dir; readable on
//              the host until the instance dir is removed).
// - encrypted: on a disk added to the running machine and opened by the guest with dm-crypt
//              under a key read from the guest's RNG; the key is only ever in guest RAM, so the
//              file on the host is ciphertext from the first write and noise once the machine
//              is gone.
// - tmpfs:     in the guest's RAM (bounded by job_tmpfs_size); nothing reaches a host file.
// The setup runs after the machine is up (booted or restored alike), never in a snapshot
// template, and before the machine is handed to a job.

export type JobDiskMode = (typeof JOB_DISK_MODES)[number];

export interface JobDiskOptions {
  mode: JobDiskMode;
  /** For tmpfs: mount(8)'s size= value, e.g. "50%" of the guest's RAM or "2g". */
  tmpfsSize: string;
  /** For encrypted: the size of the added disk. */
  diskBytes: number;
  /** The job user, who owns /builds. */
  user: string;
}

const script = readFileSync(join(dirname(fileURLToPath(import.meta.url)), '..', 'images', 'guest', 'mayfly-job-disk'));

/**
 * Refuses a mode the driver cannot provide, before anything starts. Drivers without
 * `attachJobDisk` (containers share the host's kernel and have no block device of their own to
 * encrypt) offer plain and tmpfs only.
 */
export function assertJobDiskSupported(driver: Pick<Driver, 'name' | 'attachJobDisk'>, mode: JobDiskMode): void {
  if (mode === 'encrypted' && !driver.attachJobDisk) {
    throw new MayflyError(ErrorCode.USAGE, `job_disk = "encrypted" is not supported for ${driver.name} machines (containers have no disk of their own to encrypt)`, {
      hint: 'use job_disk = "tmpfs" (the job\'s data stays in RAM) or "plain", or a VM image',
    });
  }
}

/** Sets up the job's data storage in a running machine; `asRoot` runs a command there as root. */
export async function setUpJobDisk(
  driver: Driver,
  dir: string,
  asRoot: RootExec,
  o: JobDiskOptions,
  signal?: AbortSignal,
): Promise<string> {
  if (o.mode === 'plain') return 'plain';
  assertJobDiskSupported(driver, o.mode);
  let arg = o.tmpfsSize;
  if (o.mode === 'encrypted') arg = (await driver.attachJobDisk!(dir, o.diskBytes)).serial;
  let out = '';
  let err = '';
  const r = await asRoot(['sh', '-s', '--', o.mode, arg, o.user], {
    stdin: script,
    stdout: (c) => (out += c.toString()),
    stderr: (c) => (err += c.toString()),
    signal,
  });
  if (r.exitCode !== 0) {
    throw new MayflyError(ErrorCode.MACHINE_START_FAILED, `setting up the ${o.mode} job disk failed (exit ${r.exitCode}): ${err.trim().split('\n').slice(-3).join(' / ') || 'no output'}`, {
      hint: o.mode === 'encrypted' ? 'the image needs cryptsetup (images built by this mayfly have it): mayfly image build' : 'job_tmpfs_size must fit the machine\'s memory',
    });
  }
  return out.trim();
}
