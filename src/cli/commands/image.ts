import type { Command } from 'commander';
import { ErrorCode, MayflyError } from '../../errors.ts';
import { buildImage, findRecipe, formatGc, imageShell, importImage, maintainImage, recipeOf, type Image } from '../../images/index.ts';
import type { Engine } from '../../pool/index.ts';
import { failedRebuilds } from '../../daemon/rebuilds.ts';
import { age, bytes, printJson, printList } from '../format.ts';
import type { ContextFactory } from '../main.ts';
import { withAbort } from '../signals.ts';

/** After a new version: collect the image's unused old versions and say what went. */
function collectAfterPublish(engine: Engine, name: string): void {
  const plan = engine.collectImages({ names: [name] });
  for (const d of plan.remove) process.stderr.write(`mayfly: removed ${d.name}:${d.version} (${d.why})\n`);
}

function sourceText(i: Image): string {
  const base = i.source.type === 'recipe' ? `recipe ${i.source.recipe}` : `import ${i.source.disk}`;
  return i.source.maintainedFrom === undefined ? base : `${base}, ${i.source.maintainedBy ?? 'maintain'} of ${i.source.maintainedFrom}`;
}

export function registerImage(program: Command, context: ContextFactory): void {
  const image = program.command('image').description('build, list, inspect, import, maintain, change, collect and remove images');

  image
    .command('build')
    .description('build a new version of an image from a recipe (a built-in name or a .toml file)')
    .argument('[recipe]', 'recipe name or path', 'debian-12')
    .option('--snapshot', 'also make its snapshot template now (for [defaults] size), instead of on first use')
    .action(async (recipeRef: string, o: { snapshot?: boolean }) => {
      const ctx = context();
      const recipe = findRecipe(recipeRef, ctx.config.images.recipe_dirs);
      const engine = ctx.engine();
      const img = await withAbort((signal) => buildImage(engine.images, recipe, { log: ctx.log, signal }));
      collectAfterPublish(engine, img.name);
      if (o.snapshot) {
        if (!engine.templates.canSnapshot(img)) {
          throw new MayflyError(ErrorCode.SNAPSHOT_FAILED, `image ${img.name}:${img.version} cannot be restored from a snapshot`, { hint: 'its machines boot' });
        }
        const t = await withAbort((signal) => engine.templates.ensure(img, engine.resolveSize(), signal));
        ctx.log.info({ template: t.dir, seconds: t.meta.seconds }, 'snapshot template made');
      }
      if (ctx.opts.json) printJson(img);
      else process.stdout.write(`${img.name}:${img.version} ${img.id}\n`);
    });

  image
    .command('ls')
    .description('list images and their versions')
    .option('--json', 'JSON output')
    .action((o: { json?: boolean }) => {
      const ctx = context();
      const engine = ctx.engine();
      const list = engine.images.list();
      printList(list, {
        json: Boolean(o.json || ctx.opts.json),
        empty: 'no images yet; build the default one with: mayfly image build debian-12',
        headers: ['NAME', 'VERSION', 'ID', 'SIZE', 'AGE', 'SOURCE'],
        row: (i) => [
          i.name,
          String(i.version),
          i.id.slice(0, 19),
          bytes(i.sizeBytes),
          age(Date.parse(i.createdAt)),
          sourceText(i),
        ],
      });
      for (const f of failedRebuilds(engine.state, list)) {
        process.stderr.write(`mayfly: warning: the scheduled rebuild of ${f.image} failed ${age(f.at)} ago, the previous version stays: ${f.error.split('\n')[0]}\n`);
      }
    });

  image
    .command('inspect')
    .description('show everything about one image version (JSON)')
    .argument('<ref>', 'NAME, NAME:VERSION or content id')
    .action((ref: string) => {
      const engine = context().engine();
      const img = engine.images.resolve(ref);
      printJson({ ...img, instances: engine.state.instancesUsingImage(img.name, img.version).map((i) => i.id) });
    });

  image
    .command('rm')
    .description('remove an image version, or all versions of an image')
    .argument('<ref...>', 'NAME (all versions) or NAME:VERSION')
    .option('--force', 'remove even when machines use it (they keep running on their open files)')
    .action((refs: string[], o: { force?: boolean }) => {
      const engine = context().engine();
      for (const ref of refs) {
        const all = !ref.includes(':');
        const targets = all ? engine.images.versions(ref).map((v) => engine.images.get(ref, v)!) : [engine.images.resolve(ref)];
        if (targets.length === 0) throw engine.images.notFound(ref);
        for (const img of targets) {
          const users = engine.state.instancesUsingImage(img.name, img.version);
          if (users.length > 0 && !o.force) {
            throw new MayflyError(ErrorCode.IMAGE_IN_USE, `${img.name}:${img.version} is used by ${users.map((u) => u.id).join(', ')}`, {
              hint: 'remove those machines first (mayfly rm ID), or pass --force',
            });
          }
          engine.images.remove(img.name, img.version);
          process.stdout.write(`removed ${img.name}:${img.version}\n`);
        }
      }
    });

  image
    .command('import')
    .description('import a cloud image (qcow2/raw); clones get their keys from a cloud-init NoCloud seed')
    .argument('<name>', 'name for the imported image')
    .requiredOption('--disk <file>', 'the cloud image disk (qcow2, raw, or anything qemu-img reads)')
    .option('--kernel <file>', 'kernel for direct boot (with --initrd); without, the disk boots through firmware')
    .option('--initrd <file>', 'initrd for direct boot')
    .option('--append <args>', 'kernel command line for direct boot', 'console=ttyS0 root=/dev/vda1 rw')
    .option('--user <name>', 'the unprivileged user jobs run as', 'ci')
    .action(async (name: string, o: { disk: string; kernel?: string; initrd?: string; append: string; user: string }) => {
      const ctx = context();
      const img = await importImage(ctx.engine().images, {
        name, disk: o.disk, kernel: o.kernel, initrd: o.initrd, kernelArgs: o.append, user: o.user,
      });
      collectAfterPublish(ctx.engine(), img.name);
      if (ctx.opts.json) printJson(img);
      else process.stdout.write(`${img.name}:${img.version} ${img.id}\n`);
    });

  image
    .command('maintain')
    .description("re-apply images' provisioning (apt upgrade, the recipe's packages, commands and playbook) to a copy and publish it as a new version")
    .argument('[name...]', 'images to maintain (default: every image built from a recipe)')
    .option('--no-upgrade', 'no apt-get update/upgrade/install (no network): only the recipe\'s commands and playbook')
    .action(async (names: string[], o: { upgrade: boolean }) => {
      const ctx = context();
      const engine = ctx.engine();
      const recipeDirs = ctx.config.images.recipe_dirs;
      const targets = names.length > 0 ? names : engine.images.names().filter((n) => recipeOf(engine.images.resolve(n), recipeDirs));
      if (targets.length === 0) {
        throw new MayflyError(ErrorCode.IMAGE_NOT_FOUND, 'no image built from a recipe to maintain', { hint: 'build one first: mayfly image build debian-12' });
      }
      // Check every name before changing anything.
      const work = targets.map((ref) => {
        if (ref.includes(':')) {
          throw new MayflyError(ErrorCode.USAGE, `'${ref}': maintain takes image names; it always works from the newest version`, { hint: `mayfly image maintain ${ref.split(':')[0]}` });
        }
        const img = engine.images.resolve(ref);
        const recipe = recipeOf(img, recipeDirs);
        if (!recipe) {
          throw new MayflyError(ErrorCode.RECIPE_INVALID, `${img.name}:${img.version} has no recipe to re-apply (${img.source.type === 'import' ? 'it was imported' : `its recipe ${img.source.type === 'recipe' ? img.source.recipe : ''} is gone`})`, {
            hint: `change it by hand instead: mayfly image shell ${img.name} --commit`,
          });
        }
        return { img, recipe };
      });
      const failed: string[] = [];
      for (const { img, recipe } of work) {
        try {
          const made = await withAbort((signal) => maintainImage(engine.images, img, recipe, { log: ctx.log, signal, noUpgrade: !o.upgrade }));
          collectAfterPublish(engine, made.name);
          process.stdout.write(`${made.name}:${made.version} ${made.id}\n`);
        } catch (e) {
          if (work.length === 1) throw e;
          failed.push(img.name);
          process.stderr.write(`mayfly: error: maintaining ${img.name}:${img.version} failed: ${e instanceof Error ? e.message : String(e)}\n`);
        }
      }
      if (failed.length > 0) {
        throw new MayflyError(ErrorCode.IMAGE_BUILD_FAILED, `maintaining ${failed.join(', ')} failed; their previous versions stay`);
      }
    });

  image
    .command('shell')
    .description('a root shell (or one command after --) in a copy of an image; --commit publishes the copy as a new version')
    .argument('<ref>', 'NAME, NAME:VERSION or content id')
    .argument('[command...]', 'a command to run instead of an interactive shell (after --)')
    .option('--commit', 'publish the copy as a new version when the shell or command exits 0')
    .action(async (ref: string, command: string[], o: { commit?: boolean }) => {
      const ctx = context();
      const engine = ctx.engine();
      const img = engine.images.resolve(ref);
      const interactive = command.length === 0;
      if (interactive && !process.stdin.isTTY) {
        throw new MayflyError(ErrorCode.USAGE, 'an interactive image shell needs a terminal', { hint: `run one command instead: mayfly image shell ${ref} -- CMD…` });
      }
      const r = await withAbort(
        (signal) => imageShell(engine.images, img, { commit: o.commit, command, log: ctx.log, signal }),
        { terminalOwnsSigint: interactive },
      );
      if (r.published) {
        collectAfterPublish(engine, r.published.name);
        process.stdout.write(`${r.published.name}:${r.published.version} ${r.published.id}\n`);
      }
      process.exitCode = r.exitCode;
    });

  image
    .command('gc')
    .description('remove image versions no machine, job or pool uses, beyond the newest [images] keep_versions')
    .argument('[name...]', 'only these images')
    .option('--dry-run', 'only say what would be removed')
    .action((names: string[], o: { dryRun?: boolean }) => {
      const ctx = context();
      const engine = ctx.engine();
      for (const n of names) engine.images.resolve(n);
      const plan = engine.collectImages({ dryRun: o.dryRun, names: names.length > 0 ? names : undefined });
      if (ctx.opts.json) printJson(plan);
      else process.stdout.write(formatGc(plan, o.dryRun));
    });
}
