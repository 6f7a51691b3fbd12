import { availableParallelism, totalmem } from 'node:os';
import type { MachineSize } from '../drivers/types.ts';
import { ErrorCode, MayflyError } from '../errors.ts';

// Machine sizes by label: named ones (small, medium, large, or [sizes.NAME] from the config)
// and custom labels such as `4cpu8gb50gb` (or `1cpu512mb10gb`).

export const builtinSizes: Record<string, MachineSize> = {
  small: { cpus: 1, memoryMiB: 1024, diskGiB: 4 },
  medium: { cpus: 2, memoryMiB: 2048, diskGiB: 10 },
  large: { cpus: 4, memoryMiB: 4096, diskGiB: 20 },
};

export interface HostLimits {
  cpus: number;
  memoryMiB: number;
}

export function hostLimits(memoryReserveMiB = 0): HostLimits {
  return { cpus: availableParallelism(), memoryMiB: Math.floor(totalmem() / 2 ** 20) - memoryReserveMiB };
}

const customLabel = /^(\d+)cpu(\d+)(gb|mb)(\d+)gb$/;

/** The named sizes: built-ins, overridden or extended by the config's [sizes.NAME] tables. */
export function namedSizes(configSizes: Record<string, { cpus: number; memory: number; disk: number }>): Record<string, MachineSize> {
  const out = { ...builtinSizes };
  for (const [name, s] of Object.entries(configSizes)) out[name] = { cpus: s.cpus, memoryMiB: s.memory, diskGiB: s.disk };
  return out;
}

export function parseSizeLabel(label: string, named: Record<string, MachineSize>): MachineSize {
  const byName = named[label];
  if (byName) return { ...byName };
  const m = customLabel.exec(label);
  if (!m) {
    throw new MayflyError(ErrorCode.SIZE_INVALID, `'${label}' is not a size`, {
      hint: `use a size name (${Object.keys(named).join(', ')}) or a label like 4cpu8gb50gb (CPUs, memory in gb or mb, disk in gb)`,
    });
  }
  const memoryMiB = Number(m[2]) * (m[3] === 'gb' ? 1024 : 1);
  return { cpus: Number(m[1]), memoryMiB, diskGiB: Number(m[4]) };
}

/** Refuses a size this host cannot run at all (one machine alone). */
export function checkSize(size: MachineSize, host: HostLimits, what = 'the machine'): MachineSize {
  const problems: string[] = [];
  if (!Number.isInteger(size.cpus) || size.cpus < 1) problems.push(`${size.cpus} CPUs is not a number of CPUs`);
  else if (size.cpus > host.cpus) problems.push(`${size.cpus} CPUs asked for, but this host has ${host.cpus}`);
  if (!Number.isInteger(size.memoryMiB) || size.memoryMiB < 128) problems.push(`${size.memoryMiB} MiB of memory is below the 128 MiB minimum`);
  else if (size.memoryMiB > host.memoryMiB) problems.push(`${size.memoryMiB} MiB of memory asked for, but this host can give ${host.memoryMiB} MiB`);
  if (!Number.isInteger(size.diskGiB) || size.diskGiB < 1 || size.diskGiB > 2048) problems.push(`a ${size.diskGiB} GiB disk is outside 1 to 2048 GiB`);
  if (problems.length > 0) {
    throw new MayflyError(ErrorCode.SIZE_INVALID, `${what}: ${problems.join('; ')}`, {
      hint: `this host allows up to ${host.cpus} CPUs and ${host.memoryMiB} MiB per machine`,
    });
  }
  return size;
}

/** The custom label parseSizeLabel reads back as this size (`2cpu1024mb4gb`). */
export function customSizeLabel(s: MachineSize): string {
  return `${s.cpus}cpu${s.memoryMiB}mb${s.diskGiB}gb`;
}

export function sizeLabel(s: MachineSize): string {
  return `${s.cpus}cpu/${s.memoryMiB}M/${s.diskGiB}G`;
}
