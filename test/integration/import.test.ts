import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ImageStore } from '../../src/images/store.ts';
import { instanceDirs, mayfly, testDataDir } from '../helpers/env.ts';

// `mayfly image import`: a cloud image whose clones get their identity from a cloud-init
// NoCloud seed. No cloud image can be downloaded here, so the test makes one: a Debian rootfs
// with cloud-init (built by a recipe), whose disk, kernel and initrd are then imported as a
// cloud image would be. mayfly's own fw_cfg hook in it stays idle, since an imported image
// gets no fw_cfg identity: the keys can only have come from the seed.

describe('mayfly image import', { timeout: 900_000 }, () => {
  let tmp: string;
  before(() => {
    tmp = mkdtempSync('/var/tmp/mayfly-import-');
  });
  after(async () => {
    await mayfly(['image', 'rm', 'test-cloud-src', 'test-cloud']);
    rmSync(tmp, { recursive: true, force: true });
  });

  test('an imported image boots with its identity from cloud-init', async () => {
    const recipe = join(tmp, 'cloud.toml');
    writeFileSync(recipe, 'name = "test-cloud-src"\npackages = ["cloud-init"]\ndisk_size = 2\n');
    const build = await mayfly(['image', 'build', recipe]);
    assert.equal(build.code, 0, build.stderr);
    const src = new ImageStore(testDataDir()).resolve('test-cloud-src');

    const imp = await mayfly([
      'image', 'import', 'test-cloud',
      '--disk', src.diskPath, '--kernel', src.kernelPath!, '--initrd', src.initrdPath!,
      '--append', 'console=ttyS0 root=/dev/vda rw net.ifnames=0 quiet',
    ]);
    assert.equal(imp.code, 0, imp.stderr);
    assert.match(imp.stdout, /^test-cloud:1 sha256:[0-9a-f]{64}$/m);
    const inspect = JSON.parse((await mayfly(['image', 'inspect', 'test-cloud'])).stdout) as { identity: string; source: { type: string } };
    assert.equal(inspect.identity, 'cloud-init');
    assert.equal(inspect.source.type, 'import');

    const r = await mayfly(['run', '--image', 'test-cloud', '--', 'sh', '-c', 'id -un; hostname; test -e /run/mayfly-instance-id && echo fw_cfg-used || echo seed-only']);
    assert.equal(r.code, 0, r.stderr);
    const [user, host, how] = r.stdout.trim().split('\n');
    assert.equal(user, 'ci');
    assert.match(host!, /^vm-[a-z2-7]{10}$/);
    assert.equal(how, 'seed-only');
    assert.deepEqual(instanceDirs(), []);
  });

  test('bad imports say what is wrong', async () => {
    const missing = await mayfly(['image', 'import', 'x', '--disk', join(tmp, 'nope.qcow2')]);
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /the disk file .*nope\.qcow2 does not exist/);
    const badName = await mayfly(['image', 'import', 'Bad Name', '--disk', '/dev/null']);
    assert.equal(badName.code, 2);
    assert.match(badName.stderr, /'Bad Name' is not a valid image name/);
    const half = await mayfly(['image', 'import', 'x', '--disk', '/dev/null', '--kernel', '/dev/null']);
    assert.equal(half.code, 2);
    assert.match(half.stderr, /give both --kernel and --initrd/);
  });
});
