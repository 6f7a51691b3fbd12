import { ErrorCode, MayflyError, errorText } from '../errors.ts';
import { btrfsSnapshot } from './btrfs-snapshot.ts';
import { copy } from './copy.ts';
import { filesystemOf, nearestExisting, type FilesystemInfo } from './mounts.ts';
import { overlayfs } from './overlayfs.ts';
import { qcow2Overlay } from './qcow2.ts';
import { reflink } from './reflink.ts';
import type { StorageBackend, StorageKind } from './types.ts';

// Picks the fastest storage backend that really works in the data dir. Nothing is cached: the
// probes take milliseconds, and a cached answer would go stale when the data dir is moved to
// another filesystem, btrfs-progs is installed, or the process is no longer root.

/** Fastest first: a snapshot (~5 ms), a reflink copy (per file), a mount (needs root), a full copy. */
export const DIR_BACKENDS: readonly StorageBackend[] = [btrfsSnapshot, reflink, overlayfs, copy];
export const DISK_BACKENDS: readonly StorageBackend[] = [qcow2Overlay];

/** `storage.backend` in the config: a directory backend's name, or "auto" for the fastest usable. */
export type StorageSetting = 'auto' | 'btrfs-snapshot' | 'reflink' | 'overlayfs' | 'copy';

export interface ProbeResult {
  name: string;
  usable: boolean;
  reason: string;
  /** How long the probe took. */
  ms: number;
}

export interface StorageReport {
  kind: StorageKind;
  dataDir: string;
  /** Where the probes ran: the data dir, or its nearest existing parent when it is not made yet. */
  probedIn: string;
  filesystem: FilesystemInfo;
  /** Every backend of the kind, fastest first, each with whether it works here and why. */
  probes: ProbeResult[];
}

export interface Detection extends StorageReport {
  backend: StorageBackend;
}

export function backendsOf(kind: StorageKind): readonly StorageBackend[] {
  return kind === 'dir' ? DIR_BACKENDS : DISK_BACKENDS;
}

/** The backend that made a clone (`Clone.backend`), to remove it whatever the config says now. */
export function backendByName(name: string): StorageBackend {
  const b = [...DIR_BACKENDS, ...DISK_BACKENDS].find((x) => x.name === name);
  if (!b) throw new MayflyError(ErrorCode.CLONE_REMOVE_FAILED, `no storage backend is called '${name}'`);
  return b;
}

async function probeOne(b: StorageBackend, dir: string): Promise<ProbeResult> {
  const started = performance.now();
  let r;
  try {
    r = await b.probe(dir);
  } catch (e) {
    // probe() should not throw; if one does, that is a reason too.
    r = { usable: false, reason: `its probe failed: ${errorText(e)}` };
  }
  return { name: b.name, usable: r.usable, reason: r.reason, ms: +(performance.now() - started).toFixed(1) };
}

/** Probes the backends of `kind` (all of them, or only `only`) in the data dir. Never throws for an unusable backend. */
export async function probeStorage(dataDir: string, kind: StorageKind, only?: readonly string[]): Promise<StorageReport> {
  const probedIn = nearestExisting(dataDir);
  const probes: ProbeResult[] = [];
  for (const b of backendsOf(kind)) if (!only || only.includes(b.name)) probes.push(await probeOne(b, probedIn));
  return { kind, dataDir, probedIn, filesystem: filesystemOf(probedIn), probes };
}

/** The backend the setting asks for among the probed ones, or an error saying why not and what to use. */
export function chooseStorage(report: StorageReport, setting: StorageSetting = 'auto'): StorageBackend {
  const usable = report.probes.filter((p) => p.usable);
  const where = `${report.dataDir} (${report.filesystem.type})`;
  if (setting === 'auto') {
    const first = usable[0];
    if (!first) {
      throw new MayflyError(
        ErrorCode.STORAGE_UNUSABLE,
        `no storage backend for ${report.kind === 'dir' ? 'container roots' : 'VM disks'} works in ${where}:\n` +
          report.probes.map((p) => `  ${p.name}: ${p.reason}`).join('\n'),
        { hint: 'fix one of the reasons above; `mayfly doctor` shows them too' },
      );
    }
    return backendByName(first.name);
  }
  if (report.kind !== 'dir') {
    throw new MayflyError(ErrorCode.STORAGE_UNUSABLE, `storage.backend = "${setting}" is for container roots; VM disks always use qcow2-overlay`);
  }
  const forced = report.probes.find((p) => p.name === setting);
  if (!forced) throw new MayflyError(ErrorCode.STORAGE_UNUSABLE, `storage.backend = "${setting}" was not probed`);
  if (!forced.usable) {
    const instead = usable[0];
    throw new MayflyError(ErrorCode.STORAGE_UNUSABLE, `storage.backend = "${setting}" cannot be used in ${where}: ${forced.reason}`, {
      hint: instead
        ? `set storage.backend = "${instead.name}" (the fastest that works here) or "auto"`
        : 'no directory backend works here either; `mayfly doctor` shows why',
    });
  }
  return backendByName(forced.name);
}

/**
 * The storage backend to clone `kind` with in the data dir: the one `setting` forces, or the
 * fastest usable one, with every probe result (doctor prints them).
 */
export async function detectStorage(dataDir: string, kind: StorageKind, setting: StorageSetting = 'auto'): Promise<Detection> {
  let report = await probeStorage(dataDir, kind, setting === 'auto' || kind !== 'dir' ? undefined : [setting]);
  if (setting !== 'auto' && kind === 'dir' && !report.probes[0]?.usable) {
    // Only now is the rest worth probing: the error names the fastest one that works instead.
    report = await probeStorage(dataDir, kind);
  }
  return { ...report, backend: chooseStorage(report, setting) };
}
