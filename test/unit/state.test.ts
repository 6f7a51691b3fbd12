import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { DatabaseSync } from 'node:sqlite';
import { after, describe, test } from 'node:test';
import { ErrorCode, MayflyError } from '../../src/errors.ts';
import { SqliteStateStore as StateStore, schemaVersion, type InstanceRecord } from '../../src/state/index.ts';

const dir = mkdtempSync(join(tmpdir(), 'mayfly-state-test-'));
after(() => rmSync(dir, { recursive: true, force: true }));

let n = 0;
/** A fresh database path (in a not-yet-existing subdirectory, which the store must create). */
function dbPath(): string {
  n++;
  return join(dir, `case-${n}`, 'sub', 'state.db');
}

function record(id: string, over: Partial<InstanceRecord> = {}): InstanceRecord {
  return {
    id,
    driver: 'qemu',
    imageName: 'debian-12',
    imageVersion: 3,
    imageId: 'sha256:0123456789abcdef',
    state: 'creating',
    createdAt: 1_700_000_000_000,
    updatedAt: 1_700_000_000_000,
    pid: null,
    dir: `/var/lib/mayfly/instances/${id}`,
    disks: [`/var/lib/mayfly/instances/${id}/disk.qcow2`],
    consoleLog: `/var/lib/mayfly/instances/${id}/console.log`,
    sshPort: null,
    sshHost: null,
    cpus: 2,
    memoryMiB: 1024,
    diskGiB: 4,
    accel: null,
    owner: null,
    holderPid: 4242,
    pool: null,
    ...over,
  };
}

function userVersion(path: string): number {
  const db = new DatabaseSync(path, { readOnly: true });
  try {
    return (db.prepare('PRAGMA user_version').get() as { user_version: number }).user_version;
  } finally {
    db.close();
  }
}

