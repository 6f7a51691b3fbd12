import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ensureImage, mayfly, processesMentioning, testDataDir } from '../helpers/env.ts';

// Job data protection, end to end: a job writes a unique marker into /builds and syncs; then,
// with the machine still running (--keep), every host file of the instance is searched for the
// marker. With job_disk = "plain" it is found (in the overlay), which shows the search can
// fail; with "encrypted" and "tmpfs" it is not. The marker is put together inside the guest,
// so it never appears whole in a command line, only in the written file.

const kept: { id: string; config?: string }[] = [];
const tmp = mkdtempSync('/var/tmp/mayfly-jobdisk-test-');
// A host tmpfs for instance dirs (storage.instances_dir): the tmpfs case keeps everything in RAM.
const shmInstances = join('/dev/shm', `mayfly-test-instances-${process.pid}`);

after(async () => {
  for (const k of kept) await mayfly([...(k.config ? ['--config', k.config] : []), 'rm', k.id]);
  rmSync(tmp, { recursive: true, force: true });
  rmSync(shmInstances, { recursive: true, force: true });
});

/** Files under `dir` holding `needle` (grep reads sparse files' holes as zeros: slow but complete). */
function filesWith(dir: string, needle: string): string[] {
  const r = spawnSync('grep', ['-rlaF', '--', needle, dir], { encoding: 'utf8' });
  assert.ok(r.status === 0 || r.status === 1, `grep failed: ${r.stderr}`);
  return r.stdout.split('\n').filter(Boolean).map((f) => f.slice(dir.length + 1)).sort();
}

/** Runs the marker job in a kept machine; returns the machine's id, its instance dir and what the guest said. */
async function markerJob(mode: string, config?: string, extra = ''): Promise<{ id: string; dir: string; marker: string; out: string; err: string }> {
  const a = randomBytes(12).toString('hex');
  const b = randomBytes(12).toString('hex');
  const script = `m="mayfly-marker-${a}"; m="$m-${b}"; for i in $(seq 64); do echo "$m"; done > /builds/marker; sync; findmnt -n -o SOURCE,FSTYPE -T /builds${extra}`;
  const r = await mayfly([...(config ? ['--config', config] : []), 'run', '--keep', '--job-disk', mode, '--', 'sh', '-c', script]);
  const id = /machine (vm-[a-z2-7]+) is kept running/.exec(r.stderr)?.[1];
  if (id) kept.push({ id, config });
  assert.equal(r.code, 0, r.stderr);
  assert.ok(id, r.stderr);
  const ps = JSON.parse((await mayfly([...(config ? ['--config', config] : []), 'ps', '--json'])).stdout) as { id: string; dir: string }[];
  const dir = ps.find((i) => i.id === id)?.dir;
  assert.ok(dir && existsSync(dir), `the kept machine's instance dir exists: ${dir}`);
  return { id, dir, marker: `mayfly-marker-${a}-${b}`, out: r.stdout, err: r.stderr };
}

describe('job data protection', { timeout: 900_000 }, () => {
  before(() => ensureImage());

  test('plain: the marker is readable in the instance dir on the host (the search works)', async () => {
    const j = await markerJob('plain');
    assert.match(j.out, /^\/dev\/vda\S* ext4$/m);
    assert.deepEqual(filesWith(j.dir, j.marker), ['disk.qcow2']);
  });

  test('encrypted: the job data sits on a dm-crypt disk; no host file holds the marker', async () => {
    const j = await markerJob('encrypted', undefined, '; sudo cryptsetup status mayfly-job | grep -E "type|key location"; sudo find / -xdev -newer /etc/hostname -type f -name "*key*" 2>/dev/null | grep -v ^/proc | wc -l');
    assert.match(j.out, /^\/dev\/mapper\/mayfly-job\[\/builds\] ext4$/m);
    // The data did go to the job disk's file (blocks were written), only not readably.
    const disk = join(j.dir, 'job-disk.raw');
    assert.ok(statSync(disk).blocks > 0, 'the job disk file has data');
    assert.equal(statSync(disk).mode & 0o777, 0o600);
    assert.deepEqual(filesWith(j.dir, j.marker), []);
    // No key file: plain dm-crypt has no header, the key is held by dm-crypt in the kernel, and
    // no file with "key" in its name appeared on the root disk since the identity was applied.
    assert.match(j.out, /type:\s+PLAIN/);
    assert.match(j.out, /key location:\s+dm-crypt/);
    assert.match(j.out, /^0$/m);
    // The snapshot template never had a job disk.
    const templates = join(testDataDir(), 'images', 'debian-12');
    assert.deepEqual(filesWith(templates, j.marker), []);
    for (const v of readdirSync(templates)) assert.equal(existsSync(join(templates, v, 'templates', 'job-disk.raw')), false);
  });

  test('tmpfs, with instance dirs on a host tmpfs: the marker is in no host file; the template is copied across filesystems', async () => {
    const cfg = join(tmp, 'config.toml');
    writeFileSync(cfg, `[storage]\ninstances_dir = "${shmInstances}"\n[defaults]\njob_tmpfs_size = "256m"\n`);
    const j = await markerJob('tmpfs', cfg);
    assert.match(j.out, /^mayfly-job\[\/builds\] tmpfs$/m);
    assert.match(j.err, /template copied into the instance dir/);
    assert.match(j.err, /is on another filesystem than the template .* cannot be hard-linked; copied instead/);
    assert.ok(j.dir.startsWith(shmInstances + '/'), `the instance dir ${j.dir} is on the host tmpfs`);
    assert.equal(statSync(j.dir).mode & 0o777, 0o700);
    assert.deepEqual(filesWith(j.dir, j.marker), []);
    assert.deepEqual(filesWith(join(testDataDir(), 'instances'), j.marker), []);
  });

  test('removing the machines leaves no process and no file', async () => {
    for (const k of kept.splice(0)) {
      const r = await mayfly([...(k.config ? ['--config', k.config] : []), 'rm', k.id]);
      assert.equal(r.code, 0, r.stderr);
    }
    assert.deepEqual(existsSync(shmInstances) ? readdirSync(shmInstances) : [], []);
    assert.deepEqual(processesMentioning(join(testDataDir(), 'instances')), []);
    assert.deepEqual(processesMentioning(shmInstances), []);
  });
});
