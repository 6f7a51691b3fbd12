import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { defaultConfig, type Config } from '../../src/config/index.ts';
import { ImageStore } from '../../src/images/store.ts';
import { silentLogger } from '../../src/log.ts';
import { Engine } from '../../src/pool/index.ts';
import { isSubvolume } from '../../src/storage/btrfs.ts';
import { readMounts } from '../../src/storage/mounts.ts';
import { makeRepo, startGitServer, type GitServer, type MadeRepo } from '../helpers/git-http.ts';
import { mayflyStages, runJob, type RunnerConfig } from '../helpers/gitlab-runner.ts';
import { ensureImage, instanceDirs, mayfly, mayflyBin, processesMentioning, startMayfly, testDataDir, waitFor } from '../helpers/env.ts';

// Containers: the nspawn driver with real systemd-nspawn containers on clones of the
// debian-12-container image, through the CLI, the engine and the GitLab executor.

const IMAGE = 'debian-12-container';

/** Instance cgroups that existed before this file ran (another mayfly on the host): not ours to judge. */
let foreignCgroups = new Set<string>();

/** The instance cgroups mayfly made under /sys/fs/cgroup since this file started (none may outlive a container). */
function mayflyCgroups(): string[] {
  return allMayflyCgroups().filter((d) => !foreignCgroups.has(d));
}

function allMayflyCgroups(): string[] {
  const found: string[] = [];
  const walk = (dir: string, depth: number) => {
    let entries: string[];
    try {
      entries = readdirSync(dir, { withFileTypes: true }).filter((e) => e.isDirectory()).map((e) => e.name);
    } catch {
      return;
    }
    for (const e of entries) {
      if (e.startsWith('mayfly-ct-')) found.push(join(dir, e));
      else if (depth < 4) walk(join(dir, e), depth + 1);
    }
  };
  walk('/sys/fs/cgroup', 0);
  return found;
}

/** nspawn's per-root lock files in /run: a container that is gone must not leave its own. */
const LOCKS = '/run/systemd/nspawn/locks';
let foreignLocks = new Set<string>();
const nspawnLocks = (): string[] => (existsSync(LOCKS) ? readdirSync(LOCKS) : []).filter((f) => !foreignLocks.has(f));

function assertNothingLeft(): void {
  assert.deepEqual(nspawnLocks(), [], 'no nspawn lock is left in /run');
  const instances = join(testDataDir(), 'instances');
  assert.deepEqual(instanceDirs(), []);
  assert.deepEqual(processesMentioning(instances), []);
  assert.deepEqual(readMounts().filter((m) => m.mountPoint.startsWith(instances)).map((m) => m.mountPoint), []);
  assert.deepEqual(mayflyCgroups(), []);
}

function engineWith(patch: (c: Config) => void = () => {}): Engine {
  const config = defaultConfig();
  patch(config);
  return new Engine({ dataDir: testDataDir(), config, log: silentLogger });
}

