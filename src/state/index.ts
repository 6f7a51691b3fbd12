import { chmodSync, mkdirSync } from 'node:fs';
import { dirname } from 'node:path';
import { DatabaseSync } from 'node:sqlite';
import { redactData, redactSecrets } from '../secrets.ts';
import { ErrorCode, MayflyError, errorText } from '../errors.ts';

// The state store: what mayfly believes exists on this host. SQLite through node:sqlite (no
// native addon), WAL so several mayfly processes (a run, a ps, later the daemon) share it.

export type InstanceState = 'creating' | 'booting' | 'ready' | 'leased' | 'kept' | 'destroying' | 'gone' | 'failed';

export interface InstanceRecord {
  id: string;
  driver: string;
  imageName: string;
  imageVersion: number;
  imageId: string;
  state: InstanceState;
  createdAt: number;
  updatedAt: number;
  pid: number | null;
  dir: string;
  disks: string[];
  consoleLog: string;
  sshPort: number | null;
  /** Where the guest's sshd is reached (the guest's bridge address); null: 127.0.0.1 (a forwarded port). */
  sshHost: string | null;
  cpus: number;
  memoryMiB: number;
  diskGiB: number;
  accel: string | null;
  /** Who holds it (a command, a job id); free text for `ps`. */
  owner: string | null;
  /** The mayfly process that manages it; the reaper removes machines whose manager is gone. */
  holderPid: number | null;
  /** The pool it belongs to, if any. */
  pool: string | null;
}

export type LeaseState = 'leased' | 'expired' | 'released' | 'lost';

export interface LeaseRecord {
  id: string;
  pool: string;
  instance: string;
  job: Record<string, string>;
  state: LeaseState;
  queuedAt: number;
  leasedAt: number;
  deadline: number | null;
  releasedAt: number | null;
}

/**
 * A job of an integration whose stages are separate processes (GitLab's prepare, run, cleanup):
 * which machine serves it, until when. While the record lives and has not expired, the machine
 * belongs to the job even though no mayfly process holds it.
 */
export interface JobRecord {
  /** e.g. "gitlab/<runner short token>/<job id>". */
  key: string;
  integration: string;
  /** A machine booted for the job (no daemon), or the daemon's machine behind `lease`. */
  instance: string | null;
  /** mayflyd's lease id when the machine came from a pool. */
  lease: string | null;
  createdAt: number;
  expiresAt: number;
  data: Record<string, string>;
}

export interface EventRecord {
  id: number;
  at: number;
  type: string;
  pool: string | null;
  instance: string | null;
  lease: string | null;
  data: Record<string, unknown>;
}

const migrations: string[] = [
  `CREATE TABLE instances (
     id TEXT PRIMARY KEY,
     driver TEXT NOT NULL,
     image_name TEXT NOT NULL,
     image_version INTEGER NOT NULL,
     image_id TEXT NOT NULL,
     state TEXT NOT NULL,
     created_at INTEGER NOT NULL,
     updated_at INTEGER NOT NULL,
     pid INTEGER,
     dir TEXT NOT NULL,
     disks TEXT NOT NULL,
     console_log TEXT NOT NULL,
     ssh_port INTEGER,
     cpus INTEGER NOT NULL,
     memory_mib INTEGER NOT NULL,
     disk_gib INTEGER NOT NULL,
     accel TEXT,
     owner TEXT
   )`,
  `ALTER TABLE instances ADD COLUMN holder_pid INTEGER;
   ALTER TABLE instances ADD COLUMN pool TEXT;
   CREATE TABLE events (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     at INTEGER NOT NULL,
     type TEXT NOT NULL,
     pool TEXT,
     instance TEXT,
     lease TEXT,
     data TEXT NOT NULL
   );
   CREATE INDEX events_at ON events (at);`,
  `CREATE TABLE leases (
     id TEXT PRIMARY KEY,
     pool TEXT NOT NULL,
     instance TEXT NOT NULL,
     job TEXT NOT NULL,
     state TEXT NOT NULL,
     queued_at INTEGER NOT NULL,
     leased_at INTEGER NOT NULL,
     deadline INTEGER,
     released_at INTEGER
   );
   CREATE INDEX leases_state ON leases (state);`,
  `CREATE TABLE jobs (
     key TEXT PRIMARY KEY,
     integration TEXT NOT NULL,
     instance TEXT,
     lease TEXT,
     created_at INTEGER NOT NULL,
     expires_at INTEGER NOT NULL,
     data TEXT NOT NULL
   );`,
  `ALTER TABLE instances ADD COLUMN ssh_host TEXT;`,
];

