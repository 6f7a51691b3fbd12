import { Machine } from '../pool/index.ts';
import type { Context } from './context.ts';
import { EXIT_MAYFLY_FAILED, reportError } from './report.ts';

const signalExit: Record<string, number> = { SIGINT: 130, SIGTERM: 143, SIGHUP: 129 };

/**
 * Runs a job-like command so that SIGINT/SIGTERM/SIGHUP abort it through an AbortSignal: the
 * command's own cleanup (destroying its machine) runs, then mayfly exits 128+signal.
 * Every failure of mayfly itself exits 125, apart from any code the job itself may return.
 */
export async function withSignals(ctx: Context, body: (signal: AbortSignal) => Promise<number>): Promise<number> {
  const ac = new AbortController();
  let received: string | undefined;
  const handlers = Object.keys(signalExit).map((sig) => {
    const h = () => {
      if (received) {
        // A second signal: the user will not wait for an orderly cleanup. Kill this process's
        // machines and remove their files at once, then go.
        process.stderr.write(`mayfly: ${sig} again: killing the machines now\n`);
        Machine.killAllNow();
        process.exit(signalExit[sig]);
      }
      received = sig;
      ctx.log.warn({ signal: sig }, 'stopping: the job is cancelled and its machine destroyed');
      ac.abort(new Error(`cancelled by ${sig}`));
    };
    process.on(sig, h);
    return [sig, h] as const;
  });
  try {
    const code = await body(ac.signal);
    return received ? signalExit[received]! : code;
  } catch (e) {
    if (received) return signalExit[received]!;
    reportError(e, Boolean(ctx.opts.debug));
    return EXIT_MAYFLY_FAILED;
  } finally {
    for (const [sig, h] of handlers) process.off(sig, h);
  }
}

/**
 * Runs a long task that SIGINT/SIGTERM abort (killing its child processes), then exits 128+signal.
 * With `terminalOwnsSigint`, SIGINT is left to the interactive child that has the terminal (the
 * terminal sends ^C to both; the shell handles it, mayfly carries on).
 */
export async function withAbort<T>(body: (signal: AbortSignal) => Promise<T>, opts: { terminalOwnsSigint?: boolean } = {}): Promise<T> {
  const ac = new AbortController();
  let received: string | undefined;
  const h = (sig: string) => {
    if (sig === 'SIGINT' && opts.terminalOwnsSigint) return;
    received ??= sig;
    ac.abort(new Error(`cancelled by ${sig}`));
  };
  const sigs = Object.keys(signalExit);
  for (const s of sigs) process.on(s, h);
  try {
    return await body(ac.signal);
  } catch (e) {
    if (received) {
      process.stderr.write(`mayfly: cancelled by ${received}\n`);
      process.exit(signalExit[received]);
    }
    throw e;
  } finally {
    for (const s of sigs) process.off(s, h);
  }
}
