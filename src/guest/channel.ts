import type { Readable, Writable } from 'node:stream';
import { ErrorCode, MayflyError } from '../errors.ts';
import { isValidEnvName, shellJoin, shellQuote } from '../util/shell.ts';

/**
 * How mayfly runs commands and moves files in a machine, whatever the driver: SSH into a VM
 * (ssh.ts), nsenter into a container (nsenter.ts). One channel per machine and user, kept open.
 */
export interface GuestChannel {
  readonly closed: boolean;
  /** Runs argv (quoted, never interpreted) in the guest, streaming output. */
  exec(argv: readonly string[], opts?: ExecOptions): Promise<ExecResult>;
  /** Runs a command line as the user's login shell reads it (`SHELL -c`). Callers quote what they pass. */
  execRaw(command: string, opts?: ExecOptions): Promise<ExecResult>;
  /** Runs a command and returns its output; throws with stderr when it fails. */
  capture(argv: readonly string[], opts?: Omit<ExecOptions, 'stdout' | 'stderr'>): Promise<string>;
  upload(localPath: string, remotePath: string, mode?: number): Promise<void>;
  download(remotePath: string, localPath: string): Promise<void>;
  writeFile(remotePath: string, data: string | Buffer, mode?: number): Promise<void>;
  readFile(remotePath: string): Promise<Buffer>;
  close(): void;
}

export interface ExecOptions {
  /** Environment for the command; names must be valid shell identifiers. */
  env?: Record<string, string>;
  /** Working directory in the guest. */
  cwd?: string;
  /** A stream is read only once the command has started: a child process's stdout must already
   * be listened to (e.g. piped into a PassThrough), or Node drains it when that child exits. */
  stdin?: Readable | string | Buffer;
  stdout?: Writable | ((chunk: Buffer) => void);
  stderr?: Writable | ((chunk: Buffer) => void);
  /** Aborting kills the remote command (signal KILL) and closes its channel. */
  signal?: AbortSignal;
}

export interface ExecResult {
  /** Exit status as a shell reports it: the code, or 128 + the signal number. */
  exitCode: number;
  code: number | null;
  signal: string | null;
}

// Linux x86 numbers, for the 128+N exit status a shell would report.
export const signalNumbers: Record<string, number> = {
  HUP: 1, INT: 2, QUIT: 3, ILL: 4, TRAP: 5, ABRT: 6, BUS: 7, FPE: 8, KILL: 9, USR1: 10, SEGV: 11, USR2: 12, PIPE: 13,
  ALRM: 14, TERM: 15, STKFLT: 16, CHLD: 17, CONT: 18, STOP: 19, TSTP: 20, TTIN: 21, TTOU: 22, URG: 23, XCPU: 24,
  XFSZ: 25, VTALRM: 26, PROF: 27, WINCH: 28, IO: 29, PWR: 30, SYS: 31,
};

/**
 * Builds the command line sshd hands to the login shell. Every argument and environment value
 * is single-quoted, so nothing a user passes is interpreted by the remote shell.
 */
export function remoteCommand(argv: readonly string[], opts: { env?: Record<string, string>; cwd?: string } = {}): string {
  if (argv.length === 0) throw new MayflyError(ErrorCode.USAGE, 'no command given to run in the machine');
  if (argv[0]!.includes('=')) {
    // env would take it for a variable assignment, not a command.
    throw new MayflyError(ErrorCode.USAGE, `'${argv[0]}' looks like a variable assignment, not a command`, {
      hint: 'pass variables with -e NAME=VALUE, or run it through a shell: -- sh -c "NAME=VALUE command"',
    });
  }
  const env = Object.entries(opts.env ?? {});
  for (const [k] of env) {
    if (!isValidEnvName(k)) {
      throw new MayflyError(ErrorCode.USAGE, `'${k}' is not a valid environment variable name`, {
        hint: 'names are letters, digits and _, not starting with a digit',
      });
    }
  }
  const assignments = env.map(([k, v]) => shellQuote(`${k}=${v}`));
  // `env --` so that an argv[0] starting with '-' is still the command.
  const run = `exec env -- ${assignments.length ? `${assignments.join(' ')} ` : ''}${shellJoin(argv)}`;
  return opts.cwd ? `cd -- ${shellQuote(opts.cwd)} && ${run}` : run;
}

export function pipeOut(stream: Readable, to: ExecOptions['stdout']): void {
  if (!to) {
    stream.resume();
    return;
  }
  if (typeof to === 'function') stream.on('data', to);
  else stream.pipe(to, { end: false });
}


/** Runs a command and returns its output; throws with stderr when it fails. */
export async function captureOutput(ch: GuestChannel, argv: readonly string[], opts: Omit<ExecOptions, 'stdout' | 'stderr'> = {}): Promise<string> {
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  const r = await ch.exec(argv, { ...opts, stdout: (c) => out.push(c), stderr: (c) => err.push(c) });
  if (r.exitCode !== 0) {
    throw new MayflyError(
      ErrorCode.GUEST_CHANNEL,
      `'${argv.join(' ')}' failed in the machine (exit ${r.exitCode}): ${Buffer.concat(err).toString().trim()}`,
    );
  }
  return Buffer.concat(out).toString('utf8');
}
