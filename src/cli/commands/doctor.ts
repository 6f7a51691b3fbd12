import type { Command } from 'commander';
import { accessSync, constants, existsSync, readFileSync } from 'node:fs';
import { availableParallelism, release, totalmem } from 'node:os';
import { join, resolve } from 'node:path';
import type { Config } from '../../config/index.ts';
import { errorText } from '../../errors.ts';
import { chooseStorage, probeStorage, type ProbeResult, type StorageReport, type StorageSetting } from '../../storage/index.ts';
import { findOnPath, run } from '../../util/exec.ts';
import { bytes, printJson } from '../format.ts';
import type { ContextFactory } from '../main.ts';

// `mayfly doctor`: what this host can do for mayfly, what mayfly will use, and what would make
// it faster. It only looks and probes (a test reflink, snapshot and overlay mount in the data
// dir, all removed again); it never boots a VM and never makes the data dir.

export interface DoctorReport {
  host: { kernel: string; cpus: number; memoryBytes: number; root: boolean };
  dataDir: {
    path: string;
    exists: boolean;
    /** The data dir, or its nearest existing parent when it is not made yet. */
    probedIn: string;
    filesystem: string;
    source: string;
    mountPoint: string;
    freeBytes: number;
    totalBytes: number;
  };
  kvm: {
    /** null: not known without booting a guest (not probed yet, or probed for another kernel/QEMU). */
    usable: boolean | null;
    status: 'usable' | 'unusable' | 'not-probed' | 'stale' | 'forced';
    reason: string;
  };
  storage: {
    setting: StorageSetting;
    /** Container roots. */
    dir: StorageChoice;
    /** VM disks. */
    disk: StorageChoice;
  };
  nspawn: { available: boolean; path: string | null; version: string | null; reason: string };
  network: { mode: 'user' | 'bridged'; bridged: boolean; reason: string };
  /** What to install or change for something faster or working, most useful first. */
  advice: string[];
}

interface StorageChoice {
  chosen: string | null;
  /** Why nothing (or not the configured backend) can be used; null when `chosen` is set. */
  error: string | null;
  backends: ProbeResult[];
}

/** Where the QEMU driver caches its KVM probe (src/pool/index.ts gives the driver this path). */
export function accelCacheFile(dataDir: string): string {
  return join(dataDir, 'host', 'accel.json');
}

const LOW_SPACE = 10 * 1024 ** 3;

export async function doctorReport(givenDataDir: string, config: Config): Promise<DoctorReport> {
  const dataDir = resolve(givenDataDir);
  const setting = config.storage.backend;
  const [dirReport, diskReport, kvm, nspawn] = [
    await probeStorage(dataDir, 'dir'),
    await probeStorage(dataDir, 'disk'),
    await kvmStatus(dataDir, config),
    await nspawnStatus(config.nspawn.binary),
  ];
  const fs = dirReport.filesystem;
  const report: DoctorReport = {
    host: { kernel: release(), cpus: availableParallelism(), memoryBytes: totalmem(), root: process.getuid?.() === 0 },
    dataDir: {
      path: dataDir,
      exists: existsSync(dataDir),
      probedIn: dirReport.probedIn,
      filesystem: fs.type,
      source: fs.source,
      mountPoint: fs.mountPoint,
      freeBytes: fs.freeBytes,
      totalBytes: fs.totalBytes,
    },
    kvm,
    storage: { setting, dir: choice(dirReport, setting), disk: choice(diskReport, 'auto') },
    nspawn,
    network: networkStatus(config),
    advice: [],
  };
  report.advice = advise(report, dirReport);
  return report;
}

/** Whether bridged networking could work here: only looked at, nothing is created. */
function networkStatus(config: Config): DoctorReport['network'] {
  const mode = config.defaults.network;
  const missing = [
    ...(findOnPath('ip') ? [] : ['ip (apt-get install iproute2)']),
    ...(findOnPath('nft') ? [] : ['nft (apt-get install nftables)']),
    ...(existsSync('/dev/net/tun') ? [] : ['/dev/net/tun']),
    ...(process.getuid?.() === 0 ? [] : ['root']),
  ];
  const def = mode === 'user' ? 'default: user-mode networking (QEMU slirp, no host setup)' : `default: bridged (${config.network.bridge}, ${config.network.subnet})`;
  return missing.length === 0
    ? { mode, bridged: true, reason: `${def}; bridged networking (--network bridged) is available` }
    : { mode, bridged: false, reason: `${def}; bridged networking needs ${missing.join(', ')}` };
}

