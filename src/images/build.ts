import { createHash } from 'node:crypto';
import { appendFileSync, createReadStream, existsSync, lstatSync, mkdirSync, readFileSync, readdirSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ErrorCode, MayflyError } from '../errors.ts';
import type { Logger } from '../log.ts';
import { silentLogger } from '../log.ts';
import { createProgress, type Progress } from '../progress.ts';
import { lastLines, requireTool, run, runChecked } from '../util/exec.ts';
import { shellQuote } from '../util/shell.ts';
import { fetchVerified } from './fetch.ts';
import { createBaseDir } from '../storage/index.ts';
import { CONTAINER_ID_BASE, shiftOwnership } from './id-shift.ts';
import { containerBasePackages, vmBasePackages, type Recipe } from './recipe.ts';
import type { Image, ImageStore } from './store.ts';

const guestFilesDir = join(dirname(fileURLToPath(import.meta.url)), 'guest');

/** Kernel arguments every mayfly VM boots with (see shared/notes/host-facts.md for why each matters). */
export const baseKernelArgs = 'console=ttyS0 root=/dev/vda rw net.ifnames=0 quiet mitigations=off';

// Man pages, docs and translations are a third of a minimal rootfs and no CI job reads them.
const dpkgExcludes = [
  'path-exclude=/usr/share/man/*',
  'path-exclude=/usr/share/doc/*',
  'path-include=/usr/share/doc/*/copyright',
  'path-exclude=/usr/share/info/*',
  'path-exclude=/usr/share/locale/*',
  'path-include=/usr/share/locale/locale.alias',
];

export interface BuildOptions {
  log?: Logger;
  progress?: Progress;
  signal?: AbortSignal;
}

