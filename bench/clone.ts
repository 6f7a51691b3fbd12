// Benchmark: how long it takes to give a machine its own writable disk.
//
//   node bench/clone.ts [--size-gib 2] [--runs 5]      (as root)
//
// Compares, on the same base image:
//   mayfly    a qcow2 overlay on the image (qcow2Overlay.clone: `qemu-img create -f qcow2 -b BASE
//             -F qcow2 …`), fsynced
//   baseline  a full copy of the image (`cp --reflink=never`), fsynced: what a VM tool without
//             copy-on-write disks does for every fresh machine
//
// The base is a qcow2 of --size-gib full of random data (so the copy cannot skip holes), made in a
// temporary directory under /var/tmp and removed at the end, also when something fails.

import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, fsyncSync, mkdirSync, mkdtempSync, openSync, rmSync, statSync, statfsSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { qcow2Overlay } from '../src/storage/qcow2.ts';
import { fail, fmt, printComparison } from './lib.ts';

const { values } = parseArgs({
  options: {
    'size-gib': { type: 'string', default: '2' },
    runs: { type: 'string', default: '5' },
  },
});
const sizeGiB = Number(values['size-gib']);
const runs = Number(values.runs);
if (!(sizeGiB > 0) || !Number.isInteger(sizeGiB * 1024)) fail('--size-gib must be a positive number of whole MiB (e.g. 2 or 0.25)');
if (!Number.isInteger(runs) || runs < 1) fail('--runs must be a whole number of 1 or more');
if (process.getuid?.() !== 0) fail('run it as root (mayfly creates machine disks as root)');
if (!(await qcow2Overlay.probe('/var/tmp')).usable) fail('qemu-img is missing (apt-get install qemu-utils)');

const sizeMiB = sizeGiB * 1024;
const MiB = 1024 * 1024;

// Base and raw source exist together while the base is made, then the base and one copy.
const free = statfsSync('/var/tmp');
const needMiB = 2 * sizeMiB + 64;
if ((free.bavail * free.bsize) / MiB < needMiB) fail(`/var/tmp needs ${needMiB} MiB free for a ${sizeGiB} GiB base`);

const work = mkdtempSync('/var/tmp/mayfly-bench-clone-');
const children = new Set<ChildProcess>();
// try/finally does not run when the process is killed by a signal; clean up then too.
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.once(sig, () => {
    for (const child of children) child.kill('SIGKILL');
    rmSync(work, { recursive: true, force: true });
    process.exit(128 + ({ SIGINT: 2, SIGTERM: 15, SIGHUP: 1 } as const)[sig]);
  });
}

try {
  console.log('mayfly clone benchmark: time to give one machine its own writable disk');
  console.log(`  mayfly:   qcow2 overlay on the base (qemu-img create -f qcow2 -b BASE -F qcow2), fsynced`);
  console.log(`  baseline: full copy of the base (cp --reflink=never), fsynced`);
  console.log(`  base:     ${sizeGiB} GiB qcow2 of random data in ${work} (page cache warm), ${runs} runs each, interleaved`);
  console.log('');

  const base = await makeBase();
  const baseAllocated = statSync(base).blocks * 512;
  console.log(`base ready: ${(statSync(base).size / MiB).toFixed(0)} MiB file, ${(baseAllocated / MiB).toFixed(0)} MiB allocated`);
  console.log('');

  const overlayMs: number[] = [];
  const copyMs: number[] = [];
  for (let i = 1; i <= runs; i++) {
    // mayfly: the storage backend the QEMU driver uses for every machine.
    const instanceDir = join(work, `instance-${i}`);
    mkdirSync(instanceDir);
    let t = performance.now();
    const clone = await qcow2Overlay.clone({ base, instanceDir });
    fsyncFile(clone.path);
    overlayMs.push(performance.now() - t);
    if (i === 1) {
      await checkOverlay(clone.path, base);
      console.log(`overlay check: qcow2 backed by the base, ${(statSync(clone.path).blocks / 2).toFixed(0)} KiB allocated`);
    }
    await qcow2Overlay.remove(clone);

    // baseline: an honest full copy, written through to the disk.
    const copy = join(work, `copy-${i}.qcow2`);
    t = performance.now();
    await exec('cp', ['--reflink=never', base, copy]);
    fsyncFile(copy);
    copyMs.push(performance.now() - t);
    if (statSync(copy).size !== statSync(base).size) throw new Error(`the copy ${copy} has the wrong size`);
    rmSync(copy);

    console.log(`run ${i}/${runs}: overlay ${fmt(overlayMs.at(-1)!)}  copy ${fmt(copyMs.at(-1)!)}`);
  }

  printComparison(`clone of a ${sizeGiB} GiB image, ${runs} runs`, overlayMs, copyMs, {
    mayfly: 'mayfly (qcow2 overlay)',
    baseline: 'baseline (full copy)',
  });
} finally {
  rmSync(work, { recursive: true, force: true });
}

/** A qcow2 base of the requested size, every cluster allocated with random data. */
async function makeBase(): Promise<string> {
  const raw = join(work, 'base.raw');
  const base = join(work, 'base.qcow2');
  await exec('dd', ['if=/dev/urandom', `of=${raw}`, 'bs=1M', `count=${sizeMiB}`, 'iflag=fullblock', 'status=none']);
  await exec('qemu-img', ['create', '-q', '-f', 'qcow2', base, `${sizeMiB}M`]);
  // -n: write into the qcow2 just created instead of making a new one.
  await exec('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'qcow2', raw, base]);
  rmSync(raw);
  fsyncFile(base);
  return base;
}

/** The overlay must be a real qcow2 backed by the base, or the timing means nothing. */
async function checkOverlay(path: string, base: string): Promise<void> {
  const info = JSON.parse(await exec('qemu-img', ['info', '--output=json', path])) as {
    format: string;
    'backing-filename'?: string;
    'virtual-size': number;
  };
  if (info.format !== 'qcow2' || info['backing-filename'] !== base || info['virtual-size'] !== sizeMiB * MiB) {
    throw new Error(`unexpected overlay: ${JSON.stringify(info)}`);
  }
}

function fsyncFile(path: string): void {
  const fd = openSync(path, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** Runs a command; resolves with its stdout, rejects with its stderr when it fails. */
function exec(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(child);
    let out = '';
    let err = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr.on('data', (c: Buffer) => (err += c.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      children.delete(child);
      if (code === 0) resolve(out);
      else reject(new Error(`${cmd} ${args.join(' ')} failed (exit ${code}): ${err.trim()}`));
    });
  });
}
