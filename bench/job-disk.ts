// Benchmark: what job data protection costs at a machine's start. A new machine (restored from
// the snapshot template) to its first command's output in /builds, per job_disk mode.
//
//   node bench/job-disk.ts [--runs 3] [--data-dir DIR]      (as root)
//
// Compares, in one run (interleaved, one machine at a time):
//   baseline   job_disk = "plain": /builds on the machine's root disk
//   encrypted  a disk hot-plugged over QMP, opened with dm-crypt (key from the guest's RNG), mkfs.ext4, mounted
//   tmpfs      a tmpfs mounted on /builds
// A pool pays this before a machine counts as idle, so a lease from a warm pool does not.

import { spawnSync } from 'node:child_process';
import { defaultConfig } from '../src/config/index.ts';
import { silentLogger } from '../src/log.ts';
import { Engine, type JobDiskMode } from '../src/pool/index.ts';
import { fmt, leaseToFirstOutput, mayflyBin, printComparison, vmBench } from './lib.ts';

const bench = vmBench(3);
const { runs, dataDir } = bench;
const size = { cpus: 2, memoryMiB: 1024, diskGiB: 4 };

function firstOutput(engine: Engine, jobDisk: JobDiskMode): Promise<number> {
  return leaseToFirstOutput(engine, { owner: 'bench', size, start: 'restore', jobDisk }, ['sh', '-c', 'echo first > /builds/f && cat /builds/f'], (m) =>
    m.jobDisk !== jobDisk ? `asked for ${jobDisk}, got ${m.jobDisk}` : undefined,
  );
}

const engine = new Engine({ dataDir, config: defaultConfig(), log: silentLogger });
try {
  bench.ensureImage();
  const image = engine.images.resolve('debian-12');
  const t = await engine.templates.ensure(image, size);
  console.log(`template ready (made in ${t.meta.seconds} s, not measured)`);
  const times: Record<JobDiskMode, number[]> = { plain: [], encrypted: [], tmpfs: [] };
  for (let i = 1; i <= runs; i++) {
    for (const mode of ['plain', 'encrypted', 'tmpfs'] as const) times[mode].push(await firstOutput(engine, mode));
    console.log(`run ${i}/${runs}: plain ${fmt(times.plain.at(-1)!)}  encrypted ${fmt(times.encrypted.at(-1)!)}  tmpfs ${fmt(times.tmpfs.at(-1)!)}`);
  }
  printComparison('new machine to first output in /builds: encrypted vs plain', times.encrypted, times.plain, { mayfly: 'job_disk encrypted', baseline: 'job_disk plain' });
  printComparison('new machine to first output in /builds: tmpfs vs plain', times.tmpfs, times.plain, { mayfly: 'job_disk tmpfs', baseline: 'job_disk plain' });
} finally {
  engine.close();
  spawnSync(mayflyBin, ['--data-dir', dataDir, 'rm', '--all'], { stdio: 'ignore' });
  bench.cleanup();
}
