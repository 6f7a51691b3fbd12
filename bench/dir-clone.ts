// Benchmark: how long each directory storage backend takes to give a container its own root.
//
//   node bench/dir-clone.ts [--runs 5] [--files 10000] [--mib 250]      (as root)
//
// Makes a btrfs, an xfs (reflink=1) and an ext4 in sparse loop images under /var/tmp, puts the
// same synthetic root tree in each (--files files in 25-file dirs, --mib MiB in all: mostly small
// files and one 1 MiB file in 50, random data), then clones it with every backend that works on
// that filesystem and removes the clone again. Each clone is followed by `sync -f` on its
// filesystem, so a copy pays for its writes. The baseline is `copy` (cp -a) on ext4: what a
// host without btrfs, xfs or root gets. Everything is unmounted and removed at the end, also when
// a step fails or the bench is interrupted.

import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { DIR_BACKENDS, createBaseDir, probeStorage, type StorageBackend } from '../src/storage/index.ts';
import { findOnPath } from '../src/util/exec.ts';
import { fail, fmt, loopFilesystems, summary } from './lib.ts';

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '5' },
    files: { type: 'string', default: '10000' },
    mib: { type: 'string', default: '250' },
  },
});
const runs = Number(values.runs);
const files = Number(values.files);
const mib = Number(values.mib);
if (!Number.isInteger(runs) || runs < 1) fail('--runs must be a whole number of 1 or more');
if (!Number.isInteger(files) || files < 50) fail('--files must be a whole number of 50 or more');
if (!Number.isInteger(mib) || mib < 1 || mib > 4096) fail('--mib must be a whole number from 1 to 4096');
if (process.getuid?.() !== 0) fail('run it as root (it mounts loop filesystems)');
for (const t of ['mkfs.btrfs', 'mkfs.xfs', 'mkfs.ext4', 'btrfs']) if (!findOnPath(t)) fail(`${t} is missing (apt-get install btrfs-progs xfsprogs)`);

const work = mkdtempSync('/var/tmp/mayfly-bench-dir-clone-');
const imgMiB = Math.max(1024, mib * 3 + 512); // base + one clone + metadata, with room to spare

const loops = loopFilesystems(work);

function cleanup(): void {
  loops.cleanup();
}
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.once(sig, () => {
    cleanup();
    process.exit(128 + ({ SIGINT: 2, SIGTERM: 15, SIGHUP: 1 } as const)[sig]);
  });
}

function makeFs(name: string, mkfs: string[]): string {
  return loops.make(name, mkfs, `${imgMiB}M`);
}

/** The synthetic root: `files` files, one in 50 of 1 MiB, the rest sharing what is left of `mib`. */
function writeTree(root: string): void {
  const big = Math.floor(files / 50);
  const smallBytes = Math.max(512, Math.floor((mib * 1024 * 1024 - big * 1024 * 1024) / (files - big)));
  const pool = randomBytes(1024 * 1024 + smallBytes * 2);
  for (let i = 0; i < files; i++) {
    const dir = join(root, `d${Math.floor(i / 25)}`);
    if (i % 25 === 0) mkdirSync(dir);
    const size = i % 50 === 0 ? 1024 * 1024 : smallBytes;
    const off = (i * 7919) % (pool.length - size);
    writeFileSync(join(dir, `f${i}`), pool.subarray(off, off + size));
  }
}

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t = performance.now();
  await fn();
  return performance.now() - t;
}

interface Row {
  fs: string;
  backend: StorageBackend;
  mnt: string;
  base: string;
  clone: number[];
  remove: number[];
}

try {
  console.log('mayfly directory clone benchmark: time to give one container its own root, then remove it');
  console.log(`  tree: ${files} files, ${mib} MiB (random data), the same on each filesystem; ${runs} runs each, interleaved`);
  console.log(`  each clone is followed by sync -f on its filesystem; baseline: copy (cp -a) on ext4`);
  const filesystems = [
    { fs: 'btrfs', mnt: makeFs('btrfs', ['mkfs.btrfs', '-q', '-f']) },
    { fs: 'xfs', mnt: makeFs('xfs', ['mkfs.xfs', '-q', '-f', '-m', 'reflink=1']) },
    { fs: 'ext4', mnt: makeFs('ext4', ['mkfs.ext4', '-q', '-F']) },
  ];
  const rows: Row[] = [];
  for (const { fs, mnt } of filesystems) {
    const base = (await createBaseDir(join(mnt, 'base'))).path;
    writeTree(base);
    execFileSync('sync', ['-f', base]);
    const report = await probeStorage(mnt, 'dir');
    for (const b of DIR_BACKENDS) {
      if (report.probes.find((p) => p.name === b.name)?.usable) rows.push({ fs, backend: b, mnt, base, clone: [], remove: [] });
    }
  }
  for (let run = 0; run < runs; run++) {
    for (const row of rows) {
      const instanceDir = join(row.mnt, 'instance');
      mkdirSync(instanceDir);
      let clonePath = '';
      row.clone.push(
        await timed(async () => {
          clonePath = (await row.backend.clone({ base: row.base, instanceDir })).path;
          execFileSync('sync', ['-f', instanceDir]);
        }),
      );
      row.remove.push(await timed(() => row.backend.remove({ backend: row.backend.name, path: clonePath })));
      rmSync(instanceDir, { recursive: true });
      execFileSync('sync', ['-f', row.mnt]); // the next run starts without this one's writeback
    }
  }
  const baseline = summary(rows.find((r) => r.fs === 'ext4' && r.backend.name === 'copy')!.clone).median;
  console.log(`\n${'filesystem'.padEnd(12)}${'backend'.padEnd(16)}   clone min     median        max     remove   vs copy on ext4`);
  for (const r of rows) {
    const c = summary(r.clone);
    const rm = summary(r.remove);
    console.log(
      `${r.fs.padEnd(12)}${r.backend.name.padEnd(16)}${fmt(c.min)}  ${fmt(c.median)}  ${fmt(c.max)}  ${fmt(rm.median)}   ${(baseline / c.median).toFixed(1)}x`,
    );
  }
} finally {
  cleanup();
}
