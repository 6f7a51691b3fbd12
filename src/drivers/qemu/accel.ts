import { constants, accessSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { release } from 'node:os';
import { dirname } from 'node:path';
import { ErrorCode, MayflyError } from '../../errors.ts';
import type { Logger } from '../../log.ts';
import { run } from '../../util/exec.ts';

export type Accel = 'kvm' | 'tcg';
export type AccelSetting = 'auto' | Accel;

export interface AccelChoice {
  accel: Accel;
  reason: string;
}

interface CacheEntry extends AccelChoice {
  key: string;
}

/**
 * Picks KVM only when a real probe boot works. /dev/kvm existing is not enough: on some hosts
 * (nested or PVM-flavoured KVM) QEMU aborts or the guest hangs. The probe boots the image's own
 * kernel with an init that does not exist; a working KVM reaches the "VFS: unable to mount root"
 * panic and, with panic=-1 and -no-reboot, QEMU exits by itself in about a second.
 * The answer is cached per host kernel and QEMU binary.
 */
export async function chooseAccel(opts: {
  setting: AccelSetting;
  qemu: string;
  kernel: string | null;
  initrd: string | null;
  cacheFile: string;
  log: Logger;
}): Promise<AccelChoice> {
  const kvmOpenable = canOpenKvm();
  if (opts.setting === 'tcg') return { accel: 'tcg', reason: 'qemu.accel = "tcg" in the config' };
  if (opts.setting === 'kvm') {
    if (!kvmOpenable) {
      throw new MayflyError(ErrorCode.MACHINE_START_FAILED, 'qemu.accel = "kvm" but /dev/kvm cannot be opened', {
        hint: 'enable virtualization for this host, or set qemu.accel = "auto" to fall back to TCG',
      });
    }
    return { accel: 'kvm', reason: 'qemu.accel = "kvm" in the config' };
  }
  if (!kvmOpenable) return { accel: 'tcg', reason: '/dev/kvm is missing or not accessible' };
  if (!opts.kernel || !opts.initrd) return { accel: 'tcg', reason: 'no kernel to probe KVM with; using TCG' };

  const version = await qemuVersion(opts.qemu);
  const key = `${release()}|${version}`;
  const cached = readCache(opts.cacheFile);
  if (cached?.key === key) return { accel: cached.accel, reason: cached.reason };

  opts.log.info('probing whether KVM can run a guest on this host (once per host)');
  const choice = await probeKvm(opts.qemu, opts.kernel, opts.initrd);
  mkdirSync(dirname(opts.cacheFile), { recursive: true });
  writeFileSync(opts.cacheFile, JSON.stringify({ ...choice, key } satisfies CacheEntry) + '\n');
  return choice;
}

// A binary's version does not change under a running process; each machine start asked it anew (~50 ms).
const versions = new Map<string, Promise<string>>();
function qemuVersion(qemu: string): Promise<string> {
  let v = versions.get(qemu);
  if (!v) {
    v = run(qemu, ['--version']).then((r) => r.stdout.split('\n')[0] ?? '');
    versions.set(qemu, v);
  }
  return v;
}

function canOpenKvm(): boolean {
  if (!existsSync('/dev/kvm')) return false;
  try {
    accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
    return true;
  } catch {
    return false;
  }
}

function readCache(file: string): CacheEntry | undefined {
  try {
    return JSON.parse(readFileSync(file, 'utf8')) as CacheEntry;
  } catch {
    return undefined;
  }
}

async function probeKvm(qemu: string, kernel: string, initrd: string): Promise<AccelChoice> {
  const started = Date.now();
  const r = await run('timeout', [
    '-s', 'KILL', '20', qemu,
    '-M', 'q35', '-accel', 'kvm', '-cpu', 'host', '-m', '256', '-smp', '1',
    '-display', 'none', '-nodefaults', '-no-user-config', '-no-reboot', '-serial', 'stdio',
    '-kernel', kernel, '-initrd', initrd, '-append', 'console=ttyS0 panic=-1 rdinit=/mayfly-kvm-probe',
  ]);
  const secs = ((Date.now() - started) / 1000).toFixed(1);
  if (r.code === 0 && /Kernel panic/.test(r.stdout)) {
    return { accel: 'kvm', reason: `a KVM probe boot reached the kernel's init stage in ${secs} s` };
  }
  const why = r.code === 137 ? 'the guest hung' : r.stderr.trim().split('\n')[0] || `QEMU exited with ${r.code}`;
  return { accel: 'tcg', reason: `/dev/kvm exists but a KVM probe boot failed (${why}); using TCG software emulation` };
}
