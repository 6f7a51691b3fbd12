import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, linkSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { defaultConfig } from '../../src/config/index.ts';
import { silentLogger } from '../../src/log.ts';
import { Engine } from '../../src/pool/index.ts';
import { ImageStore, type Image } from '../../src/images/store.ts';

// Shared by the integration tests: one fresh data dir per test run (scripts/test.sh makes it
// and removes it), one image built into it by whichever test file needs it first.

export const projectRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const mayflyBin = join(projectRoot, 'bin', 'mayfly');

let ownDataDir: string | undefined;

export function testDataDir(): string {
  const shared = process.env.MAYFLY_TEST_DATA_DIR;
  if (shared) return shared;
  if (!ownDataDir) {
    // Run by hand without scripts/test.sh: a private data dir, removed when this process ends.
    ownDataDir = mkdtempSync('/var/tmp/mayfly-test-own.');
    const dir = ownDataDir;
    process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
  }
  return ownDataDir;
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function startMayfly(args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): ChildProcess {
  return spawn(mayflyBin, ['--data-dir', testDataDir(), ...args], {
    cwd: opts.cwd ?? projectRoot,
    env: { ...process.env, ...opts.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
}

export function collect(child: ChildProcess): Promise<CliResult> {
  const out: Buffer[] = [];
  const err: Buffer[] = [];
  child.stdout!.on('data', (c: Buffer) => out.push(c));
  child.stderr!.on('data', (c: Buffer) => err.push(c));
  return new Promise((resolve) =>
    child.on('close', (code, signal) =>
      resolve({
        code: code ?? (signal ? 128 : 1),
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
      }),
    ),
  );
}

export function mayfly(args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Promise<CliResult> {
  return collect(startMayfly(args, opts));
}

/** Builds an image (the default one unless named) into the test data dir unless an earlier test file did. */
export async function ensureImage(name = 'debian-12'): Promise<void> {
  const dir = testDataDir();
  const built = () => new ImageStore(dir).versions(name).length > 0;
  if (built()) return;
  const lock = join(dir, `.image-build-lock-${name}`);
  mkdirSync(dir, { recursive: true });
  for (;;) {
    try {
      mkdirSync(lock);
      break;
    } catch {
      await sleep(1000);
      if (built()) return;
    }
  }
  try {
    const r = await mayfly(['image', 'build', name]);
    if (r.code !== 0) throw new Error(`building the test image failed (exit ${r.code}):\n${r.stderr}`);
  } finally {
    rmSync(lock, { recursive: true, force: true });
  }
}

/**
 * A second, bootable image without a second build: the default image's files published again
 * under `name` (hard links; machines only read them), with a content id ending in `idDigit`.
 */
export function publishImageCopy(name: string, idDigit: string, over: Partial<Pick<Image, 'source'>> = {}): Image {
  const store = new ImageStore(testDataDir());
  const base = store.resolve('debian-12');
  mkdirSync(join(store.root, '.tmp'), { recursive: true });
  const prep = mkdtempSync(join(store.root, '.tmp', `${name}-`));
  for (const f of [base.disk, base.kernel!, base.initrd!]) linkSync(join(base.dir, f), join(prep, f));
  const { dir: _d, diskPath: _p, kernelPath: _k, initrdPath: _i, sizeBytes: _s, version: _v, ...manifest } = base;
  return store.publish(prep, { ...manifest, name, id: `sha256:${'0'.repeat(63)}${idDigit}`, ...over });
}

export function testEngine(): Engine {
  return new Engine({ dataDir: testDataDir(), config: defaultConfig(), log: silentLogger });
}

/** Processes whose command line mentions `needle` (e.g. an instance dir), to prove nothing is left. */
export function processesMentioning(needle: string): number[] {
  const pids: number[] = [];
  for (const p of readdirSync('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    try {
      const stat = readFileSync(`/proc/${p}/stat`, 'utf8');
      if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z')) continue;
      if (readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(needle)) pids.push(Number(p));
    } catch {
      // the process ended while we looked
    }
  }
  return pids.filter((p) => p !== process.pid);
}

export function instanceDirs(): string[] {
  const dir = join(testDataDir(), 'instances');
  return existsSync(dir) ? readdirSync(dir) : [];
}

/** Waits until `pred` holds, polling; fails with `what` after `ms`. */
export async function waitFor(pred: () => boolean, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(100);
  }
}
