import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import * as z from 'zod';
import { loadConfig, defaultConfig, defaultConfigPath, type Config } from '../../src/config/index.ts';
import { ConfigSchema } from '../../src/config/schema.ts';
import { closestMatch, formatKeyPath, lineForPath, locateKeys, parseToml } from '../../src/config/toml.ts';
import { ErrorCode, MayflyError } from '../../src/errors.ts';
import { catchMayfly } from '../helpers/assert.ts';

const dir = mkdtempSync(join(tmpdir(), 'mayfly-config-test-'));
after(() => rmSync(dir, { recursive: true, force: true }));

function writeFile(name: string, text: string): string {
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
}

const DEFAULTS: Config = {
  defaults: { image: 'debian-12', cpus: 2, memory: 1024, disk: 4, start: 'restore', job_disk: 'plain', job_tmpfs_size: '50%', network: 'user' },
  qemu: { binary: 'qemu-system-x86_64', accel: 'auto', boot_timeout: 120, boot_retries: 1, tcg_tb_size: 64 },
  nspawn: { binary: 'systemd-nspawn', private_network: false, start_timeout: 30, pids_max: 8192 },
  images: { recipe_dirs: [], keep_versions: 3, start: {}, rebuild: {}, gc_interval: 3600 },
  log: { level: 'info' },
  storage: { backend: 'auto', instances_dir: '' },
  network: { bridge: 'mayfly0', subnet: '10.77.0.0/24', dns: [], host_ports: [], allow: [] },
  sizes: {},
  capacity: { cpu_overcommit: 4, memory_overcommit: 1, memory_reserve: 1024 },
  daemon: {
    socket: '/run/mayfly/mayfly.sock',
    socket_group: '',
    listen: '',
    token_file: '',
    reconcile_interval: 5,
    reap_interval: 60,
    delete_instances_on_shutdown: true,
  },
  pool: [],
  gitlab: { builds_dir: '/builds', cache_dir: '/cache', default_image: '', pool: '', images: {}, size_variable: 'MAYFLY_SIZE', kill_grace: 10 },
};

// A schema with an array of tables and a required key, which the main config has neither of.
const PoolSchema = z.strictObject({
  name: z.string().optional(),
  pool: z
    .array(
      z.strictObject({
        image: z.string(),
        idle_count: z.int().min(0).max(10).default(0),
      }),
    )
    .default([]),
});

