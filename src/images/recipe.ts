import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { z } from 'zod';
import { IMAGE_NAME } from '../config/schema.ts';
import { parseToml } from '../config/toml.ts';
import { ErrorCode, MayflyError } from '../errors.ts';

export const imageNamePattern = IMAGE_NAME;
export const imageName = z.string().regex(imageNamePattern, 'must be lower-case letters, digits, ".", "_" or "-" (at most 63)');

const packageName = z.string().regex(/^[a-z0-9][a-z0-9+.-]*(=[A-Za-z0-9.+:~-]+)?$/, 'is not a Debian package name');

export const recipeSchema = z.strictObject({
  name: imageName,
  description: z.string().default(''),
  /** "vm": a disk image with kernel and initrd for QEMU; "container": a root directory for systemd-nspawn. */
  kind: z.enum(['vm', 'container']).default('vm'),
  suite: z.string().regex(/^[a-z]+$/, 'must be a Debian suite or codename such as "bookworm"').default('bookworm'),
  variant: z.enum(['minbase', 'buildd', 'required', 'important', 'standard']).default('minbase'),
  /** An apt mirror URL; by default the host's own apt sources are used. */
  mirror: z.string().url().optional(),
  packages: z.array(packageName).default([]),
  /** Shell commands run inside the new root filesystem (as root, `sh -e`), in order. */
  commands: z.array(z.string().min(1)).default([]),
  /** An ansible playbook applied to the root filesystem (chroot connection). Relative to the recipe file. */
  playbook: z.string().min(1).optional(),
  /** Size of the image's root disk in GiB; a machine's disk may be larger, never smaller. */
  disk_size: z.number().int().min(1).max(2048).default(2),
  /** Extra kernel command-line arguments. */
  kernel_args: z.string().default(''),
  /**
   * The gitlab-runner binary for GitLab's cache and artifact stages, installed as
   * /usr/local/bin/gitlab-runner. A path on the build host (relative to the recipe) or a URL.
   */
  gitlab_runner: z
    .strictObject({
      source: z.string().min(1),
      sha256: z.string().regex(/^[0-9a-fA-F]{64}$/, 'must be the file\'s SHA-256 as 64 hex digits (sha256sum FILE)'),
    })
    .optional(),
});

export type Recipe = z.infer<typeof recipeSchema> & {
  /** Where the recipe came from: a file path, or `builtin:NAME`. */
  source: string;
};

/**
 * Packages every mayfly VM needs, whatever the recipe asks for. cryptsetup-bin (the tool
 * without the boot-time crypttab machinery) opens the encrypted job disk (job_disk = "encrypted").
 */
export const vmBasePackages = [
  'linux-image-cloud-amd64', 'initramfs-tools', 'systemd-sysv', 'udev', 'dbus', 'kmod', 'openssh-server',
  'iproute2', 'sudo', 'e2fsprogs', 'util-linux', 'cryptsetup-bin',
];

/** Packages every mayfly container needs: no kernel, init or sshd (commands enter with nsenter). */
export const containerBasePackages = ['iproute2', 'sudo', 'util-linux', 'ca-certificates'];

export const builtinRecipeDir = join(dirname(fileURLToPath(import.meta.url)), 'recipes');

export function parseRecipe(text: string, file: string, source = file): Recipe {
  const r = parseToml(text, file, recipeSchema, { errorCode: ErrorCode.RECIPE_INVALID });
  if (r.playbook && !isAbsolute(r.playbook) && !source.startsWith('builtin:')) {
    r.playbook = resolve(dirname(file), r.playbook);
  }
  const gr = r.gitlab_runner;
  if (gr && !/^https?:\/\//.test(gr.source) && !isAbsolute(gr.source)) gr.source = resolve(dirname(file), gr.source);
  return { ...r, source };
}

export function loadRecipeFile(path: string): Recipe {
  if (!existsSync(path)) {
    throw new MayflyError(ErrorCode.RECIPE_INVALID, `recipe file ${path} does not exist`);
  }
  return parseRecipe(readFileSync(path, 'utf8'), path);
}

/** All recipes mayfly knows by name: built-ins, then the configured recipe dirs (which may override). */
export function listRecipes(recipeDirs: readonly string[]): Map<string, Recipe> {
  const out = new Map<string, Recipe>();
  for (const f of readdirSync(builtinRecipeDir).filter((f) => f.endsWith('.toml')).sort()) {
    const path = join(builtinRecipeDir, f);
    const r = parseRecipe(readFileSync(path, 'utf8'), path, `builtin:${f.replace(/\.toml$/, '')}`);
    out.set(r.name, r);
  }
  for (const dir of recipeDirs) {
    if (!existsSync(dir)) continue;
    for (const f of readdirSync(dir).filter((f) => f.endsWith('.toml')).sort()) {
      const r = loadRecipeFile(join(dir, f));
      out.set(r.name, r);
    }
  }
  return out;
}

/** A recipe by name (built-in or from recipe dirs) or by path to a .toml file. */
export function findRecipe(nameOrPath: string, recipeDirs: readonly string[]): Recipe {
  if (nameOrPath.endsWith('.toml') || nameOrPath.includes('/')) return loadRecipeFile(resolve(nameOrPath));
  const all = listRecipes(recipeDirs);
  const r = all.get(nameOrPath);
  if (!r) {
    throw new MayflyError(ErrorCode.IMAGE_NOT_FOUND, `no recipe named '${nameOrPath}'`, {
      hint: `known recipes: ${[...all.keys()].join(', ')}; or pass the path of a recipe .toml file`,
    });
  }
  return r;
}
