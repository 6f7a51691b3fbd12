import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, fchownSync, lstatSync, openSync, readFileSync, renameSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCode, MayflyError, errorText } from '../../errors.ts';
import { containerLeader } from '../../guest/nsenter.ts';
import { CONTAINER_ID_RANGE } from '../../images/id-shift.ts';
import type { Logger } from '../../log.ts';
import { fileTail, requireTool, runChecked } from '../../util/exec.ts';
import { cmdlineIncludes, liveProcesses, processAlive } from '../../util/proc.ts';
import type { Driver, GuestNetwork, HostMachine, StartSpec, StartedMachine } from '../types.ts';
import { createInstanceCgroups, destroyInstanceCgroups, instanceProcesses, joinCgroupsScript, type InstanceCgroups } from './cgroup.ts';

// systemd-nspawn containers: one long-lived container per instance on a directory clone of the
// image's root. nspawn runs a stub init as PID 1 (--as-pid2) that reaps orphans, with
// `sleep infinity` as the payload that keeps the container up between a job's commands;
// commands enter it with nsenter (src/guest/nsenter.ts). Our hosts run no systemd, so nspawn
// gets --keep-unit --register=no, and limits come from the instance's own cgroups (cgroup.ts).

export interface NspawnDriverOptions {
  /** The systemd-nspawn binary (name or path). */
  binary: string;
  /** Give each container only a loopback interface instead of the host's network. */
  privateNetwork: boolean;
  /** How long a container may take to come up. */
  startTimeoutMs: number;
  /** Most processes (threads) a container may have at once. */
  pidsMax: number;
}

/** The payload's command name, by which readiness and `listHost` recognize a set-up container. */
export const PAYLOAD_COMM = 'sleep';
const CGROUPS_FILE = 'cgroups.json';
const PID_FILE = 'nspawn.pid';
/** nspawn leaves this per machine name on the host when it cannot clean up after itself. */
const PROPAGATE_DIR = '/run/systemd/nspawn/propagate';
const LOCKS_DIR = '/run/systemd/nspawn/locks';

export class NspawnDriver implements Driver {
  readonly name = 'nspawn';
  // A container's root cannot mount (nspawn drops CAP_SYS_ADMIN); nspawn mounts it instead.
  readonly mountsJobTmpfs = true;
  readonly bridgedPort = 'veth';
  readonly #opts: NspawnDriverOptions;

  constructor(opts: NspawnDriverOptions) {
    this.#opts = opts;
  }

