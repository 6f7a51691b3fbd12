import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { PoolEvent, PoolStatus } from '../pool/pool.ts';

// Prometheus metrics, fed by the pool's events and status: what a dashboard needs to see
// boot times, lease waits, failures and leaks.

export class Metrics {
  readonly registry = new Registry();
  readonly instances = new Gauge({ name: 'mayfly_instances', help: 'Machines by pool and state', labelNames: ['pool', 'state'], registers: [this.registry] });
  readonly waiting = new Gauge({ name: 'mayfly_lease_waiters', help: 'Lease requests waiting for a machine', labelNames: ['pool'], registers: [this.registry] });
  readonly leaseWait = new Histogram({
    name: 'mayfly_lease_wait_seconds',
    help: 'Time from a lease request to a ready machine',
    labelNames: ['pool'],
    buckets: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
    registers: [this.registry],
  });
  readonly boot = new Histogram({
    name: 'mayfly_boot_seconds',
    help: 'Time to create a machine until it runs commands',
    labelNames: ['pool'],
    buckets: [0.5, 1, 2, 5, 10, 15, 20, 30, 60, 120],
    registers: [this.registry],
  });
  readonly creations = new Counter({ name: 'mayfly_creations_total', help: 'Machines created', labelNames: ['pool'], registers: [this.registry] });
  readonly failures = new Counter({ name: 'mayfly_creation_failures_total', help: 'Machine creations that failed', labelNames: ['pool'], registers: [this.registry] });
  readonly expired = new Counter({ name: 'mayfly_leases_expired_total', help: 'Leases killed at their max runtime', labelNames: ['pool'], registers: [this.registry] });
  readonly reaped = new Counter({ name: 'mayfly_reaped_total', help: 'Orphaned machines removed by the reaper', registers: [this.registry] });

  observe(e: PoolEvent): void {
    const pool = e.pool;
    if (e.type === 'ready') {
      this.creations.inc({ pool });
      if (typeof e.data?.bootMs === 'number') this.boot.observe({ pool }, e.data.bootMs / 1000);
    } else if (e.type === 'leased' && typeof e.data?.waitedMs === 'number') {
      this.leaseWait.observe({ pool }, e.data.waitedMs / 1000);
    } else if (e.type === 'create_failed') {
      this.failures.inc({ pool });
    } else if (e.type === 'expired') {
      this.expired.inc({ pool });
    }
  }

  setPools(status: PoolStatus[]): void {
    for (const p of status) {
      this.instances.set({ pool: p.name, state: 'idle' }, p.idle);
      this.instances.set({ pool: p.name, state: 'leased' }, p.leased);
      this.instances.set({ pool: p.name, state: 'creating' }, p.creating);
      this.waiting.set({ pool: p.name }, p.waiting);
    }
  }
}
