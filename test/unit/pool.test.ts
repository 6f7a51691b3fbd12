import assert from 'node:assert/strict';
import { afterEach, describe, test } from 'node:test';
import { ConfigSchema } from '../../src/config/schema.ts';
import type { MachineSize } from '../../src/drivers/types.ts';
import { ErrorCode, MayflyError } from '../../src/errors.ts';
import { silentLogger } from '../../src/log.ts';
import { policyAt, poolSpecs, type PoolSpec } from '../../src/pool/policy.ts';
import { PoolManager, type CapacityGuard, type PoolEvent, type PoolLease, type PooledMachine, type PoolStatus } from '../../src/pool/pool.ts';

// PoolManager against a fake machine factory and a hand-driven clock. Creations either finish
// on the next microtask (auto) or wait until the test finishes them (manual); real timers are
// only involved in acquire timeouts, which the tests keep short.

const HOST = { cpus: 64, memoryMiB: 1 << 20 };

function specsFor(pools: Record<string, unknown>[]): PoolSpec[] {
  return poolSpecs(ConfigSchema.parse({ pool: pools }), HOST);
}

/** Lets every queued microtask (creation, destroy, pump) run. */
async function settle(): Promise<void> {
  for (let i = 0; i < 3; i++) await new Promise<void>((r) => setImmediate(r));
}

class FakeMachine implements PooledMachine {
  readonly id: string;
  readonly pool: string;
  dead: string | undefined;
  destroyCalls = 0;
  readonly #factory: FakeFactory;
  #gone = false;
  constructor(factory: FakeFactory, id: string, pool: string) {
    this.#factory = factory;
    this.id = id;
    this.pool = pool;
  }
  destroy(): Promise<void> {
    this.destroyCalls++;
    if (!this.#gone) {
      this.#gone = true;
      this.#factory.alive--;
    }
    return Promise.resolve();
  }
  deadReason(): string | undefined {
    return this.dead;
  }
}

interface PendingCreation {
  pool: string;
  succeed(): FakeMachine;
  fail(e: Error): void;
}

class FakeFactory {
  /** Finish each creation on the next microtask; otherwise it waits in `pending`. */
  auto: boolean;
  /** Fail every new creation with this error. */
  failWith: Error | null = null;
  /** Reject a pending creation when the pool's stop signal fires (as a real driver would). */
  honorAbort = true;
  attempts = 0;
  readonly machines: FakeMachine[] = [];
  readonly pending: PendingCreation[] = [];
  /** Creations in flight plus machines whose destroy() has not been called. */
  alive = 0;
  maxAlive = 0;
  maxPending = 0;
  #seq = 0;

  constructor(auto: boolean) {
    this.auto = auto;
  }

  readonly create = (spec: PoolSpec, signal: AbortSignal): Promise<FakeMachine> => {
    this.attempts++;
    this.alive++;
    this.maxAlive = Math.max(this.maxAlive, this.alive);
    const { promise, resolve, reject } = Promise.withResolvers<FakeMachine>();
    let done = false;
    const c: PendingCreation = {
      pool: spec.name,
      succeed: () => {
        assert.ok(!done, 'creation finished twice');
        done = true;
        this.#remove(c);
        const m = new FakeMachine(this, `m${++this.#seq}`, spec.name);
        this.machines.push(m);
        resolve(m);
        return m;
      },
      fail: (e) => {
        if (done) return;
        done = true;
        this.#remove(c);
        this.alive--;
        reject(e);
      },
    };
    signal.addEventListener('abort', () => {
      if (this.honorAbort) c.fail(new Error('creation aborted'));
    }, { once: true });
    const failure = this.failWith;
    if (failure) queueMicrotask(() => c.fail(failure));
    else if (this.auto) queueMicrotask(() => c.succeed());
    else {
      this.pending.push(c);
      this.maxPending = Math.max(this.maxPending, this.pending.length);
    }
    return promise;
  };

  #remove(c: PendingCreation): void {
    const i = this.pending.indexOf(c);
    if (i >= 0) this.pending.splice(i, 1);
  }

  /** Finishes the oldest pending creation. */
  finish(): FakeMachine {
    const c = this.pending[0];
    assert.ok(c, 'no creation is pending');
    return c.succeed();
  }
}

interface HarnessOptions {
  auto?: boolean;
  capacity?: CapacityGuard;
  /** Clock start (ms since the epoch). */
  start?: number;
  onEvent?: (e: PoolEvent) => void;
  holderAlive?: (pid: number, since: number) => boolean;
}

const managers: PoolManager<FakeMachine>[] = [];
afterEach(async () => {
  // Clears backoff timers and fails leftover waiters; creations still pending are aborted.
  for (const pm of managers.splice(0)) await pm.shutdown({ destroyIdle: true, destroyLeased: true });
});

const T0 = Date.parse('2025-01-06T12:00:00Z'); // a Monday

