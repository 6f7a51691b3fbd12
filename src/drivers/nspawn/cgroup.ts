import { existsSync, mkdirSync, readFileSync, readdirSync, rmdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { MachineSize } from '../types.ts';
import { ErrorCode, MayflyError, errorText } from '../../errors.ts';

// A container's resource limits and its handle for stopping: one cgroup per instance in each
// hierarchy that matters. Without a host systemd, nspawn (--keep-unit --register=no) can neither
// apply limits nor give the container a cgroup of its own: it makes `supervisor` and `payload`
// under the cgroup it was started in. So mayfly starts it inside a fresh cgroup per instance;
// everything the container runs (and every command entered with nsenter) lives there, which
// makes the limits hold and lets stop kill exactly the container's processes.
//
// Cgroup v1 / hybrid (our hosts): memory and cpu limits, plus the name=systemd and unified
// hierarchies so that nspawn's own sub-cgroups stay per instance. Pure v2: one cgroup under
// /sys/fs/cgroup/mayfly with memory.max and cpu.max (the root is the one place where a new
// cgroup with controllers needs no delegation).

const ROOT = '/sys/fs/cgroup';
const CPU_PERIOD_US = 100_000;

export interface InstanceCgroups {
  /** Every cgroup dir made for the instance; a process joins all of them. */
  dirs: string[];
  /** The dir whose cgroup.procs lists all of the container's processes. */
  procsDir: string;
}

function isV2Only(): boolean {
  return existsSync(join(ROOT, 'cgroup.controllers'));
}

/** This process's cgroup path per v1 hierarchy name ("memory", "cpu", "name=systemd", "" for unified). */
function ownCgroups(): Map<string, string> {
  const own = new Map<string, string>();
  for (const line of readFileSync('/proc/self/cgroup', 'utf8').split('\n')) {
    const m = /^\d+:([^:]*):(.*)$/.exec(line);
    if (!m) continue;
    for (const name of m[1]!.split(',')) own.set(name, m[2]!);
  }
  return own;
}

function write(file: string, value: string): void {
  try {
    writeFileSync(file, value);
  } catch (e) {
    throw new MayflyError(ErrorCode.MACHINE_START_FAILED, `cannot set ${file} to ${value}: ${errorText(e)}`, {
      hint: 'container limits need write access to the cgroup filesystem (run as root, not in a restricted cgroup namespace)',
    });
  }
}

function makeDir(dir: string): void {
  try {
    mkdirSync(dir, { recursive: true });
  } catch (e) {
    throw new MayflyError(ErrorCode.MACHINE_START_FAILED, `cannot make the container's cgroup ${dir}: ${errorText(e)}`, {
      hint: 'containers need root and a writable /sys/fs/cgroup',
    });
  }
}

/**
 * Makes the instance's cgroups with the size's memory and CPU limits and a cap on its number of
 * processes (a fork bomb stops there). On failure nothing of them is left.
 */
export function createInstanceCgroups(id: string, size: MachineSize, pidsMax: number): InstanceCgroups {
  const made: string[] = [];
  try {
    return isV2Only() ? createV2(id, size, pidsMax, made) : createV1(id, size, pidsMax, made);
  } catch (e) {
    for (const d of made.reverse()) removeCgroupTree(d);
    throw e;
  }
}

function createV2(id: string, size: MachineSize, pidsMax: number, made: string[]): InstanceCgroups {
  const parent = join(ROOT, 'mayfly');
  makeDir(parent);
  // A cgroup's children only get the controllers enabled in its subtree_control.
  for (const c of ['memory', 'cpu', 'pids']) {
    try {
      writeFileSync(join(ROOT, 'cgroup.subtree_control'), `+${c}`);
      writeFileSync(join(parent, 'cgroup.subtree_control'), `+${c}`);
    } catch {
      // checked below through the files the controller provides
    }
  }
  const dir = join(parent, id);
  makeDir(dir);
  made.push(dir);
  if (!existsSync(join(dir, 'memory.max'))) {
    throw new MayflyError(ErrorCode.MACHINE_START_FAILED, `the memory controller is not available in ${parent}`, {
      hint: 'enable it: echo +memory > /sys/fs/cgroup/cgroup.subtree_control',
    });
  }
  write(join(dir, 'memory.max'), String(size.memoryMiB * 1024 * 1024));
  // Without swap accounting the file is missing; memory.max is then the whole bound.
  if (existsSync(join(dir, 'memory.swap.max'))) write(join(dir, 'memory.swap.max'), '0');
  write(join(dir, 'cpu.max'), `${size.cpus * CPU_PERIOD_US} ${CPU_PERIOD_US}`);
  if (existsSync(join(dir, 'pids.max'))) write(join(dir, 'pids.max'), String(pidsMax));
  return { dirs: [dir], procsDir: dir };
}

function createV1(id: string, size: MachineSize, pidsMax: number, made: string[]): InstanceCgroups {
  const own = ownCgroups();
  const mountOf: Record<string, string> = { memory: 'memory', cpu: 'cpu', pids: 'pids', 'name=systemd': 'systemd', '': 'unified' };
  for (const [name, mount] of Object.entries(mountOf)) {
    const base = join(ROOT, mount);
    if (!existsSync(join(base, 'cgroup.procs'))) {
      if (name === 'memory' || name === 'cpu') {
        throw new MayflyError(ErrorCode.MACHINE_START_FAILED, `the ${name} cgroup controller is not mounted at ${base}`, {
          hint: 'containers need the memory and cpu controllers for their limits',
        });
      }
      continue;
    }
    const dir = join(base, own.get(name) ?? '/', `mayfly-${id}`);
    makeDir(dir);
    made.push(dir);
  }
  const under = (mount: string) => made.find((d) => d.startsWith(join(ROOT, mount) + '/'));
  const memory = under('memory')!;
  const cpu = under('cpu')!;
  const pids = under('pids');
  const memoryBytes = String(size.memoryMiB * 1024 * 1024);
  write(join(memory, 'memory.limit_in_bytes'), memoryBytes);
  // Without swap accounting the file is missing; the limit above is then the whole bound.
  if (existsSync(join(memory, 'memory.memsw.limit_in_bytes'))) write(join(memory, 'memory.memsw.limit_in_bytes'), memoryBytes);
  write(join(cpu, 'cpu.cfs_period_us'), String(CPU_PERIOD_US));
  write(join(cpu, 'cpu.cfs_quota_us'), String(size.cpus * CPU_PERIOD_US));
  if (pids) write(join(pids, 'pids.max'), String(pidsMax));
  return { dirs: [...made], procsDir: memory };
}

/** A `sh -c` prelude that moves the shell into the instance's cgroups before it execs the command. */
export function joinCgroupsScript(cg: InstanceCgroups): string {
  return cg.dirs.map((d) => `echo $$ > '${d}/cgroup.procs'`).join(' && ');
}

function procsOf(dir: string): number[] {
  try {
    return readFileSync(join(dir, 'cgroup.procs'), 'utf8').split('\n').filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

/** Every process of the instance (host pids), nested cgroups included. */
export function instanceProcesses(cg: InstanceCgroups): number[] {
  const all: number[] = [];
  const walk = (dir: string) => {
    all.push(...procsOf(dir));
    let entries: string[] = [];
    try {
      entries = readdirSync(dir, { withFileTypes: true }).filter((e) => e.isDirectory()).map((e) => e.name);
    } catch {
      return;
    }
    for (const e of entries) walk(join(dir, e));
  };
  walk(cg.procsDir);
  return [...new Set(all)];
}

/**
 * Kills every process of the instance and removes its cgroups. Killing the container's init
 * ends its PID namespace; the loop catches anything forked meanwhile and nspawn itself.
 */
export async function destroyInstanceCgroups(cg: InstanceCgroups, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const pids = instanceProcesses(cg);
    if (pids.length === 0) break;
    for (const pid of pids) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone already
      }
    }
    if (Date.now() > deadline) {
      throw new MayflyError(ErrorCode.MACHINE_STOP_FAILED, `processes ${pids.join(', ')} of the container survive SIGKILL`, {
        hint: 'a process in uninterruptible sleep (D state) may be stuck on I/O; look at /proc/PID/stack',
      });
    }
    await sleep(20);
  }
  for (const dir of cg.dirs) removeCgroupTree(dir);
}

function removeCgroupTree(dir: string): void {
  let entries: string[] = [];
  try {
    entries = readdirSync(dir, { withFileTypes: true }).filter((e) => e.isDirectory()).map((e) => e.name);
  } catch {
    return; // gone
  }
  for (const e of entries) removeCgroupTree(join(dir, e));
  try {
    rmdirSync(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
}
