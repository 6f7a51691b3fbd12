import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ConfigSchema, durationSeconds } from '../../src/config/schema.ts';
import { ErrorCode } from '../../src/errors.ts';
import { desiredIdle, policyAt, poolSpecs, type IdlePolicy, type PoolSpec } from '../../src/pool/policy.ts';
import type { HostLimits } from '../../src/pool/sizes.ts';
import { catchMayfly } from '../helpers/assert.ts';

const BIG_HOST: HostLimits = { cpus: 64, memoryMiB: 1 << 20 };
const SMALL_HOST: HostLimits = { cpus: 8, memoryMiB: 16384 };

function specs(config: Record<string, unknown>, host: HostLimits = BIG_HOST): PoolSpec[] {
  return poolSpecs(ConfigSchema.parse(config), host);
}

function one(p: Record<string, unknown>, extra: Record<string, unknown> = {}): PoolSpec {
  const [s, ...rest] = specs({ ...extra, pool: [{ name: 'ci', image: 'debian-12', ...p }] });
  assert.ok(s);
  assert.equal(rest.length, 0);
  return s;
}

describe('poolSpecs', () => {
  test('defaults', () => {
    const s = one({});
    assert.deepEqual(
      { ...s, periods: s.periods.length },
      {
        name: 'ci',
        image: 'debian-12',
        size: { cpus: 1, memoryMiB: 1024, diskGiB: 4 },
        base: { idleCount: 0, idleCountMin: 0, idleScaleFactor: 0, idleTimeMs: 1_200_000 },
        periods: 0,
        maxInstances: 10,
        maxUseCount: 1,
        maxGrowthRate: 1,
        maxRuntimeMs: 0,
      },
    );
    assert.deepEqual(specs({}), []);
  });

  test('size labels: small, medium, large', () => {
    assert.deepEqual(one({ size: 'small' }).size, { cpus: 1, memoryMiB: 1024, diskGiB: 4 });
    assert.deepEqual(one({ size: 'medium' }).size, { cpus: 2, memoryMiB: 2048, diskGiB: 10 });
    assert.deepEqual(one({ size: 'large' }).size, { cpus: 4, memoryMiB: 4096, diskGiB: 20 });
  });

  test('custom size labels', () => {
    assert.deepEqual(one({ size: '4cpu8gb50gb' }).size, { cpus: 4, memoryMiB: 8192, diskGiB: 50 });
    assert.deepEqual(one({ size: '1cpu512mb10gb' }).size, { cpus: 1, memoryMiB: 512, diskGiB: 10 });
  });

  test('[sizes.X] defines new sizes and overrides built-in ones', () => {
    const sizes = { small: { cpus: 2, memory: 1536, disk: 8 }, build: { cpus: 16, memory: 32768, disk: 100 } };
    assert.deepEqual(one({ size: 'small' }, { sizes }).size, { cpus: 2, memoryMiB: 1536, diskGiB: 8 });
    assert.deepEqual(one({ size: 'build' }, { sizes }).size, { cpus: 16, memoryMiB: 32768, diskGiB: 100 });
    assert.deepEqual(one({ size: 'medium' }, { sizes }).size, { cpus: 2, memoryMiB: 2048, diskGiB: 10 });
  });

  test('cpus, memory and disk override parts of the size', () => {
    assert.deepEqual(one({ size: 'medium', cpus: 3 }).size, { cpus: 3, memoryMiB: 2048, diskGiB: 10 });
    assert.deepEqual(one({ size: 'medium', memory: 3000 }).size, { cpus: 2, memoryMiB: 3000, diskGiB: 10 });
    assert.deepEqual(one({ size: 'medium', disk: 30 }).size, { cpus: 2, memoryMiB: 2048, diskGiB: 30 });
    assert.deepEqual(one({ size: '4cpu8gb50gb', cpus: 6, memory: 6144, disk: 60 }).size, { cpus: 6, memoryMiB: 6144, diskGiB: 60 });
  });

  test('a size beyond the host is refused, naming the pool', () => {
    const e = catchMayfly(() => specs({ pool: [{ name: 'huge', image: 'debian-12', size: '16cpu8gb10gb' }] }, SMALL_HOST));
    assert.equal(e.code, ErrorCode.CONFIG_INVALID);
    assert.equal(e.message, 'pool[0] (huge): 16 CPUs asked for, but this host has 8');
    const m = catchMayfly(() => specs({ pool: [{ name: 'fat', image: 'debian-12', memory: 20000 }] }, SMALL_HOST));
    assert.equal(m.message, 'pool[0] (fat): 20000 MiB of memory asked for, but this host can give 16384 MiB');
    // The same sizes fit a bigger host.
    assert.equal(specs({ pool: [{ name: 'huge', image: 'debian-12', size: '16cpu8gb10gb' }] }).length, 1);
  });

  test('every problem is reported together in one CONFIG_INVALID error', () => {
    const e = catchMayfly(() =>
      specs(
        {
          pool: [
            { name: 'big', image: 'debian-12', size: '128cpu1gb10gb' },
            { name: 'dup', image: 'debian-12' },
            { name: 'dup', image: 'debian-12' },
            { name: 'minmax', image: 'debian-12', idle_count: 1, idle_count_min: 2 },
            { name: 'over', image: 'debian-12', idle_count: 11, max_instances: 10 },
            { name: 'tz', image: 'debian-12', period: [{ periods: ['* * * * *'], timezone: 'Mars/Olympus' }] },
            {
              name: 'cron',
              image: 'debian-12',
              period: [{ periods: ['61 * * * *', '* * 9-17 * * mon-fri 2025', '* * 9-17 * * mon-fri *'] }],
            },
            { name: 'nosize', image: 'debian-12', size: 'huge' },
            { name: 'fine', image: 'debian-12' },
          ],
        },
        SMALL_HOST,
      ),
    );
    assert.equal(e.code, ErrorCode.CONFIG_INVALID);
    const lines = e.message.split('\n');
    assert.equal(lines.length, 8);
    assert.deepEqual(lines.slice(0, 5), [
      'pool[0] (big): 128 CPUs asked for, but this host has 8',
      'pool[2] (dup): the name "dup" is used by an earlier pool',
      'pool[3] (minmax): idle_count_min (2) is above idle_count (1)',
      'pool[4] (over): idle_count (11) is above max_instances (10)',
      'pool[5] (tz): period[0]: unknown time zone "Mars/Olympus" (use an IANA name such as "Europe/Berlin")',
    ]);
    assert.match(lines[5]!, /^pool\[6\] \(cron\): period\[0\]: "61 \* \* \* \*" is not a cron expression: .*minute/);
    assert.equal(lines[6], 'pool[6] (cron): period[0]: "* * 9-17 * * mon-fri 2025" is not a cron expression: the year field "2025" is not supported (only "*")');
    assert.match(lines[7]!, /^pool\[7\] \(nosize\): 'huge' is not a size/);
    assert.ok(!lines.some((l) => l.includes('(fine)')));
  });

  test('a 7-field cron with year "*" is accepted; any other year is refused', () => {
    const s = one({ period: [{ periods: ['* * 9-17 * * mon-fri *'], timezone: 'UTC', idle_count: 2 }], idle_count: 1 });
    assert.equal(s.periods.length, 1);
    assert.deepEqual(s.periods[0]!.patterns, ['* * 9-17 * * mon-fri *']);
    assert.equal(s.periods[0]!.crons.length, 1);
    assert.equal(policyAt(s, new Date('2025-01-06T09:15:42Z')).period, 0);
    assert.equal(policyAt(s, new Date('2025-01-06T18:00:00Z')).period, null);
    for (const year of ['2025', '2025-2030', '*/2']) {
      const e = catchMayfly(() => one({ period: [{ periods: [`* * 9-17 * * mon-fri ${year}`] }] }));
      assert.equal(e.code, ErrorCode.CONFIG_INVALID);
      assert.equal(e.message, `pool[0] (ci): period[0]: "* * 9-17 * * mon-fri ${year}" is not a cron expression: the year field "${year}" is not supported (only "*")`);
    }
  });

  test('durations: strings and seconds', () => {
    const s = one({ idle_time: '20m', max_runtime: '1h30m', period: [{ periods: ['* * * * * *'], idle_time: 90 }] });
    assert.equal(s.base.idleTimeMs, 1_200_000);
    assert.equal(s.maxRuntimeMs, 5_400_000);
    assert.deepEqual(s.periods[0]!.overrides, { idleTimeMs: 90_000 });
    assert.equal(one({ idle_time: 90 }).base.idleTimeMs, 90_000);
    assert.equal(one({ idle_time: '90s' }).base.idleTimeMs, 90_000);
    assert.equal(one({ max_runtime: '2h' }).maxRuntimeMs, 7_200_000);
    assert.deepEqual(
      ['20m', '1h30m', '1h2m3s', '45s', 90, 0].map(durationSeconds),
      [1200, 5400, 3723, 45, 90, 0],
    );
    for (const bad of ['20 minutes', '', '1m1h', '-5', 1.5]) {
      assert.equal(ConfigSchema.safeParse({ pool: [{ name: 'ci', image: 'debian-12', idle_time: bad }] }).success, false, `idle_time ${JSON.stringify(bad)}`);
    }
  });
});

