import type { MachineSize } from '../drivers/types.ts';
import { ErrorCode, MayflyError, errorText } from '../errors.ts';
import type { Logger } from '../log.ts';
import { newId } from '../util/ids.ts';
import { holderAlive } from '../util/proc.ts';
import { desiredIdle, policyAt, type PoolSpec } from './policy.ts';

// The warm pool: per class (image × size) it keeps idle, ready machines, hands them out as
// leases in FIFO order, creates on demand up to max_instances, and reconciles in named steps:
// expireIdle → killOverdueLeases → dropLost → refill. Machines come from a factory, so the
// policy logic is the same whatever driver makes them.

export interface PooledMachine {
  readonly id: string;
  destroy(): Promise<void>;
  /** undefined while the machine runs; why it is gone otherwise. */
  deadReason(): string | undefined;
}

export type PoolEventType =
  | 'queued' | 'leased' | 'released' | 'ready' | 'destroyed' | 'expired' | 'lost' | 'create_failed' | 'idle_expired' | 'wait_timeout'
  | 'reaped' | 'abandoned';

export interface PoolEvent {
  type: PoolEventType;
  at: number;
  pool: string;
  instance?: string;
  lease?: string;
  data?: Record<string, unknown>;
}

export interface CapacityGuard {
  /** Whether one more machine of `size` fits next to `running` (every machine that exists or is starting). */
  allows(size: MachineSize, running: readonly MachineSize[]): boolean;
}

export interface PoolDeps<M extends PooledMachine> {
  create(spec: PoolSpec, signal: AbortSignal): Promise<M>;
  log: Logger;
  capacity: CapacityGuard;
  clock?: () => number;
  onEvent?: (e: PoolEvent) => void;
  /** Whether a lease's holder process still runs (default: /proc, aware of pid reuse). */
  holderAlive?: (pid: number, since: number) => boolean;
}

export interface AcquireRequest {
  pool: string;
  /** Free-form job description (id, name, project), kept with the lease. */
  job?: Record<string, string>;
  /** How long to wait for a machine before giving up. */
  timeoutMs: number;
  /** A shorter max runtime for this lease; the pool's max_runtime, when set, is the ceiling. */
  maxRuntimeMs?: number;
  /** A local process holding the lease: when it is gone, the lease is released for it. */
  holderPid?: number;
  signal?: AbortSignal;
}

export interface PoolLease<M> {
  id: string;
  pool: string;
  machine: M;
  job: Record<string, string>;
  queuedAt: number;
  leasedAt: number;
  deadline: number | null;
  holderPid: number | null;
}

interface Idle<M> {
  machine: M;
  since: number;
  uses: number;
}

interface Leased<M> extends PoolLease<M> {
  uses: number;
}

interface Waiter<M> {
  req: AcquireRequest;
  queuedAt: number;
  resolve: (l: PoolLease<M>) => void;
  reject: (e: unknown) => void;
  cleanup: () => void;
}

class PoolState<M> {
  readonly spec: PoolSpec;
  idle: Idle<M>[] = [];
  leased = new Map<string, Leased<M>>();
  creating = 0;
  destroying = 0;
  waiters: Waiter<M>[] = [];
  failures = 0;
  backoffUntil = 0;
  lastError: string | null = null;
  /** The host capacity guard refused the last creation this pool wanted. */
  capacityBlocked = false;
  constructor(spec: PoolSpec) {
    this.spec = spec;
  }
  get total(): number {
    return this.idle.length + this.leased.size + this.creating + this.destroying;
  }
}

export interface PoolStatus {
  name: string;
  image: string;
  size: MachineSize;
  idle: number;
  leased: number;
  creating: number;
  waiting: number;
  desiredIdle: number;
  maxInstances: number;
  period: number | null;
  failures: number;
  backoffUntil: number | null;
  lastError: string | null;
}

const maxBackoffMs = 5 * 60_000;

