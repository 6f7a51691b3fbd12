import type { Command } from 'commander';
import { ErrorCode, MayflyError } from '../../errors.ts';
import { buildImage, findRecipe, importImage } from '../../images/index.ts';
import { age, bytes, printJson, printList } from '../format.ts';
import type { ContextFactory } from '../main.ts';
import { withAbort } from '../signals.ts';

export function registerImage(program: Command, context: ContextFactory): void {
  const image = program.command('image').description('build, list, inspect, import and remove images');

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
      printList(ctx.engine().images.list(), {
        json: Boolean(o.json || ctx.opts.json),
        empty: 'no images yet; build the default one with: mayfly image build debian-12',
        headers: ['NAME', 'VERSION', 'ID', 'SIZE', 'AGE', 'SOURCE'],
        row: (i) => [
          i.name,
          String(i.version),
          i.id.slice(0, 19),
          bytes(i.sizeBytes),
          age(Date.parse(i.createdAt)),
          i.source.type === 'recipe' ? `recipe ${i.source.recipe}` : `import ${i.source.disk}`,
        ],
      });
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
      if (ctx.opts.json) printJson(img);
      else process.stdout.write(`${img.name}:${img.version} ${img.id}\n`);
    });
}
