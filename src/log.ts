import { Writable } from 'node:stream';
import { pino, type Logger, type LevelWithSilent } from 'pino';
import { redactSecrets } from './secrets.ts';

export type { Logger };

// Secrets never reach a log line: any field with one of these names is replaced, at any depth
// pino's redaction reaches (top level and one level of nesting); and every serialized line
// goes through redactSecrets, which cuts the values of registered secrets (a job's token,
// `-e` values marked secret), private keys and URL passwords wherever they appear.
const secretKeys = ['token', 'password', 'privateKey', 'private_key', 'secret', 'authorization', 'key'];
const redactPaths = secretKeys.flatMap((k) => [k, `*.${k}`]);

const levelNames: Record<number, string> = { 10: 'trace', 20: 'debug', 30: 'info', 40: 'warn', 50: 'error', 60: 'fatal' };

/** On a terminal, JSON lines are hard to read; turn each into `mayfly: msg key=value…`. */
function humanStream(out: NodeJS.WritableStream): Writable {
  return new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString('utf8').split('\n')) {
        if (!line) continue;
        try {
          const rec = JSON.parse(line) as Record<string, unknown>;
          const { level, msg, time: _t, pid: _p, hostname: _h, ...rest } = rec;
          const lvl = levelNames[level as number] ?? 'info';
          const extras = Object.entries(rest)
            .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
            .join(' ');
          const prefix = lvl === 'info' ? 'mayfly:' : `mayfly ${lvl}:`;
          out.write(`${prefix} ${String(msg ?? '')}${extras ? `  (${extras})` : ''}\n`);
        } catch {
          out.write(line + '\n');
        }
      }
      cb();
    },
  });
}

export interface LogOptions {
  level?: LevelWithSilent;
  /** JSON lines (for services and machines) instead of human lines. */
  json?: boolean;
  destination?: NodeJS.WritableStream;
}

export function createLogger(opts: LogOptions = {}): Logger {
  const dest = opts.destination ?? process.stderr;
  const json = opts.json ?? !(dest as { isTTY?: boolean }).isTTY;
  return pino(
    {
      level: opts.level ?? 'info',
      base: undefined,
      redact: { paths: redactPaths, censor: '[redacted]' },
      hooks: { streamWrite: redactSecrets },
      timestamp: json ? pino.stdTimeFunctions.isoTime : false,
    },
    json ? dest : humanStream(dest),
  );
}

/** A logger that drops everything, for library callers that do not pass one. */
export const silentLogger: Logger = pino({ level: 'silent' });
