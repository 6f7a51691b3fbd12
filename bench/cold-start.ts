// Benchmark: a fresh machine from nothing to its first command's output, cold boot vs restore
// from a snapshot template.
//
//   node bench/cold-start.ts [--runs 5] [--data-dir DIR]      (as root)
//
// Compares, in one run (interleaved, one machine at a time):
//   mayfly    start = "restore": a new overlay on the template's frozen disk, its memory state
//             loaded, the clone's identity handed over, then `echo first` over SSH
//   baseline  start = "boot": the same machine booted (what mayfly did before snapshots)
// The template is made first and not measured (its time is printed).

import { spawnSync } from 'node:child_process';
import { defaultConfig } from '../src/config/index.ts';
import { silentLogger } from '../src/log.ts';
import { Engine, type StartMode } from '../src/pool/index.ts';
import { fmt, leaseToFirstOutput, mayflyBin, printComparison, vmBench } from './lib.ts';

const bench = vmBench(5);
const { runs, dataDir } = bench;
const size = { cpus: 2, memoryMiB: 1024, diskGiB: 4 };

function firstOutput(engine: Engine, start: StartMode): Promise<number> {
  return leaseToFirstOutput(engine, { owner: 'bench', size, start }, ['echo', 'first'], (m) =>
    m.restored !== (start === 'restore') ? `asked to ${start}, but the machine was ${m.restored ? 'restored' : 'booted'}` : undefined,
  );
}

const engine = new Engine({ dataDir, config: defaultConfig(), log: silentLogger });
try {
  bench.ensureImage();
  const image = engine.images.resolve('debian-12');
  const t = await engine.templates.ensure(image, size);
  console.log(`template: made in ${t.meta.seconds} s (once per image version and size), memory state ${(t.meta.stateBytes / 2 ** 20).toFixed(0)} MiB`);
  const restore: number[] = [];
  const boot: number[] = [];
  for (let i = 1; i <= runs; i++) {
    restore.push(await firstOutput(engine, 'restore'));
    boot.push(await firstOutput(engine, 'boot'));
    console.log(`run ${i}/${runs}: restore ${fmt(restore.at(-1)!)}  boot ${fmt(boot.at(-1)!)}`);
  }
  printComparison('new machine to first output', restore, boot, { mayfly: 'restore (snapshot)', baseline: 'cold boot' });
} finally {
  engine.close();
  spawnSync(mayflyBin, ['--data-dir', dataDir, 'rm', '--all'], { stdio: 'ignore' });
  bench.cleanup();
}