/** The schema version a store has once opened (SQLite's user_version). */
export const schemaVersion = migrations.length;

type Row = Record<string, string | number | null>;

function toRecord(r: Row): InstanceRecord {
  return {
    id: String(r.id),
    driver: String(r.driver),
    imageName: String(r.image_name),
    imageVersion: Number(r.image_version),
    imageId: String(r.image_id),
    state: String(r.state) as InstanceState,
    createdAt: Number(r.created_at),
    updatedAt: Number(r.updated_at),
    pid: r.pid === null ? null : Number(r.pid),
    dir: String(r.dir),
    disks: JSON.parse(String(r.disks)) as string[],
    consoleLog: String(r.console_log),
    sshPort: r.ssh_port === null ? null : Number(r.ssh_port),
    sshHost: r.ssh_host === null || r.ssh_host === undefined ? null : String(r.ssh_host),
    cpus: Number(r.cpus),
    memoryMiB: Number(r.memory_mib),
    diskGiB: Number(r.disk_gib),
    accel: r.accel === null ? null : String(r.accel),
    owner: r.owner === null ? null : String(r.owner),
    holderPid: r.holder_pid === null || r.holder_pid === undefined ? null : Number(r.holder_pid),
    pool: r.pool === null || r.pool === undefined ? null : String(r.pool),
  };
}

/**
 * What mayfly keeps about this host. SQLite (below) is the default; the interface is what a
 * PostgreSQL store for a fleet of hosts would implement. SQL is kept portable apart from the
 * SQLite pragmas and AUTOINCREMENT.
 */
export interface StateStore {
  insertInstance(rec: InstanceRecord): void;
  updateInstance(id: string, patch: Partial<Pick<InstanceRecord, 'state' | 'pid' | 'sshPort' | 'sshHost' | 'accel' | 'owner' | 'holderPid'>>): void;
  deleteInstance(id: string): void;
  getInstance(id: string): InstanceRecord | undefined;
  listInstances(): InstanceRecord[];
  instancesUsingImage(name: string, version?: number): InstanceRecord[];
  addEvent(e: Omit<EventRecord, 'id'>): number;
  events(afterId?: number, limit?: number): EventRecord[];
  /** The newest `n` events, oldest first. */
  recentEvents(n: number): EventRecord[];
  insertLease(l: LeaseRecord): void;
  updateLease(id: string, patch: { state: LeaseState; releasedAt?: number }): void;
  listLeases(states?: readonly LeaseState[]): LeaseRecord[];
  /** Inserts or replaces the job's record. */
  putJob(j: JobRecord): void;
  getJob(key: string): JobRecord | undefined;
  deleteJob(key: string): void;
  listJobs(): JobRecord[];
  close(): void;
}

export function openStateStore(path: string): StateStore {
  return new SqliteStateStore(path);
}

/**
 * Opens the database in WAL mode and runs `init`. When several processes open a fresh database
 * at once, SQLite can answer "database is locked" at once instead of waiting (switching the
 * journal mode, or a lock upgrade it refuses to wait for to avoid a deadlock), so a busy answer
 * is retried from the start for up to 15 s.
 */
function openWithRetry(path: string, init: (db: DatabaseSync) => void): DatabaseSync {
  const deadline = Date.now() + 15_000;
  const pause = new Int32Array(new SharedArrayBuffer(4));
  for (;;) {
    const db = new DatabaseSync(path);
    try {
      // busy_timeout first: switching to WAL takes a lock that other openers must wait for.
      db.exec('PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; PRAGMA foreign_keys = ON;');
      init(db);
      return db;
    } catch (e) {
      db.close();
      if (!/locked|busy/i.test(errorText(e)) || Date.now() > deadline) throw e;
      Atomics.wait(pause, 0, 0, 20 + Math.random() * 80);
    }
  }
}

