import { Cron } from 'croner';
import type { Config } from '../config/index.ts';
import { durationSeconds } from '../config/schema.ts';
import type { MachineSize } from '../drivers/types.ts';
import { ErrorCode, MayflyError, errorText } from '../errors.ts';
import { checkSize, namedSizes, parseSizeLabel, type HostLimits } from './sizes.ts';

// A pool's policy: the [[pool]] table resolved into plain data, and the idle policy in force
// at a given time. Semantics follow GitLab's docker+machine autoscaler where names match:
// idle_count, idle_count_min, idle_scale_factor, idle_time, and periods whose last match wins.

export interface IdlePolicy {
  idleCount: number;
  idleCountMin: number;
  idleScaleFactor: number;
  idleTimeMs: number;
}

export interface PeriodSpec {
  crons: Cron[];
  patterns: string[];
  timezone: string;
  overrides: Partial<IdlePolicy>;
}

export interface PoolSpec {
  name: string;
  image: string;
  size: MachineSize;
  base: IdlePolicy;
  periods: PeriodSpec[];
  maxInstances: number;
  maxUseCount: number;
  maxGrowthRate: number;
  /** 0: no limit. */
  maxRuntimeMs: number;
}

type PoolConfig = Config['pool'][number];

/**
 * GitLab's periods have 7 fields (seconds … year, e.g. "* * 9-17 * * mon-fri *"); croner takes
 * 5 or 6. A trailing year field of "*" is dropped; any other year is refused.
 */
function cronPattern(p: string): string {
  const fields = p.trim().split(/\s+/);
  // croner reads a 5-field pattern with seconds = 0, which would match one second a minute.
  if (fields.length === 5) return ['*', ...fields].join(' ');
  if (fields.length === 7) {
    if (fields[6] !== '*') throw new Error(`the year field "${fields[6]}" is not supported (only "*")`);
    return fields.slice(0, 6).join(' ');
  }
  return fields.join(' ');
}

function overrides(p: { idle_count?: number; idle_count_min?: number; idle_scale_factor?: number; idle_time?: number | string }): Partial<IdlePolicy> {
  const o: Partial<IdlePolicy> = {};
  if (p.idle_count !== undefined) o.idleCount = p.idle_count;
  if (p.idle_count_min !== undefined) o.idleCountMin = p.idle_count_min;
  if (p.idle_scale_factor !== undefined) o.idleScaleFactor = p.idle_scale_factor;
  if (p.idle_time !== undefined) o.idleTimeMs = durationSeconds(p.idle_time) * 1000;
  return o;
}

/** Resolves and checks every [[pool]]; all problems are reported together, naming the pool. */
export function poolSpecs(config: Config, host: HostLimits): PoolSpec[] {
  const problems: string[] = [];
  const seen = new Set<string>();
  const specs: PoolSpec[] = [];
  const sizes = namedSizes(config.sizes);
  for (const [i, p] of config.pool.entries()) {
    const where = `pool[${i}] (${p.name})`;
    if (seen.has(p.name)) problems.push(`${where}: the name "${p.name}" is used by an earlier pool`);
    seen.add(p.name);
    let size: MachineSize | undefined;
    try {
      const base = parseSizeLabel(p.size, sizes);
      size = checkSize({ cpus: p.cpus ?? base.cpus, memoryMiB: p.memory ?? base.memoryMiB, diskGiB: p.disk ?? base.diskGiB }, host, where);
    } catch (e) {
      problems.push(e instanceof MayflyError && e.message.startsWith(where) ? e.message : `${where}: ${errorText(e)}`);
    }
    if (p.idle_count_min > p.idle_count) problems.push(`${where}: idle_count_min (${p.idle_count_min}) is above idle_count (${p.idle_count})`);
    if (p.idle_count > p.max_instances) problems.push(`${where}: idle_count (${p.idle_count}) is above max_instances (${p.max_instances})`);
    const periods: PeriodSpec[] = [];
    for (const [j, per] of p.period.entries()) {
      try {
        Intl.DateTimeFormat('en', { timeZone: per.timezone });
      } catch {
        problems.push(`${where}: period[${j}]: unknown time zone "${per.timezone}" (use an IANA name such as "Europe/Berlin")`);
        continue;
      }
      const crons: Cron[] = [];
      for (const pattern of per.periods) {
        try {
          crons.push(new Cron(cronPattern(pattern), { timezone: per.timezone, paused: true }));
        } catch (e) {
          problems.push(`${where}: period[${j}]: "${pattern}" is not a cron expression: ${errorText(e)}`);
        }
      }
      periods.push({ crons, patterns: per.periods, timezone: per.timezone, overrides: overrides(per) });
    }
    if (size) {
      specs.push({
        name: p.name,
        image: p.image,
        size,
        base: { idleCount: p.idle_count, idleCountMin: p.idle_count_min, idleScaleFactor: p.idle_scale_factor, idleTimeMs: durationSeconds(p.idle_time) * 1000 },
        periods,
        maxInstances: p.max_instances,
        maxUseCount: p.max_use_count,
        maxGrowthRate: p.max_growth_rate,
        maxRuntimeMs: durationSeconds(p.max_runtime) * 1000,
      });
    }
  }
  if (problems.length > 0) throw new MayflyError(ErrorCode.CONFIG_INVALID, problems.join('\n'));
  return specs;
}

/** The idle policy at `now`: the base, overridden by the last period whose cron matches. */
export function policyAt(spec: PoolSpec, now: Date): IdlePolicy & { period: number | null } {
  let active: number | null = null;
  spec.periods.forEach((p, i) => {
    if (p.crons.some((c) => c.match(now))) active = i;
  });
  return active === null ? { ...spec.base, period: null } : { ...spec.base, ...spec.periods[active]!.overrides, period: active };
}

/**
 * Idle machines wanted: idle_count, or with idle_scale_factor > 0, in-use × factor rounded up,
 * kept between idle_count_min and idle_count (docker+machine's IdleScaleFactor semantics).
 */
export function desiredIdle(policy: IdlePolicy, inUse: number): number {
  if (policy.idleScaleFactor <= 0) return policy.idleCount;
  const scaled = Math.ceil(inUse * policy.idleScaleFactor);
  return Math.min(policy.idleCount, Math.max(policy.idleCountMin, scaled));
}
