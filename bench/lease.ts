// Benchmark: from asking for a machine to the first output of a command in it.
//
//   node bench/lease.ts [--runs 5] [--data-dir DIR]      (as root)
//
// Compares, in one run:
//   mayfly    warm pool: mayflyd keeps one idle machine (idle_count = 1); a lease request to the
//             daemon's socket, then `echo first` through the daemon's open guest connection
//   baseline  cold boot: the same request served by booting a fresh machine (what `mayfly run`
//             does without a pool)
// Before each warm run the bench waits until the pool has refilled, so each lease is warm.
// It also prints mayflyd's resident memory with 0 and with 4 idle machines.
// Without --data-dir the default image is built first into a temporary data dir (not measured).

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { defaultConfig } from '../src/config/index.ts';
import { DaemonClient } from '../src/daemon/client.ts';
import { silentLogger } from '../src/log.ts';
import { Engine } from '../src/pool/index.ts';
import { fmt, mayflyBin, printComparison, vmBench } from './lib.ts';

const bench = vmBench(5);
const { runs, dataDir } = bench;
const work = mkdtempSync('/var/tmp/mayfly-bench-lease-');
const socket = join(work, 'mayfly.sock');
let daemon: ChildProcess | undefined;

function writeConfig(idle: number): string {
  const file = join(work, `config-${idle}.toml`);
  writeFileSync(
    file,
    `[daemon]\nsocket = "${socket}"\nreconcile_interval = 1\n\n[capacity]\ncpu_overcommit = 8\n\n` +
      `[[pool]]\nname = "bench"\nimage = "debian-12"\nsize = "2cpu1024mb4gb"\nidle_count = ${idle}\nmax_instances = ${Math.max(idle, 1) + 1}\nmax_growth_rate = 2\n`,
  );
  return file;
}

async function startDaemon(idle: number): Promise<DaemonClient> {
  daemon = spawn(mayflyBin, ['--data-dir', dataDir, '--config', writeConfig(idle), 'daemon'], { stdio: 'ignore' });
  for (let i = 0; i < 100; i++) {
    const c = await DaemonClient.find(socket);
    if (c) return c;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error('mayflyd did not start');
}

async function stopDaemon(): Promise<void> {
  if (!daemon || daemon.exitCode !== null) return;
  daemon.kill('SIGTERM');
  await new Promise((r) => daemon!.once('close', r));
}

async function waitIdle(c: DaemonClient, n: number): Promise<void> {
  for (;;) {
    const [p] = await c.call<{ idle: number }[]>('GET', '/v1/pools');
    if (p && p.idle >= n) return;
    await new Promise((r) => setTimeout(r, 200));
  }
}

function rssMiB(pid: number): number {
  const kb = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);
  return kb / 1024;
}

async function warmRun(c: DaemonClient): Promise<number> {
  const t0 = performance.now();
  const lease = await c.call<{ id: string }>('POST', '/v1/leases', { pool: 'bench', timeout: 300 });
  let first: number | undefined;
  await c.exec(lease.id, { argv: ['echo', 'first'] }, { stdout: () => (first ??= performance.now() - t0), stderr: () => {} });
  await c.call('DELETE', `/v1/leases/${lease.id}`);
  if (first === undefined) throw new Error('no output');
  return first;
}

async function coldRun(engine: Engine): Promise<number> {
  const t0 = performance.now();
  const lease = await engine.lease({ owner: 'bench', size: { cpus: 2, memoryMiB: 1024, diskGiB: 4 } });
  let first: number | undefined;
  try {
    await lease.machine.guest.exec(['echo', 'first'], { stdout: () => (first ??= performance.now() - t0) });
  } finally {
    await lease.release();
  }
  if (first === undefined) throw new Error('no output');
  return first;
}

try {
  bench.ensureImage();

  let c = await startDaemon(0);
  await new Promise((r) => setTimeout(r, 2000));
  const rssIdle0 = rssMiB(daemon!.pid!);
  await stopDaemon();

  c = await startDaemon(1);
  const engine = new Engine({ dataDir, config: defaultConfig(), log: silentLogger });
  const warm: number[] = [];
  const cold: number[] = [];
  for (let i = 1; i <= runs; i++) {
    await waitIdle(c, 1);
    warm.push(await warmRun(c));
    // The refill boot, and the first seconds of the new guest, must not compete with the cold boot for CPU.
    await waitIdle(c, 1);
    await new Promise((r) => setTimeout(r, 10_000));
    cold.push(await coldRun(engine));
    console.log(`run ${i}/${runs}: warm ${fmt(warm.at(-1)!)}  cold ${fmt(cold.at(-1)!)}`);
  }
  engine.close();
  await stopDaemon();

  c = await startDaemon(4);
  await waitIdle(c, 4);
  const rssIdle4 = rssMiB(daemon!.pid!);
  await stopDaemon();

  printComparison('lease request to first output', warm, cold, { mayfly: 'warm pool (mayflyd)', baseline: 'cold boot' });
  console.log(`\nmayflyd resident memory: ${rssIdle0.toFixed(0)} MiB with 0 idle machines, ${rssIdle4.toFixed(0)} MiB with 4 (the guests' QEMU processes are separate)`);
} finally {
  await stopDaemon();
  spawnSync(mayflyBin, ['--data-dir', dataDir, 'rm', '--all'], { stdio: 'ignore' });
  rmSync(work, { recursive: true, force: true });
  bench.cleanup();
}
