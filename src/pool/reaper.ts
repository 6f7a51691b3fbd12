import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import type { Driver } from '../drivers/types.ts';
import { errorText } from '../errors.ts';
import type { Logger } from '../log.ts';
import type { BridgedNetwork } from '../network/index.ts';
import type { StateStore } from '../state/index.ts';
import { removeInstanceDir } from '../storage/index.ts';
import { holderAlive } from '../util/proc.ts';
import { Machine } from './machine.ts';

// The reaper: compares what exists on the host (machine processes, instance dirs with clones,
// keys, sockets, console logs, bridge ports and their nftables rules) with the state store, and
// removes whatever nothing explains.
// A machine is explained while this process manages it, while another live mayfly process
// does (a `mayfly run` next to the daemon), while a job record holds it (GitLab's stages are
// separate processes) and has not expired, or when a user kept it (`run --keep`).

export interface ReapResult {
  /** Instances removed, each with why. */
  removed: { id: string; why: string }[];
}

/**
 * Stops an instance's process and removes its network port, its files (unmounting and deleting
 * its clone, whichever backend made it) and record: the way out for anything no Machine object
 * holds. Without a known driver (files with no record) every driver stops what its own files in
 * the dir name.
 */
export async function removeInstance(
  deps: { state: StateStore; drivers: readonly Driver[]; network?: BridgedNetwork },
  id: string,
  driverName: string | null,
  pid: number | null,
  dir: string,
): Promise<void> {
  for (const driver of deps.drivers) {
    if (driverName === null) await driver.stop(null, dir);
    else if (driver.name === driverName) await driver.stop(pid, dir);
  }
  await deps.network?.detachInstance(id);
  await removeInstanceDir(dir);
  deps.state.deleteInstance(id);
}

export async function reap(deps: {
  state: StateStore;
  drivers: readonly Driver[];
  instancesDir: string;
  log: Logger;
  network?: BridgedNetwork;
}): Promise<ReapResult> {
  const { state, drivers, instancesDir, log } = deps;
  const removed: ReapResult['removed'] = [];
  const remove = async (id: string, driverName: string | null, pid: number | null, dir: string, why: string) => {
    try {
      await removeInstance(deps, id, driverName, pid, dir);
      removed.push({ id, why });
      log.warn({ instance: id, why }, 'reaped an orphaned machine');
    } catch (e) {
      log.error({ instance: id, err: errorText(e) }, 'reaping a machine failed');
    }
  };

  // Asked again right before every removal: machines are created while the reaper works, by
  // this process or by another one. (A machine's record is written before its dir, so a dir
  // without a record is never one being made.)
  const explained = (id: string): boolean => {
    if (Machine.liveIds().has(id)) return true;
    const rec = state.getInstance(id);
    if (!rec) return false;
    if (rec.state === 'kept') return true;
    // A machine booted for a multi-process job (GitLab's stages) until the job's record expires.
    // (A pool machine leased to a job is the daemon's to account for, not the record's.)
    if (state.listJobs().some((j) => j.instance === id && j.lease === null && j.expiresAt > Date.now())) return true;
    return rec.holderPid !== null && rec.holderPid !== process.pid && holderAlive(rec.holderPid, rec.createdAt);
  };

  for (const rec of state.listInstances()) {
    if (explained(rec.id)) continue;
    const why = rec.holderPid === process.pid ? 'not managed by this process any more' : `its mayfly process (pid ${rec.holderPid ?? '?'}) is gone`;
    await remove(rec.id, rec.driver, rec.pid, rec.dir, why);
  }
  // Machine processes of this data dir that the state store does not know at all.
  for (const driver of drivers) {
    for (const h of driver.listHost()) {
      if (!h.dir.startsWith(instancesDir + '/') || state.getInstance(h.id) || explained(h.id)) continue;
      await remove(h.id, driver.name, h.pid, h.dir, 'a machine process with no record');
    }
  }
  // Leftover instance dirs (clones, keys, console logs) with neither record nor process.
  if (existsSync(instancesDir)) {
    for (const id of readdirSync(instancesDir)) {
      if (state.getInstance(id) || explained(id)) continue;
      await remove(id, null, null, join(instancesDir, id), 'files with no record');
    }
  }
  // Bridge ports and rules whose instance has no record any more (a process killed between
  // removing the machine and its port, or before recording it).
  if (deps.network) {
    try {
      const ports = await deps.network.reap((id) => Machine.liveIds().has(id) || state.getInstance(id) !== undefined);
      for (const p of ports) removed.push({ id: p.id, why: `network port ${p.hostIf} with no record` });
    } catch (e) {
      log.error({ err: errorText(e) }, 'reaping network ports failed');
    }
  }
  // Records of jobs that ran past their expiry and whose machine is gone: a runner that crashed
  // never called cleanup.
  for (const j of state.listJobs()) {
    if (j.expiresAt <= Date.now() && (!j.instance || !state.getInstance(j.instance))) {
      state.deleteJob(j.key);
      log.warn({ job: j.key }, 'dropped the record of an expired job that was never cleaned up');
    }
  }
  return { removed };
}