  async start(spec: StartSpec, opts: { log: Logger; signal?: AbortSignal }): Promise<StartedMachine> {
    if (spec.restore) {
      throw new MayflyError(ErrorCode.RESTORE_FAILED, 'containers start in milliseconds and have no snapshot templates');
    }
    if (process.getuid?.() !== 0) {
      throw new MayflyError(ErrorCode.NOT_ROOT, 'containers need root (systemd-nspawn, cgroups)', { hint: 'run mayfly as root' });
    }
    const binary = requireTool(this.#opts.binary);
    const root = spec.disk.path;
    const { dir } = spec;
    const idShift = spec.image.idShift;
    if (idShift === undefined) {
      throw new MayflyError(ErrorCode.MACHINE_START_FAILED, `image ${spec.image.name}:${spec.image.version} predates user namespaces for containers`, {
        hint: `rebuild it (mayfly image build ${spec.image.name}) or maintain it (mayfly image maintain ${spec.image.name})`,
      });
    }
    // The clone is fresh and nothing has run in it yet: its identity is written directly.
    const etcFile = (name: string, text: string) => writeCloneFile(root, name, text, idShift);
    etcFile('hostname', `${spec.identity.hostname}\n`);
    etcFile('machine-id', `${randomBytes(16).toString('hex')}\n`);
    // sudo and friends resolve the host name.
    etcFile('hosts', `127.0.0.1\tlocalhost\n127.0.1.1\t${spec.identity.hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n`);
    const net = spec.network;
    if (net && !net.peerIf) throw new MayflyError(ErrorCode.MACHINE_START_FAILED, `containers need a veth on the bridge, got ${net.hostIf} alone`);
    if (net) etcFile('resolv.conf', net.dns.map((d) => `nameserver ${d}\n`).join(''));

    const cgroups = createInstanceCgroups(spec.id, spec.size, this.#opts.pidsMax);
    // Whole or not at all: a half-written file would leave cgroups nothing can find to remove.
    writeFileSync(join(dir, `${CGROUPS_FILE}.tmp`), JSON.stringify(cgroups));
    renameSync(join(dir, `${CGROUPS_FILE}.tmp`), join(dir, CGROUPS_FILE));
    const consoleLog = join(dir, 'console.log');
    const args = [
      '--quiet',
      '--keep-unit',
      '--register=no',
      `--directory=${root}`,
      `--machine=${spec.id}`,
      `--hostname=${spec.identity.hostname}`,
      '--as-pid2',
      '--console=pipe',
      // Root in the container (and every command entered into it) is root only in its own user
      // namespace; the image's files are stored shifted into this range (images/id-shift.ts).
      `--private-users=${idShift}:${CONTAINER_ID_RANGE}`,
      '--private-users-ownership=off',
      // Bridged: a network namespace of its own, into which the veth's container end is moved
      // below (not with --network-interface: nspawn looks interfaces up through udev, which
      // hosts without systemd lack); the DNS servers were written above.
      ...(net ? ['--private-network', '--resolv-conf=off'] : this.#opts.privateNetwork ? ['--private-network'] : []),
      ...(spec.jobTmpfs === undefined ? [] : [`--tmpfs=/builds:${jobTmpfsOptions(spec.jobTmpfs, spec.size.memoryMiB)}`]),
      '--',
      '/bin/sleep',
      'infinity',
    ];
    writeFileSync(join(dir, 'nspawn.args'), [binary, ...args].join('\n') + '\n');
    const log = openSync(consoleLog, 'a', 0o600);
    let pid: number;
    try {
      const child = spawn('/bin/sh', ['-c', `${joinCgroupsScript(cgroups)} && exec "$@"`, 'sh', binary, ...args], {
        detached: true,
        stdio: ['ignore', log, log],
        // Nothing of mayfly's environment (job secrets included) reaches the container.
        env: { PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' },
      });
      child.unref();
      if (child.pid === undefined) throw new MayflyError(ErrorCode.MACHINE_START_FAILED, `cannot run ${binary}`);
      pid = child.pid;
    } finally {
      closeSync(log);
    }
    writeFileSync(join(dir, PID_FILE), `${pid}\n`);
    opts.log.debug({ instance: spec.id, pid }, 'nspawn started');
    try {
      const leader = await this.#waitSetUp(pid, dir, opts.signal);
      if (net) await configureNetwork(leader, net);
      if (spec.jobTmpfs !== undefined) {
        // As the container's root (its user namespace: no power outside it), before any job runs.
        await runChecked('nsenter', ['--target', String(leader), '--all', '--', 'chown', `${spec.image.user}:`, '/builds'], {
          code: ErrorCode.MACHINE_START_FAILED,
          what: `giving the job tmpfs to ${spec.image.user}`,
        });
      }
    } catch (e) {
      await this.stop(pid, dir);
      throw e;
    }
    return { pid, ssh: null, consoleLog, accel: 'nspawn' };
  }

  /** Waits until nspawn has set the container up and its payload runs; returns the container's init. */
  async #waitSetUp(pid: number, dir: string, signal: AbortSignal | undefined): Promise<number> {
    const deadline = Date.now() + this.#opts.startTimeoutMs;
    for (;;) {
      signal?.throwIfAborted();
      const leader = containerLeader(pid, PAYLOAD_COMM);
      if (leader !== undefined) return leader;
      // Only whether it runs: right after the spawn the pid may still show node's command line (before exec).
      const dead = processAlive(pid) ? undefined : this.deadReason(pid, dir);
      if (dead) throw new MayflyError(ErrorCode.MACHINE_START_FAILED, dead, { hint: `the command line is in ${join(dir, 'nspawn.args')}` });
      if (Date.now() > deadline) {
        throw new MayflyError(ErrorCode.BOOT_TIMEOUT, `the container did not come up within ${this.#opts.startTimeoutMs / 1000} s`, {
          hint: `its output is in ${join(dir, 'console.log')}`,
        });
      }
      await sleep(5);
    }
  }

  deadReason(pid: number, dir: string): string | undefined {
    if (processAlive(pid) && this.#isOurs(pid, dir)) return undefined;
    const tail = this.consoleTail(dir, 15);
    return `the container's nspawn process (pid ${pid}) has exited${tail ? `; its last output:\n${tail}` : ''}`;
  }

  async stop(pid: number | null, dir: string): Promise<void> {
    pid ??= readPid(dir);
    const cgroups = readCgroups(dir);
    if (pid !== null && processAlive(pid) && this.#isOurs(pid, dir)) {
      // Ending the container's init ends everything in it; nspawn then cleans up and exits.
      const leader = containerLeader(pid, PAYLOAD_COMM);
      if (leader !== undefined) {
        try {
          process.kill(leader, 'SIGKILL');
        } catch {
          // gone already
        }
      }
      const deadline = Date.now() + 3000;
      while (processAlive(pid) && Date.now() < deadline) await sleep(10);
      if (processAlive(pid)) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // gone already
        }
      }
    }
    // Whatever is left in the instance's cgroups (a container whose nspawn was killed) goes too.
    if (cgroups) await destroyInstanceCgroups(cgroups);
    // What nspawn keeps on the host per machine and per root directory, which a killed nspawn
    // leaves behind (its lock names the root by device and inode, still ours until removal).
    rmSync(join(PROPAGATE_DIR, basename(dir)), { recursive: true, force: true });
    try {
      const st = statSync(join(dir, 'root'));
      rmSync(join(LOCKS_DIR, `inode-${st.dev}:${st.ino}`), { force: true });
    } catch {
      // no root (a start that failed before the clone)
    }
  }

  killNow(pid: number | null, dir: string): void {
    const cgroups = readCgroups(dir);
    const pids = cgroups ? instanceProcesses(cgroups) : pid !== null && this.#isOurs(pid, dir) ? [pid] : [];
    for (const p of pids) {
      try {
        process.kill(p, 'SIGKILL');
      } catch {
        // gone already
      }
    }
  }

  /** Guards against killing a recycled pid that now belongs to some other program. */
  #isOurs(pid: number, dir: string): boolean {
    return cmdlineIncludes(pid, `--directory=${dir}/`);
  }

  consoleTail(dir: string, lines: number): string {
    return fileTail(join(dir, 'console.log'), lines);
  }

  listHost(): HostMachine[] {
    const out: HostMachine[] = [];
    for (const { pid, argv } of liveProcesses()) {
      const name = basename(argv[0] ?? '');
      if ((name !== 'systemd-nspawn' && name !== basename(this.#opts.binary)) || !argv.includes('--as-pid2')) continue;
      const d = argv.find((a) => a.startsWith('--directory='))?.slice('--directory='.length);
      if (!d || basename(d) !== 'root') continue;
      const instanceDir = dirname(d);
      out.push({ id: basename(instanceDir), pid, dir: instanceDir });
    }
    return out;
  }
}

/**
 * Gives the container's end of its veth the attachment's address and default route, from the
 * host with the host's `ip` inside the container's network namespace (the image needs no
 * iproute2, and nothing in the container runs before its network is up).
 */
async function configureNetwork(leaderPid: number, net: GuestNetwork): Promise<void> {
  await runChecked('ip', ['link', 'set', 'dev', net.peerIf!, 'netns', String(leaderPid)], {
    code: ErrorCode.MACHINE_START_FAILED,
    what: `moving ${net.peerIf} into the container`,
  });
  const batch = [
    `link set dev ${net.peerIf} name eth0`,
    `link set dev eth0 address ${net.mac}`,
    `address add ${net.address}/${net.prefixLength} dev eth0`,
    'link set dev lo up',
    'link set dev eth0 up',
    `route add default via ${net.gateway} dev eth0`,
  ].join('\n');
  await runChecked('nsenter', ['--target', String(leaderPid), '--net', '--', 'ip', '-batch', '-'], {
    input: batch,
    code: ErrorCode.MACHINE_START_FAILED,
    what: "setting up the container's bridged network",
  });
}

/**
 * Mount options for the job's tmpfs, sized in bytes (a percentage is of the container's memory,
 * not the host's). nspawn makes the container's root own it, whatever the options say; the job
 * user gets it right after the start.
 */
export function jobTmpfsOptions(size: string, memoryMiB: number): string {
  const pct = /^(\d+)%$/.exec(size);
  const bytes = pct ? Math.floor((memoryMiB * 1024 * 1024 * Number(pct[1])) / 100) : size;
  return `mode=0755,size=${bytes}`;
}

/**
 * Writes /etc/NAME of a fresh clone, owned by the container's root. Never through a symlink (an
 * image may link /etc/resolv.conf elsewhere: written on the host that would be a host file):
 * whatever is there is replaced by a new regular file.
 */
function writeCloneFile(root: string, name: string, text: string, idShift: number): void {
  const etc = join(root, 'etc');
  if (!lstatSync(etc).isDirectory()) throw new MayflyError(ErrorCode.MACHINE_START_FAILED, `${etc} in the image is not a directory`);
  const path = join(etc, name);
  rmSync(path, { force: true });
  const fd = openSync(path, 'wx', 0o644);
  try {
    writeSync(fd, text);
    fchownSync(fd, idShift, idShift);
  } finally {
    closeSync(fd);
  }
}

function readPid(dir: string): number | null {
  try {
    return Number(readFileSync(join(dir, PID_FILE), 'utf8').trim()) || null;
  } catch {
    return null;
  }
}

function readCgroups(dir: string): InstanceCgroups | undefined {
  try {
    return JSON.parse(readFileSync(join(dir, CGROUPS_FILE), 'utf8')) as InstanceCgroups;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw new MayflyError(ErrorCode.MACHINE_STOP_FAILED, `cannot read ${join(dir, CGROUPS_FILE)}: ${errorText(e)}`);
    return undefined;
  }
}

/** How a channel reaches a container this driver started: its init and its cgroups. */
export function containerTarget(pid: number, dir: string): { leaderPid: number; joinCgroups: string } {
  // The recorded pid must still be this instance's nspawn (not a reused pid of something else).
  const leaderPid = cmdlineIncludes(pid, `--directory=${dir}/`) ? containerLeader(pid, PAYLOAD_COMM) : undefined;
  const cgroups = readCgroups(dir);
  if (leaderPid === undefined || !cgroups) {
    throw new MayflyError(ErrorCode.GUEST_CHANNEL, `the container in ${dir} is not running`, {
      hint: 'it was stopped or removed (mayfly rm, the reaper, or a cleanup)',
    });
  }
  return { leaderPid, joinCgroups: joinCgroupsScript(cgroups) };
}
