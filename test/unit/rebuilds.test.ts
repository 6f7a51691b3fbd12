import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { ConfigSchema } from '../../src/config/schema.ts';
import { parseToml } from '../../src/config/toml.ts';
import { failedRebuilds, ImageRebuilds, rebuildRecipe, rebuildSchedules } from '../../src/daemon/rebuilds.ts';
import { Daemon } from '../../src/daemon/service.ts';
import { ErrorCode, MayflyError } from '../../src/errors.ts';
import { ImageStore, type Image } from '../../src/images/store.ts';
import { silentLogger } from '../../src/log.ts';
import type { Recipe } from '../../src/images/recipe.ts';
import { catchMayfly } from '../helpers/assert.ts';

const parseConfig = (text: string, file: string) => parseToml(text, file, ConfigSchema);

const root = mkdtempSync(join(tmpdir(), 'mayfly-rebuild-test-'));
after(() => rmSync(root, { recursive: true, force: true }));

function fakePublish(store: ImageStore, recipe: Recipe): Image {
  const dir = store.tempDir('fake');
  writeFileSync(join(dir, 'disk.qcow2'), 'x');
  return store.publish(dir, {
    name: recipe.name, id: `sha256:${'2'.repeat(64)}`, kind: 'vm', createdAt: new Date().toISOString(),
    source: { type: 'recipe', recipe: recipe.source, suite: recipe.suite, packages: [] },
    disk: 'disk.qcow2', kernel: null, initrd: null, kernelArgs: null, diskVirtualBytes: 1, identity: 'fw_cfg', user: 'ci',
  });
}