export class SqliteStateStore implements StateStore {
  readonly path: string;
  #db: DatabaseSync;

  constructor(path: string) {
    this.path = path;
    try {
      mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
      this.#db = openWithRetry(path, (db) => {
        this.#db = db;
        this.#migrate();
      });
      // Instance records name key files and job records name machines: root's business only.
      // (SQLite gives its -wal and -shm files the database's mode.)
      // Best effort: a reader that does not own the file (a user running `mayfly ps`) leaves it.
      if (path !== ':memory:') {
        try {
          chmodSync(path, 0o600);
        } catch {
          // not ours to change
        }
      }
    } catch (e) {
      throw new MayflyError(ErrorCode.STATE, `cannot open the state database ${path}: ${errorText(e)}`, {
        hint: 'check that the data dir is writable (mayfly needs root), or pass another --data-dir',
        cause: e,
      });
    }
  }

  #version(): number {
    return (this.#db.prepare('PRAGMA user_version').get() as { user_version: number }).user_version;
  }

  #migrate(): void {
    if (this.#version() >= migrations.length) return;
    // Another process may migrate at the same moment: read the version again under the write lock.
    this.#db.exec('BEGIN IMMEDIATE');
    try {
      for (let v = this.#version(); v < migrations.length; v++) {
        this.#db.exec(migrations[v]!);
        this.#db.exec(`PRAGMA user_version = ${v + 1}`);
      }
      this.#db.exec('COMMIT');
    } catch (e) {
      this.#db.exec('ROLLBACK');
      throw e;
    }
  }

  insertInstance(rec: InstanceRecord): void {
    this.#db
      .prepare(
        `INSERT INTO instances (id, driver, image_name, image_version, image_id, state, created_at, updated_at, pid, dir,
           disks, console_log, ssh_port, ssh_host, cpus, memory_mib, disk_gib, accel, owner, holder_pid, pool)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      )
      .run(
        rec.id, rec.driver, rec.imageName, rec.imageVersion, rec.imageId, rec.state, rec.createdAt, rec.updatedAt,
        rec.pid, rec.dir, JSON.stringify(rec.disks), rec.consoleLog, rec.sshPort, rec.sshHost, rec.cpus, rec.memoryMiB,
        rec.diskGiB, rec.accel, rec.owner === null ? null : redactSecrets(rec.owner), rec.holderPid, rec.pool,
      );
  }

  updateInstance(id: string, patch: Partial<Pick<InstanceRecord, 'state' | 'pid' | 'sshPort' | 'sshHost' | 'accel' | 'owner' | 'holderPid'>>): void {
    const cols: Record<string, string> = { state: 'state', pid: 'pid', sshPort: 'ssh_port', sshHost: 'ssh_host', accel: 'accel', owner: 'owner', holderPid: 'holder_pid' };
    const sets: string[] = ['updated_at = ?'];
    const values: (string | number | null)[] = [Date.now()];
    for (const [k, v] of Object.entries(patch)) {
      const col = cols[k];
      if (!col) continue;
      sets.push(`${col} = ?`);
      values.push(typeof v === 'string' ? redactSecrets(v) : (v as number | null));
    }
    this.#db.prepare(`UPDATE instances SET ${sets.join(', ')} WHERE id = ?`).run(...values, id);
  }

  deleteInstance(id: string): void {
    this.#db.prepare('DELETE FROM instances WHERE id = ?').run(id);
  }

  getInstance(id: string): InstanceRecord | undefined {
    const r = this.#db.prepare('SELECT * FROM instances WHERE id = ?').get(id) as Row | undefined;
    return r ? toRecord(r) : undefined;
  }

  listInstances(): InstanceRecord[] {
    return (this.#db.prepare('SELECT * FROM instances ORDER BY created_at').all() as Row[]).map(toRecord);
  }

  instancesUsingImage(name: string, version?: number): InstanceRecord[] {
    return this.listInstances().filter((i) => i.imageName === name && (version === undefined || i.imageVersion === version));
  }

  addEvent(e: Omit<EventRecord, 'id'>): number {
    const r = this.#db
      .prepare('INSERT INTO events (at, type, pool, instance, lease, data) VALUES (?, ?, ?, ?, ?, ?)')
      .run(e.at, e.type, e.pool, e.instance, e.lease, JSON.stringify(redactData(e.data)));
    return Number(r.lastInsertRowid);
  }

  /** Events after `afterId`, oldest first. */
  events(afterId = 0, limit = 1000): EventRecord[] {
    return (this.#db.prepare('SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?').all(afterId, limit) as Row[]).map(toEvent);
  }

  recentEvents(n: number): EventRecord[] {
    return (this.#db.prepare('SELECT * FROM (SELECT * FROM events ORDER BY id DESC LIMIT ?) ORDER BY id').all(n) as Row[]).map(toEvent);
  }

  insertLease(l: LeaseRecord): void {
    this.#db
      .prepare('INSERT INTO leases (id, pool, instance, job, state, queued_at, leased_at, deadline, released_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)')
      .run(l.id, l.pool, l.instance, JSON.stringify(redactData(l.job)), l.state, l.queuedAt, l.leasedAt, l.deadline, l.releasedAt);
  }

  updateLease(id: string, patch: { state: LeaseState; releasedAt?: number }): void {
    this.#db.prepare('UPDATE leases SET state = ?, released_at = COALESCE(?, released_at) WHERE id = ?').run(patch.state, patch.releasedAt ?? null, id);
  }

  listLeases(states?: readonly LeaseState[]): LeaseRecord[] {
    const rows = (
      states && states.length > 0
        ? this.#db.prepare(`SELECT * FROM leases WHERE state IN (${states.map(() => '?').join(', ')}) ORDER BY leased_at`).all(...states)
        : this.#db.prepare('SELECT * FROM leases ORDER BY leased_at').all()
    ) as Row[];
    return rows.map((r) => ({
      id: String(r.id),
      pool: String(r.pool),
      instance: String(r.instance),
      job: JSON.parse(String(r.job)) as Record<string, string>,
      state: String(r.state) as LeaseState,
      queuedAt: Number(r.queued_at),
      leasedAt: Number(r.leased_at),
      deadline: r.deadline === null ? null : Number(r.deadline),
      releasedAt: r.released_at === null ? null : Number(r.released_at),
    }));
  }

  putJob(j: JobRecord): void {
    this.#db.prepare('DELETE FROM jobs WHERE key = ?').run(j.key);
    this.#db
      .prepare('INSERT INTO jobs (key, integration, instance, lease, created_at, expires_at, data) VALUES (?, ?, ?, ?, ?, ?, ?)')
      .run(j.key, j.integration, j.instance, j.lease, j.createdAt, j.expiresAt, JSON.stringify(redactData(j.data)));
  }

  getJob(key: string): JobRecord | undefined {
    const r = this.#db.prepare('SELECT * FROM jobs WHERE key = ?').get(key) as Row | undefined;
    return r ? toJob(r) : undefined;
  }

  deleteJob(key: string): void {
    this.#db.prepare('DELETE FROM jobs WHERE key = ?').run(key);
  }

  listJobs(): JobRecord[] {
    return (this.#db.prepare('SELECT * FROM jobs ORDER BY created_at').all() as Row[]).map(toJob);
  }

  close(): void {
    this.#db.close();
  }
}

function toJob(r: Row): JobRecord {
  return {
    key: String(r.key),
    integration: String(r.integration),
    instance: r.instance === null ? null : String(r.instance),
    lease: r.lease === null ? null : String(r.lease),
    createdAt: Number(r.created_at),
    expiresAt: Number(r.expires_at),
    data: JSON.parse(String(r.data)) as Record<string, string>,
  };
}

function toEvent(r: Row): EventRecord {
  return {
    id: Number(r.id),
    at: Number(r.at),
    type: String(r.type),
    pool: r.pool === null ? null : String(r.pool),
    instance: r.instance === null ? null : String(r.instance),
    lease: r.lease === null ? null : String(r.lease),
    data: JSON.parse(String(r.data)) as Record<string, unknown>,
  };
}