function harness(pools: Record<string, unknown>[], opts: HarnessOptions = {}) {
  const factory = new FakeFactory(opts.auto ?? true);
  const events: PoolEvent[] = [];
  const clock = { now: opts.start ?? T0 };
  const pm = new PoolManager<FakeMachine>(specsFor(pools), {
    create: factory.create,
    log: silentLogger,
    capacity: opts.capacity ?? { allows: () => true },
    clock: () => clock.now,
    holderAlive: opts.holderAlive,
    onEvent: (e) => {
      events.push(e);
      opts.onEvent?.(e);
    },
  });
  managers.push(pm);
  return {
    pm,
    factory,
    events,
    clock,
    advance(ms: number) {
      clock.now += ms;
    },
    status(name?: string): PoolStatus {
      const s = name === undefined ? pm.status()[0] : pm.status().find((x) => x.name === name);
      assert.ok(s, `no status for ${name}`);
      return s;
    },
    ofType(type: PoolEvent['type']): PoolEvent[] {
      return events.filter((e) => e.type === type);
    },
  };
}

function isCode(code: string, message?: RegExp) {
  return (e: unknown): boolean => {
    assert.ok(e instanceof MayflyError, `expected a MayflyError, got ${String(e)}`);
    assert.equal(e.code, code);
    if (message) assert.match(e.message, message);
    return true;
  };
}

const pool = (o: Record<string, unknown> = {}) => ({ name: 'ci', image: 'debian-12', ...o });

describe('filling the warm pool', () => {
  test('fills to idle_count and no more', async () => {
    const h = harness([pool({ idle_count: 3, max_growth_rate: 10 })]);
    assert.equal(h.status().idle, 0);
    await h.pm.reconcile();
    assert.equal(h.status().creating, 3);
    await settle();
    assert.deepEqual({ idle: h.status().idle, creating: h.status().creating, leased: h.status().leased }, { idle: 3, creating: 0, leased: 0 });
    assert.equal(h.factory.attempts, 3);
    assert.equal(h.ofType('ready').length, 3);
    for (let i = 0; i < 3; i++) {
      await h.pm.reconcile();
      await settle();
    }
    assert.equal(h.status().idle, 3);
    assert.equal(h.factory.attempts, 3);
    assert.deepEqual(
      h.pm.machines().map((m) => m.id),
      ['m1', 'm2', 'm3'],
    );
  });

  test('refills after leases take idle machines', async () => {
    const h = harness([pool({ idle_count: 3, max_growth_rate: 10 })]);
    await h.pm.reconcile();
    await settle();
    const a = h.pm.acquire({ pool: 'ci', timeoutMs: 1000 });
    // Handed out synchronously, and the refill starts at once.
    assert.deepEqual([h.status().idle, h.status().leased, h.status().creating], [2, 1, 1]);
    const b = h.pm.acquire({ pool: 'ci', timeoutMs: 1000 });
    assert.deepEqual([h.status().idle, h.status().leased, h.status().creating], [1, 2, 2]);
    const [la, lb] = await Promise.all([a, b]);
    assert.equal(la.machine.id, 'm1');
    assert.equal(lb.machine.id, 'm2');
    await settle();
    assert.deepEqual([h.status().idle, h.status().leased, h.status().creating], [3, 2, 0]);
    assert.equal(h.factory.attempts, 5);
  });

  test('max_growth_rate bounds concurrent creations', async () => {
    const h = harness([pool({ idle_count: 5, max_growth_rate: 2 })], { auto: false });
    await h.pm.reconcile();
    assert.equal(h.factory.pending.length, 2);
    await h.pm.reconcile();
    await h.pm.reconcile();
    assert.equal(h.factory.pending.length, 2);
    assert.equal(h.factory.attempts, 2);
    h.factory.finish();
    await settle();
    // One slot freed, one more creation started.
    assert.deepEqual([h.status().idle, h.status().creating, h.factory.attempts], [1, 2, 3]);
    while (h.factory.pending.length > 0) {
      h.factory.finish();
      await settle();
      await h.pm.reconcile();
    }
    assert.equal(h.status().idle, 5);
    assert.equal(h.factory.attempts, 5);
    assert.equal(h.factory.maxPending, 2);
  });
});