function choice(report: StorageReport, setting: StorageSetting): StorageChoice {
  try {
    return { chosen: chooseStorage(report, setting).name, error: null, backends: report.probes };
  } catch (e) {
    return { chosen: null, error: errorText(e), backends: report.probes };
  }
}

/**
 * KVM from what the QEMU driver cached after its probe boot (src/drivers/qemu/accel.ts), which
 * is keyed by the host kernel and the QEMU version. Doctor does not boot a guest itself: the
 * probe needs an image's kernel and can take 20 s when KVM hangs.
 */
async function kvmStatus(dataDir: string, config: Config): Promise<DoctorReport['kvm']> {
  if (config.qemu.accel === 'tcg') return { usable: null, status: 'forced', reason: 'qemu.accel = "tcg" in the config: VMs use TCG' };
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
  } catch {
    const why = existsSync('/dev/kvm')
      ? '/dev/kvm is not accessible to this user (root or the kvm group can open it)'
      : '/dev/kvm is missing (no hardware virtualization here)';
    return { usable: false, status: 'unusable', reason: `${why}: VMs use TCG (software emulation)` };
  }
  if (config.qemu.accel === 'kvm') return { usable: true, status: 'forced', reason: 'qemu.accel = "kvm" in the config (not probed)' };
  let cached: { accel?: unknown; reason?: unknown; key?: unknown };
  try {
    cached = JSON.parse(readFileSync(accelCacheFile(dataDir), 'utf8')) as typeof cached;
  } catch {
    return { usable: null, status: 'not-probed', reason: '/dev/kvm opens, but not probed yet; `mayfly run -- true` probes it' };
  }
  const qemuVersion = findOnPath(config.qemu.binary)
    ? ((await run(config.qemu.binary, ['--version']).catch(() => ({ stdout: '' }))).stdout.split('\n')[0] ?? '')
    : '';
  const reason = typeof cached.reason === 'string' ? cached.reason : 'no reason recorded';
  if (cached.key !== `${release()}|${qemuVersion}`) {
    return {
      usable: null,
      status: 'stale',
      reason: `probed for another kernel or QEMU (then: ${reason}); the next VM start probes again`,
    };
  }
  return cached.accel === 'kvm' ? { usable: true, status: 'usable', reason } : { usable: false, status: 'unusable', reason };
}

async function nspawnStatus(binary: string): Promise<DoctorReport['nspawn']> {
  const path = findOnPath(binary);
  if (!path) return { available: false, path: null, version: null, reason: 'not installed: apt-get install systemd-container' };
  const r = await run(path, ['--version']).catch((e: unknown) => ({ code: 1, stdout: '', stderr: errorText(e) }));
  const version = r.code === 0 ? (r.stdout.split('\n')[0]?.trim() ?? null) : null;
  return r.code === 0
    ? { available: true, path, version, reason: `${version} (containers need --keep-unit --register=no without a running systemd)` }
    : { available: false, path, version: null, reason: `${path} --version failed: ${r.stderr.trim() || `exit ${r.code}`}` };
}

/** What the data dir gets now instead of btrfs snapshots, for the advice line. */
const slowerClones: Record<string, string> = {
  reflink: 'reflink copies, one inode at a time',
  overlayfs: 'an overlay mount per container',
  copy: 'full copies, seconds each',
};

