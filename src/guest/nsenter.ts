import { spawn, type ChildProcess } from 'node:child_process';
import { createReadStream, readdirSync, readFileSync, readlinkSync, writeFileSync } from 'node:fs';
import type { Readable } from 'node:stream';
import { ErrorCode, MayflyError, errorText } from '../errors.ts';
import { requireTool } from '../util/exec.ts';
import { processAlive } from '../util/proc.ts';
import { captureOutput, pipeOut, remoteCommand, signalNumbers, type ExecOptions, type ExecResult, type GuestChannel } from './channel.ts';

// The container guest channel: each command is a process entered into the container with
// nsenter (all of its namespaces and root) after joining its cgroups (so the container's
// limits bind it too), switched to the user with setpriv, run by the user's shell. No daemon
// in the container and no handshake: a command costs a few milliseconds. Files move through
// commands run as the channel's user inside the container, never through the clone's path on
// the host, so a symlink a job planted cannot redirect a write to the host's files.

export interface ContainerTarget {
  /** Host pid of the container's init (its PID 1). */
  leaderPid: number;
  /** A `sh` prelude that moves the shell into the container's cgroups. */
  joinCgroups: string;
}

interface Account {
  name: string;
  uid: number;
  gid: number;
  home: string;
  shell: string;
  /** Supplementary groups (besides the primary one). */
  groups: number[];
}

// After a command exits, its output pipes may still be held by a process it started in the
// background; the command is done anyway (like `ssh` with a daemonizing command, but without hanging).
const DRAIN_AFTER_EXIT_MS = 500;

let nsenterPath: string | undefined;

function nsenter(): string {
  nsenterPath ??= requireTool('nsenter');
  return nsenterPath;
}

/** Whether `pid` is in another PID namespace than this process (a container's init is). */
function inOtherPidNamespace(pid: number): boolean {
  try {
    return readlinkSync(`/proc/${pid}/ns/pid`) !== readlinkSync('/proc/self/ns/pid');
  } catch {
    return false;
  }
}

function childrenOf(pid: number): number[] {
  const out: number[] = [];
  try {
    for (const t of readdirSync(`/proc/${pid}/task`)) {
      out.push(
        ...readFileSync(`/proc/${pid}/task/${t}/children`, 'utf8')
          .split(' ')
          .filter(Boolean)
          .map(Number),
      );
    }
  } catch {
    // gone
  }
  return out;
}

function commOf(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim();
  } catch {
    return '';
  }
}

/**
 * The container's init (host pid) once the container is fully set up, else undefined. nspawn's
 * child in a new PID namespace is the init; its own child is the payload, which execs
 * `payloadComm` only after nspawn has finished the mounts.
 */
export function containerLeader(nspawnPid: number, payloadComm: string): number | undefined {
  for (const c of childrenOf(nspawnPid)) {
    if (!inOtherPidNamespace(c)) continue;
    if (childrenOf(c).some((p) => commOf(p) === payloadComm)) return c;
  }
  return undefined;
}

export class NsenterChannel implements GuestChannel {
  readonly #target: ContainerTarget;
  readonly #account: Account;
  readonly #running = new Set<ChildProcess>();
  #closed = false;

  private constructor(target: ContainerTarget, account: Account) {
    this.#target = target;
    this.#account = account;
  }

  get closed(): boolean {
    return this.#closed;
  }

  /**
   * A channel as `user`, whose account is looked up inside the container. The lookup is a real
   * command run in the container, so a channel that opens is also the readiness check.
   */
  static async open(target: ContainerTarget, user: string, signal?: AbortSignal): Promise<NsenterChannel> {
    const root = new NsenterChannel(target, { name: 'root', uid: 0, gid: 0, home: '/root', shell: '/bin/sh', groups: [] });
    let found: string;
    try {
      found = await root.capture(['sh', '-c', 'getent passwd "$1" && id -G "$1"', 'sh', user], { signal });
    } catch (e) {
      if (signal?.aborted) throw e;
      throw new MayflyError(ErrorCode.GUEST_CHANNEL, `cannot enter the container as '${user}': ${errorText(e)}`, {
        hint: user === 'root' ? undefined : 'container images made by mayfly have the `ci` user; check the image recipe',
      });
    }
    return new NsenterChannel(target, parseAccount(found, user));
  }

