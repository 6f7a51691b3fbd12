import { spawn, type SpawnOptions } from 'node:child_process';
import { accessSync, constants, readFileSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import { ErrorCode, MayflyError } from '../errors.ts';

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  input?: string | Buffer;
  /** Called with each line of stdout+stderr as it arrives (progress, logs). */
  onLine?: (line: string) => void;
  /** Stop the command when this fires (the result then comes once it has exited). */
  signal?: AbortSignal;
  /**
   * Run it in its own process group and stop the whole group on abort (SIGTERM, SIGKILL after
   * 10 s), for tools that start children of their own.
   */
  processGroup?: boolean;
}

/** Runs a host command, collecting output. Never throws for a non-zero exit; see `runChecked`. */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const spawnOpts: SpawnOptions = {
      cwd: opts.cwd,
      env: opts.env ?? process.env,
      stdio: ['pipe', 'pipe', 'pipe'],
      detached: Boolean(opts.processGroup),
    };
    const child = spawn(cmd, args, spawnOpts);
    let killTimer: NodeJS.Timeout | undefined;
    const onAbort = () => {
      const kill = (sig: NodeJS.Signals) => {
        try {
          if (opts.processGroup && child.pid) process.kill(-child.pid, sig);
          else child.kill(sig);
        } catch {
          // already gone
        }
      };
      kill('SIGTERM');
      killTimer = setTimeout(() => kill('SIGKILL'), 10_000);
    };
    if (opts.signal?.aborted) onAbort();
    else opts.signal?.addEventListener('abort', onAbort, { once: true });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let partial = '';
    const feed = (chunk: Buffer) => {
      if (!opts.onLine) return;
      partial += chunk.toString('utf8');
      const lines = partial.split('\n');
      partial = lines.pop() ?? '';
      for (const l of lines) opts.onLine(l);
    };
    child.stdout!.on('data', (c: Buffer) => { out.push(c); feed(c); });
    child.stderr!.on('data', (c: Buffer) => { err.push(c); feed(c); });
    child.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT') reject(missingTool(cmd));
      else reject(e);
    });
    child.on('close', (code, signal) => {
      opts.signal?.removeEventListener('abort', onAbort);
      if (killTimer) clearTimeout(killTimer);
      if (partial && opts.onLine) opts.onLine(partial);
      resolve({
        code: code ?? (signal ? 128 + signalNumber(signal) : 1),
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
      });
    });
    child.stdin!.on('error', () => {});
    if (opts.input !== undefined) child.stdin!.end(opts.input);
    else child.stdin!.end();
  });
}

/** Runs a host command and throws a MayflyError carrying the tail of its output when it fails. */
export async function runChecked(
  cmd: string,
  args: readonly string[],
  opts: RunOptions & { what?: string; code?: string } = {},
): Promise<RunResult> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) {
    const tail = lastLines(r.stderr || r.stdout, 15);
    throw new MayflyError(
      opts.code ?? ErrorCode.MACHINE_START_FAILED,
      `${opts.what ?? `${cmd} ${args.join(' ')}`} failed (exit ${r.code})${tail ? `:\n${tail}` : ''}`,
    );
  }
  return r;
}

export function lastLines(text: string, n: number): string {
  return text.trimEnd().split('\n').slice(-n).join('\n');
}

/** Debian package that provides each host tool mayfly runs, for "install X" hints. */
const toolPackages: Record<string, string> = {
  'qemu-system-x86_64': 'qemu-system-x86',
  'qemu-img': 'qemu-utils',
  mmdebstrap: 'mmdebstrap',
  'mkfs.ext4': 'e2fsprogs',
  tar: 'tar',
  git: 'git',
  'ansible-playbook': 'ansible',
  genisoimage: 'genisoimage',
  'systemd-nspawn': 'systemd-container',
  nsenter: 'util-linux',
};

export function missingTool(cmd: string): MayflyError {
  if (cmd.includes('/')) {
    // A path the config gave (qemu.binary, nspawn.binary).
    return new MayflyError(ErrorCode.MISSING_TOOL, `'${cmd}' does not exist or cannot be run`, {
      hint: 'fix the path in the config, or give the command\'s name to find it on PATH',
    });
  }
  const pkg = toolPackages[cmd];
  return new MayflyError(
    ErrorCode.MISSING_TOOL,
    `'${cmd}' is not installed or not on PATH`,
    { hint: pkg ? `install it with: apt-get install ${pkg}` : 'install it and try again' },
  );
}

/** Where `cmd` is: itself when it is a path (a configured binary), else the first match on PATH; only if it can be run. */
export function findOnPath(cmd: string): string | undefined {
  const runnable = (p: string) => {
    try {
      accessSync(p, constants.X_OK);
      return true;
    } catch {
      return false;
    }
  };
  if (cmd.includes('/')) return runnable(cmd) ? cmd : undefined;
  return (process.env.PATH ?? '').split(delimiter).map((dir) => join(dir, cmd)).find(runnable);
}

export function requireTool(cmd: string): string {
  const p = findOnPath(cmd);
  if (!p) throw missingTool(cmd);
  return p;
}

const signals: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGKILL: 9, SIGTERM: 15, SIGPIPE: 13, SIGABRT: 6, SIGSEGV: 11 };
export function signalNumber(name: string): number {
  return signals[name] ?? 1;
}

/**
 * The last lines of a log file (a console), without carriage returns and colour codes so that
 * they read well inside an error message; empty when the file is missing.
 */
export function fileTail(path: string, lines: number): string {
  try {
    return lastLines(readFileSync(path, 'utf8').replace(/\r|\x1b\[[0-9;]*[A-Za-z]|\x1b/g, '').trim(), lines);
  } catch {
    return '';
  }
}
