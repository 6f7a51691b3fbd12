import { cpSync, existsSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCode, MayflyError } from '../errors.ts';
import type { Logger } from '../log.ts';
import { silentLogger } from '../log.ts';
import { createProgress, type Progress } from '../progress.ts';
import { lastLines, requireTool, run, runChecked } from '../util/exec.ts';
import { shellQuote } from '../util/shell.ts';
import { enterRoot, interactiveInRoot, runScriptInRoot } from './chroot.ts';
import { fetchVerified } from './fetch.ts';
import { containerBasePackages, listRecipes, loadRecipeFile, vmBasePackages, type Recipe } from './recipe.ts';
import type { Image, ImageManifest, ImageStore } from './store.ts';
import { closeWorkRoot, isContainerImage, removeStaleWorkRoots, rootKind, type WorkRoot } from './workroot.ts';

// Image maintenance, the chroot-maintenance workflow of nspawn users for mayfly's images:
// `maintain` re-applies an image's provisioning to a copy of its newest version and publishes
// the copy as the next version; `shell` opens a root shell (or runs one command) in a copy and
// publishes it only when asked. The version worked from is never changed, so machines running
// on it (clones of its files) see nothing of this.

const guestFilesDir = join(dirname(fileURLToPath(import.meta.url)), 'guest');

export type MaintainedBy = 'maintain' | 'shell';

/**
 * The recipe an image version was built from, as it reads now: the recipe file it was built
 * from when that still exists, else the recipe of that name (built-in or in recipe_dirs).
 * Imported images have none.
 */
export function recipeOf(image: Image, recipeDirs: readonly string[]): Recipe | undefined {
  if (image.source.type !== 'recipe') return undefined;
  const src = image.source.recipe;
  if (!src.startsWith('builtin:') && existsSync(src)) return loadRecipeFile(src);
  return listRecipes(recipeDirs).get(image.name);
}

export interface MaintainOptions {
  log?: Logger;
  progress?: Progress;
  signal?: AbortSignal;
  /** Skip apt-get update/upgrade/install (no network): only mayfly's setup and the recipe's commands and playbook. */
  noUpgrade?: boolean;
}

/**
 * What `maintain` does in the copy, in order: mayfly's guest setup (so the guest agent matches
 * this mayfly), `apt-get update` and `apt-get --with-new-pkgs upgrade` (security and point
 * release updates, a new kernel included; nothing is removed), `apt-get install` of the
 * recipe's packages (ones added to the recipe since arrive), the gitlab-runner binary, the
 * recipe's commands, its playbook, and mayfly's finalize step (no host keys, an empty
 * machine-id, the small initrd, apt caches gone). Recipe commands therefore run again on an
 * image that already has their effect: they should be idempotent.
 */
export async function maintainImage(store: ImageStore, image: Image, recipe: Recipe, opts: MaintainOptions = {}): Promise<Image> {
  const log = opts.log ?? silentLogger;
  const signal = opts.signal;
  if (recipe.playbook) requireTool('ansible-playbook');
  for (const t of ['qemu-img', 'losetup', 'setpriv', 'unshare', 'chroot']) requireTool(t);
  const ref = `${image.name}:${image.version}`;
  const progress = opts.progress ?? createProgress(`maintain ${ref}`, 7);
  await removeStaleWorkRoots(store);
  log.info({ image: ref, recipe: recipe.source }, 'image maintenance started');
  let w: WorkRoot | undefined;
  try {
    progress.step('copy the image');
    w = await rootKind(image).open(store, image, signal);
    const root = w.root;
    const entered = await enterRoot(root);
    const detail = (l: string) => progress.detail(l);
    try {
      const vm = !isContainerImage(image);
      progress.step('mayfly guest setup');
      cpSync(guestFilesDir, join(root, 'tmp', 'mayfly-guest'), { recursive: true });
      const setup = vm ? 'setup-rootfs.sh' : 'setup-container.sh';
      await runScriptInRoot(root, `/bin/sh /tmp/mayfly-guest/${setup}`, 'mayfly guest setup', { signal, onLine: detail });
      progress.step(opts.noUpgrade ? 'apt (skipped: --no-upgrade)' : 'apt-get update, upgrade and install the recipe\'s packages');
      if (!opts.noUpgrade) {
        const packages = [...new Set([...(vm ? vmBasePackages : containerBasePackages), ...recipe.packages])];
        const apt = 'apt-get -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold';
        await runScriptInRoot(
          root,
          [`apt-get update`, `${apt} --with-new-pkgs upgrade`, `${apt} --no-install-recommends install ${packages.map(shellQuote).join(' ')}`].join('\n'),
          'apt-get update/upgrade/install',
          { signal, onLine: detail },
        );
      }
      progress.step(`the recipe's ${recipe.commands.length} command(s)${recipe.playbook ? ' and playbook' : ''}`);
      if (recipe.gitlab_runner) {
        const file = join(w.dir, 'gitlab-runner');
        await fetchVerified(recipe.gitlab_runner.source, recipe.gitlab_runner.sha256, file, `recipe ${recipe.name}: gitlab_runner`, signal);
        await runChecked('install', ['-m', '0755', file, join(root, 'usr/local/bin/gitlab-runner')], { code: ErrorCode.IMAGE_BUILD_FAILED });
      }
      for (const [i, cmd] of recipe.commands.entries()) {
        await runScriptInRoot(root, cmd, `recipe ${recipe.name}: command ${i + 1} (${cmd.split('\n')[0]!.slice(0, 60)})`, { signal, onLine: detail });
      }
      if (recipe.playbook) {
        const r = await run('ansible-playbook', ['-i', `${root},`, '-c', 'community.general.chroot', recipe.playbook], { signal, onLine: detail, processGroup: true });
        signal?.throwIfAborted();
        if (r.code !== 0) {
          throw new MayflyError(ErrorCode.IMAGE_BUILD_FAILED, `recipe ${recipe.name}: ansible-playbook failed (exit ${r.code}):\n${lastLines(r.stdout + r.stderr, 12)}`);
        }
      }
      progress.step('finalize');
      await finalizeRoot(w, signal, detail);
    } finally {
      await entered.leave();
    }
    progress.step('seal the new disk');
    const img = await publishWorkRoot(store, w, 'maintain', signal, progress);
    progress.done(`${ref} → ${img.name}:${img.version} ${img.id.slice(0, 19)}`);
    log.info({ image: `${img.name}:${img.version}`, from: ref, id: img.id }, 'image maintenance finished');
    return img;
  } catch (e) {
    progress.fail();
    throw e;
  } finally {
    if (w) await closeWorkRoot(w);
  }
}

