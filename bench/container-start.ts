// Benchmark: time to run `true` in a fresh container, mayfly (each directory storage backend)
// against `systemd-nspawn --ephemeral` on ext4 (copies the tree) and on btrfs (snapshots it).
//
//   node bench/container-start.ts [--runs 5] [--data-dir DIR]      (as root)
//
// The debian-12-container image is built into DIR unless it has one (not measured). Then btrfs,
// xfs (reflink=1) and ext4 filesystems are made in sparse loop images under /var/tmp, each with
// a mayfly data dir holding a copy of the image (a subvolume on btrfs). For each filesystem and
// backend that works there, mayfly (in-process, the engine a `mayfly run` uses) makes a clone,
// starts the container, runs `true` in it and removes everything; the baselines run
// `systemd-nspawn --ephemeral -D ROOT true` on the ext4 and btrfs copies. Measured: mayfly to
// `true`'s exit status (what a job waits for), and its whole cycle including the removal;
// nspawn's whole command (its removal of the ephemeral copy included). Runs are interleaved.
// One more row is mayfly's fastest path as deployed: mayflyd's pool (in-process here) keeps one
// container started on btrfs; a lease takes it, runs `true`, releases it (destroyed; the pool
// starts the next one before the next run, not measured).
// Everything is unmounted and removed at the end, also when a step fails or on a signal.

import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { ConfigSchema, defaultConfig } from '../src/config/index.ts';
import type { STORAGE_BACKENDS } from '../src/config/schema.ts';
import { ImageStore } from '../src/images/store.ts';
import { silentLogger } from '../src/log.ts';
import { Daemon } from '../src/daemon/service.ts';
import { Engine } from '../src/pool/index.ts';
import { probeStorage } from '../src/storage/index.ts';
import { findOnPath } from '../src/util/exec.ts';
import { fail, fmt, loopFilesystems, mayflyBin, summary } from './lib.ts';

const IMAGE = 'debian-12-container';
const { values } = parseArgs({ options: { runs: { type: 'string', default: '5' }, 'data-dir': { type: 'string' } } });
const runs = Number(values.runs);
if (!Number.isInteger(runs) || runs < 1) fail('--runs must be a whole number of 1 or more');
if (process.getuid?.() !== 0) fail('run it as root (containers, loop filesystems)');
for (const t of ['systemd-nspawn', 'mkfs.btrfs', 'mkfs.xfs', 'mkfs.ext4']) {
  if (!findOnPath(t)) fail(`${t} is missing (apt-get install systemd-container btrfs-progs xfsprogs)`);
}

const ownSource = values['data-dir'] === undefined;
const sourceDir = values['data-dir'] ?? mkdtempSync('/var/tmp/mayfly-bench-ct-src-');
const work = mkdtempSync('/var/tmp/mayfly-bench-ct-');

const loops = loopFilesystems(work);

function cleanup(): void {
  loops.cleanup();
  if (ownSource) rmSync(sourceDir, { recursive: true, force: true });
}
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.once(sig, () => {
    cleanup();
    process.exit(128 + ({ SIGINT: 2, SIGTERM: 15, SIGHUP: 1 } as const)[sig]);
  });
}

function makeFs(name: string, mkfs: string[]): string {
  return loops.make(name, mkfs, '2G');
}

/** A data dir on `mnt` holding a copy of the source image (its root a subvolume on btrfs). */
async function copyImage(mnt: string): Promise<{ dataDir: string; root: string }> {
  const dataDir = join(mnt, 'data');
  const img = await new ImageStore(dataDir).importCopy(new ImageStore(sourceDir).resolve(IMAGE));
  return { dataDir, root: img.diskPath };
}

function ms(fromNs: bigint): number {
  return Number(process.hrtime.bigint() - fromNs) / 1e6;
}

type Backend = Exclude<(typeof STORAGE_BACKENDS)[number], 'auto'>;

interface MayflyRow {
  fs: string;
  backend: Backend;
  engine: Engine;
  toTrue: number[];
  cycle: number[];
}

interface BaselineRow {
  fs: string;
  root: string;
  times: number[];
}

async function mayflyOnce(row: MayflyRow): Promise<void> {
  const t0 = process.hrtime.bigint();
  const lease = await row.engine.lease({ image: IMAGE, owner: 'bench: container-start' });
  try {
    const r = await lease.machine.guest.exec(['true']);
    if (r.exitCode !== 0) throw new Error(`true exited with ${r.exitCode}`);
    row.toTrue.push(ms(t0));
  } finally {
    await lease.release();
  }
  row.cycle.push(ms(t0));
}

interface PoolRow {
  daemon: Daemon;
  toTrue: number[];
  cycle: number[];
}

async function poolOnce(row: PoolRow): Promise<void> {
  const idle = () => row.daemon.pools.status()[0]!.idle > 0;
  for (let i = 0; !idle(); i++) {
    if (i > 3000) throw new Error('the pool made no idle container within 30 s');
    await row.daemon.reconcileNow();
    await new Promise((r) => setTimeout(r, 10));
  }
  const t0 = process.hrtime.bigint();
  const lease = await row.daemon.pools.acquire({ pool: 'bench', timeoutMs: 30_000 });
  const r = await lease.machine.guest.exec(['true']);
  if (r.exitCode !== 0) throw new Error(`true exited with ${r.exitCode}`);
  row.toTrue.push(ms(t0));
  await row.daemon.pools.release(lease.id);
  row.cycle.push(ms(t0));
}

