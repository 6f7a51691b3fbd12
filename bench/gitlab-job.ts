// Benchmark: a trivial GitLab job through `mayfly gitlab …`, driven by the gitlab-runner
// imitation of the test suite (test/helpers/gitlab-runner.ts, written from the protocol
// reference), with the sources fetched from a git server on the host's loopback.
//
//   node bench/gitlab-job.ts [--runs 3] [--data-dir DIR]      (as root)
//
// Compares, in one run, jobs of config → prepare → prepare_script → get_sources → build_script
// (`true`) → cleanup_file_variables → cleanup:
//   mayfly    warm pool: mayflyd keeps one idle machine; prepare leases it
//   baseline  no pool: prepare boots a machine for the job
// Before each warm job the bench waits until the pool has refilled, and before each cold job
// until the refill boot is over, so neither competes with a boot for CPU. Prints per-stage
// medians, the ratio of whole-job medians, and jobs per minute one after another.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { DaemonClient } from '../src/daemon/client.ts';
import { makeRepo, startGitServer } from '../test/helpers/git-http.ts';
import { mayflyStages, runJob, type JobResult, type RunnerConfig } from '../test/helpers/gitlab-runner.ts';
import { fmt, mayflyBin, printComparison, summary, vmBench } from './lib.ts';

const bench = vmBench(3);
const { runs, dataDir } = bench;
const work = mkdtempSync('/var/tmp/mayfly-bench-gitlab-');
const socket = join(work, 'mayfly.sock');
const config = join(work, 'config.toml');
writeFileSync(
  config,
  `[daemon]\nsocket = "${socket}"\nreconcile_interval = 1\n\n` +
    `[[pool]]\nname = "bench"\nimage = "debian-12"\nsize = "2cpu1024mb4gb"\nidle_count = 1\nmax_instances = 2\n`,
);
// The baseline's mayfly must not find the daemon, or prepare would take a pool machine anyway.
const noDaemonConfig = join(work, 'no-daemon.toml');
writeFileSync(noDaemonConfig, `[daemon]\nsocket = "${join(work, 'nobody.sock')}"\n`);
let daemon: ChildProcess | undefined;

function runner(pool: boolean): RunnerConfig {
  return mayflyStages(mayflyBin, ['--data-dir', dataDir, '--config', pool ? config : noDaemonConfig], pool ? ['--pool', 'bench'] : []);
}

async function idle(c: DaemonClient): Promise<number> {
  const [p] = await c.call<{ idle: number; creating: number }[]>('GET', '/v1/pools');
  return p!.creating > 0 ? -1 : p!.idle;
}

async function waitFor(c: DaemonClient, pred: (idle: number) => boolean): Promise<void> {
  while (!pred(await idle(c))) await new Promise((r) => setTimeout(r, 200));
}

/** Milliseconds per exec (config, prepare, each stage, cleanup) and for the whole job. */
function timings(r: JobResult, t0: number): Map<string, number> {
  if (r.status !== 'success') throw new Error(`the job did not succeed (${r.status}):\n${r.log}\n${r.runnerLog}`);
  const m = new Map<string, number>();
  for (const c of r.calls) m.set(c.kind === 'run' ? c.stage! : c.kind, c.endedAt - c.startedAt);
  m.set('whole job', Math.max(...r.calls.map((c) => c.endedAt)) - t0);
  return m;
}

const gitRoot = join(work, 'git');
const token = 'bench-token';
const repo = await makeRepo(gitRoot, { 'README.md': 'bench\n' });
const git = await startGitServer(gitRoot, { user: 'gitlab-ci-token', password: token });
try {
  bench.ensureImage();
  daemon = spawn(mayflyBin, ['--data-dir', dataDir, '--config', config, 'daemon'], { stdio: 'ignore' });
  let client: DaemonClient | undefined;
  for (let i = 0; i < 100 && !client; i++) {
    client = await DaemonClient.find(socket);
    if (!client) await new Promise((r) => setTimeout(r, 100));
  }
  if (!client) throw new Error('mayflyd did not start');

  const bootedLine = /mayfly: machine vm-\S+ .*(booted|restored) in/;
  const job = (id: number) => ({ id, token, repoUrl: `http://10.0.2.2:${git.port}/group/project.git`, sha: repo.sha, ref: repo.ref, script: ['true'] });
  const warm: Map<string, number>[] = [];
  const cold: Map<string, number>[] = [];
  for (let i = 1; i <= runs; i++) {
    await waitFor(client, (n) => n >= 1);
    let t0 = Date.now();
    warm.push(timings(await runJob(runner(true), job(1000 + i)), t0));
    await waitFor(client, (n) => n >= 1);
    await new Promise((r) => setTimeout(r, 5000)); // the refilled guest's first seconds
    t0 = Date.now();
    const r = await runJob(runner(false), job(2000 + i));
    if (!bootedLine.test(r.log)) throw new Error(`the baseline job did not boot its machine:\n${r.log}`);
    cold.push(timings(r, t0));
    console.log(`run ${i}/${runs}: warm ${fmt(warm.at(-1)!.get('whole job')!)}  no pool ${fmt(cold.at(-1)!.get('whole job')!)}`);
  }

  const names = [...warm[0]!.keys()];
  console.log(`\nper exec, median of ${runs} (ms)`);
  console.log(`${'exec'.padEnd(24)}${'warm pool'.padStart(12)}${'no pool'.padStart(12)}`);
  for (const n of names) {
    const w = summary(warm.map((t) => t.get(n) ?? 0)).median;
    const c = summary(cold.map((t) => t.get(n) ?? 0)).median;
    console.log(`${n.padEnd(24)}${w.toFixed(0).padStart(12)}${c.toFixed(0).padStart(12)}`);
  }
  const w = warm.map((t) => t.get('whole job')!);
  const c = cold.map((t) => t.get('whole job')!);
  printComparison('whole job (config to cleanup)', w, c, { mayfly: 'warm pool (mayflyd)', baseline: 'no pool (boot per job)' });
  console.log(
    `jobs per minute, one after another: ${(60_000 / summary(w).median).toFixed(1)} with a ready machine, ${(60_000 / summary(c).median).toFixed(1)} booting each` +
      '\n(with idle_count = 1 a sustained stream is bounded by the refill boot; raise idle_count for bursts)',
  );
} finally {
  if (daemon && daemon.exitCode === null) {
    daemon.kill('SIGTERM');
    await new Promise((r) => daemon!.once('close', r));
  }
  await git.close();
  spawnSync(mayflyBin, ['--data-dir', dataDir, 'rm', '--all'], { stdio: 'ignore' });
  rmSync(work, { recursive: true, force: true });
  bench.cleanup();
}