describe('acquire', () => {
  test('takes an idle machine at once and reports queued, then leased', async () => {
    const h = harness([pool({ idle_count: 1 })]);
    await h.pm.reconcile();
    await settle();
    const [m1] = h.factory.machines;
    assert.ok(m1);
    h.advance(1234);
    h.events.length = 0;
    const lease = await h.pm.acquire({ pool: 'ci', timeoutMs: 100, job: { id: '42' } });
    assert.equal(lease.machine, m1);
    assert.equal(lease.pool, 'ci');
    assert.deepEqual(lease.job, { id: '42' });
    assert.equal(lease.queuedAt, T0 + 1234);
    assert.equal(lease.leasedAt, T0 + 1234);
    assert.equal(lease.deadline, null);
    assert.equal(h.pm.lease(lease.id), lease);
    const [queued, leased] = h.events;
    assert.deepEqual(
      h.events.slice(0, 2).map((e) => e.type),
      ['queued', 'leased'],
    );
    assert.deepEqual(queued, { type: 'queued', pool: 'ci', at: T0 + 1234, data: { job: { id: '42' } } });
    assert.deepEqual(leased, {
      type: 'leased',
      pool: 'ci',
      at: T0 + 1234,
      instance: 'm1',
      lease: lease.id,
      data: { waitedMs: 0, job: { id: '42' } },
    });
  });

  test('a waiter gets the machine created for it, with waitedMs', async () => {
    const h = harness([pool()], { auto: false });
    const p = h.pm.acquire({ pool: 'ci', timeoutMs: 1000, job: { id: '7' } });
    assert.deepEqual([h.status().waiting, h.status().creating], [1, 1]);
    h.advance(5000);
    const m = h.factory.finish();
    const lease = await p;
    assert.equal(lease.machine, m);
    assert.equal(lease.queuedAt, T0);
    assert.equal(lease.leasedAt, T0 + 5000);
    assert.deepEqual(
      h.events.map((e) => e.type),
      ['queued', 'ready', 'leased'],
    );
    assert.deepEqual(h.ofType('ready')[0]!.data, { bootMs: 5000 });
    assert.deepEqual(h.ofType('leased')[0]!.data, { waitedMs: 5000, job: { id: '7' } });
    assert.equal(h.status().waiting, 0);
  });

  test('max_instances holds under a burst of 20; waiters are served FIFO; the rest time out', async () => {
    const h = harness([pool({ max_instances: 3, max_growth_rate: 3, max_use_count: 1 })]);
    const order: number[] = [];
    const leases: PoolLease<FakeMachine>[] = [];
    const errors: unknown[] = [];
    const all = Array.from({ length: 20 }, (_, i) =>
      h.pm.acquire({ pool: 'ci', timeoutMs: 200, job: { n: String(i) } }).then(
        (l) => {
          order.push(i);
          leases[i] = l;
        },
        (e: unknown) => {
          errors[i] = e;
        },
      ),
    );
    assert.equal(h.status().waiting, 20);
    assert.equal(h.status().creating, 3);
    await settle();
    assert.deepEqual(order, [0, 1, 2]);
    assert.deepEqual([h.status().leased, h.status().waiting, h.status().creating], [3, 17, 0]);
    for (let k = 0; k < 5; k++) {
      await h.pm.release(leases[k]!.id);
      assert.ok(h.factory.alive <= 3);
      await settle();
      assert.deepEqual(order, Array.from({ length: 4 + k }, (_, i) => i));
      assert.equal(h.status().leased, 3);
    }
    await Promise.all(all);
    assert.deepEqual(order, [0, 1, 2, 3, 4, 5, 6, 7]);
    assert.equal(h.factory.maxAlive, 3);
    assert.equal(h.factory.attempts, 8);
    assert.deepEqual(
      h.ofType('leased').map((e) => (e.data!.job as Record<string, string>).n),
      ['0', '1', '2', '3', '4', '5', '6', '7'],
    );
    for (let i = 0; i < 20; i++) {
      if (i < 8) {
        assert.equal(errors[i], undefined);
        continue;
      }
      assert.equal(leases[i], undefined);
      assert.ok(isCode(ErrorCode.POOL_TIMEOUT, /^no machine of pool 'ci' became free within 0\.2 s$/)(errors[i]));
      assert.equal((errors[i] as MayflyError).hint, 'all 3 machines (max_instances) are busy; raise max_instances or wait longer');
    }
    assert.equal(h.ofType('wait_timeout').length, 12);
    assert.equal(h.status().waiting, 0);
  });

  test('an abort signal removes the waiter', async () => {
    const h = harness([pool()], { auto: false });
    const ac = new AbortController();
    const p = h.pm.acquire({ pool: 'ci', timeoutMs: 5000, signal: ac.signal });
    assert.equal(h.status().waiting, 1);
    ac.abort();
    await assert.rejects(p, { name: 'AbortError' });
    assert.equal(h.status().waiting, 0);
    // The machine started for it becomes idle rather than going to nobody.
    h.factory.finish();
    await settle();
    assert.deepEqual([h.status().idle, h.status().leased], [1, 0]);
    assert.equal(h.ofType('leased').length, 0);
    // An already-aborted signal refuses at once.
    const gone = AbortSignal.abort(new Error('cancelled by the job'));
    await assert.rejects(async () => h.pm.acquire({ pool: 'ci', timeoutMs: 5000, signal: gone }), { message: 'cancelled by the job' });
    assert.equal(h.status().waiting, 0);
  });

  test(
    'acquire reports its errors through the returned promise',
    async () => {
      const h = harness([pool()]);
      let p: Promise<unknown> | undefined;
      assert.doesNotThrow(() => {
        p = h.pm.acquire({ pool: 'nope', timeoutMs: 10 });
      });
      await assert.rejects(p!, isCode(ErrorCode.USAGE));
    },
  );

  test('an unknown pool is a usage error listing the pools', async () => {
    const h = harness([pool({ name: 'alpha' }), pool({ name: 'beta' })]);
    await assert.rejects(
      async () => h.pm.acquire({ pool: 'gamma', timeoutMs: 10 }),
      (e: unknown) => {
        assert.ok(isCode(ErrorCode.USAGE)(e));
        assert.equal((e as MayflyError).message, "no pool named 'gamma'");
        assert.equal((e as MayflyError).hint, 'pools: alpha, beta');
        return true;
      },
    );
    const none = harness([]);
    await assert.rejects(async () => none.pm.acquire({ pool: 'ci', timeoutMs: 10 }), (e: unknown) => {
      assert.ok(isCode(ErrorCode.USAGE)(e));
      assert.equal((e as MayflyError).hint, 'no [[pool]] is configured');
      return true;
    });
  });
});

