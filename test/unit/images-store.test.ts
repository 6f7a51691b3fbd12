import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs, { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { after, describe, test } from 'node:test';
import { ErrorCode, MayflyError } from '../../src/errors.ts';
import { builtinRecipeDir, findRecipe, listRecipes, loadRecipeFile, parseRecipe } from '../../src/images/recipe.ts';
import { ImageStore, type ImageManifest } from '../../src/images/store.ts';
import { catchMayfly } from '../helpers/assert.ts';

const root = mkdtempSync(join(tmpdir(), 'mayfly-images-test-'));
after(() => rmSync(root, { recursive: true, force: true }));

let n = 0;
function freshStore(): ImageStore {
  n++;
  return new ImageStore(join(root, `data-${n}`));
}

type Draft = Omit<ImageManifest, 'version'>;

function draft(name: string, id: string, over: Partial<Draft> = {}): Draft {
  return {
    name,
    id,
    kind: 'vm',
    createdAt: '2025-01-01T00:00:00.000Z',
    source: { type: 'recipe', recipe: 'builtin:debian-12', suite: 'bookworm', packages: ['git'] },
    disk: 'disk.qcow2',
    kernel: 'vmlinuz',
    initrd: 'initrd.img',
    kernelArgs: 'console=ttyS0',
    diskVirtualBytes: 2 * 1024 ** 3,
    identity: 'fw_cfg',
    user: 'ci',
    ...over,
  };
}

/** A prepared image directory on the store's filesystem, with small fake files. */
function prepare(store: ImageStore, marker: string): string {
  mkdirSync(join(store.root, '.tmp'), { recursive: true });
  const dir = mkdtempSync(join(store.root, '.tmp', 'prep-'));
  writeFileSync(join(dir, 'disk.qcow2'), `disk of ${marker}\n`.repeat(200));
  writeFileSync(join(dir, 'vmlinuz'), 'kernel');
  writeFileSync(join(dir, 'initrd.img'), 'initrd');
  writeFileSync(join(dir, 'marker'), marker);
  return dir;
}

const hex = (c: string) => `sha256:${c.repeat(64).slice(0, 64)}`;


describe('ImageStore.publish', () => {
  test('versions count up 1, 2, 3 and each is complete', () => {
    const store = freshStore();
    for (const v of [1, 2, 3]) {
      const prepared = prepare(store, `v${v}`);
      const img = store.publish(prepared, draft('debian-12', hex(String(v))));
      assert.equal(img.version, v);
      assert.equal(img.name, 'debian-12');
      assert.equal(img.id, hex(String(v)));
      assert.equal(img.dir, join(store.root, 'debian-12', String(v)));
      assert.equal(img.diskPath, join(img.dir, 'disk.qcow2'));
      assert.equal(img.kernelPath, join(img.dir, 'vmlinuz'));
      assert.equal(img.initrdPath, join(img.dir, 'initrd.img'));
      assert.equal(existsSync(prepared), false, 'the prepared dir is moved, not copied');
      assert.equal(readFileSync(join(img.dir, 'marker'), 'utf8'), `v${v}`);
      const onDisk = JSON.parse(readFileSync(join(img.dir, 'manifest.json'), 'utf8')) as ImageManifest;
      assert.deepEqual(onDisk, { ...draft('debian-12', hex(String(v))), version: v });
      const blocks = readdirSync(img.dir).reduce((s, f) => s + statSync(join(img.dir, f)).blocks * 512, 0);
      assert.ok(img.sizeBytes > 0);
      assert.equal(img.sizeBytes, blocks);
    }
    assert.deepEqual(store.versions('debian-12'), [1, 2, 3]);
    assert.deepEqual(store.names(), ['debian-12']);
  });

  test('a null kernel and initrd give null paths', () => {
    const store = freshStore();
    const img = store.publish(prepare(store, 'k'), draft('cloud', hex('c'), { kernel: null, initrd: null, kernelArgs: null }));
    assert.equal(img.kernelPath, null);
    assert.equal(img.initrdPath, null);
  });

  test('names are independent and sorted; scratch dirs are not images', () => {
    const store = freshStore();
    store.publish(prepare(store, 'z'), draft('zeta', hex('1')));
    store.publish(prepare(store, 'a'), draft('alpha', hex('2')));
    store.publish(prepare(store, 'a2'), draft('alpha', hex('3')));
    prepare(store, 'left in .tmp');
    mkdirSync(join(store.root, 'empty-name'));
    assert.deepEqual(store.names(), ['alpha', 'zeta']);
    assert.deepEqual(store.versions('alpha'), [1, 2]);
    assert.deepEqual(store.versions('zeta'), [1]);
    assert.deepEqual(
      store.list().map((i) => `${i.name}:${i.version}`),
      ['alpha:1', 'alpha:2', 'zeta:1'],
    );
  });

  test('losing the race for a version number takes the next one', () => {
    // Simulates another process publishing version 2 between this one choosing 2 and renaming.
    const store = freshStore();
    store.publish(prepare(store, 'first'), draft('racy', hex('1')));
    const rival = prepare(store, 'rival');
    const mine = prepare(store, 'mine');
    const original = fs.renameSync;
    let intercepted = 0;
    fs.renameSync = ((from: fs.PathLike, to: fs.PathLike) => {
      if (from === mine && intercepted === 0) {
        intercepted++;
        writeFileSync(join(rival, 'manifest.json'), JSON.stringify({ ...draft('racy', hex('2')), version: 2 }));
        original(rival, to);
      }
      original(from, to);
    }) as typeof fs.renameSync;
    syncBuiltinESMExports();
    try {
      const img = store.publish(mine, draft('racy', hex('3')));
      assert.equal(intercepted, 1, 'the rename was intercepted');
      assert.equal(img.version, 3);
      assert.equal(readFileSync(join(img.dir, 'marker'), 'utf8'), 'mine');
      assert.equal(store.get('racy', 3)?.id, hex('3'));
      assert.equal(store.get('racy', 2)?.id, hex('2'));
      assert.equal(readFileSync(join(store.root, 'racy', '2', 'marker'), 'utf8'), 'rival');
    } finally {
      fs.renameSync = original;
      syncBuiltinESMExports();
    }
  });

  test('concurrent publishes from several processes get distinct versions', async () => {
    const store = freshStore();
    const processes = 4;
    const each = 5;
    const moduleUrl = pathToFileURL(resolve(import.meta.dirname, '..', '..', 'src', 'images', 'store.ts')).href;
    const startAt = Date.now() + 1500; // all children start publishing at the same moment
    const code = `
      import { mkdirSync, mkdtempSync, writeFileSync } from 'node:fs';
      import { join } from 'node:path';
      import { ImageStore } from ${JSON.stringify(moduleUrl)};
      const [dataDir, who, count, startAt] = process.argv.slice(1);
      const store = new ImageStore(dataDir);
      mkdirSync(join(store.root, '.tmp'), { recursive: true });
      const dirs = [];
      for (let i = 0; i < Number(count); i++) {
        const d = mkdtempSync(join(store.root, '.tmp', 'p-'));
        writeFileSync(join(d, 'disk.qcow2'), 'x');
        writeFileSync(join(d, 'marker'), who + '/' + i);
        dirs.push(d);
      }
      while (Date.now() < Number(startAt)) {}
      const got = dirs.map((d, i) => store.publish(d, {
        name: 'shared', id: 'sha256:' + who + i, kind: 'vm', createdAt: '', source: { type: 'import', disk: d },
        disk: 'disk.qcow2', kernel: null, initrd: null, kernelArgs: null, diskVirtualBytes: 1, identity: 'cloud-init', user: 'ci',
      }).version);
      process.stdout.write(JSON.stringify(got));
    `;
    const dataDir = join(store.root, '..');
    const results = await Promise.all(
      Array.from({ length: processes }, (_, p) =>
        new Promise<number[]>((res, rej) => {
          const child = spawn(process.execPath, ['--input-type=module', '-e', code, dataDir, `p${p}`, String(each), String(startAt)], {
            stdio: ['ignore', 'pipe', 'pipe'],
          });
          let out = '';
          let err = '';
          child.stdout.on('data', (c: Buffer) => (out += c.toString()));
          child.stderr.on('data', (c: Buffer) => (err += c.toString()));
          child.on('close', (c) => (c === 0 ? res(JSON.parse(out) as number[]) : rej(new Error(`child ${p} exited ${c}: ${err}`))));
        }),
      ),
    );
    const all = results.flat().sort((a, b) => a - b);
    const expected = Array.from({ length: processes * each }, (_, i) => i + 1);
    assert.deepEqual(all, expected, 'every publish got its own version number');
    assert.deepEqual(store.versions('shared'), expected);
    // Each version directory holds the one prepared dir whose manifest says that version.
    const markers = new Set<string>();
    for (const v of expected) {
      const img = store.get('shared', v)!;
      assert.equal(img.version, v);
      const marker = readFileSync(join(img.dir, 'marker'), 'utf8');
      const [who, i] = marker.split('/');
      assert.equal(img.id, `sha256:${who}${i}`, `version ${v} holds ${marker} with its own manifest`);
      markers.add(marker);
    }
    assert.equal(markers.size, processes * each);
    assert.deepEqual(readdirSync(join(store.root, '.tmp')), [], 'no prepared dir left behind');
  });

  // Two builds of one recipe in one process may ask for a scratch dir in the same millisecond.
  test('tempDir gives a new directory on every call', () => {
    const store = freshStore();
    const a = store.tempDir('build-x');
    const b = store.tempDir('build-x');
    assert.notEqual(a, b);
  });

  test('tempDir is inside the store, so publishing is a rename', () => {
    const store = freshStore();
    const d = store.tempDir('build-y');
    assert.ok(d.startsWith(join(store.root, '.tmp') + '/'), d);
    assert.equal(statSync(d).isDirectory(), true);
    assert.equal(statSync(d).mode & 0o777, 0o700);
  });
});

describe('ImageStore.resolve', () => {
  const store = freshStore();
  store.publish(prepare(store, 'd1'), draft('debian-12', hex('a1')));
  store.publish(prepare(store, 'd2'), draft('debian-12', hex('b2')));
  store.publish(prepare(store, 'd3'), draft('debian-12', hex('c3')));
  store.publish(prepare(store, 'u1'), draft('ubuntu', `sha256:c3c3c3c3${'0'.repeat(56)}`));
  store.publish(prepare(store, 'n1'), draft('deadbeef', hex('e')));

  test('NAME is the newest version', () => {
    const img = store.resolve('debian-12');
    assert.equal(img.version, 3);
    assert.equal(img.id, hex('c3'));
  });

  test('NAME:VERSION is that version', () => {
    assert.equal(store.resolve('debian-12:1').id, hex('a1'));
    assert.equal(store.resolve('debian-12:2').id, hex('b2'));
    assert.equal(store.resolve('ubuntu:1').name, 'ubuntu');
  });

  test('a content id prefix of 8+ hex digits, with or without sha256:', () => {
    assert.equal(store.resolve('b2b2b2b2').version, 2);
    assert.equal(store.resolve('sha256:a1a1a1a1').version, 1);
    assert.equal(store.resolve(hex('b2')).version, 2);
    const img = store.resolve('a1a1a1a1a1a1');
    assert.equal(`${img.name}:${img.version}`, 'debian-12:1');
  });

  test('a name that looks like hex is a name first', () => {
    assert.equal(store.resolve('deadbeef').name, 'deadbeef');
  });

  test('a short or ambiguous prefix is not found', () => {
    // 7 digits is too short to be an id.
    assert.equal(catchMayfly(() => store.resolve('b2b2b2b')).code, ErrorCode.IMAGE_NOT_FOUND);
    // debian-12:3 is c3c3c3c3c3… and ubuntu:1 is c3c3c3c3000…: 8 digits match both, 10 only one.
    const e = catchMayfly(() => store.resolve('sha256:c3c3c3c3'));
    assert.equal(e.code, ErrorCode.IMAGE_NOT_FOUND);
    assert.equal(e.message, `no image 'sha256:c3c3c3c3' in ${store.root}`);
    assert.equal(store.resolve('c3c3c3c3c3').name, 'debian-12');
    assert.equal(store.resolve('c3c3c3c300').name, 'ubuntu');
  });

  test('an unknown name lists the images there are', () => {
    const e = catchMayfly(() => store.resolve('fedora'));
    assert.equal(e.code, ErrorCode.IMAGE_NOT_FOUND);
    assert.equal(e.message, `no image 'fedora' in ${store.root}`);
    assert.equal(e.hint, 'available images: deadbeef, debian-12, ubuntu; build another with: mayfly image build RECIPE');
    assert.equal(catchMayfly(() => store.resolve('fedora:1')).message, `no image 'fedora:1' in ${store.root}`);
    assert.equal(catchMayfly(() => store.resolve('Debian-12')).code, ErrorCode.IMAGE_NOT_FOUND);
  });

  test('an unknown version lists the versions there are', () => {
    const e = catchMayfly(() => store.resolve('debian-12:9'));
    assert.equal(e.code, ErrorCode.IMAGE_NOT_FOUND);
    assert.equal(e.message, 'image debian-12 has no version 9');
    assert.equal(e.hint, 'versions: 1, 2, 3');
    assert.equal(catchMayfly(() => store.resolve('debian-12:0')).message, 'image debian-12 has no version 0');
  });

  test('an empty store says how to build the first image', () => {
    const empty = freshStore();
    const e = catchMayfly(() => empty.resolve('debian-12'));
    assert.equal(e.message, `no image 'debian-12' in ${empty.root}`);
    assert.equal(e.hint, 'no image has been built yet; build the default one with: mayfly image build debian-12');
    assert.deepEqual(empty.names(), []);
    assert.deepEqual(empty.list(), []);
    assert.deepEqual(empty.versions('debian-12'), []);
  });
});

describe('ImageStore.remove', () => {
  test('removes one version, then the name with its last version', () => {
    const store = freshStore();
    store.publish(prepare(store, '1'), draft('gone', hex('1')));
    store.publish(prepare(store, '2'), draft('gone', hex('2')));
    store.publish(prepare(store, 'k'), draft('kept', hex('3')));

    store.remove('gone', 1);
    assert.equal(store.get('gone', 1), undefined);
    assert.equal(existsSync(join(store.root, 'gone', '1')), false);
    assert.deepEqual(store.versions('gone'), [2]);
    assert.equal(store.resolve('gone').version, 2);
    assert.equal(catchMayfly(() => store.resolve('gone:1')).message, 'image gone has no version 1');

    store.remove('gone', 2);
    assert.equal(existsSync(join(store.root, 'gone')), false);
    assert.deepEqual(store.names(), ['kept']);
    assert.equal(catchMayfly(() => store.resolve('gone')).hint?.startsWith('available images: kept;'), true);
    // Nothing is left in the scratch area.
    assert.deepEqual(
      readdirSync(join(store.root, '.tmp')).filter((f) => f.startsWith('rm-')),
      [],
    );
  });

  test('a missing version is an error, not a silent success', () => {
    const store = freshStore();
    store.publish(prepare(store, '1'), draft('x', hex('1')));
    assert.throws(() => store.remove('x', 5), { code: 'ENOENT' });
    assert.deepEqual(store.versions('x'), [1]);
  });
});

// ---------------------------------------------------------------------------------------------

describe('recipes', () => {
  const dir = join(root, 'recipes');
  mkdirSync(dir);

  test('the built-in debian-12 recipe loads with its defaults', () => {
    const r = findRecipe('debian-12', []);
    assert.deepEqual(r, {
      name: 'debian-12',
      description: 'Debian 12 (bookworm) with git, git-lfs, bash, curl, ca-certificates, sudo',
      kind: 'vm',
      suite: 'bookworm',
      variant: 'minbase',
      packages: ['git', 'git-lfs', 'bash', 'ca-certificates', 'curl', 'procps', 'less', 'xz-utils', 'unzip'],
      commands: [],
      disk_size: 2,
      kernel_args: '',
      source: 'builtin:debian-12',
    });
    assert.equal(existsSync(join(builtinRecipeDir, 'debian-12.toml')), true);
  });

  test('a minimal recipe gets every default', () => {
    assert.deepEqual(parseRecipe('name = "tiny"\n', '/r/tiny.toml'), {
      name: 'tiny',
      description: '',
      kind: 'vm',
      suite: 'bookworm',
      variant: 'minbase',
      packages: [],
      commands: [],
      disk_size: 2,
      kernel_args: '',
      source: '/r/tiny.toml',
    });
  });

  test('versioned package names are accepted', () => {
    const r = parseRecipe('name = "p"\npackages = ["libc6=2.36-9+deb12u4", "g++", "python3.11"]\n', 'p.toml');
    assert.deepEqual(r.packages, ['libc6=2.36-9+deb12u4', 'g++', 'python3.11']);
  });

  const invalid: [string, string, string][] = [
    [
      'bad package name',
      'name = "x"\npackages = ["git", "Bad_Pkg"]\n',
      'r.toml:2: packages[1]: is not a Debian package name (got "Bad_Pkg")',
    ],
    [
      'bad package on its own line',
      'name = "x"\npackages = [\n  "git",\n  "rm -rf",\n]\n',
      'r.toml:4: packages[1]: is not a Debian package name (got "rm -rf")',
    ],
    [
      'unknown key',
      'name = "x"\nfoo = 1\n',
      "r.toml:2: foo: unknown key 'foo' (valid keys here: name, description, kind, suite, variant, mirror, packages, commands, playbook, disk_size, kernel_args, gitlab_runner)",
    ],
    ['misspelt key', 'name = "x"\n\npackage = ["git"]\n', "r.toml:3: package: unknown key 'package' — did you mean 'packages'?"],
    ['disk_size 0', 'name = "x"\n\n\ndisk_size = 0\n', 'r.toml:4: disk_size: must be an integer from 1 to 2048 (got 0)'],
    ['disk_size too big', 'disk_size = 4096\nname = "x"\n', 'r.toml:1: disk_size: must be an integer from 1 to 2048 (got 4096)'],
    ['missing name', 'suite = "bookworm"\n', 'r.toml:1: name: required key is missing'],
    [
      'bad name',
      'name = "Debian 12"\n',
      'r.toml:1: name: must be lower-case letters, digits, ".", "_" or "-" (at most 63) (got "Debian 12")',
    ],
  ];
  for (const [what, text, message] of invalid) {
    test(`invalid recipe: ${what}`, () => {
      const e = catchMayfly(() => parseRecipe(text, 'r.toml'));
      assert.equal(e.code, ErrorCode.RECIPE_INVALID);
      assert.equal(e.message, message);
    });
  }

  test('all problems are reported at once, in line order', () => {
    const e = catchMayfly(() => parseRecipe('name = "x"\ndisk_size = 0\npackages = ["A"]\nbogus = true\n', 'r.toml'));
    assert.equal(e.code, ErrorCode.RECIPE_INVALID);
    assert.deepEqual(
      e.message.split('\n').map((l) => l.split(': ').slice(0, 2).join(': ')),
      ['r.toml:2: disk_size', 'r.toml:3: packages[0]', 'r.toml:4: bogus'],
    );
  });

  test('a recipe file by path, with its playbook resolved next to it', () => {
    const path = join(dir, 'web.toml');
    writeFileSync(path, 'name = "web"\nplaybook = "site.yml"\npackages = ["nginx"]\n');
    const r = findRecipe(path, []);
    assert.equal(r.name, 'web');
    assert.equal(r.source, path);
    assert.equal(r.playbook, join(dir, 'site.yml'));
    assert.deepEqual(r.packages, ['nginx']);
    assert.deepEqual(loadRecipeFile(path), r);
  });

  test('a missing recipe file is RECIPE_INVALID', () => {
    const path = join(dir, 'missing.toml');
    const e = catchMayfly(() => findRecipe(path, []));
    assert.equal(e.code, ErrorCode.RECIPE_INVALID);
    assert.equal(e.message, `recipe file ${path} does not exist`);
  });

  test('recipes by name from recipe dirs, which may override built-ins', () => {
    const rdir = join(root, 'recipe-dir');
    mkdirSync(rdir);
    writeFileSync(join(rdir, 'custom.toml'), 'name = "custom"\npackages = ["make"]\n');
    writeFileSync(join(rdir, 'my-debian.toml'), 'name = "debian-12"\ndisk_size = 8\n');
    writeFileSync(join(rdir, 'notes.txt'), 'not a recipe');
    const custom = findRecipe('custom', [rdir, join(root, 'no-such-dir')]);
    assert.equal(custom.source, join(rdir, 'custom.toml'));
    assert.deepEqual(custom.packages, ['make']);
    const overridden = findRecipe('debian-12', [rdir]);
    assert.equal(overridden.disk_size, 8);
    assert.equal(overridden.source, join(rdir, 'my-debian.toml'));
    assert.deepEqual([...listRecipes([rdir]).keys()], ['debian-12-container', 'debian-12', 'custom']);
  });

  test('an unknown recipe name lists the known ones', () => {
    const rdir = join(root, 'recipe-dir-2');
    mkdirSync(rdir);
    writeFileSync(join(rdir, 'zz.toml'), 'name = "zz"\n');
    const e = catchMayfly(() => findRecipe('fedora-40', [rdir]));
    assert.equal(e.code, ErrorCode.IMAGE_NOT_FOUND);
    assert.equal(e.message, "no recipe named 'fedora-40'");
    assert.equal(e.hint, 'known recipes: debian-12-container, debian-12, zz; or pass the path of a recipe .toml file');
  });
});