describe('loadConfig', () => {
  test('the default path is /etc/mayfly/config.toml', () => {
    assert.equal(defaultConfigPath, '/etc/mayfly/config.toml');
  });

  test('a missing file at the default path means all defaults', () => {
    assert.deepEqual(loadConfig(undefined, join(dir, 'absent.toml')), DEFAULTS);
    assert.deepEqual(defaultConfig(), DEFAULTS);
  });

  test('a file at the default path is read', () => {
    const path = writeFile('default.toml', '[qemu]\naccel = "kvm"\n');
    assert.equal(loadConfig(undefined, path).qemu.accel, 'kvm');
  });

  test('a missing file at an explicit path is an error naming the path', () => {
    const path = join(dir, 'nope.toml');
    const err = catchMayfly(() => loadConfig(path, join(dir, 'absent.toml')));
    assert.equal(err.code, ErrorCode.CONFIG_NOT_FOUND);
    assert.equal(err.message, `cannot read ${path}: no such file`);
  });

  test('an explicit path equal to the default path must still exist', () => {
    const path = join(dir, 'also-absent.toml');
    assert.equal(catchMayfly(() => loadConfig(path, path)).code, ErrorCode.CONFIG_NOT_FOUND);
  });

  test('a valid file overrides only the keys it sets', () => {
    const path = writeFile(
      'valid.toml',
      `[defaults]
image = "alpine-3.20"
cpus = 8
[qemu]
accel = "tcg"
boot_timeout = 300
[images]
recipe_dirs = ["/srv/recipes", "/opt/more"]
[log]
level = "debug"
`,
    );
    assert.deepEqual(loadConfig(path), {
      ...DEFAULTS,
      defaults: { image: 'alpine-3.20', cpus: 8, memory: 1024, disk: 4, start: 'restore', job_disk: 'plain', job_tmpfs_size: '50%', network: 'user' },
      qemu: { binary: 'qemu-system-x86_64', accel: 'tcg', boot_timeout: 300, boot_retries: 1, tcg_tb_size: 64 },
      images: { recipe_dirs: ['/srv/recipes', '/opt/more'], keep_versions: 3, start: {}, rebuild: {}, gc_interval: 3600 },
      log: { level: 'debug' },
    });
  });

  test('an empty file means all defaults', () => {
    assert.deepEqual(loadConfig(writeFile('empty.toml', '')), DEFAULTS);
  });

  test('examples/config.toml is valid and shows exactly the defaults', () => {
    const example = new URL('../../examples/config.toml', import.meta.url);
    assert.deepEqual(loadConfig(example.pathname), DEFAULTS);
    // Every key must be documented in the example, not just defaulted.
    const text = readFileSync(example, 'utf8');
    const written = locateKeys(text);
    for (const [section, keys] of Object.entries(DEFAULTS)) {
      for (const key of Object.keys(keys as object)) assert.ok(written.has(`${section}.${key}`), `${section}.${key} missing`);
    }
  });

  test('schema errors in a file are CONFIG_INVALID with the file path', () => {
    const path = writeFile('bad.toml', '[log]\nlevel = "loud"\n');
    const err = catchMayfly(() => loadConfig(path));
    assert.equal(err.code, ErrorCode.CONFIG_INVALID);
    assert.equal(
      err.message,
      `${path}:2: log.level: must be one of "trace", "debug", "info", "warn", "error", "silent" (got "loud")`,
    );
  });

  test('storage.backend takes "auto" or a directory backend, and says which when wrong', () => {
    assert.equal(loadConfig(writeFile('storage.toml', '[storage]\nbackend = "overlayfs"\n')).storage.backend, 'overlayfs');
    const path = writeFile('storage-bad.toml', '[storage]\nbackend = "zfs"\n');
    assert.equal(
      catchMayfly(() => loadConfig(path)).message,
      `${path}:2: storage.backend: must be one of "auto", "btrfs-snapshot", "reflink", "overlayfs", "copy" (got "zfs")`,
    );
  });
});