describe('release and max_use_count', () => {
  test('max_use_count 1: release destroys the machine', async () => {
    const h = harness([pool({ idle_count: 0, max_use_count: 1 })]);
    const l = await h.pm.acquire({ pool: 'ci', timeoutMs: 1000 });
    h.advance(60_000);
    await h.pm.release(l.id);
    assert.equal(l.machine.destroyCalls, 1);
    assert.deepEqual(h.ofType('released')[0], { type: 'released', pool: 'ci', at: T0 + 60_000, instance: l.machine.id, lease: l.id, data: { heldMs: 60_000 } });
    assert.deepEqual(h.ofType('destroyed')[0]!.data, { why: 'released' });
    assert.deepEqual([h.status().idle, h.status().leased], [0, 0]);
    assert.equal(h.pm.lease(l.id), undefined);
    await assert.rejects(h.pm.release(l.id), isCode(ErrorCode.LEASE_NOT_FOUND));
  });

  test('max_use_count 2: the first release returns it to idle, the second destroys it', async () => {
    const h = harness([pool({ idle_count: 0, max_use_count: 2 })]);
    const l1 = await h.pm.acquire({ pool: 'ci', timeoutMs: 1000 });
    await h.pm.release(l1.id);
    assert.equal(l1.machine.destroyCalls, 0);
    assert.deepEqual([h.status().idle, h.status().leased], [1, 0]);
    const l2 = await h.pm.acquire({ pool: 'ci', timeoutMs: 1000 });
    assert.equal(l2.machine, l1.machine);
    assert.notEqual(l2.id, l1.id);
    await h.pm.release(l2.id);
    assert.equal(l1.machine.destroyCalls, 1);
    assert.deepEqual([h.status().idle, h.status().leased], [0, 0]);
    assert.equal(h.factory.attempts, 1);
  });
});