export async function buildImage(store: ImageStore, recipe: Recipe, opts: BuildOptions = {}): Promise<Image> {
  const log = opts.log ?? silentLogger;
  const container = recipe.kind === 'container';
  for (const tool of container ? ['mmdebstrap'] : ['mmdebstrap', 'mkfs.ext4', 'qemu-img']) requireTool(tool);
  if (recipe.playbook) {
    requireTool('ansible-playbook');
    if (!existsSync(recipe.playbook)) {
      throw new MayflyError(ErrorCode.RECIPE_INVALID, `recipe ${recipe.name}: playbook ${recipe.playbook} does not exist`);
    }
  }
  if (process.getuid?.() !== 0) {
    throw new MayflyError(ErrorCode.NOT_ROOT, 'building an image needs root (mmdebstrap --mode=root, mkfs of a root filesystem)', {
      hint: 'run it as root, e.g. with sudo',
    });
  }

  const progress = opts.progress ?? createProgress(`build ${recipe.name}`, container ? 3 : 5);
  const work = store.tempDir(`build-${recipe.name}`);
  const out = join(work, 'out');
  mkdirSync(out);
  const buildLog = join(out, 'build.log');
  const logLine = (l: string) => appendFileSync(buildLog, l + '\n', { mode: 0o600 });
  const started = Date.now();
  log.info({ recipe: recipe.name, source: recipe.source, work }, 'image build started');

  try {
    if (recipe.gitlab_runner) {
      log.info({ source: recipe.gitlab_runner.source }, 'fetching the gitlab-runner binary');
      await fetchVerified(recipe.gitlab_runner.source, recipe.gitlab_runner.sha256, join(work, 'gitlab-runner'), `recipe ${recipe.name}: gitlab_runner`, opts.signal);
    }
    // A container's root is published as it is: made where it will stay (a subvolume on btrfs, so
    // that clones can be snapshots). A VM's is copied into a disk image and dropped.
    const rootfs = container ? (await createBaseDir(join(out, 'rootfs'))).path : join(work, 'rootfs');
    const packages = [...new Set([...(container ? containerBasePackages : vmBasePackages), ...recipe.packages])];
    progress.step(`bootstrap ${recipe.suite} with ${packages.length} packages (mmdebstrap)`);
    const args = [
      `--variant=${recipe.variant}`,
      '--mode=root',
      `--include=${packages.join(',')}`,
      ...dpkgExcludes.map((o) => `--dpkgopt=${o}`),
      ...customizeHooks(recipe, work),
      recipe.suite,
      rootfs,
      ...(recipe.mirror ? [recipe.mirror] : []),
    ];
    // A mirror URL may carry credentials; the log is kept with the image.
    logLine(`$ mmdebstrap ${args.map((a) => a.replace(/\/\/[^/@\s]+@/, '//***@')).join(' ')}`);
    const r = await run('mmdebstrap', args, {
      signal: opts.signal,
      // mmdebstrap runs apt in a chroot with /proc, /sys and /dev bind-mounted: cancelling must
      // stop all of it and let mmdebstrap unmount before anything is removed.
      processGroup: true,
      onLine: (l) => {
        logLine(l);
        if (/^(I|W|E): /.test(l)) progress.detail(l.slice(3));
      },
    });
    opts.signal?.throwIfAborted();
    if (r.code !== 0) {
      throw new MayflyError(
        ErrorCode.IMAGE_BUILD_FAILED,
        `building ${recipe.name}: mmdebstrap failed (exit ${r.code}):\n${lastLines(r.stdout + r.stderr, 12)}`,
        { hint: `the whole log is in ${buildLog} (kept because the build failed)` },
      );
    }

    if (container) return await publishContainer(store, recipe, out, rootfs, packages, { progress, log, logLine, started, work });

    progress.step('extract kernel and initrd');
    const { kernel, initrd } = findKernel(rootfs, recipe.name);
    await runChecked('cp', [kernel, join(out, 'vmlinuz')], { code: ErrorCode.IMAGE_BUILD_FAILED });
    await runChecked('cp', [initrd, join(out, 'initrd.img')], { code: ErrorCode.IMAGE_BUILD_FAILED });

    progress.step(`make the root disk (ext4, ${recipe.disk_size} GiB)`);
    const used = Number((await runChecked('du', ['-sxb', rootfs])).stdout.split(/\s/)[0]);
    const sizeBytes = recipe.disk_size * 1024 ** 3;
    if (used > sizeBytes * 0.9) {
      throw new MayflyError(
        ErrorCode.IMAGE_BUILD_FAILED,
        `recipe ${recipe.name}: the root filesystem holds ${(used / 1024 ** 3).toFixed(2)} GiB, too much for disk_size = ${recipe.disk_size}`,
        { hint: `raise disk_size in ${recipe.source} to at least ${Math.ceil((used * 1.25) / 1024 ** 3)}` },
      );
    }
    const raw = join(work, 'root.raw');
    await runChecked('truncate', ['-s', String(sizeBytes), raw]);
    await runChecked('mkfs.ext4', ['-q', '-F', '-L', 'root', '-d', rootfs, raw], {
      code: ErrorCode.IMAGE_BUILD_FAILED,
      what: 'mkfs.ext4 -d (copying the rootfs into the disk)',
    });
    rmSync(rootfs, { recursive: true, force: true });

    progress.step('convert to qcow2');
    await runChecked('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, join(out, 'disk.qcow2')], {
      code: ErrorCode.IMAGE_BUILD_FAILED,
    });
    rmSync(raw, { force: true });

    progress.step('content id and publish');
    const id = await contentId([join(out, 'disk.qcow2'), join(out, 'vmlinuz'), join(out, 'initrd.img')]);
    logLine(`content id ${id}, built in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    const image = store.publish(out, {
      name: recipe.name,
      id,
      kind: 'vm',
      createdAt: new Date().toISOString(),
      source: { type: 'recipe', recipe: recipe.source, suite: recipe.suite, packages },
      disk: 'disk.qcow2',
      kernel: 'vmlinuz',
      initrd: 'initrd.img',
      kernelArgs: [baseKernelArgs, recipe.kernel_args].filter(Boolean).join(' '),
      diskVirtualBytes: sizeBytes,
      identity: 'fw_cfg',
      // static-net: the guest applies a bridged address from fw_cfg or the restore message.
      features: ['restore-agent', 'static-net'],
      user: 'ci',
    });
    await removeBuildDir(work);
    progress.done(`built ${image.name}:${image.version} ${image.id.slice(0, 19)}`);
    log.info({ image: image.name, version: image.version, id: image.id }, 'image build finished');
    return image;
  } catch (e) {
    progress.fail();
    // Keep the build log of a failed build for the user; drop the bulky rest.
    if (existsSync(buildLog)) {
      const kept = join(store.root, '.failed', `${recipe.name}-${Date.now().toString(36)}.log`);
      mkdirSync(dirname(kept), { recursive: true });
      await run('cp', [buildLog, kept]);
      if (e instanceof MayflyError && e.hint?.includes(buildLog)) {
        throw new MayflyError(e.code, e.message, { hint: `the whole log is in ${kept}` });
      }
    }
    throw e;
  } finally {
    await removeBuildDir(work);
  }
}

/**
 * Removes a build's scratch dir, first unmounting anything still mounted under it (a killed
 * mmdebstrap can leave the host's /proc, /sys, /dev bound into the rootfs). A recursive delete
 * through such a mount would delete host files, so nothing is deleted while one remains.
 */
async function removeBuildDir(dir: string): Promise<void> {
  const mountsUnder = () =>
    readFileSync('/proc/self/mountinfo', 'utf8')
      .split('\n')
      .map((l) => l.split(' ')[4]?.replace(/\\040/g, ' '))
      .filter((mp): mp is string => mp !== undefined && mp.startsWith(dir + '/'))
      .sort((a, b) => b.length - a.length);
  for (const mp of mountsUnder()) await run('umount', ['-l', mp]);
  const left = mountsUnder();
  if (left.length > 0) {
    throw new MayflyError(ErrorCode.IMAGE_BUILD_FAILED, `the build dir ${dir} still has mounts (${left.join(', ')}); not removing it`, {
      hint: `unmount them (umount -R ${dir}/rootfs) and remove ${dir} by hand`,
    });
  }
  rmSync(dir, { recursive: true, force: true });
}

async function publishContainer(
  store: ImageStore,
  recipe: Recipe,
  out: string,
  rootfs: string,
  packages: string[],
  ctx: { progress: Progress; log: Logger; logLine: (l: string) => void; started: number; work: string },
): Promise<Image> {
  ctx.progress.step('shift owners into the containers\' user namespace range, measure, content id');
  shiftOwnership(rootfs, CONTAINER_ID_BASE);
  const used = Number((await runChecked('du', ['-sxb', rootfs])).stdout.split(/\s/)[0]);
  const id = await treeId(rootfs);
  ctx.logLine(`content id ${id}, built in ${((Date.now() - ctx.started) / 1000).toFixed(1)} s`);
  ctx.progress.step('publish');
  const image = store.publish(out, {
    name: recipe.name,
    id,
    kind: 'container',
    createdAt: new Date().toISOString(),
    source: { type: 'recipe', recipe: recipe.source, suite: recipe.suite, packages },
    disk: 'rootfs',
    kernel: null,
    initrd: null,
    kernelArgs: null,
    diskVirtualBytes: used,
    identity: 'files',
    idShift: CONTAINER_ID_BASE,
    features: [],
    user: 'ci',
  });
  await removeBuildDir(ctx.work);
  ctx.progress.done(`built ${image.name}:${image.version} ${image.id.slice(0, 19)} (container)`);
  ctx.log.info({ image: image.name, version: image.version, id: image.id }, 'image build finished');
  return image;
}

/**
 * Content id of a root directory: every entry in path order with its type, mode, owner, link
 * target or content. Timestamps are left out: they differ between two builds of the same tree.
 */
export async function treeId(root: string): Promise<string> {
  const h = createHash('sha256');
  const walk = async (rel: string): Promise<void> => {
    const names = readdirSync(join(root, rel)).sort();
    for (const name of names) {
      const p = rel ? `${rel}/${name}` : name;
      const full = join(root, p);
      const st = lstatSync(full);
      h.update(`${p}\0${st.mode}\0${st.uid}:${st.gid}\0`);
      if (st.isSymbolicLink()) h.update(readlinkSync(full));
      else if (st.isFile()) {
        h.update(`${st.size}\0`);
        for await (const chunk of createReadStream(full, { highWaterMark: 1 << 20 })) h.update(chunk as Buffer);
      } else if (st.isDirectory()) await walk(p);
      h.update('\n');
    }
  };
  await walk('');
  return `sha256:${h.digest('hex')}`;
}

/** mmdebstrap customize hooks: mayfly's guest setup, the recipe's commands and playbook, then mayfly's finalize step. */
function customizeHooks(recipe: Recipe, work: string): string[] {
  const hooks: string[] = [];
  const scripts = join(work, 'scripts');
  const setup = recipe.kind === 'container' ? 'setup-container.sh' : 'setup-rootfs.sh';
  const finalize = recipe.kind === 'container' ? 'finalize-container.sh' : 'finalize-rootfs.sh';
  mkdirSync(scripts, { recursive: true });
  hooks.push(`mkdir -p "$1/tmp/mayfly-guest" && cp -a ${shellQuote(guestFilesDir)}/. "$1/tmp/mayfly-guest/"`);
  hooks.push(`chroot "$1" /bin/sh /tmp/mayfly-guest/${setup}`);
  if (recipe.gitlab_runner) {
    // Before the recipe's commands, so that they may use (or register) it.
    hooks.push(`install -m 0755 ${shellQuote(join(work, 'gitlab-runner'))} "$1/usr/local/bin/gitlab-runner"`);
  }
  recipe.commands.forEach((cmd, i) => {
    const file = join(scripts, `command-${i + 1}.sh`);
    writeFileSync(file, `set -e\n${cmd}\n`);
    hooks.push(
      `cp ${shellQuote(file)} "$1/tmp/mayfly-command.sh" && chroot "$1" /bin/sh /tmp/mayfly-command.sh && rm -f "$1/tmp/mayfly-command.sh"`,
    );
  });
  if (recipe.playbook) {
    hooks.push(`ansible-playbook -i "$1," -c community.general.chroot ${shellQuote(recipe.playbook)}`);
  }
  hooks.push(`chroot "$1" /bin/sh /tmp/mayfly-guest/${finalize}`);
  return hooks.map((h) => `--customize-hook=${h}`);
}

export function findKernel(rootfs: string, name: string): { kernel: string; initrd: string } {
  const boot = join(rootfs, 'boot');
  const kernels = existsSync(boot) ? readdirSync(boot).filter((f) => f.startsWith('vmlinuz-')).sort(compareVersions) : [];
  const latest = kernels.at(-1);
  if (!latest) {
    throw new MayflyError(ErrorCode.IMAGE_BUILD_FAILED, `recipe ${name}: no kernel was installed in /boot`, {
      hint: 'VM images need a kernel; keep linux-image-cloud-amd64 (mayfly adds it) and do not remove it in commands',
    });
  }
  const kver = latest.slice('vmlinuz-'.length);
  const initrd = join(boot, `initrd.img-${kver}`);
  if (!existsSync(initrd)) {
    throw new MayflyError(ErrorCode.IMAGE_BUILD_FAILED, `recipe ${name}: kernel ${kver} has no initrd in /boot`);
  }
  return { kernel: join(boot, latest), initrd };
}

function compareVersions(a: string, b: string): number {
  return a.localeCompare(b, 'en', { numeric: true });
}

export async function contentId(files: readonly string[]): Promise<string> {
  const h = createHash('sha256');
  for (const f of files) {
    h.update(`${statSync(f).size}\0`);
    for await (const chunk of createReadStream(f, { highWaterMark: 4 << 20 })) h.update(chunk as Buffer);
  }
  return `sha256:${h.digest('hex')}`;
}