function baselineOnce(row: BaselineRow): void {
  const t0 = process.hrtime.bigint();
  const r = spawnSync('systemd-nspawn', ['-q', '--keep-unit', '--register=no', '--ephemeral', '-D', row.root, '/bin/true'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`systemd-nspawn --ephemeral failed: ${r.stderr}`);
  row.times.push(ms(t0));
}

try {
  if (new ImageStore(sourceDir).versions(IMAGE).length === 0) {
    console.log(`building ${IMAGE} first (not measured)…`);
    if (spawnSync(mayflyBin, ['--data-dir', sourceDir, 'image', 'build', IMAGE], { stdio: 'inherit' }).status !== 0) fail('the image build failed');
  }
  console.log('mayfly container start benchmark: a fresh container, `true` in it, removed again');
  console.log(`  ${runs} runs each, interleaved; mayfly in-process (the engine behind \`mayfly run\`), baseline systemd-nspawn --ephemeral`);
  const filesystems = [
    { fs: 'btrfs', mnt: makeFs('btrfs', ['mkfs.btrfs', '-q', '-f']) },
    { fs: 'xfs', mnt: makeFs('xfs', ['mkfs.xfs', '-q', '-f', '-m', 'reflink=1']) },
    { fs: 'ext4', mnt: makeFs('ext4', ['mkfs.ext4', '-q', '-F']) },
  ];
  const rows: MayflyRow[] = [];
  const baselines: BaselineRow[] = [];
  for (const { fs, mnt } of filesystems) {
    const { dataDir, root } = await copyImage(mnt);
    if (fs !== 'xfs') baselines.push({ fs, root, times: [] });
    mkdirSync(join(dataDir, 'instances'), { recursive: true });
    const report = await probeStorage(join(dataDir, 'instances'), 'dir');
    for (const p of report.probes) {
      if (!p.usable) continue;
      const config = defaultConfig();
      config.storage.backend = p.name as Backend;
      const row: MayflyRow = { fs, backend: p.name as Backend, engine: new Engine({ dataDir, config, log: silentLogger }), toTrue: [], cycle: [] };
      await mayflyOnce(row); // warm-up: the backend probe and first-use costs are not measured
      row.toTrue.length = 0;
      row.cycle.length = 0;
      rows.push(row);
    }
  }
  const btrfsData = join(filesystems[0]!.mnt, 'data');
  const poolConfig = ConfigSchema.parse({
    daemon: { socket: join(work, 'unused.sock') },
    pool: [{ name: 'bench', image: IMAGE, size: '2cpu1024mb4gb', idle_count: 1, max_instances: 2 }],
  });
  const pool: PoolRow = { daemon: new Daemon({ dataDir: btrfsData, config: poolConfig, log: silentLogger }), toTrue: [], cycle: [] };
  await poolOnce(pool);
  pool.toTrue.length = 0;
  pool.cycle.length = 0;
  for (const b of baselines) baselineOnce(b); // warm-up, as for mayfly
  for (const b of baselines) b.times.length = 0;
  for (let run = 0; run < runs; run++) {
    for (const b of baselines) baselineOnce(b);
    for (const row of rows) await mayflyOnce(row);
    await poolOnce(pool);
  }
  const base = Object.fromEntries(baselines.map((b) => [b.fs, summary(b.times).median]));
  console.log(`\n${'filesystem'.padEnd(12)}${'how'.padEnd(30)}   to true: min     median        max   whole cycle   vs --ephemeral ext4 / btrfs`);
  for (const b of baselines) {
    const s = summary(b.times);
    console.log(`${b.fs.padEnd(12)}${'systemd-nspawn --ephemeral'.padEnd(30)}${fmt(s.min)}  ${fmt(s.median)}  ${fmt(s.max)}     ${fmt(s.median)}   (baseline)`);
  }
  for (const r of rows) {
    const s = summary(r.toTrue);
    const c = summary(r.cycle);
    const ratios = `${(base.ext4! / s.median).toFixed(1)}x / ${(base.btrfs! / s.median).toFixed(2)}x`;
    console.log(`${r.fs.padEnd(12)}${`mayfly, ${r.backend}`.padEnd(30)}${fmt(s.min)}  ${fmt(s.median)}  ${fmt(s.max)}     ${fmt(c.median)}   ${ratios}`);
  }
  {
    const s = summary(pool.toTrue);
    const c = summary(pool.cycle);
    const ratios = `${(base.ext4! / s.median).toFixed(1)}x / ${(base.btrfs! / s.median).toFixed(2)}x`;
    console.log(`${'btrfs'.padEnd(12)}${'mayfly, warm pool (mayflyd)'.padEnd(30)}${fmt(s.min)}  ${fmt(s.median)}  ${fmt(s.max)}     ${fmt(c.median)}   ${ratios}`);
  }
  const best = rows.reduce((a, b) => (summary(a.toTrue).median <= summary(b.toTrue).median ? a : b));
  const bestMs = summary(best.toTrue).median;
  console.log(
    `\nfastest cold mayfly path: ${best.backend} on ${best.fs}, ${fmt(bestMs).trim()} to true: ` +
      `${(base.ext4! / bestMs).toFixed(1)}x faster than --ephemeral on ext4, ${(base.btrfs! / bestMs).toFixed(2)}x --ephemeral on btrfs ` +
      `(whole cycle with removal: ${fmt(summary(best.cycle).median).trim()})`,
  );
  const poolMs = summary(pool.toTrue).median;
  console.log(
    `warm pool: ${fmt(poolMs).trim()} to true: ${(base.ext4! / poolMs).toFixed(1)}x faster than --ephemeral on ext4, ${(base.btrfs! / poolMs).toFixed(2)}x --ephemeral on btrfs`,
  );
  await pool.daemon.stop();
  for (const r of rows) r.engine.close();
} finally {
  cleanup();
}