describe('idle policy', () => {
  // Period 09:00–11:59 UTC wants 4 idle; otherwise 1. idle_time is 10 minutes.
  const withPeriod = pool({
    idle_count: 1,
    idle_time: '10m',
    max_growth_rate: 1,
    period: [{ periods: ['* * 9-11 * * *'], timezone: 'UTC', idle_count: 4 }],
  });

  async function fillFourAt(h: ReturnType<typeof harness>): Promise<void> {
    await h.pm.reconcile();
    for (let i = 0; i < 4; i++) {
      h.advance(60_000);
      h.factory.finish();
      await settle();
    }
    assert.equal(h.status().idle, 4);
    assert.equal(h.factory.pending.length, 0);
  }

  test('idle_time: excess idle machines go once past idle_time, oldest first', async () => {
    const h = harness([withPeriod], { auto: false, start: Date.parse('2025-01-06T11:50:00Z') });
    await fillFourAt(h); // m1 ready 11:51, m2 11:52, m3 11:53, m4 11:54
    h.clock.now = Date.parse('2025-01-06T12:00:00Z'); // period over: 1 wanted, but none is 10 min idle yet
    await h.pm.reconcile();
    await settle();
    assert.equal(h.status().desiredIdle, 1);
    assert.equal(h.status().idle, 4);
    h.clock.now = Date.parse('2025-01-06T12:01:00Z'); // m1 idle exactly 10 min: not past it
    await h.pm.reconcile();
    await settle();
    assert.equal(h.status().idle, 4);
    assert.equal(h.ofType('idle_expired').length, 0);
    h.clock.now = Date.parse('2025-01-06T12:01:00.001Z');
    await h.pm.reconcile();
    await settle();
    assert.equal(h.status().idle, 3);
    assert.deepEqual(
      h.ofType('idle_expired').map((e) => [e.instance, e.data!.idleMs]),
      [['m1', 600_001]],
    );
    h.clock.now = Date.parse('2025-01-06T12:03:30Z');
    await h.pm.reconcile();
    await settle();
    assert.deepEqual(
      h.ofType('idle_expired').map((e) => e.instance),
      ['m1', 'm2', 'm3'],
    );
    assert.deepEqual(
      h.factory.machines.map((m) => m.destroyCalls),
      [1, 1, 1, 0],
    );
    // The one wanted stays, however long it idles.
    h.clock.now = Date.parse('2025-01-06T20:00:00Z');
    await h.pm.reconcile();
    await settle();
    assert.deepEqual(
      h.pm.machines().map((m) => m.id),
      ['m4'],
    );
    assert.equal(h.factory.attempts, 4);
  });

  test('idle_time: within idle_time nothing is destroyed while in the period', async () => {
    const h = harness([withPeriod], { auto: false, start: Date.parse('2025-01-06T09:00:00Z') });
    await fillFourAt(h);
    h.clock.now = Date.parse('2025-01-06T11:59:59Z'); // long idle, but 4 are wanted
    await h.pm.reconcile();
    await settle();
    assert.equal(h.status().idle, 4);
    assert.equal(h.status().period, 0);
    assert.equal(h.ofType('idle_expired').length, 0);
  });

  test('idle_scale_factor scales idle with machines in use, between idle_count_min and idle_count', async () => {
    const h = harness([pool({ idle_count: 5, idle_count_min: 1, idle_scale_factor: 0.5, idle_time: '20m', max_instances: 30, max_growth_rate: 10 })]);
    await h.pm.reconcile();
    await settle();
    assert.deepEqual([h.status().idle, h.status().desiredIdle], [1, 1]);
    const leases: PoolLease<FakeMachine>[] = [];
    const expectations: [number, number][] = [
      [1, 1], // ceil(0.5) = 1
      [5, 3], // ceil(2.5) = 3
      [12, 5], // ceil(6) = 6, capped at idle_count
    ];
    for (const [inUse, idle] of expectations) {
      while (leases.length < inUse) leases.push(await h.pm.acquire({ pool: 'ci', timeoutMs: 1000 }));
      await settle();
      assert.deepEqual([h.status().leased, h.status().desiredIdle, h.status().idle], [inUse, idle, idle], `with ${inUse} in use`);
    }
    // Jobs end (max_use_count 1): back to idle_count_min, once the extra ones have idled long enough.
    for (const l of leases) await h.pm.release(l.id);
    await settle();
    assert.deepEqual([h.status().leased, h.status().desiredIdle, h.status().idle], [0, 1, 5]);
    h.advance(20 * 60_000 + 1);
    await h.pm.reconcile();
    await settle();
    assert.equal(h.status().idle, 1);
    assert.equal(h.ofType('idle_expired').length, 4);
  });

  test('a period switches the policy (Europe/Berlin business hours)', async () => {
    const berlin = pool({
      idle_count: 1,
      max_growth_rate: 5,
      period: [{ periods: ['* * 9-17 * * mon-fri *'], timezone: 'Europe/Berlin', idle_count: 3 }],
    });
    const [spec] = specsFor([berlin]);
    assert.ok(spec);
    const at = (iso: string) => policyAt(spec, new Date(iso));
    // Winter (UTC+1): 08:00Z is 09:00 in Berlin, inside; 07:59:59Z is 08:59:59, outside.
    assert.deepEqual(at('2025-01-06T08:00:00Z'), { idleCount: 3, idleCountMin: 0, idleScaleFactor: 0, idleTimeMs: 1_200_000, period: 0 });
    assert.equal(at('2025-01-06T07:59:59Z').period, null);
    assert.equal(at('2025-01-06T07:59:59Z').idleCount, 1);
    // 16:59:59Z is 17:59:59 in Berlin (hour 17, inside); 17:00Z is 18:00 (outside) though UTC hour 17 is in 9-17.
    assert.equal(at('2025-01-06T16:59:59Z').period, 0);
    assert.equal(at('2025-01-06T17:00:00Z').period, null);
    // Summer (UTC+2): 07:00Z is 09:00 in Berlin; 06:59:59Z is not.
    assert.equal(at('2025-07-07T07:00:00Z').period, 0);
    assert.equal(at('2025-07-07T06:59:59Z').period, null);
    // Saturday.
    assert.equal(at('2025-01-04T10:00:00Z').period, null);

    const inside = harness([berlin], { start: Date.parse('2025-01-06T08:00:00Z') });
    await inside.pm.reconcile();
    await settle();
    assert.deepEqual([inside.status().idle, inside.status().desiredIdle, inside.status().period], [3, 3, 0]);

    const outside = harness([berlin], { start: Date.parse('2025-01-06T17:00:00Z') });
    await outside.pm.reconcile();
    await settle();
    assert.deepEqual([outside.status().idle, outside.status().desiredIdle, outside.status().period], [1, 1, null]);

    // The same pool after the period ends: extra machines go once idle_time (20 min) has passed.
    inside.clock.now = Date.parse('2025-01-06T17:00:00Z');
    await inside.pm.reconcile();
    await settle();
    assert.deepEqual([inside.status().idle, inside.status().desiredIdle, inside.status().period], [1, 1, null]);
    assert.equal(inside.ofType('idle_expired').length, 2);
  });
});