describe('job data and instance dir settings', () => {
  test('job_disk takes plain, encrypted or tmpfs, in [defaults] and per pool', () => {
    const c = loadConfig(writeFile('jd.toml', '[defaults]\njob_disk = "tmpfs"\njob_tmpfs_size = "2g"\n[[pool]]\nname = "p"\nimage = "debian-12"\njob_disk = "encrypted"\n'));
    assert.equal(c.defaults.job_disk, 'tmpfs');
    assert.equal(c.defaults.job_tmpfs_size, '2g');
    assert.equal(c.pool[0]!.job_disk, 'encrypted');
    const bad = writeFile('jd-bad.toml', '[defaults]\njob_disk = "luks"\n');
    assert.match(catchMayfly(() => loadConfig(bad)).message, /defaults\.job_disk: must be one of "plain", "encrypted", "tmpfs" \(got "luks"\)/);
    const size = writeFile('jd-size.toml', '[defaults]\njob_tmpfs_size = "half"\n');
    assert.match(catchMayfly(() => loadConfig(size)).message, /job_tmpfs_size: must be a share of the machine's memory like "50%"/);
  });

  test('storage.instances_dir must be absolute and free of commas', () => {
    assert.equal(loadConfig(writeFile('inst.toml', '[storage]\ninstances_dir = "/dev/shm/mayfly"\n')).storage.instances_dir, '/dev/shm/mayfly');
    assert.match(catchMayfly(() => loadConfig(writeFile('inst-rel.toml', '[storage]\ninstances_dir = "inst"\n'))).message, /instances_dir: must be an absolute path/);
    assert.match(catchMayfly(() => loadConfig(writeFile('inst-comma.toml', '[storage]\ninstances_dir = "/a,b"\n'))).message, /must not contain a comma/);
  });
});

describe('config validation messages', () => {
  const check = (text: string): string => catchMayfly(() => parseToml(text, 'c.toml', ConfigSchema)).message;

  test('unknown top-level key, with its own line', () => {
    assert.equal(check('\n\nqemuu = 1\n'), "c.toml:3: qemuu: unknown key 'qemuu' — did you mean 'qemu'?");
  });

  test('unknown table header at top level', () => {
    assert.equal(
      check('[log]\nlevel = "info"\n\n[server]\nport = 1\n'),
      "c.toml:4: server: unknown key 'server' (valid keys here: defaults, network, qemu, nspawn, images, log, storage, sizes, capacity, daemon, pool, gitlab)",
    );
  });

  test('unknown key inside a table suggests the closest known key', () => {
    assert.equal(
      check('[defaults]\ncpus = 2\n\n[qemu]\n# comment\nboot_timout = 30\n'),
      "c.toml:6: qemu.boot_timout: unknown key 'boot_timout' — did you mean 'boot_timeout'?",
    );
  });

  test('unknown key far from every known key lists the valid keys', () => {
    assert.equal(check('[log]\ncolour = true\n'), "c.toml:2: log.colour: unknown key 'colour' (valid keys here: level)");
  });

  test('wrong type names the key, the line, and what was given', () => {
    assert.equal(check('[defaults]\nimage = "x"\ncpus = "4"\n'), 'c.toml:3: defaults.cpus: expected an integer, got a string ("4")');
    assert.equal(check('[defaults]\nmemory = 1.5\n'), 'c.toml:2: defaults.memory: expected an integer, got a float (1.5)');
    assert.equal(check('qemu = 5\n'), 'c.toml:1: qemu: expected a table, got an integer (5)');
  });

  test('out of range shows the whole range', () => {
    assert.equal(check('[qemu]\nboot_timeout = 1\n'), 'c.toml:2: qemu.boot_timeout: must be an integer from 5 to 3600 (got 1)');
    assert.equal(check('[defaults]\n\nmemory = 999999\n'), 'c.toml:3: defaults.memory: must be an integer from 128 to 262144 (got 999999)');
  });

  test('bad enum value suggests the closest option', () => {
    assert.equal(check('[qemu]\naccel = "kvmm"\n'), 'c.toml:2: qemu.accel: must be one of "auto", "kvm", "tcg" (got "kvmm") — did you mean "kvm"?');
  });

  test('format and refinement checks use the schema wording, located per array element', () => {
    assert.equal(
      check('[defaults]\nimage = "Debian"\n'),
      'c.toml:2: defaults.image: must be an image name: 1 to 63 characters of a-z, 0-9, ".", "_" or "-", starting with a letter or digit (got "Debian")',
    );
    assert.equal(
      check('[images]\nrecipe_dirs = [\n  "/ok",\n  "relative",\n]\n'),
      'c.toml:4: images.recipe_dirs[1]: must be an absolute path (got "relative")',
    );
  });

  test('every problem is reported, one per line, in file order', () => {
    const text = [
      '[qemu]', // 1
      'accel = "fast"', // 2
      'boot_retries = 9', // 3
      '', // 4
      '[defaults]', // 5
      'cpu = 4', // 6
      'disk = 0', // 7
      '[log]', // 8
      'level = "info"', // 9
      'lvl = "x"', // 10
    ].join('\n');
    assert.equal(
      check(text),
      [
        'c.toml:2: qemu.accel: must be one of "auto", "kvm", "tcg" (got "fast")',
        'c.toml:3: qemu.boot_retries: must be an integer from 0 to 5 (got 9)',
        "c.toml:6: defaults.cpu: unknown key 'cpu' — did you mean 'cpus'?",
        'c.toml:7: defaults.disk: must be an integer from 1 to 2048 (got 0)',
        "c.toml:10: log.lvl: unknown key 'lvl' (valid keys here: level)",
      ].join('\n'),
    );
  });

  test('syntax errors are CONFIG_PARSE with file:line:col and the reason', () => {
    const err = catchMayfly(() => parseToml('[qemu]\naccel = "kvm"\nboot_timeout = \n', 'c.toml', ConfigSchema));
    assert.equal(err.code, ErrorCode.CONFIG_PARSE);
    const [first, blank, ...snippet] = err.message.split('\n');
    assert.equal(first, 'c.toml:3:16: invalid TOML: invalid value');
    assert.equal(blank, '');
    assert.ok(snippet.some((l) => l.includes('boot_timeout =')), err.message);
  });

  test('duplicate keys are syntax errors on the line of the duplicate', () => {
    const err = catchMayfly(() => parseToml('[log]\nlevel = "info"\nlevel = "warn"\n', 'c.toml', ConfigSchema));
    assert.equal(err.code, ErrorCode.CONFIG_PARSE);
    assert.match(err.message, /^c\.toml:3:1: invalid TOML: /);
  });
});

describe('parseToml with other schemas', () => {
  const check = (text: string): string => catchMayfly(() => parseToml(text, 'p.toml', PoolSchema)).message;

  test('unknown key in the second [[pool]] entry points at that entry', () => {
    const text = '[[pool]]\nimage = "a"\nidle_count = 1\n\n[[pool]]\nimage = "b"\nidle_cont = 2\n';
    assert.equal(check(text), "p.toml:7: pool[1].idle_cont: unknown key 'idle_cont' — did you mean 'idle_count'?");
  });

  test('bad value in an array-of-tables entry', () => {
    assert.equal(
      check('[[pool]]\nimage = "a"\n[[pool]]\nimage = "b"\n[[pool]]\nimage = "c"\nidle_count = -1\n'),
      'p.toml:7: pool[2].idle_count: must be an integer from 0 to 10 (got -1)',
    );
  });

  test('a missing required key points at its table header', () => {
    assert.equal(check('name = "x"\n\n[[pool]]\nimage = "a"\n[[pool]]\nidle_count = 1\n'), 'p.toml:5: pool[1].image: required key is missing');
  });

  test('a missing required key at top level points at line 1', () => {
    const Required = z.strictObject({ name: z.string() });
    const err = catchMayfly(() => parseToml('\n\n', 'r.toml', Required));
    assert.equal(err.message, 'r.toml:1: name: required key is missing');
  });

  test('errorCode replaces CONFIG_INVALID; results are typed and defaulted', () => {
    const err = catchMayfly(() => parseToml('nam = "x"', 'r.toml', PoolSchema, { errorCode: ErrorCode.RECIPE_INVALID }));
    assert.equal(err.code, ErrorCode.RECIPE_INVALID);
    assert.equal(err.message, "r.toml:1: nam: unknown key 'nam' — did you mean 'name'?");
    assert.deepEqual(parseToml('[[pool]]\nimage = "a"', 'r.toml', PoolSchema), { pool: [{ image: 'a', idle_count: 0 }] });
  });

  test('unknown keys inside inline tables are located', () => {
    assert.equal(
      check('pool = [\n  { image = "a" },\n  { image = "b", idel = 1 },\n]\n'),
      "p.toml:3: pool[1].idel: unknown key 'idel' (valid keys here: image, idle_count)",
    );
  });
});

describe('key locator', () => {
  test('tables, dotted keys and array-of-tables indices', () => {
    const text = [
      'top = 1', // 1
      '[a.b]', // 2
      'c.d = 2', // 3
      '[[pool]]', // 4
      'name = "x"', // 5
      '[[pool]]', // 6
      '[pool.sub]', // 7
      'k = 1', // 8
      '[[pool.vm]]', // 9
      '[[pool.vm]]', // 10
      'id = 2', // 11
      '[[pool]]', // 12
      '[[pool.vm]]', // 13
    ].join('\n');
    assert.deepEqual(
      [...locateKeys(text)],
      [
        ['top', 1],
        ['a', 2],
        ['a.b', 2],
        ['a.b.c', 3],
        ['a.b.c.d', 3],
        ['pool', 4],
        ['pool[0]', 4],
        ['pool[0].name', 5],
        ['pool[1]', 6],
        ['pool[1].sub', 7],
        ['pool[1].sub.k', 8],
        ['pool[1].vm', 9],
        ['pool[1].vm[0]', 9],
        ['pool[1].vm[1]', 10],
        ['pool[1].vm[1].id', 11],
        ['pool[2]', 12],
        ['pool[2].vm', 13],
        ['pool[2].vm[0]', 13],
      ],
    );
  });

  test('is not fooled by brackets in strings, comments and multi-line values', () => {
    const text = [
      's = """', // 1
      '[fake]', // 2
      'x = 1 """', // 3
      "l = '''", // 4
      '[[fake2]]', // 5
      "'''", // 6
      'c = "[nope]" # [nope2]', // 7
      '# [commented]', // 8
      'arr = [', // 9
      '  [1, 2], # ]', // 10
      '  "]",', // 11
      ']', // 12
      '[real]', // 13
      'when = 1979-05-27 07:32:00Z', // 14
    ].join('\n');
    assert.deepEqual(
      [...locateKeys(text)],
      [
        ['s', 1],
        ['l', 4],
        ['c', 7],
        ['arr', 9],
        ['arr[0]', 10],
        ['arr[0][0]', 10],
        ['arr[0][1]', 10],
        ['arr[1]', 11],
        ['real', 13],
        ['real.when', 14],
      ],
    );
  });

  test('quoted keys and inline tables', () => {
    const text = ['"dot.ted" = 1', "[ 'lit' . \"q\\u0041\" ]", 'x = { y = 1, z = { w = 2 } }'].join('\n');
    assert.deepEqual(
      [...locateKeys(text)],
      [
        ['"dot.ted"', 1],
        ['lit', 2],
        ['lit.qA', 2],
        ['lit.qA.x', 3],
        ['lit.qA.x.y', 3],
        ['lit.qA.x.z', 3],
        ['lit.qA.x.z.w', 3],
      ],
    );
  });

  test('lineForPath falls back to the nearest written ancestor, then line 1', () => {
    const locations = locateKeys('\n[qemu]\naccel = "kvm"\n');
    assert.equal(lineForPath(locations, ['qemu', 'accel']), 3);
    assert.equal(lineForPath(locations, ['qemu', 'binary']), 2);
    assert.equal(lineForPath(locations, ['log', 'level']), 1);
    assert.equal(lineForPath(locations, []), 1);
  });

  test('formatKeyPath', () => {
    assert.equal(formatKeyPath(['pool', 1, 'idle_count']), 'pool[1].idle_count');
    assert.equal(formatKeyPath(['env', 'A.B', 'x y']), 'env."A.B"."x y"');
    assert.equal(formatKeyPath([]), '');
  });
});

describe('closestMatch', () => {
  const keys = ['image', 'cpus', 'memory', 'disk', 'boot_timeout'];

  test('finds typos, transpositions, case and dash differences', () => {
    assert.equal(closestMatch('imgae', keys), 'image');
    assert.equal(closestMatch('cpu', keys), 'cpus');
    assert.equal(closestMatch('Boot-Timeout', keys), 'boot_timeout');
  });

  test('suggests nothing for unrelated words', () => {
    assert.equal(closestMatch('mem', keys), undefined);
    assert.equal(closestMatch('colour', keys), undefined);
    assert.equal(closestMatch('x', ['y']), undefined);
  });
});
