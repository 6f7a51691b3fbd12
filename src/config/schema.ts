// Schema of mayfly's main config file. Every section and key is optional and defaulted, so an
// empty or missing file is a valid config. Sections are strict: a misspelt key is an error
// rather than a silently ignored setting.
//
// To add a section, add an entry to `configSections`: a table with `section({...})`, or an
// array of tables (`[[pool]]`) with `z.array(z.strictObject({...})).default([])`.

import { isAbsolute } from 'node:path';
import * as z from 'zod';

export const IMAGE_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;
export const ACCELS = ['auto', 'kvm', 'tcg'] as const;
export const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'silent'] as const;

const imageName = z.string().regex(IMAGE_NAME, {
  error: 'must be an image name: 1 to 63 characters of a-z, 0-9, ".", "_" or "-", starting with a letter or digit',
});

function int(min: number, max: number, fallback: number) {
  return z.int().min(min).max(max).default(fallback);
}

// prefault, not default: a missing table must still be parsed so its keys get their defaults.
function section<Shape extends z.core.$ZodLooseShape>(shape: Shape) {
  return z.strictObject(shape).prefault({} as z.input<z.ZodObject<Shape, z.core.$strict>>);
}

export const configSections = {
  /** What `mayfly run` uses when flags are absent. */
  defaults: section({
    image: imageName.default('debian-12'),
    cpus: int(1, 64, 2),
    memory: int(128, 262144, 1024), // MiB
    disk: int(1, 2048, 4), // GiB
  }),
  qemu: section({
    binary: z.string().min(1).default('qemu-system-x86_64'),
    accel: z.enum(ACCELS).default('auto'),
    boot_timeout: int(5, 3600, 120), // seconds
    boot_retries: int(0, 5, 1), // extra attempts after a boot timeout
    tcg_tb_size: int(16, 2048, 64), // MiB
  }),
  images: section({
    recipe_dirs: z.array(z.string().refine((p) => isAbsolute(p), 'must be an absolute path')).default([]),
    keep_versions: int(1, 100, 3),
  }),
  log: section({
    level: z.enum(LOG_LEVELS).default('info'),
  }),
};

export const ConfigSchema = z.strictObject(configSections);

/** The config with every default filled in. */
export type Config = z.output<typeof ConfigSchema>;