describe('max_runtime', () => {
  test('a lease past its deadline has its machine destroyed and is marked expired', async () => {
    const h = harness([pool({ max_runtime: '10m' })]);
    const l = await h.pm.acquire({ pool: 'ci', timeoutMs: 1000 });
    assert.equal(l.deadline, T0 + 600_000);
    h.advance(599_999);
    await h.pm.reconcile();
    await settle();
    assert.equal(h.pm.isExpired(l.id), false);
    assert.equal(l.machine.destroyCalls, 0);
    assert.equal(h.ofType('expired').length, 0);
    h.advance(1);
    await h.pm.reconcile();
    await settle();
    assert.equal(h.pm.isExpired(l.id), true);
    assert.equal(l.machine.destroyCalls, 1);
    assert.deepEqual(h.ofType('expired'), [
      { type: 'expired', pool: 'ci', at: T0 + 600_000, instance: l.machine.id, lease: l.id, data: { maxRuntimeMs: 600_000 } },
    ]);
    // The slot is free at once (the holder may never come back); expiring again does nothing;
    // the holder's release still answers, once.
    assert.equal(h.status().leased, 0);
    await h.pm.reconcile();
    assert.equal(h.ofType('expired').length, 1);
    await h.pm.release(l.id);
    assert.equal(h.status().leased, 0);
    assert.equal(h.status().idle, 0);
    assert.equal(h.pm.isExpired(l.id), false);
    assert.equal(h.ofType('released').length, 1);
    await assert.rejects(h.pm.release(l.id), (e: unknown) => isCode(ErrorCode.LEASE_NOT_FOUND, /no lease/)(e));
  });

  test('a lease may ask for less time than the pool allows, never more', async () => {
    const h = harness([pool({ max_runtime: '10m' })]);
    const none = await h.pm.acquire({ pool: 'ci', timeoutMs: 1000, maxRuntimeMs: 0 });
    const short = await h.pm.acquire({ pool: 'ci', timeoutMs: 1000, maxRuntimeMs: 1000 });
    const long = await h.pm.acquire({ pool: 'ci', timeoutMs: 1000, maxRuntimeMs: 3600_000 });
    assert.equal(none.deadline, T0 + 600_000, 'asking for no limit keeps the pool limit');
    assert.equal(short.deadline, T0 + 1000);
    assert.equal(long.deadline, T0 + 600_000);
    h.advance(1000);
    await h.pm.reconcile();
    assert.deepEqual([none, short, long].map((l) => h.pm.isExpired(l.id)), [false, true, false]);

    const free = harness([pool({})]);
    const unlimited = await free.pm.acquire({ pool: 'ci', timeoutMs: 1000 });
    const limited = await free.pm.acquire({ pool: 'ci', timeoutMs: 1000, maxRuntimeMs: 5000 });
    assert.deepEqual([unlimited.deadline, limited.deadline], [null, T0 + 5000]);
  });

  test('a lease whose holder process is gone is released for it', async () => {
    const dead = new Set<number>();
    const h = harness([pool({})], { holderAlive: (pid: number) => !dead.has(pid) });
    const held = await h.pm.acquire({ pool: 'ci', timeoutMs: 1000, holderPid: 111 });
    const orphan = await h.pm.acquire({ pool: 'ci', timeoutMs: 1000, holderPid: 222 });
    const noHolder = await h.pm.acquire({ pool: 'ci', timeoutMs: 1000 });
    dead.add(222);
    await h.pm.reconcile();
    await settle();
    assert.equal(h.status().leased, 2);
    assert.deepEqual(h.ofType('abandoned').map((e) => e.lease), [orphan.id]);
    assert.equal(orphan.machine.destroyCalls, 1);
    assert.deepEqual([held.machine.destroyCalls, noHolder.machine.destroyCalls], [0, 0]);
  });

  test('a detached lease outlives the process that took it; its deadline still ends it', async () => {
    const dead = new Set<number>();
    const h = harness([pool({})], { holderAlive: (pid: number) => !dead.has(pid) });
    const job = await h.pm.acquire({ pool: 'ci', timeoutMs: 1000, holderPid: 333, maxRuntimeMs: 60_000 });
    h.pm.detach(job.id);
    dead.add(333);
    await h.pm.reconcile();
    await settle();
    assert.equal(job.machine.destroyCalls, 0);
    assert.deepEqual(h.ofType('abandoned'), []);
    h.advance(60_000);
    await h.pm.reconcile();
    await settle();
    assert.equal(job.machine.destroyCalls, 1);
    assert.deepEqual(h.ofType('expired').map((e) => e.lease), [job.id]);
    assert.throws(() => h.pm.detach('lease-none'), /no lease 'lease-none'/);
  });
});

