import type { Command } from 'commander';
import { ErrorCode, MayflyError } from '../../errors.ts';
import { runCommand } from '../../integrations/local/run.ts';
import { shellJoin } from '../../util/shell.ts';
import { redactSecrets, registerSecret, registerSecretsFromEnv } from '../../secrets.ts';
import { jobDiskOption, networkOption, obtainJobMachine, startOption, type MachineChoice } from '../job-machine.ts';
import { age, printList } from '../format.ts';
import { collectPairs, positiveInt, type ContextFactory } from '../main.ts';
import { withSignals } from '../signals.ts';

interface RunOptions extends MachineChoice {
  env: Record<string, string>;
  secretEnv: Record<string, string>;
  root?: boolean;
}

export function registerMachines(program: Command, context: ContextFactory): void {
  program
    .command('run')
    .description('run a command in a fresh machine, then destroy the machine')
    .argument('<command...>', 'the command and its arguments (put them after --)')
    .option('--image <ref>', 'image NAME, NAME:VERSION or content id (default: config defaults.image)')
    .option('--cpus <n>', 'virtual CPUs', positiveInt('--cpus'))
    .option('--memory <MiB>', 'memory in MiB', positiveInt('--memory'))
    .option('--disk <GiB>', 'disk size in GiB (at least the image\'s)', positiveInt('--disk'))
    .option('-e, --env <KEY=VALUE>', 'environment variable for the command (repeatable); values of names like *TOKEN*, *PASSWORD*, *SECRET*, *_KEY are kept out of logs', collectPairs, {})
    .option('--secret-env <KEY=VALUE>', 'like -e, and the value is a secret: never in mayfly\'s logs, events or state (repeatable)', collectPairs, {})
    .option('--root', 'run as root instead of the ci user')
    .option('--keep', 'keep the machine afterwards and print how to reach it (never from a pool)')
    .option('--pool <name>', 'take a ready machine from this mayflyd pool')
    .option('--no-daemon', 'boot a machine in this process even when mayflyd runs')
    .addOption(startOption())
    .addOption(jobDiskOption())
    .addOption(networkOption())
    .passThroughOptions()
    .action(async (command: string[], o: RunOptions) => {
      const ctx = context();
      for (const v of Object.values(o.secretEnv)) registerSecret(v);
      registerSecretsFromEnv(o.env);
      const env = { ...o.env, ...o.secretEnv };
      process.exitCode = await withSignals(ctx, async (signal) => {
        // The store and the daemon keep this label; a secret in the command line is cut out of it.
        const machine = await obtainJobMachine(ctx, o, `run: ${redactSecrets(shellJoin(command)).slice(0, 60)}`, signal);
        process.stderr.write(`mayfly: machine ${machine.id} (${machine.image}) ${machine.origin}\n`);
        return runCommand(machine, {
          argv: command,
          env,
          asRoot: o.root,
          keep: o.keep,
          stdout: process.stdout,
          stderr: process.stderr,
          signal,
          onKept: (howTo: string) => process.stderr.write(howTo + '\n'),
        });
      });
    });

  program
    .command('ps')
    .description('list the machines on this host')
    .option('--json', 'JSON output')
    .action((o: { json?: boolean }) => {
      const ctx = context();
      printList(ctx.engine().instances(), {
        json: Boolean(o.json || ctx.opts.json),
        empty: 'no machines',
        headers: ['ID', 'DRIVER', 'IMAGE', 'STATE', 'AGE', 'PID', 'SIZE', 'SSH', 'OWNER', 'DISK', 'CONSOLE'],
        row: (i) => [
          i.id,
          i.driver,
          `${i.imageName}:${i.imageVersion}`,
          i.running || i.state === 'creating' ? i.state : `${i.state} (process gone)`,
          age(i.createdAt),
          i.pid === null ? '-' : String(i.pid),
          `${i.cpus}cpu/${i.memoryMiB}M/${i.diskGiB}G`,
          i.sshPort === null ? '-' : `${i.sshHost ?? '127.0.0.1'}:${i.sshPort}`,
          i.owner ?? '-',
          i.disks.join(','),
          i.consoleLog,
        ],
      });
    });

  program
    .command('rm')
    .description('destroy machines (e.g. ones kept with run --keep)')
    .argument('[id...]', 'instance ids from mayfly ps')
    .option('--all', 'destroy every machine in this data dir')
    .action(async (given: string[], o: { all?: boolean }) => {
      const engine = context().engine();
      const ids = o.all ? engine.instances().map((i) => i.id) : given;
      if (!o.all && ids.length === 0) {
        throw new MayflyError(ErrorCode.USAGE, 'name the machines to destroy, or pass --all', { hint: 'list them with: mayfly ps' });
      }
      for (const id of ids) {
        await engine.destroyInstance(id);
        process.stdout.write(`${id} destroyed\n`);
      }
    });

  program
    .command('reap')
    .description('remove what no live mayfly process explains: machines of killed processes, their clones, bridge ports and rules')
    .action(async () => {
      const r = await context().engine().reap();
      for (const x of r.removed) process.stdout.write(`${x.id}: removed (${x.why})\n`);
    });

  program
    .command('network-down')
    .description('remove mayfly\'s bridge and its nftables tables (refused while bridged machines exist)')
    .action(async () => {
      const engine = context().engine();
      await engine.network.down();
      process.stdout.write(`removed bridge ${engine.network.settings.bridge} and its nftables tables\n`);
    });
}
