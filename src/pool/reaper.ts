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

/** A live process that is mayfly itself (a recycled pid belonging to something else is not). */
function isMayflyProcess(pid: number): boolean {
  if (!processAlive(pid)) return false;
  try {
    return /mayfly/.test(readFileSync(`/proc/${pid}/cmdline`, 'utf8'));
  } catch {
    return false;
  }
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
    if (rec.holderPid !== null && rec.holderPid !== process.pid && isMayflyProcess(rec.holderPid)) continue;
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
