import { readFileSync, readdirSync } from 'node:fs';

// Facts about host processes from /proc.

export function processAlive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}

/** When a process started (ms since the epoch); undefined when it is gone. */
export function processStartedAt(pid: number): number | undefined {
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
 * Whether the process `pid` that did something at `since` still runs. A pid reused since
 * belongs to a process started later, so it does not count.
 */
export function holderAlive(pid: number, since: number): boolean {
  if (!processAlive(pid)) return false;
  const started = processStartedAt(pid);
  return started !== undefined && started <= since + 2000;
}

/** Every live process on the host with its argv (for drivers that find their machines by command line). */
export function liveProcesses(): { pid: number; argv: string[] }[] {
  const out: { pid: number; argv: string[] }[] = [];
  for (const p of readdirSync('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    let argv: string[];
    try {
      argv = readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0');
    } catch {
      continue; // ended while we looked
    }
    if (processAlive(Number(p))) out.push({ pid: Number(p), argv });
  }
  return out;
}

/** Whether process `pid`'s command line contains `needle` (guards against acting on a reused pid). */
export function cmdlineIncludes(pid: number, needle: string): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(needle);
  } catch {
    return false;
  }
}