describe('containers (systemd-nspawn)', { timeout: 900_000 }, () => {
  before(async () => {
    foreignCgroups = new Set(allMayflyCgroups());
    foreignLocks = new Set(existsSync(LOCKS) ? readdirSync(LOCKS) : []);
    await ensureImage(IMAGE);
  });

  test('mayfly run in a fresh container: the job user, its own hostname and machine-id, the exit code, nothing left', async () => {
    const r = await mayfly(['run', '--image', IMAGE, '--', 'sh', '-c', 'id -un; hostname; cat /etc/machine-id; pwd; exit 7']);
    assert.equal(r.code, 7, r.stderr);
    const [user, host, machineId, cwd] = r.stdout.trim().split('\n');
    assert.equal(user, 'ci');
    assert.match(host!, /^ct-[a-z0-9]+$/);
    assert.match(machineId!, /^[0-9a-f]{32}$/);
    assert.equal(cwd, '/builds');
    assert.match(r.stderr, new RegExp(`machine ${host} \\(${IMAGE}:\\d+\\)`));
    assertNothingLeft();
  });

  test('root in a container is root only in its own user namespace: no host privilege, even with sudo', async () => {
    const script = [
      'sudo -n id -u',
      'tr -s " " < /proc/self/uid_map',
      'if sudo -n mknod /tmp/disk b 8 0 2>/dev/null; then echo mknod allowed; else echo mknod refused; fi',
      'if sudo -n chattr +i /builds 2>/dev/null; then echo chattr allowed; else echo chattr refused; fi',
    ].join('; ');
    const r = await mayfly(['run', '--image', IMAGE, '--', 'sh', '-c', script]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, ['0', ` 0 ${0x70000000} 65536`, 'mknod refused', 'chattr refused', ''].join('\n'));
    assertNothingLeft();
  });

  test('limits: a memory hog is killed at the size\'s memory limit; the CPU quota is the size\'s', async () => {
    const engine = engineWith();
    const lease = await engine.lease({ image: IMAGE, size: { cpus: 1, memoryMiB: 256 }, owner: 'test: limits' });
    try {
      const m = lease.machine;
      const cg = JSON.parse(readFileSync(join(m.dir, 'cgroups.json'), 'utf8')) as { dirs: string[]; procsDir: string };
      const memory = cg.dirs.find((d) => d.includes('/memory/') || existsSync(join(d, 'memory.max')))!;
      const limit = existsSync(join(memory, 'memory.max')) ? 'memory.max' : 'memory.limit_in_bytes';
      assert.equal(readFileSync(join(memory, limit), 'utf8').trim(), String(256 * 1024 * 1024));
      const cpu = cg.dirs.find((d) => d.includes('/cpu/')) ?? memory;
      const quota = existsSync(join(cpu, 'cpu.max')) ? readFileSync(join(cpu, 'cpu.max'), 'utf8').trim() : readFileSync(join(cpu, 'cpu.cfs_quota_us'), 'utf8').trim();
      assert.match(quota, /^100000( 100000)?$/);

      const small = await m.guest.exec(['perl', '-e', 'my $x = "a" x (64*1024*1024); print "ok\\n"']);
      assert.equal(small.exitCode, 0, 'an allocation well under the limit works');
      const hog = await m.guest.exec(['perl', '-e', 'my $x = "a" x (600*1024*1024); print "survived\\n"']);
      assert.equal(hog.exitCode, 137, 'the hog is killed (SIGKILL by the OOM killer)');
      // The container itself survives its hog.
      assert.equal((await m.guest.exec(['true'])).exitCode, 0);
    } finally {
      await lease.release();
      engine.close();
    }
    assertNothingLeft();
  });

  test('job_disk tmpfs: /builds is a tmpfs owned by the job user, sized from the container\'s memory; encrypted is refused clearly', async () => {
    const r = await mayfly(['run', '--memory', '512', '--job-disk', 'tmpfs', '--image', IMAGE, '--', 'sh', '-c', 'findmnt -n -o FSTYPE,OPTIONS /builds; stat -c %U /builds']);
    assert.equal(r.code, 0, r.stderr);
    const [mount, owner] = r.stdout.trim().split('\n');
    assert.match(mount!, /^tmpfs .*size=262144k/);
    assert.equal(owner, 'ci');
    const enc = await mayfly(['run', '--job-disk', 'encrypted', '--image', IMAGE, '--', 'true']);
    assert.equal(enc.code, 125);
    assert.match(enc.stderr, /job_disk = "encrypted" is not supported for nspawn machines/);
    assertNothingLeft();
  });

  test('private network: the container sees only its loopback', async () => {
    const engine = engineWith((c) => (c.nspawn.private_network = true));
    const lease = await engine.lease({ image: IMAGE, owner: 'test: private network' });
    try {
      const links = await lease.machine.guest.capture(['ip', '-o', 'link']);
      assert.deepEqual(links.trim().split('\n').map((l) => l.split(':')[1]!.trim()), ['lo']);
    } finally {
      await lease.release();
      engine.close();
    }
    assertNothingLeft();
  });

  test('the reaper removes a container whose mayfly process was killed: processes, mount, cgroups, files', async () => {
    const child = startMayfly(['run', '--image', IMAGE, '--', 'sleep', '600']);
    const exited = new Promise((resolve) => child.on('exit', resolve));
    await waitFor(() => processesMentioning(join(testDataDir(), 'instances')).length > 0, 30_000, 'the container to start');
    child.kill('SIGKILL');
    await exited;
    assert.ok(mayflyCgroups().length > 0, 'the orphaned container is still there before the reaper runs');
    const engine = engineWith();
    try {
      const r = await engine.reap(silentLogger);
      assert.equal(r.removed.length, 1);
    } finally {
      engine.close();
    }
    assertNothingLeft();
  });

  test('a new image version made while a container runs (image shell --commit) does not change that container\'s files', async () => {
    const engine = engineWith();
    const lease = await engine.lease({ image: IMAGE, owner: 'test: maintain while running' });
    const store = new ImageStore(testDataDir());
    const before = store.versions(IMAGE).at(-1)!;
    try {
      const r = await mayfly(['image', 'shell', '--commit', IMAGE, '--', 'sh', '-c', 'echo new > /etc/mayfly-test-marker']);
      assert.equal(r.code, 0, r.stderr);
      const after = store.versions(IMAGE).at(-1)!;
      assert.equal(after, before + 1);
      const running = await lease.machine.guest.exec(['test', '-e', '/etc/mayfly-test-marker']);
      assert.equal(running.exitCode, 1, 'the running container does not see the new version\'s file');
      const fresh = await mayfly(['run', '--image', IMAGE, '--', 'cat', '/etc/mayfly-test-marker']);
      assert.equal(fresh.stdout.trim(), 'new', fresh.stderr);
    } finally {
      await lease.release();
      engine.close();
      // Later tests (and other files) use the image as built.
      for (const v of store.versions(IMAGE).filter((v) => v > before)) store.remove(IMAGE, v);
    }
    assertNothingLeft();
  });

  describe('on a btrfs data dir (a loop filesystem made by the test)', () => {
    let mnt: string;
    let dataDir: string;

    before(async () => {
      mnt = mkdtempSync('/var/tmp/mayfly-ct-btrfs-');
      execFileSync('truncate', ['-s', '1G', join(mnt, '..', `${basename(mnt)}.img`)]);
      execFileSync('mkfs.btrfs', ['-q', '-f', join(mnt, '..', `${basename(mnt)}.img`)]);
      execFileSync('mount', ['-o', 'loop', join(mnt, '..', `${basename(mnt)}.img`), mnt]);
      dataDir = join(mnt, 'data');
      const copy = await new ImageStore(dataDir).importCopy(new ImageStore(testDataDir()).resolve(IMAGE));
      assert.ok(isSubvolume(copy.diskPath), 'the copied image root is a subvolume');
    });

    after(() => {
      const img = join(mnt, '..', `${basename(mnt)}.img`);
      spawnSync('umount', [mnt]);
      rmSync(mnt, { recursive: true, force: true });
      rmSync(img, { force: true });
    });

    test('detection picks btrfs-snapshot: the root is a snapshot; release and the reaper delete it as a subvolume', async () => {
      const engine = new Engine({ dataDir, config: defaultConfig(), log: silentLogger });
      try {
        assert.equal((await engine.dirStorage()).name, 'btrfs-snapshot');
        const lease = await engine.lease({ image: IMAGE, owner: 'test: btrfs' });
        const root = join(lease.machine.dir, 'root');
        assert.ok(isSubvolume(root), 'the container root is a subvolume snapshot');
        assert.equal((await lease.machine.guest.exec(['sh', '-c', 'echo written > /builds/f && cat /builds/f'])).exitCode, 0);
        await lease.release();
        assert.equal(existsSync(lease.machine.dir), false);

        // A crashed holder: the reaper finds the record of a dead process and removes the subvolume too.
        const child = spawn(mayflyBin, ['--data-dir', dataDir, 'run', '--image', IMAGE, '--', 'sleep', '600'], { stdio: 'ignore' });
        const exited = new Promise((resolve) => child.on('exit', resolve));
        await waitFor(() => processesMentioning(join(dataDir, 'instances')).length > 0, 30_000, 'the container to start');
        child.kill('SIGKILL');
        await exited;
        const r = await engine.reap(silentLogger);
        assert.equal(r.removed.length, 1);
        assert.deepEqual(readdirSync(join(dataDir, 'instances')), []);
        assert.deepEqual(processesMentioning(join(dataDir, 'instances')), []);
        const subvolumes = execFileSync('btrfs', ['subvolume', 'list', mnt], { encoding: 'utf8' }).split('\n').filter((l) => l.includes('instances/'));
        assert.deepEqual(subvolumes, [], 'no snapshot is left');
      } finally {
        engine.close();
      }
      assert.deepEqual(mayflyCgroups(), []);
    });
  });

  describe('a GitLab job in a container', () => {
    let dir: string;
    let git: GitServer;
    let repo: MadeRepo;
    const token = 'container-job-token';

    before(async () => {
      dir = mkdtempSync('/var/tmp/mayfly-ct-gitlab-');
      writeFileSync(join(dir, 'config.toml'), `[daemon]\nsocket = "${join(dir, 'mayfly.sock')}"\n`);
      const gitRoot = join(dir, 'git');
      repo = await makeRepo(gitRoot, { 'README.md': 'hello from the repository\n' });
      git = await startGitServer(gitRoot, { user: 'gitlab-ci-token', password: token });
    });

    after(async () => {
      await git?.close();
      rmSync(dir, { recursive: true, force: true });
    });

    test('a service started in the script still runs in after_script (a separate stage and process); sources come over git', async () => {
      const runner: RunnerConfig = {
        ...mayflyStages(mayflyBin, ['--data-dir', testDataDir(), '--config', join(dir, 'config.toml')]),
        gracefulKillTimeoutMs: 60_000,
        prepareRetryIntervalMs: 200,
      };
      const r = await runJob(runner, {
        id: 7001,
        token,
        // The container shares the host's network: the git server on the host's loopback is reachable as such.
        repoUrl: `http://127.0.0.1:${git.port}/group/project.git`,
        sha: repo.sha,
        ref: repo.ref,
        image: IMAGE,
        script: ['cat README.md', 'nohup sleep 600 >/dev/null 2>&1 & echo $! > /tmp/service.pid', 'id -un'],
        afterScript: ['kill -0 "$(cat /tmp/service.pid)" && echo "service still up: $(cat /proc/$(cat /tmp/service.pid)/comm)"'],
      });
      assert.equal(r.status, 'success', r.log);
      assert.match(r.log, /mayfly: machine ct-[a-z0-9]+: debian-12-container:\d+ .*, started in [\d.]+ s/);
      assert.match(r.log, /hello from the repository/);
      assert.match(r.log, /\nci\n/);
      assert.match(r.log, /service still up: sleep/);
      assert.ok(!r.log.includes(token), 'the job token never shows in the job log');
      assertNothingLeft();
    });
  });
});