describe('policyAt', () => {
  const spec = one({
    idle_count: 1,
    idle_time: '20m',
    period: [
      // Working hours: more idle machines, kept longer.
      { periods: ['* * 8-18 * * *'], timezone: 'UTC', idle_count: 4, idle_time: '1h' },
      // Lunch peak, inside working hours; listed later, so it wins where both match.
      { periods: ['* * 12-13 * * *'], timezone: 'UTC', idle_count: 8 },
      // Weekends, two patterns (either matches).
      { periods: ['* * * * * sat', '* * * * * sun'], timezone: 'UTC', idle_count: 0 },
    ],
  });
  const at = (iso: string) => policyAt(spec, new Date(iso));

  test('the base outside every period', () => {
    assert.deepEqual(at('2025-01-06T07:30:00Z'), { idleCount: 1, idleCountMin: 0, idleScaleFactor: 0, idleTimeMs: 1_200_000, period: null });
  });

  test('a single matching period overrides only what it sets', () => {
    assert.deepEqual(at('2025-01-06T09:30:00Z'), { idleCount: 4, idleCountMin: 0, idleScaleFactor: 0, idleTimeMs: 3_600_000, period: 0 });
  });

  test('where periods overlap the last match wins, over the base (not layered on earlier periods)', () => {
    assert.deepEqual(at('2025-01-06T12:30:00Z'), { idleCount: 8, idleCountMin: 0, idleScaleFactor: 0, idleTimeMs: 1_200_000, period: 1 });
    // Saturday noon matches all three.
    assert.deepEqual(at('2025-01-04T12:30:00Z'), { idleCount: 0, idleCountMin: 0, idleScaleFactor: 0, idleTimeMs: 1_200_000, period: 2 });
    assert.equal(at('2025-01-05T03:00:00Z').period, 2);
    // Order decides, not specificity: with the lunch period first, working hours win at noon.
    const reversed = one({
      idle_count: 1,
      period: [
        { periods: ['* * 12-13 * * *'], idle_count: 8 },
        { periods: ['* * 8-18 * * *'], idle_count: 4 },
      ],
    });
    assert.deepEqual(policyAt(reversed, new Date('2025-01-06T12:30:00Z')).period, 1);
    assert.deepEqual(policyAt(reversed, new Date('2025-01-06T12:30:00Z')).idleCount, 4);
  });

  test('a period in a time zone', () => {
    const berlin = one({ idle_count: 1, period: [{ periods: ['* * 9-17 * * mon-fri *'], timezone: 'Europe/Berlin', idle_count: 3 }] });
    const p = (iso: string) => policyAt(berlin, new Date(iso)).period;
    assert.equal(p('2025-01-06T08:00:00Z'), 0); // 09:00 CET
    assert.equal(p('2025-01-06T07:59:59Z'), null); // 08:59:59 CET
    assert.equal(p('2025-01-06T17:00:00Z'), null); // 18:00 CET, though 17h UTC
    assert.equal(p('2025-07-07T07:00:00Z'), 0); // 09:00 CEST
    assert.equal(p('2025-07-07T16:00:00Z'), null); // 18:00 CEST
    assert.equal(p('2025-01-03T22:30:00Z'), null); // Friday 23:30 in Berlin, still Friday UTC
    assert.equal(p('2025-01-05T23:30:00Z'), null); // Monday 00:30 in Berlin
  });

  test('a 5-field cron matches at the start of a minute', () => {
    const five = one({ idle_count: 1, period: [{ periods: ['* 9-17 * * mon-fri'], timezone: 'Europe/Berlin', idle_count: 3 }] });
    assert.equal(policyAt(five, new Date('2025-01-06T08:30:00Z')).period, 0);
    assert.equal(policyAt(five, new Date('2025-01-06T07:30:00Z')).period, null);
  });

  test(
    'a 5-field cron matches during the whole minute',
    () => {
      const five = one({ idle_count: 1, period: [{ periods: ['* 9-17 * * mon-fri'], timezone: 'Europe/Berlin', idle_count: 3 }] });
      assert.equal(policyAt(five, new Date('2025-01-06T08:30:15Z')).period, 0);
      assert.equal(policyAt(five, new Date('2025-01-06T16:59:59.500Z')).period, 0);
    },
  );
});