/** mayfly's finalize step in the copy: what clones must not share goes, caches are dropped. */
async function finalizeRoot(w: WorkRoot, signal?: AbortSignal, onLine?: (l: string) => void): Promise<void> {
  const script = isContainerImage(w.image) ? 'finalize-container.sh' : 'finalize-rootfs.sh';
  mkdirSync(join(w.root, 'tmp'), { recursive: true });
  cpSync(join(guestFilesDir, script), join(w.root, 'tmp', 'mayfly-finalize.sh'));
  await runScriptInRoot(w.root, '/bin/sh /tmp/mayfly-finalize.sh; rm -f /tmp/mayfly-finalize.sh', 'mayfly finalize', { signal, onLine });
}

/** Seals the work root and publishes it as the next version of its image, recording where it came from. */
async function publishWorkRoot(store: ImageStore, w: WorkRoot, by: MaintainedBy, signal?: AbortSignal, progress?: Progress): Promise<Image> {
  const sealed = await rootKind(w.image).seal(w, signal);
  signal?.throwIfAborted();
  progress?.step('publish');
  const { dir: _d, diskPath: _p, kernelPath: _k, initrdPath: _i, sizeBytes: _s, version, ...from } = w.image;
  const manifest: Omit<ImageManifest, 'version'> = {
    ...from,
    ...sealed,
    createdAt: new Date().toISOString(),
    // The guest's feature flags stay: the copy keeps (and the guest setup refreshes) what they promise.
    source: { ...from.source, maintainedFrom: version, maintainedBy: by },
  };
  return store.publish(w.out, manifest);
}

export interface ShellOptions {
  /** Publish the copy as a new version when the shell or command exits 0. */
  commit?: boolean;
  /** A command to run instead of an interactive shell. */
  command?: readonly string[];
  log?: Logger;
  signal?: AbortSignal;
  /** Where to say what happened (default stderr). */
  say?: (line: string) => void;
}

export interface ShellResult {
  exitCode: number;
  published: Image | null;
}

/**
 * A root shell (or one command) in a copy of the image. With `commit`, the copy becomes the
 * next version when the shell exits 0 (after mayfly's finalize step); otherwise, or on a
 * non-zero exit, it is thrown away.
 */
export async function imageShell(store: ImageStore, image: Image, opts: ShellOptions = {}): Promise<ShellResult> {
  const say = opts.say ?? ((l: string) => process.stderr.write(`mayfly: ${l}\n`));
  for (const t of ['qemu-img', 'losetup', 'setpriv', 'unshare', 'chroot']) requireTool(t);
  const ref = `${image.name}:${image.version}`;
  await removeStaleWorkRoots(store);
  let w: WorkRoot | undefined;
  try {
    w = await rootKind(image).open(store, image, opts.signal);
    const entered = await enterRoot(w.root);
    let code: number;
    try {
      const cmd = opts.command && opts.command.length > 0 ? opts.command : ['/bin/bash', '-l'];
      if (!opts.command?.length) {
        say(`root shell in a copy of ${ref}; ${opts.commit ? 'exit 0 publishes it as a new version, exit 1 throws it away' : 'it is thrown away at exit (--commit publishes it)'}`);
      }
      code = await interactiveInRoot(w.root, cmd, opts.signal);
      opts.signal?.throwIfAborted();
      if (opts.commit && code === 0) await finalizeRoot(w, opts.signal);
    } finally {
      await entered.leave();
    }
    if (!opts.commit) {
      say(`changes to the copy of ${ref} thrown away (no --commit)`);
      return { exitCode: code, published: null };
    }
    if (code !== 0) {
      say(`exit ${code}: changes to the copy of ${ref} thrown away, nothing published`);
      return { exitCode: code, published: null };
    }
    const img = await publishWorkRoot(store, w, 'shell', opts.signal);
    say(`published ${img.name}:${img.version} ${img.id.slice(0, 19)} (from ${ref})`);
    opts.log?.info({ image: `${img.name}:${img.version}`, from: ref }, 'image changed in a shell published');
    return { exitCode: 0, published: img };
  } finally {
    if (w) await closeWorkRoot(w);
  }
}
