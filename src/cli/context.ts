import { loadConfig, type Config } from '../config/index.ts';
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

export function createContext(opts: GlobalOptions): Context {
  const config = loadConfig(opts.config);
  const log = createLogger({ level: opts.debug ? 'debug' : config.log.level });
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