describe('desiredIdle', () => {
  const policy = (idleCount: number, idleCountMin: number, idleScaleFactor: number): IdlePolicy => ({ idleCount, idleCountMin, idleScaleFactor, idleTimeMs: 0 });
  const table: [IdlePolicy, number, number][] = [
    // Without a scale factor: idle_count, whatever is in use.
    [policy(3, 0, 0), 0, 3],
    [policy(3, 0, 0), 50, 3],
    [policy(0, 0, 0), 7, 0],
    // With one: ceil(in use × factor), between idle_count_min and idle_count.
    [policy(5, 1, 0.5), 0, 1],
    [policy(5, 1, 0.5), 1, 1],
    [policy(5, 1, 0.5), 2, 1],
    [policy(5, 1, 0.5), 3, 2],
    [policy(5, 1, 0.5), 5, 3],
    [policy(5, 1, 0.5), 10, 5],
    [policy(5, 1, 0.5), 11, 5],
    [policy(5, 0, 1), 0, 0],
    [policy(5, 0, 1), 4, 4],
    [policy(5, 2, 1), 1, 2],
    [policy(10, 0, 0.25), 1, 1],
    [policy(10, 0, 0.25), 8, 2],
    [policy(10, 0, 0.25), 9, 3],
    [policy(4, 4, 2), 0, 4],
    [policy(0, 0, 2), 10, 0],
  ];
  for (const [p, inUse, want] of table) {
    test(`idle_count=${p.idleCount} min=${p.idleCountMin} factor=${p.idleScaleFactor}, ${inUse} in use → ${want}`, () => {
      assert.equal(desiredIdle(p, inUse), want);
    });
  }
});
