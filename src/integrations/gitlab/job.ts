import { setTimeout as sleep } from 'node:timers/promises';
import type { Config } from '../../config/index.ts';
import { DaemonClient } from '../../daemon/client.ts';
import { ErrorCode, MayflyError, errorText } from '../../errors.ts';
import type { Logger } from '../../log.ts';
import type { Engine } from '../../pool/index.ts';
import type { JobRecord } from '../../state/index.ts';
import { holderAlive } from '../../util/proc.ts';
import { attachedJobMachine, daemonLeaseMachine, type JobMachine } from '../job-machine.ts';

// A GitLab job's machine across the runner's separate prepare, run and cleanup processes: the
// state store keeps which machine (or which mayflyd lease) serves the job, until when.

export const integration = 'gitlab';

/** How instances of a job are labelled in `mayfly ps`; the key in parentheses finds them again. */
export function jobOwner(key: string, jobId: string, project: string): string {
  return `gitlab job ${jobId}${project ? ` ${project}` : ''} (${key})`;
}

/** The machine a recorded job runs on, reached from this process. */
export function jobMachine(engine: Engine, config: Config, job: JobRecord): JobMachine {
  if (!job.instance) throw new MayflyError(ErrorCode.INSTANCE_NOT_FOUND, `job ${job.key} has no machine`);
  if (job.lease) {
    const client = new DaemonClient(job.data.socket ?? config.daemon.socket);
    return daemonLeaseMachine(client, { id: job.lease, pool: job.data.pool ?? '?', waited_ms: 0, instance: { id: job.instance, image: job.data.image ?? '?' } });
  }
  return attachedJobMachine(engine, engine.attach(job.instance));
}

/**
 * Gives back everything a job holds: its lease or its machine, machines an interrupted prepare
 * of the same job left behind, and the record. Idempotent; a machine already gone is not an
 * error. Returns what it did, for the runner's log.
 */
export async function releaseJob(engine: Engine, config: Config, key: string, log: Logger): Promise<string[]> {
  const done: string[] = [];
  const job = engine.state.getJob(key);
  if (job?.lease) {
    const socket = job.data.socket ?? config.daemon.socket;
    const client = await findDaemon(socket);
    if (!client) {
      done.push(`mayflyd does not answer on ${socket}; lease ${job.lease} ends when its deadline passes or the daemon restarts`);
    } else {
      try {
        await client.call('DELETE', `/v1/leases/${encodeURIComponent(job.lease)}`);
        done.push(`released lease ${job.lease} (machine ${job.instance})`);
      } catch (e) {
        if (!(e instanceof MayflyError && e.code === ErrorCode.LEASE_NOT_FOUND)) throw e;
        done.push(`lease ${job.lease} was already gone`);
      }
    }
  } else if (job?.instance) {
    done.push(await destroyIfPresent(engine, job.instance));
  }
  // A prepare killed while it booted leaves a machine that no record names yet.
  const others = new Set(engine.state.listJobs().filter((j) => j.key !== key).map((j) => j.instance));
  for (const rec of engine.state.listInstances()) {
    if (rec.id === job?.instance || others.has(rec.id) || !rec.owner?.endsWith(`(${key})`) || rec.pool !== null) continue;
    if (rec.holderPid !== null && rec.holderPid !== process.pid && holderAlive(rec.holderPid, rec.createdAt)) continue;
    done.push(`${await destroyIfPresent(engine, rec.id)} (left by an interrupted prepare)`);
  }
  if (job) engine.state.deleteJob(key);
  if (done.length === 0) log.debug({ job: key }, 'nothing to clean up');
  return done;
}

/** The daemon, asked for up to 30 s: a busy mayflyd may miss one 2 s health check, and a lease it never hears about stays held until its deadline. */
async function findDaemon(socket: string): Promise<DaemonClient | undefined> {
  const end = Date.now() + 30_000;
  for (;;) {
    const c = await DaemonClient.find(socket);
    if (c || Date.now() > end) return c;
    await sleep(1000);
  }
}

async function destroyIfPresent(engine: Engine, id: string): Promise<string> {
  try {
    await engine.destroyInstance(id);
    return `destroyed machine ${id}`;
  } catch (e) {
    if (e instanceof MayflyError && e.code === ErrorCode.INSTANCE_NOT_FOUND) return `machine ${id} was already gone`;
    throw new MayflyError(ErrorCode.STATE, `could not destroy machine ${id}: ${errorText(e)}`, { cause: e });
  }
}