function advise(r: DoctorReport, dir: StorageReport): string[] {
  const out: string[] = [];
  const usable = (name: string) => dir.probes.find((p) => p.name === name)?.usable ?? false;
  const chosen = r.storage.dir.chosen;
  if (r.storage.dir.error) out.push(r.storage.dir.error.split('\n')[0]!);
  if (r.dataDir.filesystem === 'btrfs' && !findOnPath('btrfs')) {
    out.push('apt-get install btrfs-progs: the data dir is on btrfs, and with it container clones are snapshots made in milliseconds');
  } else if (!usable('btrfs-snapshot')) {
    const now = chosen ? ` (now: ${slowerClones[chosen] ?? chosen})` : '';
    out.push(`put the data dir on btrfs: container clones become snapshots made in milliseconds, whatever their size${now}`);
  }
  if (!usable('overlayfs') && !usable('btrfs-snapshot') && !usable('reflink') && !r.host.root) {
    out.push('run mayfly as root: overlayfs clones (instant, on any filesystem) need it');
  }
  if (!r.nspawn.available) out.push('apt-get install systemd-container: images of kind "container" run in systemd-nspawn');
  if (r.storage.disk.chosen === null) out.push('apt-get install qemu-utils: VM disks are qcow2 overlays made with qemu-img');
  if (r.kvm.status === 'not-probed' || r.kvm.status === 'stale') out.push('run `mayfly run -- true` once: it probes whether KVM runs a guest here');
  if (r.kvm.usable === false) {
    if (!existsSync('/dev/kvm')) out.push('enable hardware virtualization (or nested virtualization on a VM host) for KVM: TCG runs VMs several times slower');
    else if (!r.host.root && r.kvm.status === 'unusable' && r.kvm.reason.includes('not accessible')) out.push('run mayfly as root or in the kvm group: /dev/kvm is there');
  }
  if (r.dataDir.freeBytes < LOW_SPACE) out.push(`only ${bytes(r.dataDir.freeBytes)} free in the data dir: images and clones need room`);
  return out;
}

function yesNo(v: boolean | null): string {
  return v === null ? '?' : v ? 'yes' : 'no';
}

export function formatDoctor(r: DoctorReport): string {
  const label = (s: string) => s.padEnd(12);
  const lines: string[] = [];
  const d = r.dataDir;
  lines.push(`${label('host')}Linux ${r.host.kernel}, ${r.host.cpus} CPUs, ${bytes(r.host.memoryBytes)} memory${r.host.root ? ', root' : ', not root'}`);
  lines.push(`${label('data dir')}${d.path} on ${d.filesystem} (${d.source}), ${bytes(d.freeBytes)} free of ${bytes(d.totalBytes)}`);
  if (!d.exists) lines.push(`${label('')}not made yet; probed in ${d.probedIn}`);
  lines.push(`${label('KVM')}${yesNo(r.kvm.usable).padEnd(3)}  ${r.kvm.reason}`);
  const w = Math.max(...[...r.storage.disk.backends, ...r.storage.dir.backends].map((b) => b.name.length));
  const backendLines = (title: string, c: StorageChoice) => {
    c.backends.forEach((b, i) => {
      const mark = b.name === c.chosen ? '  <- used' : '';
      lines.push(`${label(i === 0 ? title : '')}${b.name.padEnd(w)}  ${yesNo(b.usable).padEnd(3)}  ${b.reason}${mark}`);
    });
  };
  backendLines('VM disks', r.storage.disk);
  backendLines('containers', r.storage.dir);
  if (r.storage.setting !== 'auto') lines.push(`${label('')}storage.backend = "${r.storage.setting}" in the config`);
  lines.push(`${label('nspawn')}${yesNo(r.nspawn.available).padEnd(3)}  ${r.nspawn.available ? `${r.nspawn.path}: ${r.nspawn.reason}` : r.nspawn.reason}`);
  lines.push(`${label('network')}${r.network.reason}`);
  if (r.advice.length > 0) {
    lines.push('', 'to do:');
    for (const a of r.advice) lines.push(`  - ${a}`);
  }
  return lines.join('\n') + '\n';
}

export function registerDoctor(program: Command, context: ContextFactory): void {
  program
    .command('doctor')
    .description('what this host offers mayfly (KVM, storage backends, nspawn, networking, space) and what would make it faster')
    .option('--json', 'JSON output')
    .action(async (o: { json?: boolean }) => {
      const ctx = context();
      const report = await doctorReport(ctx.opts.dataDir, ctx.config);
      if (o.json || ctx.opts.json) printJson(report);
      else process.stdout.write(formatDoctor(report));
    });
}