describe('failures and limits', () => {
  test('creation failure backs off, and success resets the failure count', async () => {
    const h = harness([pool({ idle_count: 1 })]);
    h.factory.failWith = new Error('qemu exploded');
    await h.pm.reconcile();
    await settle();
    assert.equal(h.factory.attempts, 1);
    let s = h.status();
    assert.deepEqual([s.failures, s.lastError, s.backoffUntil, s.idle, s.creating], [1, 'qemu exploded', T0 + 2000, 0, 0]);
    assert.deepEqual(h.ofType('create_failed')[0]!.data, { error: 'qemu exploded', failures: 1, backoffMs: 2000 });

    // No new attempt before backoffUntil, whether by reconcile or by a waiter.
    h.advance(1999);
    await h.pm.reconcile();
    await assert.rejects(h.pm.acquire({ pool: 'ci', timeoutMs: 50 }), (e: unknown) => {
      assert.ok(isCode(ErrorCode.POOL_TIMEOUT, /pool 'ci'/)(e));
      assert.equal((e as MayflyError).hint, 'creating machines fails: qemu exploded');
      return true;
    });
    assert.equal(h.factory.attempts, 1);

    // At backoffUntil it tries again; a second failure doubles the backoff.
    h.advance(1);
    await h.pm.reconcile();
    await settle();
    assert.equal(h.factory.attempts, 2);
    s = h.status();
    assert.deepEqual([s.failures, s.backoffUntil], [2, T0 + 2000 + 4000]);

    h.factory.failWith = null;
    h.advance(4000);
    await h.pm.reconcile();
    await settle();
    s = h.status();
    assert.equal(h.factory.attempts, 3);
    assert.deepEqual([s.failures, s.lastError, s.backoffUntil, s.idle], [0, null, null, 1]);
  });

  test('capacity guard false: nothing is created', async () => {
    const calls: [MachineSize, number][] = [];
    const h = harness([pool({ idle_count: 2 })], {
      capacity: {
        allows: (size, running) => {
          calls.push([size, running.length]);
          return false;
        },
      },
    });
    await h.pm.reconcile();
    await settle();
    assert.equal(h.factory.attempts, 0);
    assert.deepEqual([h.status().idle, h.status().creating], [0, 0]);
    assert.deepEqual(calls, [[{ cpus: 1, memoryMiB: 1024, diskGiB: 4 }, 0]]);
    await assert.rejects(h.pm.acquire({ pool: 'ci', timeoutMs: 50 }), isCode(ErrorCode.POOL_TIMEOUT, /pool 'ci'/));
    assert.equal(h.factory.attempts, 0);
  });

  test(
    'a timeout caused by the capacity guard says so in its hint',
    async () => {
      const h = harness([pool({ idle_count: 0 })], { capacity: { allows: () => false } });
      await assert.rejects(h.pm.acquire({ pool: 'ci', timeoutMs: 50 }), (e: unknown) => {
        assert.ok(isCode(ErrorCode.POOL_TIMEOUT)(e));
        assert.match((e as MayflyError).hint ?? '', /capacity/);
        return true;
      });
    },
  );

  test('the capacity guard sees every machine of every pool', async () => {
    const seen: string[][] = [];
    const guard: CapacityGuard = {
      allows: (size, running) => {
        seen.push(running.map((r) => `${r.cpus}`));
        return running.length + 1 <= 3;
      },
    };
    const h = harness([pool({ name: 'a', idle_count: 2, max_growth_rate: 5 }), pool({ name: 'b', size: 'medium', idle_count: 2, max_growth_rate: 5 })], {
      capacity: guard,
    });
    await h.pm.reconcile();
    await settle();
    assert.deepEqual([h.status('a').idle, h.status('b').idle], [2, 1]);
    assert.equal(h.factory.attempts, 3);
    // Running sizes (as CPUs) across both pools, machines being created included.
    assert.deepEqual(seen.slice(0, 4), [[], ['1'], ['1', '1'], ['1', '1', '2']]);
    assert.ok(seen.slice(4).every((r) => r.length === 3));
  });

  test('a dead idle machine is not handed out; it is destroyed and reported lost', async () => {
    const h = harness([pool({ idle_count: 2, max_growth_rate: 2 })]);
    await h.pm.reconcile();
    await settle();
    const [m1, m2] = h.factory.machines;
    assert.ok(m1 && m2);
    m1.dead = 'qemu exited with status 1';
    const l = await h.pm.acquire({ pool: 'ci', timeoutMs: 1000 });
    assert.equal(l.machine, m2);
    await settle();
    assert.equal(m1.destroyCalls, 1);
    assert.deepEqual(h.ofType('lost'), [{ type: 'lost', pool: 'ci', at: T0, instance: 'm1', data: { why: 'qemu exited with status 1' } }]);
    assert.deepEqual(
      h.ofType('destroyed').map((e) => [e.instance, e.data!.why]),
      [['m1', 'lost']],
    );
    assert.equal(h.status().idle, 2);
    assert.ok(!h.pm.machines().includes(m1));

    // reconcile drops dead idle machines too, and refills.
    const [idleA] = h.pm.machines().filter((m) => m !== m2);
    assert.ok(idleA);
    idleA.dead = 'vanished';
    await h.pm.reconcile();
    await settle();
    assert.equal(idleA.destroyCalls, 1);
    assert.deepEqual(
      h.ofType('lost').map((e) => e.instance),
      ['m1', idleA.id],
    );
    assert.equal(h.status().idle, 2);
    assert.ok(!h.pm.machines().includes(idleA));
  });

  test(
    'a throwing event listener does not corrupt the creation count',
    async () => {
      let thrown = false;
      const h = harness([pool({ idle_count: 1 })], {
        onEvent: (e) => {
          if (e.type === 'ready' && !thrown) {
            thrown = true;
            throw new Error('listener bug');
          }
        },
      });
      await h.pm.reconcile();
      await settle();
      assert.equal(h.status().creating, 0);
      assert.equal(h.status().failures, 0);
    },
  );
});