  exec(argv: readonly string[], opts: ExecOptions = {}): Promise<ExecResult> {
    // Every word is quoted: any POSIX shell runs it the same, and dash starts faster than bash.
    return this.#run('/bin/sh', remoteCommand(argv, { env: opts.env, cwd: opts.cwd }), opts);
  }

  execRaw(command: string, opts: ExecOptions = {}): Promise<ExecResult> {
    return this.#run(this.#account.shell, command, opts);
  }

  #run(shell: string, command: string, opts: ExecOptions): Promise<ExecResult> {
    if (this.#closed) return Promise.reject(new MayflyError(ErrorCode.GUEST_CHANNEL, 'the channel to the container is closed'));
    opts.signal?.throwIfAborted();
    const a = this.#account;
    // nsenter switches user itself (and drops supplementary groups); setpriv, which costs another
    // exec, only for an account that has some.
    const become =
      a.uid === 0
        ? ['--']
        : a.groups.length === 0
          ? [`--setuid=${a.uid}`, `--setgid=${a.gid}`, '--']
          : ['--', 'setpriv', `--reuid=${a.uid}`, `--regid=${a.gid}`, '--init-groups', '--'];
    // Like an SSH login: start in the home directory, with the account's basic environment and nothing of mayfly's.
    const env = {
      HOME: a.home,
      USER: a.name,
      LOGNAME: a.name,
      SHELL: a.shell,
      PATH: a.uid === 0 ? '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' : '/usr/local/bin:/usr/bin:/bin:/usr/games',
      // The command travels in the environment, not the argv: any host user can read a
      // process's command line (/proc/PID/cmdline), and commands carry job secrets.
      MAYFLY_COMMAND: command,
    };
    const child = spawn(
      '/bin/sh',
      [
        '-c',
        // 255 when the container's cgroups are gone with it (then reported as the container's failure, below).
        `${this.#target.joinCgroups} || exit 255; exec "$@"`,
        'sh',
        nsenter(),
        '-t', String(this.#target.leaderPid), '-a',
        ...become,
        shell, '-c', 'cd ~ 2>/dev/null; c=$MAYFLY_COMMAND; unset MAYFLY_COMMAND; eval "$c"',
      ],
      // Its own process group: cancelling kills the command and what it started, not mayfly.
      { env, detached: true, stdio: ['pipe', 'pipe', 'pipe'] },
    );
    this.#running.add(child);
    return new Promise<ExecResult>((resolve, reject) => {
      let settled = false;
      const finish = (fn: () => void) => {
        if (settled) return;
        settled = true;
        this.#running.delete(child);
        opts.signal?.removeEventListener('abort', onAbort);
        fn();
      };
      const onAbort = () => {
        killGroup(child);
        finish(() => reject(opts.signal!.reason));
      };
      opts.signal?.addEventListener('abort', onAbort, { once: true });
      pipeOut(child.stdout!, opts.stdout);
      pipeOut(child.stderr!, opts.stderr);
      child.once('error', (e) => finish(() => reject(new MayflyError(ErrorCode.GUEST_CHANNEL, `cannot enter the container: ${e.message}`, { cause: e }))));
      child.once('exit', (code, sig) => {
        const name = sig ? sig.replace(/^SIG/, '') : null;
        const result = { exitCode: code ?? 128 + (signalNumbers[name ?? ''] ?? 1), code, signal: name };
        // A command that failed because the container went away (or could not be entered) is
        // the machine's failure, not the job's: its code must not pass for the job's own.
        const gone = result.exitCode !== 0 && !processAlive(this.#target.leaderPid);
        const done = () =>
          finish(() =>
            gone
              ? reject(new MayflyError(ErrorCode.GUEST_CHANNEL, `the container stopped while running a command (exit ${result.exitCode})`))
              : resolve(result),
          );
        if (child.stdout!.readableEnded && child.stderr!.readableEnded) return done();
        const timer = setTimeout(() => {
          child.stdout!.destroy();
          child.stderr!.destroy();
          done();
        }, DRAIN_AFTER_EXIT_MS);
        child.once('close', () => {
          clearTimeout(timer);
          done();
        });
      });
      child.stdin!.on('error', () => {
        // the command exited without reading all of its input
      });
      const stdin = opts.stdin;
      if (stdin === undefined) child.stdin!.end();
      else if (typeof stdin === 'string' || Buffer.isBuffer(stdin)) child.stdin!.end(stdin);
      else (stdin as Readable).pipe(child.stdin!);
    });
  }

  capture(argv: readonly string[], opts: Omit<ExecOptions, 'stdout' | 'stderr'> = {}): Promise<string> {
    return captureOutput(this, argv, opts);
  }

  async #put(what: string, remotePath: string, stdin: Readable | Buffer | string, mode: number | undefined): Promise<void> {
    const script = mode === undefined ? 'cat > "$1"' : `cat > "$1" && chmod ${mode.toString(8)} "$1"`;
    await this.capture(['sh', '-c', script, 'sh', remotePath], { stdin }).catch((e: unknown) => {
      throw new MayflyError(ErrorCode.GUEST_CHANNEL, `${what} failed: ${errorText(e)}`, { cause: e });
    });
  }

  upload(localPath: string, remotePath: string, mode?: number): Promise<void> {
    return this.#put(`copying ${localPath} to the container's ${remotePath}`, remotePath, createReadStream(localPath), mode);
  }

  writeFile(remotePath: string, data: string | Buffer, mode = 0o644): Promise<void> {
    return this.#put(`writing the container's ${remotePath}`, remotePath, data, mode);
  }

  async readFile(remotePath: string): Promise<Buffer> {
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const r = await this.exec(['cat', '--', remotePath], { stdout: (c) => out.push(c), stderr: (c) => err.push(c) });
    if (r.exitCode !== 0) {
      throw new MayflyError(ErrorCode.GUEST_CHANNEL, `reading the container's ${remotePath} failed: ${Buffer.concat(err).toString().trim()}`);
    }
    return Buffer.concat(out);
  }

  async download(remotePath: string, localPath: string): Promise<void> {
    writeFileSync(localPath, await this.readFile(remotePath));
  }

  /** Ends the channel; commands still running through it are killed, as a closed SSH connection would end them. */
  close(): void {
    this.#closed = true;
    for (const c of this.#running) killGroup(c);
    this.#running.clear();
  }
}

function killGroup(child: ChildProcess): void {
  try {
    if (child.pid) process.kill(-child.pid, 'SIGKILL');
  } catch {
    // gone already
  }
}

/** `getent passwd USER` and `id -G USER` output, one line each. */
function parseAccount(found: string, user: string): Account {
  const [entry = '', ids = ''] = found.trim().split('\n');
  const f = entry.split(':');
  if (f.length < 7 || !/^\d+$/.test(f[2]!) || !/^\d+$/.test(f[3]!)) {
    throw new MayflyError(ErrorCode.GUEST_CHANNEL, `the container's passwd entry for '${user}' is malformed`);
  }
  const gid = Number(f[3]);
  const groups = ids.split(' ').filter((g) => /^\d+$/.test(g)).map(Number).filter((g) => g !== gid);
  return { name: f[0]!, uid: Number(f[2]), gid, home: f[5] || '/', shell: f[6] || '/bin/sh', groups };
}