describe('StateStore', () => {
  test('insert then get returns the exact record, all fields', () => {
    const s = new StateStore(dbPath());
    try {
      const full = record('vm-full', {
        state: 'leased',
        pid: 4242,
        sshPort: 40022,
        accel: 'kvm',
        owner: "exec: job 'a b'",
        disks: ['/a b/disk.qcow2', '/c/seed.iso'],
        imageName: 'ubuntu-24.04',
        imageVersion: 17,
        memoryMiB: 65536,
        diskGiB: 2048,
        cpus: 64,
      });
      s.insertInstance(full);
      assert.deepEqual(s.getInstance('vm-full'), full);
      const bare = record('vm-bare');
      s.insertInstance(bare);
      assert.deepEqual(s.getInstance('vm-bare'), bare);
      assert.equal(s.getInstance('vm-missing'), undefined);
    } finally {
      s.close();
    }
  });

  test('list is ordered by creation time, not insertion order', () => {
    const s = new StateStore(dbPath());
    try {
      assert.deepEqual(s.listInstances(), []);
      s.insertInstance(record('c', { createdAt: 3000 }));
      s.insertInstance(record('a', { createdAt: 1000 }));
      s.insertInstance(record('b', { createdAt: 2000 }));
      assert.deepEqual(
        s.listInstances().map((i) => i.id),
        ['a', 'b', 'c'],
      );
      assert.deepEqual(s.listInstances()[1], record('b', { createdAt: 2000 }));
    } finally {
      s.close();
    }
  });

  test('a duplicate id is refused and leaves the first record as it was', () => {
    const s = new StateStore(dbPath());
    try {
      s.insertInstance(record('dup', { cpus: 1 }));
      assert.throws(() => s.insertInstance(record('dup', { cpus: 8 })), /UNIQUE constraint failed: instances\.id/);
      assert.equal(s.getInstance('dup')?.cpus, 1);
      assert.equal(s.listInstances().length, 1);
    } finally {
      s.close();
    }
  });

  test('update changes only the named fields and bumps updatedAt', () => {
    const s = new StateStore(dbPath());
    try {
      const orig = record('u1');
      s.insertInstance(orig);
      s.insertInstance(record('u2'));
      const before = Date.now();
      s.updateInstance('u1', { state: 'ready', pid: 99, sshPort: 2222, sshHost: '10.77.0.2', accel: 'tcg', owner: 'me' });
      const after = Date.now();
      const got = s.getInstance('u1')!;
      assert.ok(got.updatedAt >= before && got.updatedAt <= after, `updatedAt ${got.updatedAt} not in [${before}, ${after}]`);
      assert.deepEqual(got, { ...orig, state: 'ready', pid: 99, sshPort: 2222, sshHost: '10.77.0.2', accel: 'tcg', owner: 'me', updatedAt: got.updatedAt });
      // The other row is untouched.
      assert.deepEqual(s.getInstance('u2'), record('u2'));

      // Setting back to null works; fields not in the patch keep their values.
      s.updateInstance('u1', { owner: null, pid: null });
      const again = s.getInstance('u1')!;
      assert.equal(again.owner, null);
      assert.equal(again.pid, null);
      assert.equal(again.state, 'ready');
      assert.equal(again.sshPort, 2222);
      assert.equal(again.accel, 'tcg');

      // Keys outside the updatable set are ignored, not written.
      s.updateInstance('u1', { state: 'gone', ...({ dir: '/evil', cpus: 99 } as object) });
      const third = s.getInstance('u1')!;
      assert.equal(third.state, 'gone');
      assert.equal(third.dir, orig.dir);
      assert.equal(third.cpus, orig.cpus);

      // Updating a missing id is a no-op, not an error, and creates nothing.
      s.updateInstance('nope', { state: 'ready' });
      assert.equal(s.getInstance('nope'), undefined);
      assert.equal(s.listInstances().length, 2);
    } finally {
      s.close();
    }
  });

  test('delete removes exactly one record and is idempotent', () => {
    const s = new StateStore(dbPath());
    try {
      s.insertInstance(record('d1', { createdAt: 1 }));
      s.insertInstance(record('d2', { createdAt: 2 }));
      s.deleteInstance('d1');
      assert.equal(s.getInstance('d1'), undefined);
      assert.deepEqual(
        s.listInstances().map((i) => i.id),
        ['d2'],
      );
      s.deleteInstance('d1');
      s.deleteInstance('never-existed');
      assert.deepEqual(
        s.listInstances().map((i) => i.id),
        ['d2'],
      );
    } finally {
      s.close();
    }
  });

  test('instancesUsingImage filters by name and optionally version', () => {
    const s = new StateStore(dbPath());
    try {
      s.insertInstance(record('x1', { imageName: 'debian-12', imageVersion: 1, createdAt: 1 }));
      s.insertInstance(record('x2', { imageName: 'debian-12', imageVersion: 2, createdAt: 2 }));
      s.insertInstance(record('x3', { imageName: 'other', imageVersion: 1, createdAt: 3 }));
      assert.deepEqual(
        s.instancesUsingImage('debian-12').map((i) => i.id),
        ['x1', 'x2'],
      );
      assert.deepEqual(
        s.instancesUsingImage('debian-12', 2).map((i) => i.id),
        ['x2'],
      );
      assert.deepEqual(s.instancesUsingImage('debian-12', 3), []);
      assert.deepEqual(s.instancesUsingImage('nope'), []);
    } finally {
      s.close();
    }
  });

  test('reopening runs no migration twice and keeps the data', () => {
    const path = dbPath();
    const first = new StateStore(path);
    first.insertInstance(record('keep'));
    first.close();
    assert.equal(userVersion(path), schemaVersion);

    for (let i = 0; i < 3; i++) {
      const s = new StateStore(path); // would throw "table instances already exists" if re-migrated
      assert.deepEqual(s.getInstance('keep'), record('keep'));
      assert.equal(s.listInstances().length, 1);
      s.close();
      assert.equal(userVersion(path), schemaVersion);
    }
  });

  test('uses WAL so several processes can share it', () => {
    const path = dbPath();
    const s = new StateStore(path);
    s.close();
    const db = new DatabaseSync(path);
    try {
      assert.equal((db.prepare('PRAGMA journal_mode').get() as { journal_mode: string }).journal_mode, 'wal');
    } finally {
      db.close();
    }
  });

  test("two stores on one file see each other's writes", () => {
    const path = dbPath();
    const a = new StateStore(path);
    const b = new StateStore(path);
    try {
      a.insertInstance(record('from-a', { createdAt: 1 }));
      assert.deepEqual(b.getInstance('from-a'), record('from-a', { createdAt: 1 }));

      b.insertInstance(record('from-b', { createdAt: 2 }));
      assert.deepEqual(
        a.listInstances().map((i) => i.id),
        ['from-a', 'from-b'],
      );

      b.updateInstance('from-a', { state: 'ready', pid: 7 });
      assert.equal(a.getInstance('from-a')?.state, 'ready');
      assert.equal(a.getInstance('from-a')?.pid, 7);

      a.deleteInstance('from-b');
      assert.equal(b.getInstance('from-b'), undefined);
      assert.deepEqual(
        b.listInstances().map((i) => i.id),
        ['from-a'],
      );
    } finally {
      a.close();
      b.close();
    }
  });

  // Several mayfly processes (a run, a ps) may be the first to open a fresh data dir at once.
  // busy_timeout must come before journal_mode=WAL, and user_version must be read inside the
  // migration's write transaction; either mistake makes one of the openers fail.
  test('several processes opening a fresh database at once all succeed', async () => {
    const moduleUrl = pathToFileURL(join(import.meta.dirname, '..', '..', 'src', 'state', 'index.ts')).href;
    for (let round = 0; round < 3; round++) {
      const path = dbPath();
      const code = `import { SqliteStateStore as StateStore } from ${JSON.stringify(moduleUrl)}; new StateStore(${JSON.stringify(path)}).close();`;
      const results = await Promise.all(
        Array.from({ length: 6 }, () =>
          new Promise<{ code: number | null; stderr: string }>((resolve) => {
            const child = spawn(process.execPath, ['--input-type=module', '-e', code], { stdio: ['ignore', 'ignore', 'pipe'] });
            let stderr = '';
            child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
            child.on('close', (c) => resolve({ code: c, stderr }));
          }),
        ),
      );
      for (const r of results) assert.equal(r.code, 0, /cannot open the state database \/[^\n]*/.exec(r.stderr)?.[0] ?? r.stderr);
      assert.equal(userVersion(path), schemaVersion);
    }
  });

  test('an unopenable path is a STATE MayflyError naming the path', () => {
    const path = join(dir, 'a-directory');
    mkdirSync(path);
    assert.throws(
      () => new StateStore(path),
      (e: unknown) => {
        assert.ok(e instanceof MayflyError);
        assert.equal(e.code, ErrorCode.STATE);
        assert.ok(e.message.startsWith(`cannot open the state database ${path}: `), e.message);
        assert.equal(e.hint, 'check that the data dir is writable (mayfly needs root), or pass another --data-dir');
        return true;
      },
    );
  });
});

describe('leases in the state store', () => {
  test('insert, update and list by state', () => {
    const s = new StateStore(dbPath());
    try {
      const base = { pool: 'p', instance: 'vm-1', job: { name: 'build' }, queuedAt: 10, leasedAt: 20, deadline: null, releasedAt: null };
      s.insertLease({ ...base, id: 'lease-a', state: 'leased' });
      s.insertLease({ ...base, id: 'lease-b', state: 'leased', leasedAt: 30, deadline: 90 });
      s.updateLease('lease-a', { state: 'released', releasedAt: 50 });
      assert.deepEqual(s.listLeases(['leased']).map((l) => l.id), ['lease-b']);
      assert.deepEqual(s.listLeases(), [
        { ...base, id: 'lease-a', state: 'released', releasedAt: 50 },
        { ...base, id: 'lease-b', state: 'leased', leasedAt: 30, deadline: 90 },
      ]);
      s.updateLease('lease-b', { state: 'lost' });
      assert.equal(s.listLeases(['lost'])[0]?.releasedAt, null, 'a state change without a time keeps released_at');
    } finally {
      s.close();
    }
  });
});
