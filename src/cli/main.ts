import { Command, CommanderError, Option } from 'commander';
import { ErrorCode, MayflyError } from '../errors.ts';
import { EXIT_USAGE, reportError } from './report.ts';
import { isValidEnvName } from '../util/shell.ts';
import { version } from '../version.ts';
import { createContext, defaultDataDir, type Context, type GlobalOptions, type LogChoice } from './context.ts';
import { registerGitlab } from './commands/gitlab.ts';
import { registerDaemon } from './commands/daemon.ts';
import { registerDoctor } from './commands/doctor.ts';
import { registerExec } from './commands/exec.ts';
import { registerImage } from './commands/image.ts';
import { registerLicenses } from './commands/licenses.ts';
import { registerMachines } from './commands/machines.ts';

/** The context, made on first use; the first caller's log choice wins. */
export type ContextFactory = (log?: LogChoice) => Context;

export function buildProgram(): Command {
  const program = new Command('mayfly')
    .description('fresh, disposable CI machines on hardware you own')
    .version(version)
    .addOption(new Option('--data-dir <dir>', 'where images, instances and state live').env('MAYFLY_DATA_DIR').default(defaultDataDir))
    .addOption(new Option('--config <file>', 'config file (TOML; default /etc/mayfly/config.toml if it exists)').env('MAYFLY_CONFIG'))
    .option('--debug', 'debug logging and stack traces')
    .option('--json', 'machine-readable output where the output is data')
    .enablePositionalOptions()
    .showHelpAfterError('(run mayfly help for usage)');

  let ctx: Context | undefined;
  const context: ContextFactory = (log) => (ctx ??= createContext(program.opts<GlobalOptions>(), log));
  registerMachines(program, context);
  registerExec(program, context);
  registerImage(program, context);
  registerDaemon(program, context);
  registerGitlab(program, context);
  registerDoctor(program, context);
  registerLicenses(program);
  program.hook('postAction', () => ctx?.close());
  return program;
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  program.exitOverride();
  try {
    await program.parseAsync(argv);
    return process.exitCode === undefined ? 0 : Number(process.exitCode);
  } catch (e) {
    if (e instanceof CommanderError) {
      // Help and version are "errors" to commander; their exit code is 0.
      return e.exitCode === 0 ? 0 : EXIT_USAGE;
    }
    return reportError(e, argv.includes('--debug'));
  }
}

/** For commands that take `K=V` pairs (repeatable). */
export function collectPairs(value: string, previous: Record<string, string> = {}): Record<string, string> {
  const i = value.indexOf('=');
  if (i <= 0) throw new MayflyError(ErrorCode.USAGE, `'${value}' is not KEY=VALUE`, { exitCode: EXIT_USAGE });
  if (!isValidEnvName(value.slice(0, i))) {
    throw new MayflyError(ErrorCode.USAGE, `'${value.slice(0, i)}' is not a valid variable name`, {
      hint: 'names are letters, digits and _, not starting with a digit',
      exitCode: EXIT_USAGE,
    });
  }
  return { ...previous, [value.slice(0, i)]: value.slice(i + 1) };
}

export function positiveInt(what: string): (v: string) => number {
  return (v) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 1) {
      throw new MayflyError(ErrorCode.USAGE, `${what} must be a whole number of 1 or more, got '${v}'`, { exitCode: EXIT_USAGE });
    }
    return n;
  };
}
