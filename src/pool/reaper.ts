import { existsSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import type { Driver } from '../drivers/types.ts';
import { errorText } from '../errors.ts';
import type { Logger } from '../log.ts';
import type { StateStore } from '../state/index.ts';
import { Machine } from './machine.ts';

// The reaper: compares what exists on the host (machine processes, instance dirs with clones,
// keys, sockets, console logs) with the state store, and removes whatever nothing explains.
// A machine is explained while this process manages it, while another live mayfly process
// does (a `mayfly run` next to the daemon), or when a user kept it (`run --keep`).

export interface ReapResult {
  /** Instances removed, each with why. */
  removed: { id: string; why: string }[];
}

function processAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}

/** When a process started (ms since the epoch), from /proc; undefined when it is gone. */
function processStartedAt(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const ticks = Number(fields[19]); // field 22 of stat: start time in clock ticks after boot
    const btime = Number(/^btime (\d+)$/m.exec(readFileSync('/proc/stat', 'utf8'))![1]);
    return btime * 1000 + (ticks * 1000) / 100; // USER_HZ is 100 on Linux
  } catch {
    return undefined;
  }
}

/**
 * Whether the process that created a machine still runs. A pid that was reused since belongs
 * to a process started after the machine's record, so it does not count.
 */
function holderAlive(pid: number, recordCreatedAt: number): boolean {
  if (!processAlive(pid)) return false;
  const started = processStartedAt(pid);
  return started !== undefined && started <= recordCreatedAt + 2000;
}

export async function reap(deps: { state: StateStore; driver: Driver; instancesDir: string; log: Logger }): Promise<ReapResult> {
  const { state, driver, instancesDir, log } = deps;
  const ours = Machine.liveIds();
  const removed: ReapResult['removed'] = [];
  const remove = async (id: string, pid: number | null, dir: string, why: string) => {
    try {
      await driver.stop(pid, dir);
      rmSync(dir, { recursive: true, force: true });
      state.deleteInstance(id);
      removed.push({ id, why });
      log.warn({ instance: id, why }, 'reaped an orphaned machine');
    } catch (e) {
      log.error({ instance: id, err: errorText(e) }, 'reaping a machine failed');
    }
  };

  const known = new Set<string>();
  for (const rec of state.listInstances()) {
    known.add(rec.id);
    if (ours.has(rec.id) || rec.state === 'kept') continue;
    if (rec.holderPid !== null && rec.holderPid !== process.pid && holderAlive(rec.holderPid, rec.createdAt)) continue;
    const why = rec.holderPid === process.pid ? 'not managed by this process any more' : `its mayfly process (pid ${rec.holderPid ?? '?'}) is gone`;
    await remove(rec.id, rec.pid, rec.dir, why);
  }
  // Machine processes of this data dir that the state store does not know at all.
  for (const h of driver.listHost()) {
    if (known.has(h.id) || ours.has(h.id) || !h.dir.startsWith(instancesDir + '/')) continue;
    await remove(h.id, h.pid, h.dir, 'a machine process with no record');
    known.add(h.id);
  }
  // Leftover instance dirs (clones, keys, console logs) with neither record nor process.
  if (existsSync(instancesDir)) {
    for (const id of readdirSync(instancesDir)) {
      if (known.has(id) || ours.has(id)) continue;
      await remove(id, null, join(instancesDir, id), 'files with no record');
    }
  }
  return { removed };
}
