import { spawn } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, readFileSync, readlinkSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCode, MayflyError } from '../errors.ts';
import { unmountAll } from '../storage/mounts.ts';
import { lastLines, run, runChecked, signalNumber, type RunResult } from '../util/exec.ts';

// Working inside an image's root directory as the build's chroot does: the host's /proc, /sys
// and /dev mounted in, the host's resolver (the image's own points at the VM network), and no
// service started by a package's maintainer script. Every command runs in its own PID
// namespace, so nothing it starts outlives it and keeps the mounts busy.

export interface Entered {
  root: string;
  /** Undoes `enterRoot` (the root itself stays mounted). */
  leave(): Promise<void>;
}

const policyRcd = 'usr/sbin/policy-rc.d';

export async function enterRoot(root: string): Promise<Entered> {
  const mounted: string[] = [];
  let ownPolicy = false;
  let resolvBefore: SavedFile | undefined;
  const leave = async () => {
    if (ownPolicy) rmSync(join(root, policyRcd), { force: true });
    ownPolicy = false;
    if (resolvBefore) restoreFile(join(root, 'etc', 'resolv.conf'), resolvBefore);
    resolvBefore = undefined;
    for (const m of mounted.reverse()) await unmountAll(m);
    mounted.length = 0;
  };
  try {
    for (const [target, args] of [
      ['proc', ['-t', 'proc', 'proc']],
      ['sys', ['-t', 'sysfs', 'sysfs']],
      ['dev', ['--bind', '/dev']],
      ['dev/pts', ['--bind', '/dev/pts']],
    ] as const) {
      const at = join(root, target);
      mkdirSync(at, { recursive: true });
      await runChecked('mount', [...args, at], { code: ErrorCode.IMAGE_BUILD_FAILED, what: `mounting /${target} into the image` });
      mounted.push(at);
    }
    // The host's resolver while we work; the image's own is put back on leaving (it points at
    // the machines' network, which does not exist here).
    if (existsSync(join(root, 'etc'))) {
      const resolv = join(root, 'etc', 'resolv.conf');
      resolvBefore = saveFile(resolv);
      rmSync(resolv, { force: true });
      writeFileSync(resolv, readFileSync('/etc/resolv.conf'));
    }
    if (existsSync(join(root, 'usr', 'sbin')) && !existsSync(join(root, policyRcd))) {
      writeFileSync(join(root, policyRcd), '#!/bin/sh\n# mayfly: no service starts while an image is changed\nexit 101\n', { mode: 0o755 });
      ownPolicy = true;
    }
    return { root, leave };
  } catch (e) {
    await leave();
    throw e;
  }
}

type SavedFile = { kind: 'none' } | { kind: 'link'; target: string } | { kind: 'file'; content: Buffer; mode: number };

function saveFile(path: string): SavedFile {
  try {
    const st = lstatSync(path);
    if (st.isSymbolicLink()) return { kind: 'link', target: readlinkSync(path) };
    return { kind: 'file', content: readFileSync(path), mode: st.mode & 0o7777 };
  } catch {
    return { kind: 'none' };
  }
}

function restoreFile(path: string, saved: SavedFile): void {
  rmSync(path, { force: true });
  if (saved.kind === 'link') symlinkSync(saved.target, path);
  else if (saved.kind === 'file') writeFileSync(path, saved.content, { mode: saved.mode });
}

export const chrootEnv: NodeJS.ProcessEnv = {
  PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
  HOME: '/root',
  LANG: 'C.UTF-8',
  DEBIAN_FRONTEND: 'noninteractive',
};

/**
 * argv for running `cmd` chrooted into `root`, alone in a new PID namespace that dies with
 * mayfly: setpriv's parent-death signal ends unshare when mayfly is killed (even with -9), and
 * unshare's --kill-child then ends the namespace, so nothing keeps writing into the copy.
 */
export function chrootArgv(root: string, cmd: readonly string[]): string[] {
  return ['setpriv', '--pdeathsig', 'KILL', 'unshare', '--pid', '--fork', '--kill-child', `--mount-proc=${join(root, 'proc')}`, 'chroot', root, ...cmd];
}

/** Runs a command in the root, collecting its output (and streaming it to `onLine`). */
export function runInRoot(root: string, cmd: readonly string[], opts: { signal?: AbortSignal; onLine?: (l: string) => void; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  const [bin, ...args] = chrootArgv(root, cmd);
  return run(bin!, args, { env: { ...chrootEnv, ...opts.env }, signal: opts.signal, onLine: opts.onLine, processGroup: true });
}

/** Runs a shell script (`sh -e`) in the root; throws with its output's tail when it fails. */
export async function runScriptInRoot(root: string, script: string, what: string, opts: { signal?: AbortSignal; onLine?: (l: string) => void } = {}): Promise<void> {
  const file = `tmp/mayfly-command-${process.pid}.sh`;
  mkdirSync(join(root, 'tmp'), { recursive: true });
  writeFileSync(join(root, file), `set -e\n${script}\n`);
  try {
    const r = await runInRoot(root, ['/bin/sh', `/${file}`], opts);
    opts.signal?.throwIfAborted();
    if (r.code !== 0) {
      const tail = lastLines(r.stdout + r.stderr, 12);
      throw new MayflyError(ErrorCode.IMAGE_BUILD_FAILED, `${what} failed (exit ${r.code})${tail ? `:\n${tail}` : ''}`);
    }
  } finally {
    rmSync(join(root, file), { force: true });
  }
}

/**
 * Runs a command in the root with the terminal (or the caller's stdio) attached, as
 * `image shell` does. Resolves with its exit code (128+N for signal N).
 */
export function interactiveInRoot(root: string, cmd: readonly string[], signal?: AbortSignal): Promise<number> {
  const [bin, ...args] = chrootArgv(root, cmd);
  const env: NodeJS.ProcessEnv = { ...chrootEnv, TERM: process.env.TERM ?? 'dumb' };
  delete env.DEBIAN_FRONTEND;
  return new Promise((resolve, reject) => {
    const child = spawn(bin!, args, { stdio: 'inherit', env });
    const onAbort = () => child.kill('SIGTERM');
    signal?.addEventListener('abort', onAbort, { once: true });
    child.on('error', reject);
    child.on('close', (code, sig) => {
      signal?.removeEventListener('abort', onAbort);
      resolve(code ?? 128 + (sig ? signalNumber(sig) : 0));
    });
  });
}
