import { isMayflyError } from '../errors.ts';
import { redactSecrets } from '../secrets.ts';

// Exit codes of mayfly itself. `run` and `exec` otherwise exit with the job's own status, so
// mayfly's failures there use 125 (as `docker run` does) to stay apart from the job's codes.
export const EXIT_USAGE = 2;
export const EXIT_MAYFLY_FAILED = 125;
export const EXIT_INTERNAL = 70;

/** Prints an error the way a user should see it and returns the exit code it maps to. */
export function reportError(e: unknown, debug: boolean): number {
  if (isMayflyError(e)) {
    // An error may quote a command line or a URL with a secret in it.
    process.stderr.write(redactSecrets(`mayfly: error: ${e.message}\n`));
    if (e.hint) process.stderr.write(redactSecrets(`  hint: ${e.hint}\n`));
    if (debug) process.stderr.write(redactSecrets(`${e.stack}\n`));
    return e.exitCode;
  }
  process.stderr.write(redactSecrets(`mayfly: internal error: ${e instanceof Error ? e.message : String(e)}\n`));
  process.stderr.write(debug && e instanceof Error ? redactSecrets(`${e.stack}\n`) : '  (run with --debug for the stack trace, and please report it)\n');
  return EXIT_INTERNAL;
}
