// Benchmark: from "give me a fresh machine and run this" to the command's first output byte,
// a cold boot (no warm pool, no snapshot). This is the baseline the warm pool has to beat.
//
//   node bench/first-output.ts [--runs 3] [--data-dir DIR]      (as root)
//
// Compares, on the same image, interleaved:
//   mayfly    `mayfly run -- echo first`: clone, boot, readiness over SSH, run, destroy
//   baseline  what a hand-written script does (shared/notes/host-facts.md): qemu-img overlay,
//             qemu-system with the same machine, keys made with ssh-keygen, then the OpenSSH
//             client polled every 0.1 s until `echo first` answers
// Without --data-dir the default image is built first into a temporary data dir (≈40 s, not
// measured), which is removed at the end.

import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { ImageStore } from '../src/images/store.ts';
import { fmt, mayflyBin, printComparison, vmBench } from './lib.ts';

const bench = vmBench(3);
const { runs, dataDir } = bench;
const work = mkdtempSync('/var/tmp/mayfly-bench-work-');
let baselinePid: number | undefined;

try {
  bench.ensureImage();
  const image = new ImageStore(dataDir).resolve('debian-12');
  console.log(`image ${image.name}:${image.version}, ${runs} runs each, interleaved`);

  const mayflyMs: number[] = [];
  const baselineMs: number[] = [];
  for (let i = 1; i <= runs; i++) {
    mayflyMs.push(await timeMayfly());
    baselineMs.push(await timeBaseline(image.diskPath, image.kernelPath!, image.initrdPath!, image.kernelArgs!));
    console.log(`run ${i}/${runs}: mayfly ${fmt(mayflyMs.at(-1)!)}  baseline ${fmt(baselineMs.at(-1)!)}`);
  }
  printComparison('cold start to first output (no pool, no snapshot)', mayflyMs, baselineMs, {
    mayfly: 'mayfly run',
    baseline: 'baseline (qemu + ssh polling)',
  });
} finally {
  if (baselinePid) spawnSync('kill', ['-9', String(baselinePid)]);
  spawnSync(mayflyBin, ['--data-dir', dataDir, 'rm', '--all'], { stdio: 'ignore' });
  rmSync(work, { recursive: true, force: true });
  bench.cleanup();
}

function timeMayfly(): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    let first: number | undefined;
    const child = spawn(mayflyBin, ['--data-dir', dataDir, 'run', '--', 'echo', 'first'], { stdio: ['ignore', 'pipe', 'ignore'] });
    child.stdout.once('data', () => (first = performance.now() - t0));
    child.on('close', (code) => (code === 0 && first !== undefined ? resolve(first) : reject(new Error(`mayfly run exited ${code}`))));
  });
}

async function timeBaseline(base: string, kernel: string, initrd: string, append: string): Promise<number> {
  const dir = mkdtempSync(join(work, 'vm-'));
  const t0 = performance.now();
  const sh = (cmd: string, args: string[]) => {
    const r = spawnSync(cmd, args, { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`${cmd} failed: ${r.stderr}`);
    return r.stdout;
  };
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', join(dir, 'disk.qcow2'), '4G']);
  sh('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(dir, 'key')]);
  sh('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', join(dir, 'hostkey')]);
  writeFileSync(join(dir, 'id'), 'bench');
  const port = await freePort();
  writeFileSync(join(dir, 'known_hosts'), `[127.0.0.1]:${port} ${readFileSync(join(dir, 'hostkey.pub'), 'utf8')}`);
  const fw = (name: string, file: string) => ['-fw_cfg', `name=opt/mayfly/${name},file=${join(dir, file)}`];
  sh('qemu-system-x86_64', [
    '-M', 'q35', '-accel', 'tcg,tb-size=64', '-cpu', 'max', '-smp', '2', '-m', '1024',
    '-display', 'none', '-no-user-config', '-nodefaults', '-serial', `file:${join(dir, 'console.log')}`,
    '-kernel', kernel, '-initrd', initrd, '-append', append,
    '-drive', `file=${join(dir, 'disk.qcow2')},if=none,id=d0,format=qcow2,cache=unsafe`, '-device', 'virtio-blk-pci,drive=d0',
    '-netdev', `user,id=n0,hostfwd=tcp:127.0.0.1:${port}-:22`, '-device', 'virtio-net-pci,netdev=n0',
    ...fw('id', 'id'), ...fw('hostname', 'id'), ...fw('host_key', 'hostkey'), ...fw('host_key_pub', 'hostkey.pub'),
    ...fw('authorized_keys', 'key.pub'),
    '-pidfile', join(dir, 'pid'), '-daemonize',
  ]);
  baselinePid = Number(readFileSync(join(dir, 'pid'), 'utf8'));
  try {
    for (;;) {
      const r = spawnSync('ssh', [
        '-o', 'BatchMode=yes', '-o', 'ConnectTimeout=2', '-o', `UserKnownHostsFile=${join(dir, 'known_hosts')}`,
        '-o', 'StrictHostKeyChecking=yes', '-i', join(dir, 'key'), '-p', String(port), 'ci@127.0.0.1', 'echo first',
      ], { encoding: 'utf8' });
      if (r.status === 0 && r.stdout === 'first\n') return performance.now() - t0;
      if (performance.now() - t0 > 180_000) throw new Error('the baseline VM did not answer within 180 s');
      await new Promise((res) => setTimeout(res, 100));
    }
  } finally {
    spawnSync('kill', ['-9', String(baselinePid)]);
    baselinePid = undefined;
    rmSync(dir, { recursive: true, force: true });
  }
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const a = srv.address();
      srv.close(() => (typeof a === 'object' && a ? resolve(a.port) : reject(new Error('no port'))));
    });
  });
}
