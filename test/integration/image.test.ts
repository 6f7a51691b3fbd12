import { createHash } from 'node:crypto';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { collect, ensureImage, instanceDirs, mayfly, processesMentioning, startMayfly, testDataDir, waitFor } from '../helpers/env.ts';

// Images: the default one (built once for all integration tests) and a custom recipe whose
// commands must end up inside the machine.

describe('mayfly image', { timeout: 900_000 }, () => {
  let tmp: string;
  before(async () => {
    await ensureImage();
    tmp = mkdtempSync('/var/tmp/mayfly-recipes-');
  });
  after(() => rmSync(tmp, { recursive: true, force: true }));

  test('the default image is listed and inspectable', async () => {
    const ls = await mayfly(['image', 'ls', '--json']);
    assert.equal(ls.code, 0, ls.stderr);
    const images = JSON.parse(ls.stdout) as { name: string; version: number; id: string; identity: string; kernelArgs: string; sizeBytes: number }[];
    const d = images.find((i) => i.name === 'debian-12');
    assert.ok(d);
    assert.match(d.id, /^sha256:[0-9a-f]{64}$/);
    assert.equal(d.identity, 'fw_cfg');
    assert.match(d.kernelArgs, /root=\/dev\/vda/);
    assert.ok(d.sizeBytes > 50 * 1024 ** 2 && d.sizeBytes < 1024 ** 3, `image size ${d.sizeBytes}`);

    const text = await mayfly(['image', 'ls']);
    assert.match(text.stdout, /^NAME\s+VERSION\s+ID\s+SIZE\s+AGE\s+SOURCE$/m);
    assert.match(text.stdout, new RegExp(`^debian-12\\s+${d.version}\\s+sha256:[0-9a-f]{12}\\s+\\d`, 'm'));

    const byId = await mayfly(['image', 'inspect', d.id.slice(0, 20)]);
    assert.equal(byId.code, 0, byId.stderr);
    assert.equal(JSON.parse(byId.stdout).name, 'debian-12');
  });

  test('a recipe with commands builds a new image whose machines carry the result', async () => {
    const recipe = join(tmp, 'marker.toml');
    // A stand-in for the gitlab-runner binary (no download here): installed with its checksum checked.
    const runner = '#!/bin/sh\necho "Version:      0.0.0-mayfly-test"\n';
    writeFileSync(join(tmp, 'gitlab-runner'), runner);
    writeFileSync(
      recipe,
      [
        'name = "test-marker"',
        'packages = ["jq"]',
        'commands = [',
        '  "echo built-by-recipe > /etc/mayfly-test-marker",',
        '  "id ci > /etc/mayfly-test-ci-user",',
        ']',
        '[gitlab_runner]',
        'source = "gitlab-runner"',
        `sha256 = "${createHash('sha256').update(runner).digest('hex')}"`,
      ].join('\n') + '\n',
    );
    const build = await mayfly(['image', 'build', recipe]);
    assert.equal(build.code, 0, build.stderr);
    assert.match(build.stdout, /^test-marker:1 sha256:[0-9a-f]{64}$/m);
    assert.match(build.stderr, /step 1\/5: bootstrap bookworm/, 'plain progress lines without a terminal');
    assert.match(build.stderr, /step 5\/5: content id and publish/);

    const run = await mayfly(['run', '--image', 'test-marker', '--', 'sh', '-c', 'cat /etc/mayfly-test-marker; jq -n 1+1; gitlab-runner --version']);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stdout, 'built-by-recipe\n2\nVersion:      0.0.0-mayfly-test\n');
    assert.deepEqual(instanceDirs(), []);

    const rm = await mayfly(['image', 'rm', 'test-marker']);
    assert.equal(rm.code, 0, rm.stderr);
    assert.equal(existsSync(join(testDataDir(), 'images', 'test-marker')), false);
    const gone = await mayfly(['image', 'inspect', 'test-marker']);
    assert.equal(gone.code, 2);
    assert.match(gone.stderr, /no image 'test-marker'/);
  });

  test('cancelling a build stops mmdebstrap, unmounts and removes everything', async () => {
    const recipe = join(tmp, 'cancelled.toml');
    writeFileSync(recipe, 'name = "test-cancelled"\n');
    const child = startMayfly(['image', 'build', recipe]);
    const result = collect(child);
    const scratch = join(testDataDir(), 'images', '.tmp');
    const mountsUnder = (dir: string) => readFileSync('/proc/self/mountinfo', 'utf8').split('\n').filter((l) => l.split(' ')[4]?.startsWith(dir));
    // Cancel while apt runs in the chroot, with the host's /proc, /sys and /dev bound into it.
    await waitFor(() => mountsUnder(scratch).length > 0, 120_000, 'mmdebstrap to mount into its chroot');
    child.kill('SIGTERM');
    const r = await result;
    assert.equal(r.code, 143, r.stderr);
    assert.deepEqual(mountsUnder(testDataDir()), [], 'no mount is left');
    assert.deepEqual(readdirSync(scratch).filter((d) => d.startsWith('build-')), [], 'no build dir is left');
    assert.deepEqual(processesMentioning(scratch), [], 'no mmdebstrap or apt process is left');
    assert.equal(existsSync(join(testDataDir(), 'images', 'test-cancelled')), false);
  });

  test('bad recipes and references fail with the file, the line and the reason', async () => {
    const bad = join(tmp, 'bad.toml');
    writeFileSync(bad, 'name = "Bad Name"\npackages = ["ok", "not a package"]\ndisk_sise = 3\n');
    const r = await mayfly(['image', 'build', bad]);
    assert.equal(r.code, 2);
    assert.match(r.stderr, /bad\.toml:1: name: must be lower-case/);
    assert.match(r.stderr, /bad\.toml:2: packages\[1\]: is not a Debian package name/);
    assert.match(r.stderr, /bad\.toml:3: disk_sise: unknown key 'disk_sise' — did you mean 'disk_size'\?/);

    const unknown = await mayfly(['image', 'build', 'no-such-recipe']);
    assert.equal(unknown.code, 2);
    assert.match(unknown.stderr, /no recipe named 'no-such-recipe'/);
    assert.match(unknown.stderr, /known recipes: debian-12/);

    const noVersion = await mayfly(['image', 'inspect', 'debian-12:99']);
    assert.equal(noVersion.code, 2);
    assert.match(noVersion.stderr, /image debian-12 has no version 99/);
  });
});