describe('shutdown', () => {
  test('rejects waiters, destroys idle machines and any creation that finishes later; leaves leases', async () => {
    const h = harness([pool({ name: 'warm', idle_count: 2, max_instances: 4, max_growth_rate: 2 }), pool({ name: 'full', max_instances: 1 })]);
    await h.pm.reconcile();
    await settle();
    const lw = await h.pm.acquire({ pool: 'warm', timeoutMs: 1000 });
    const lf = await h.pm.acquire({ pool: 'full', timeoutMs: 1000 });
    await settle();
    assert.deepEqual([h.status('warm').idle, h.status('warm').leased], [2, 1]);
    h.factory.auto = false;
    h.factory.honorAbort = false;
    const lw2 = await h.pm.acquire({ pool: 'warm', timeoutMs: 1000 }); // its refill stays pending
    assert.equal(h.status('warm').creating, 1);
    const waiter = h.pm.acquire({ pool: 'full', timeoutMs: 5000 });
    assert.equal(h.status('full').waiting, 1);
    const idleBefore = h.pm.machines().filter((m) => m !== lw.machine && m !== lw2.machine && m !== lf.machine);
    assert.equal(idleBefore.length, 1);

    let finished = false;
    const done = h.pm.shutdown({ destroyIdle: true, destroyLeased: false }).then(() => {
      finished = true;
    });
    await assert.rejects(waiter, isCode(ErrorCode.SHUTTING_DOWN));
    await settle();
    assert.equal(finished, false, 'shutdown waits for creations in flight');
    const late = h.factory.finish();
    await done;
    assert.equal(late.destroyCalls, 1);
    assert.equal(idleBefore[0]!.destroyCalls, 1);
    for (const l of [lw, lw2, lf]) assert.equal(l.machine.destroyCalls, 0);
    assert.deepEqual(
      h.pm.status().map((s) => [s.name, s.idle, s.leased, s.creating, s.waiting]),
      [
        ['warm', 0, 2, 0, 0],
        ['full', 0, 1, 0, 0],
      ],
    );
    assert.ok(!h.ofType('ready').some((e) => e.instance === late.id));
    await assert.rejects(h.pm.acquire({ pool: 'warm', timeoutMs: 1000 }), isCode(ErrorCode.SHUTTING_DOWN));
    await h.pm.reconcile();
    assert.equal(h.factory.attempts, 5); // warm: 2 + 2 refills; full: 1
    // A lease released after shutdown is destroyed, not kept idle.
    await h.pm.release(lw.id);
    assert.equal(lw.machine.destroyCalls, 1);
    assert.equal(h.status('warm').idle, 0);
  });

  test('destroys leased machines when asked', async () => {
    const h = harness([pool({ idle_count: 1 })]);
    await h.pm.reconcile();
    await settle();
    const l = await h.pm.acquire({ pool: 'ci', timeoutMs: 1000 });
    await settle();
    await h.pm.shutdown({ destroyIdle: true, destroyLeased: true });
    assert.deepEqual(
      h.factory.machines.map((m) => m.destroyCalls),
      [1, 1],
    );
    assert.equal(h.pm.lease(l.id), undefined);
    assert.deepEqual(h.pm.machines(), []);
    assert.deepEqual(
      h.ofType('destroyed').map((e) => e.data!.why),
      ['shutdown', 'shutdown'],
    );
  });
});
