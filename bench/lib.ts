import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { ImageStore } from '../src/images/store.ts';
import type { Engine, LeaseRequest, Machine } from '../src/pool/index.ts';

// Shared by the benchmarks: summaries and printing. Each bench measures a baseline and mayfly
// in the same run and prints the ratio of medians.

export interface Summary {
  min: number;
  median: number;
  max: number;
}

export function summary(ms: number[]): Summary {
  const s = [...ms].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  const median = s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
  return { min: s[0]!, median, max: s.at(-1)! };
}

export function fmt(ms: number): string {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s`.padStart(9) : `${ms.toFixed(1)} ms`.padStart(9);
}

export function printComparison(title: string, mayfly: number[], baseline: number[], labels: { mayfly: string; baseline: string }): void {
  const m = summary(mayfly);
  const b = summary(baseline);
  const width = Math.max(labels.mayfly.length, labels.baseline.length) + 2;
  console.log(`\n${title}`);
  console.log(`${''.padEnd(width)}      min     median        max`);
  console.log(`${labels.mayfly.padEnd(width)}${fmt(m.min)}  ${fmt(m.median)}  ${fmt(m.max)}`);
  console.log(`${labels.baseline.padEnd(width)}${fmt(b.min)}  ${fmt(b.median)}  ${fmt(b.max)}`);
  console.log(`ratio of medians (baseline / mayfly): ${(b.median / m.median).toFixed(2)}x`);
}

export function fail(message: string): never {
  console.error(`bench: ${message}`);
  process.exit(2);
}

export const mayflyBin = join(dirname(fileURLToPath(import.meta.url)), '..', 'bin', 'mayfly');

export interface VmBench {
  runs: number;
  dataDir: string;
  /** Builds the default image into the data dir unless it has one (not measured). */
  ensureImage(): void;
  /** Removes the data dir when the bench made it. */
  cleanup(): void;
}

/** The options and data dir every VM benchmark takes: `--runs N` and `--data-dir DIR`. */
export function vmBench(defaultRuns: number): VmBench {
  const { values } = parseArgs({ options: { runs: { type: 'string', default: String(defaultRuns) }, 'data-dir': { type: 'string' } } });
  const runs = Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1) fail('--runs must be a whole number of 1 or more');
  if (process.getuid?.() !== 0) fail('run it as root (it boots VMs)');
  const own = values['data-dir'] === undefined;
  const dataDir = values['data-dir'] ?? mkdtempSync('/var/tmp/mayfly-bench-');
  return {
    runs,
    dataDir,
    ensureImage() {
      if (new ImageStore(dataDir).versions('debian-12').length > 0) return;
      console.log('building the default image first (not measured)…');
      if (spawnSync(mayflyBin, ['--data-dir', dataDir, 'image', 'build', 'debian-12'], { stdio: 'inherit' }).status !== 0) {
        fail('the image build failed');
      }
    },
    cleanup() {
      if (own) rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/**
 * Scratch filesystems in sparse loop images under `work` (btrfs, xfs with reflink, ext4, …),
 * and a cleanup that unmounts them, detaches their loop devices and removes `work`.
 */
export function loopFilesystems(work: string): { make(name: string, mkfs: string[], size: string): string; cleanup(): void } {
  return {
    make(name, mkfs, size) {
      const img = join(work, `${name}.img`);
      const mnt = join(work, name);
      execFileSync('truncate', ['-s', size, img]);
      execFileSync(mkfs[0]!, [...mkfs.slice(1), img], { stdio: 'ignore' });
      mkdirSync(mnt);
      execFileSync('mount', ['-o', 'loop', img, mnt]);
      return mnt;
    },
    cleanup() {
      const mounts = readFileSync('/proc/self/mountinfo', 'utf8').split('\n').filter(Boolean).map((l) => l.split(' ')[4]!);
      for (const m of mounts.filter((p) => p.startsWith(work + '/')).sort((a, b) => b.length - a.length)) {
        if (spawnSync('umount', [m]).status !== 0) spawnSync('umount', ['--lazy', m]);
      }
      for (const l of spawnSync('losetup', ['-a'], { encoding: 'utf8' }).stdout.split('\n').filter((l) => l.includes(work))) {
        spawnSync('losetup', ['-d', l.split(':')[0]!]);
      }
      rmSync(work, { recursive: true, force: true });
    },
  };
}

/**
 * Milliseconds from a lease request to the first output of `argv` in the new machine, which is
 * then released. `check` refuses a machine that is not what the run asked for.
 */
export async function leaseToFirstOutput(engine: Engine, req: LeaseRequest, argv: string[], check: (m: Machine) => string | undefined): Promise<number> {
  const t0 = performance.now();
  const lease = await engine.lease(req);
  let first: number | undefined;
  try {
    const wrong = check(lease.machine);
    if (wrong) throw new Error(wrong);
    await lease.machine.guest.exec(argv, { stdout: () => (first ??= performance.now() - t0) });
  } finally {
    await lease.release();
  }
  if (first === undefined) throw new Error('no output');
  return first;
}
