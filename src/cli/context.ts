import { loadConfig, type Config } from '../config/index.ts';
import type { LevelWithSilent } from 'pino';
import { createLogger, type Logger } from '../log.ts';
import { Engine } from '../pool/index.ts';

export interface GlobalOptions {
  dataDir: string;
  config?: string;
  debug?: boolean;
  json?: boolean;
}

export const defaultDataDir = '/var/lib/mayfly';

/** What every command needs, built once from the global options. */
export interface Context {
  opts: GlobalOptions;
  config: Config;
  log: Logger;
  engine(): Engine;
  close(): void;
}

/** How a command wants mayfly's own log: GitLab's job log wants few, readable lines. */
export interface LogChoice {
  level?: LevelWithSilent;
  human?: boolean;
}

export function createContext(opts: GlobalOptions, logChoice: LogChoice = {}): Context {
  const config = loadConfig(opts.config);
  const log = createLogger({ level: opts.debug ? 'debug' : (logChoice.level ?? config.log.level), json: logChoice.human ? false : undefined });
  let engine: Engine | undefined;
  return {
    opts,
    config,
    log,
    engine() {
      engine ??= new Engine({ dataDir: opts.dataDir, config, log });
      return engine;
    },
    close() {
      engine?.close();
    },
  };
}
