// Entry point for mayfly's main config file. See schema.ts for the keys and
// examples/config.toml for a documented example.

import { ConfigSchema, type Config } from './schema.ts';
import { loadTomlFile } from './toml.ts';

export type { Config } from './schema.ts';
export { ConfigSchema } from './schema.ts';

export const defaultConfigPath = '/etc/mayfly/config.toml';

/**
 * Loads the config at `path`. Without a path the default location is used and may be absent
 * (meaning all defaults); a path the user named explicitly must exist, since a typo there would
 * otherwise silently drop their settings. `defaultPath` exists for tests.
 */
export function loadConfig(path: string | undefined, defaultPath: string = defaultConfigPath): Config {
  if (path !== undefined) return loadTomlFile(path, ConfigSchema) ?? defaultConfig();
  return loadTomlFile(defaultPath, ConfigSchema, { optional: true }) ?? defaultConfig();
}

/** Every key at its default value. */
export function defaultConfig(): Config {
  return ConfigSchema.parse({});
}