describe('scheduled rebuilds', () => {
  test('[images] rebuild takes a cron string (UTC) or a table with a time zone', () => {
    const c = parseConfig('[images]\nrebuild = { "debian-12" = "0 3 * * sun", "tools" = { cron = "30 2 * * *", timezone = "Europe/Berlin" } }\n', 'c.toml');
    assert.deepEqual(rebuildSchedules(c), [
      { image: 'debian-12', cron: '0 3 * * sun', timezone: 'UTC' },
      { image: 'tools', cron: '30 2 * * *', timezone: 'Europe/Berlin' },
    ]);
  });

  test('a bad cron expression, time zone or image name is an error naming the key and line', () => {
    const e = catchMayfly(() => parseConfig('[images]\nrebuild = { "debian-12" = "every sunday" }\n', 'c.toml'));
    assert.equal(e.code, ErrorCode.CONFIG_INVALID);
    assert.match(e.message, /c\.toml:2: images\.rebuild\.debian-12: .*cron expression/);
    const tz = catchMayfly(() => parseConfig('[images]\nrebuild = { "a" = { cron = "0 3 * * *", timezone = "Mars/Olympus" } }\n', 'c.toml'));
    assert.match(tz.message, /images\.rebuild\.a\.timezone: is not a time zone/);
    const key = catchMayfly(() => parseConfig('[images]\nrebuild = { "a" = { cron = "0 3 * * *", tz = "UTC" } }\n', 'c.toml'));
    assert.match(key.message, /tz/);
  });

  test('a rebuild publishes a new version, reports it and collects; a failure keeps the previous version and is reported', async () => {
    const store = new ImageStore(join(root, 'd1'));
    const recipe: Recipe = { name: 'debian-12', source: 'builtin:debian-12', suite: 'bookworm' } as Recipe;
    fakePublish(store, recipe);
    const events: { type: string; data: Record<string, unknown> }[] = [];
    const collected: string[] = [];
    let fail = false;
    const r = new ImageRebuilds([], {
      images: store,
      recipeDirs: [],
      log: silentLogger,
      report: (type, data) => events.push({ type, data }),
      afterPublish: (img) => collected.push(`${img.name}:${img.version}`),
      build: async (s, rec) => {
        if (fail) throw new MayflyError(ErrorCode.IMAGE_BUILD_FAILED, 'mmdebstrap failed (exit 1)');
        return fakePublish(s, rec);
      },
    });
    await r.rebuild('debian-12');
    assert.deepEqual(store.versions('debian-12'), [1, 2]);
    assert.equal(events[0]!.type, 'image_rebuilt');
    assert.equal(events[0]!.data.version, 2);
    assert.deepEqual(collected, ['debian-12:2']);

    fail = true;
    await r.rebuild('debian-12');
    assert.deepEqual(store.versions('debian-12'), [1, 2], 'the previous version stays');
    assert.equal(events[1]!.type, 'image_rebuild_failed');
    assert.deepEqual(events[1]!.data, { image: 'debian-12', error: 'mmdebstrap failed (exit 1)', kept: 2 });
    await r.stop();
  });

  test('the schedule fires at its times, and one image is never rebuilt twice at once', async () => {
    const store = new ImageStore(join(root, 'd2'));
    const recipe: Recipe = { name: 'debian-12', source: 'builtin:debian-12', suite: 'bookworm' } as Recipe;
    fakePublish(store, recipe);
    let builds = 0;
    let release!: () => void;
    const gate = new Promise<void>((res) => (release = res));
    const r = new ImageRebuilds([{ image: 'debian-12', cron: '* * * * * *', timezone: 'UTC' }], {
      images: store, recipeDirs: [], log: silentLogger, report: () => {}, afterPublish: () => {},
      build: async (s, rec) => {
        builds++;
        await gate;
        return fakePublish(s, rec);
      },
    });
    r.start();
    assert.ok(r.next()[0]!.at instanceof Date);
    await new Promise((res) => setTimeout(res, 2500));
    assert.equal(builds, 1, 'a rebuild still running is not started again');
    release();
    await r.stop();
    assert.deepEqual(store.versions('debian-12'), [1, 2]);
  });

  test('the recipe of a rebuild is the one the newest version came from, else the one of its name', () => {
    const store = new ImageStore(join(root, 'd3'));
    const file = join(root, 'custom.toml');
    writeFileSync(file, 'name = "custom"\ncommands = ["true"]\n');
    fakePublish(store, { name: 'custom', source: file, suite: 'bookworm' } as Recipe);
    assert.equal(rebuildRecipe(store, 'custom', []).source, file);
    assert.equal(rebuildRecipe(store, 'debian-12', []).source, 'builtin:debian-12');
    assert.match(catchMayfly(() => rebuildRecipe(store, 'nothing', [])).message, /no recipe named 'nothing'/);
  });

  test('mayflyd runs the schedule; a failed rebuild is an event that image ls reports until a newer version exists', async () => {
    const dir = join(root, 'd4');
    // No recipe of this name exists: every rebuild fails.
    const config = ConfigSchema.parse({ images: { rebuild: { 'test-gone': '* * * * * *' } } });
    const daemon = new Daemon({ dataDir: dir, config, log: silentLogger });
    try {
      await daemon.start();
      const deadline = Date.now() + 5000;
      while (!daemon.engine.state.recentEvents(50).some((e) => e.type === 'image_rebuild_failed') && Date.now() < deadline) {
        await new Promise((res) => setTimeout(res, 100));
      }
      const ev = daemon.engine.state.recentEvents(50).find((e) => e.type === 'image_rebuild_failed');
      assert.ok(ev, 'an image_rebuild_failed event');
      assert.equal(ev.data.image, 'test-gone');
      assert.match(String(ev.data.error), /no recipe named 'test-gone'/);
      const failed = failedRebuilds(daemon.engine.state, daemon.engine.images.list());
      assert.deepEqual(failed.map((f) => f.image), ['test-gone']);
      // A version made after the failure answers it.
      await new Promise((res) => setTimeout(res, 5));
      fakePublish(daemon.engine.images, { name: 'test-gone', source: 'builtin:x', suite: 'bookworm' } as Recipe);
      assert.deepEqual(failedRebuilds(daemon.engine.state, daemon.engine.images.list()), []);
    } finally {
      await daemon.stop();
    }
  });
});