export class PoolManager<M extends PooledMachine> {
  readonly #pools = new Map<string, PoolState<M>>();
  readonly #deps: PoolDeps<M>;
  readonly #clock: () => number;
  readonly #stopping = new AbortController();
  #timers = new Set<NodeJS.Timeout>();
  readonly #pending = new Set<Promise<unknown>>();
  /** Leases whose machine was killed at max_runtime: their slot is free, the holder still has to hear it. */
  readonly #expired = new Map<string, { pool: string; instance: string }>();

  constructor(specs: readonly PoolSpec[], deps: PoolDeps<M>) {
    for (const s of specs) this.#pools.set(s.name, new PoolState<M>(s));
    this.#deps = deps;
    this.#clock = deps.clock ?? Date.now;
  }

  get poolNames(): string[] {
    return [...this.#pools.keys()];
  }

  #pool(name: string): PoolState<M> {
    const p = this.#pools.get(name);
    if (!p) {
      throw new MayflyError(ErrorCode.USAGE, `no pool named '${name}'`, {
        hint: this.#pools.size ? `pools: ${this.poolNames.join(', ')}` : 'no [[pool]] is configured',
      });
    }
    return p;
  }

  #emit(e: Omit<PoolEvent, 'at'>): void {
    try {
      this.#deps.onEvent?.({ ...e, at: this.#clock() });
    } catch (err) {
      // A listener's failure must not unbalance the pool's own bookkeeping.
      this.#deps.log.error({ pool: e.pool, event: e.type, err: errorText(err) }, 'an event listener failed');
    }
  }

  /** A ready machine for a job: idle first, else a new one, else a place in the FIFO queue. */
  acquire(req: AcquireRequest): Promise<PoolLease<M>> {
    try {
      return this.#acquire(req);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  #acquire(req: AcquireRequest): Promise<PoolLease<M>> {
    const p = this.#pool(req.pool);
    if (this.#stopping.signal.aborted) return Promise.reject(shuttingDown());
    req.signal?.throwIfAborted();
    return new Promise((resolve, reject) => {
      const w: Waiter<M> = { req, queuedAt: this.#clock(), resolve, reject, cleanup: () => {} };
      const timer = setTimeout(() => {
        this.#dropWaiter(p, w);
        this.#emit({ type: 'wait_timeout', pool: p.spec.name, data: { waitedMs: this.#clock() - w.queuedAt } });
        reject(
          new MayflyError(ErrorCode.POOL_TIMEOUT, `no machine of pool '${p.spec.name}' became free within ${seconds(req.timeoutMs)}`, {
            hint: p.lastError
              ? `creating machines fails: ${p.lastError}`
              : p.capacityBlocked
                ? 'the host capacity guard stops new machines ([capacity] in the config); wait for others to finish or raise it'
                : `all ${p.spec.maxInstances} machines (max_instances) are busy; raise max_instances or wait longer`,
          }),
        );
      }, req.timeoutMs);
      const onAbort = () => {
        this.#dropWaiter(p, w);
        reject(req.signal!.reason);
      };
      req.signal?.addEventListener('abort', onAbort, { once: true });
      w.cleanup = () => {
        clearTimeout(timer);
        req.signal?.removeEventListener('abort', onAbort);
      };
      p.waiters.push(w);
      this.#emit({ type: 'queued', pool: p.spec.name, data: { job: req.job ?? {} } });
      this.#pump(p);
    });
  }

  #dropWaiter(p: PoolState<M>, w: Waiter<M>): void {
    w.cleanup();
    p.waiters = p.waiters.filter((x) => x !== w);
  }

  /** Ends a lease: the machine is destroyed, or goes back to idle when max_use_count allows. */
  async release(leaseId: string): Promise<void> {
    const expired = this.#expired.get(leaseId);
    if (expired) {
      this.#expired.delete(leaseId);
      this.#emit({ type: 'released', pool: expired.pool, instance: expired.instance, lease: leaseId, data: { expired: true } });
      return;
    }
    for (const p of this.#pools.values()) {
      const l = p.leased.get(leaseId);
      if (!l) continue;
      p.leased.delete(leaseId);
      this.#emit({ type: 'released', pool: p.spec.name, instance: l.machine.id, lease: l.id, data: { heldMs: this.#clock() - l.leasedAt } });
      if (l.uses < p.spec.maxUseCount && !l.machine.deadReason() && !this.#stopping.signal.aborted) {
        p.idle.push({ machine: l.machine, since: this.#clock(), uses: l.uses });
        this.#pump(p);
        return;
      }
      await this.#destroy(p, l.machine, 'released');
      return;
    }
    throw new MayflyError(ErrorCode.LEASE_NOT_FOUND, `no lease '${leaseId}'`, { hint: 'it may have been released already or expired' });
  }

  /**
   * The lease no longer belongs to the process that asked for it (a GitLab job whose stages are
   * separate processes); its deadline still bounds it.
   */
  detach(leaseId: string): void {
    const l = this.lease(leaseId);
    if (!l) throw new MayflyError(ErrorCode.LEASE_NOT_FOUND, `no lease '${leaseId}'`, { hint: 'it may have been released already or expired' });
    l.holderPid = null;
  }

  lease(leaseId: string): PoolLease<M> | undefined {
    for (const p of this.#pools.values()) {
      const l = p.leased.get(leaseId);
      if (l) return l;
    }
    return undefined;
  }

  /** Every machine the pools account for (idle and leased). */
  machines(): M[] {
    return [...this.#pools.values()].flatMap((p) => [...p.idle.map((i) => i.machine), ...[...p.leased.values()].map((l) => l.machine)]);
  }

  async #destroy(p: PoolState<M>, m: M, why: string): Promise<void> {
    p.destroying++;
    try {
      await m.destroy();
      this.#emit({ type: 'destroyed', pool: p.spec.name, instance: m.id, data: { why } });
    } catch (e) {
      this.#deps.log.error({ pool: p.spec.name, instance: m.id, err: errorText(e) }, 'destroying a machine failed');
    } finally {
      p.destroying--;
      // The freed room may be what another pool's waiters (or the capacity guard) wait for.
      this.#pumpAll();
    }
  }

  #track<T>(promise: Promise<T>): void {
    const tracked = promise.finally(() => this.#pending.delete(tracked));
    this.#pending.add(tracked);
  }

  /** Pools with waiters first, so freed host capacity goes to jobs before idle refills. */
  #pumpAll(): void {
    const pools = [...this.#pools.values()].sort((a, b) => Number(b.waiters.length > 0) - Number(a.waiters.length > 0));
    for (const q of pools) this.#pump(q);
  }

  /** Serves waiters from idle machines, then starts the creations the policy and limits allow. */
  #pump(p: PoolState<M>): void {
    while (p.waiters.length > 0 && p.idle.length > 0) {
      const idle = p.idle.shift()!;
      const dead = idle.machine.deadReason();
      if (dead) {
        this.#emit({ type: 'lost', pool: p.spec.name, instance: idle.machine.id, data: { why: dead } });
        this.#track(this.#destroy(p, idle.machine, 'lost'));
        continue;
      }
      const w = p.waiters.shift()!;
      w.cleanup();
      const now = this.#clock();
      // A lease may ask for less time than the pool allows, never more.
      const asked = w.req.maxRuntimeMs ?? 0;
      const poolMax = p.spec.maxRuntimeMs;
      const maxRuntimeMs = poolMax > 0 ? (asked > 0 ? Math.min(asked, poolMax) : poolMax) : asked;
      const lease: Leased<M> = {
        id: newId('lease'),
        pool: p.spec.name,
        machine: idle.machine,
        job: w.req.job ?? {},
        queuedAt: w.queuedAt,
        leasedAt: now,
        deadline: maxRuntimeMs > 0 ? now + maxRuntimeMs : null,
        holderPid: w.req.holderPid ?? null,
        uses: idle.uses + 1,
      };
      p.leased.set(lease.id, lease);
      this.#emit({ type: 'leased', pool: p.spec.name, instance: lease.machine.id, lease: lease.id, data: { waitedMs: now - w.queuedAt, job: lease.job } });
      w.resolve(lease);
    }
    this.#scale(p);
  }

  #scale(p: PoolState<M>): void {
    if (this.#stopping.signal.aborted) return;
    const now = this.#clock();
    if (now < p.backoffUntil) return;
    const policy = policyAt(p.spec, new Date(now));
    const wanted = p.waiters.length + desiredIdle(policy, p.leased.size) - p.idle.length - p.creating;
    let n = Math.min(wanted, p.spec.maxInstances - p.total, p.spec.maxGrowthRate - p.creating);
    p.capacityBlocked = false;
    while (n-- > 0) {
      if (!this.#deps.capacity.allows(p.spec.size, this.#sizesInUse())) {
        p.capacityBlocked = true;
        this.#deps.log.debug({ pool: p.spec.name }, 'host capacity reached; not creating more machines');
        return;
      }
      this.#create(p);
    }
  }

  #sizesInUse(): MachineSize[] {
    return [...this.#pools.values()].flatMap((p) => Array<MachineSize>(p.total).fill(p.spec.size));
  }

  #create(p: PoolState<M>): void {
    p.creating++;
    const started = this.#clock();
    const onReady = async (m: M) => {
      p.creating--;
      p.failures = 0;
      p.lastError = null;
      if (this.#stopping.signal.aborted) {
        await m.destroy().catch(() => {});
        return;
      }
      p.idle.push({ machine: m, since: this.#clock(), uses: 0 });
      this.#emit({ type: 'ready', pool: p.spec.name, instance: m.id, data: { bootMs: this.#clock() - started } });
      this.#pump(p);
    };
    const onFailed = (e: unknown) => {
      p.creating--;
      if (this.#stopping.signal.aborted) return;
      p.failures++;
      p.lastError = errorText(e);
      const backoff = Math.min(maxBackoffMs, 1000 * 2 ** Math.min(p.failures, 20));
      p.backoffUntil = this.#clock() + backoff;
      this.#emit({ type: 'create_failed', pool: p.spec.name, data: { error: p.lastError, failures: p.failures, backoffMs: backoff } });
      this.#deps.log.warn({ pool: p.spec.name, failures: p.failures, backoffMs: backoff, err: p.lastError }, 'creating a machine failed; backing off');
      const t = setTimeout(() => {
        this.#timers.delete(t);
        this.#pump(p);
      }, backoff);
      t.unref();
      this.#timers.add(t);
    };
    // onReady's own errors must not be taken for a failed creation (that would count it twice).
    // A factory that throws at once counts as a failed creation too.
    let creation: Promise<M>;
    try {
      creation = this.#deps.create(p.spec, this.#stopping.signal);
    } catch (e) {
      creation = Promise.reject(e);
    }
    this.#track(creation.then(onReady, onFailed));
  }

  /** One autoscaler pass over every pool. */
  async reconcile(): Promise<void> {
    for (const p of this.#pools.values()) {
      this.#expireIdle(p);
      this.#killOverdueLeases(p);
      this.#releaseAbandoned(p);
      this.#dropLost(p);
      this.#pump(p);
    }
  }

  /** Idle machines past idle_time go while there are more idle machines than the policy wants. */
  #expireIdle(p: PoolState<M>): void {
    const now = this.#clock();
    const policy = policyAt(p.spec, new Date(now));
    const keep = desiredIdle(policy, p.leased.size);
    p.idle.sort((a, b) => a.since - b.since);
    while (p.idle.length > keep && now - p.idle[0]!.since > policy.idleTimeMs) {
      const old = p.idle.shift()!;
      this.#emit({ type: 'idle_expired', pool: p.spec.name, instance: old.machine.id, data: { idleMs: now - old.since } });
      this.#track(this.#destroy(p, old.machine, 'idle_time'));
    }
  }

  #killOverdueLeases(p: PoolState<M>): void {
    const now = this.#clock();
    for (const l of [...p.leased.values()]) {
      if (l.deadline === null || now < l.deadline) continue;
      p.leased.delete(l.id);
      this.#expired.set(l.id, { pool: p.spec.name, instance: l.machine.id });
      this.#emit({ type: 'expired', pool: p.spec.name, instance: l.machine.id, lease: l.id, data: { maxRuntimeMs: l.deadline - l.leasedAt } });
      this.#deps.log.warn({ pool: p.spec.name, lease: l.id, instance: l.machine.id }, 'lease ran past its max runtime; its machine is killed');
      this.#track(this.#destroy(p, l.machine, 'max_runtime'));
    }
  }

  /** Leases whose holder process is gone (a `mayfly run` killed with -9) are released for it. */
  #releaseAbandoned(p: PoolState<M>): void {
    const alive = this.#deps.holderAlive ?? holderAlive;
    for (const l of [...p.leased.values()]) {
      if (l.holderPid === null || alive(l.holderPid, l.leasedAt)) continue;
      this.#emit({ type: 'abandoned', pool: p.spec.name, instance: l.machine.id, lease: l.id, data: { holderPid: l.holderPid } });
      this.#track(this.release(l.id));
    }
  }

  #dropLost(p: PoolState<M>): void {
    const alive: Idle<M>[] = [];
    for (const i of p.idle) {
      const dead = i.machine.deadReason();
      if (!dead) {
        alive.push(i);
        continue;
      }
      this.#emit({ type: 'lost', pool: p.spec.name, instance: i.machine.id, data: { why: dead } });
      this.#track(this.#destroy(p, i.machine, 'lost'));
    }
    p.idle = alive;
  }

  /** Whether a lease's machine was killed for running past its max runtime (and it is not released yet). */
  isExpired(leaseId: string): boolean {
    return this.#expired.has(leaseId);
  }

  status(): PoolStatus[] {
    const now = this.#clock();
    return [...this.#pools.values()].map((p) => {
      const policy = policyAt(p.spec, new Date(now));
      return {
        name: p.spec.name,
        image: p.spec.image,
        size: p.spec.size,
        idle: p.idle.length,
        leased: p.leased.size,
        creating: p.creating,
        waiting: p.waiters.length,
        desiredIdle: desiredIdle(policy, p.leased.size),
        maxInstances: p.spec.maxInstances,
        period: policy.period,
        failures: p.failures,
        backoffUntil: p.backoffUntil > now ? p.backoffUntil : null,
        lastError: p.lastError,
      };
    });
  }

  /** Stops creating, fails waiters, and destroys idle machines (and leased ones too when asked). */
  async shutdown(opts: { destroyIdle: boolean; destroyLeased: boolean }): Promise<void> {
    this.#stopping.abort(shuttingDown());
    for (const t of this.#timers) clearTimeout(t);
    this.#timers.clear();
    for (const p of this.#pools.values()) {
      for (const w of p.waiters) {
        w.cleanup();
        w.reject(shuttingDown());
      }
      p.waiters = [];
      if (opts.destroyIdle) {
        const idle = p.idle;
        p.idle = [];
        for (const i of idle) this.#track(this.#destroy(p, i.machine, 'shutdown'));
      }
      if (opts.destroyLeased) {
        const leased = [...p.leased.values()];
        p.leased.clear();
        for (const l of leased) this.#track(this.#destroy(p, l.machine, 'shutdown'));
      }
    }
    while (this.#pending.size > 0) await Promise.allSettled([...this.#pending]);
  }
}

function seconds(ms: number): string {
  return ms < 10_000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.round(ms / 1000)} s`;
}

function shuttingDown(): MayflyError {
  return new MayflyError(ErrorCode.SHUTTING_DOWN, 'mayflyd is shutting down', { hint: 'try again once it is back' });
}
