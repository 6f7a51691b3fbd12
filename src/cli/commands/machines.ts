import type { Command } from 'commander';
import { ErrorCode, MayflyError } from '../../errors.ts';
import { DaemonClient } from '../../daemon/client.ts';
import type { MachineSize } from '../../drivers/index.ts';
import { runInFreshMachine, runInPooledMachine } from '../../integrations/local/run.ts';
import { age, printList } from '../format.ts';
import { collectPairs, positiveInt, type ContextFactory } from '../main.ts';
import { withSignals } from '../signals.ts';

interface RunOptions {
  image?: string;
  cpus?: number;
  memory?: number;
  disk?: number;
  env: Record<string, string>;
  root?: boolean;
  keep?: boolean;
  pool?: string;
  daemon: boolean;
}

function runSizeLabel(s: MachineSize): string {
  return `${s.cpus}cpu${s.memoryMiB}mb${s.diskGiB}gb`;
}

/** Whether some pool of the daemon has this image (and this size, when one was asked for). */
async function poolServes(client: DaemonClient, image: string, sizeLabel: string | undefined): Promise<boolean> {
  const pools = await client.call<{ image: string; size: MachineSize }[]>('GET', '/v1/pools');
  const want = sizeLabel ? /^(\d+)cpu(\d+)mb(\d+)gb$/.exec(sizeLabel) : null;
  return pools.some(
    (p) =>
      (p.image === image || image.startsWith(`${p.image}:`)) &&
      (!want || (p.size.cpus === Number(want[1]) && p.size.memoryMiB === Number(want[2]) && p.size.diskGiB === Number(want[3]))),
  );
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
    .option('-e, --env <KEY=VALUE>', 'environment variable for the command (repeatable)', collectPairs, {})
    .option('--root', 'run as root instead of the ci user')
    .option('--keep', 'keep the machine afterwards and print how to reach it (never from a pool)')
    .option('--pool <name>', 'take a ready machine from this mayflyd pool')
    .option('--no-daemon', 'boot a machine in this process even when mayflyd runs')
    .passThroughOptions()
    .action(async (command: string[], o: RunOptions) => {
      const ctx = context();
      process.exitCode = await withSignals(ctx, async (signal) => {
        const req = {
          argv: command,
          image: o.image,
          size: { cpus: o.cpus, memoryMiB: o.memory, diskGiB: o.disk },
          env: o.env,
          asRoot: o.root,
          keep: o.keep,
          stdout: process.stdout,
          stderr: process.stderr,
          signal,
          onKept: (howTo: string) => process.stderr.write(howTo + '\n'),
        };
        const client = o.daemon && !o.keep ? await DaemonClient.find(ctx.config.daemon.socket) : undefined;
        if (o.pool && !client) {
          throw new MayflyError(ErrorCode.DAEMON, `--pool ${o.pool} needs mayflyd, and none answers on ${ctx.config.daemon.socket}`, {
            hint: 'start it with: mayfly daemon (or systemctl start mayflyd)',
          });
        }
        if (client) {
          const sizeLabel = o.cpus || o.memory || o.disk ? runSizeLabel(ctx.engine().resolveSize(req.size)) : undefined;
          const servable = o.pool !== undefined || (await poolServes(client, o.image ?? ctx.config.defaults.image, sizeLabel));
          if (servable) return runInPooledMachine(client, { ...req, pool: o.pool, image: o.image ?? ctx.config.defaults.image, sizeLabel });
          ctx.log.info('no mayflyd pool serves this image and size; booting a machine here');
        }
        return runInFreshMachine(ctx.engine(), req);
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
        headers: ['ID', 'DRIVER', 'IMAGE', 'STATE', 'AGE', 'PID', 'SIZE', 'OWNER', 'DISK', 'CONSOLE'],
        row: (i) => [
          i.id,
          i.driver,
          `${i.imageName}:${i.imageVersion}`,
          i.running || i.state === 'creating' ? i.state : `${i.state} (process gone)`,
          age(i.createdAt),
          i.pid === null ? '-' : String(i.pid),
          `${i.cpus}cpu/${i.memoryMiB}M/${i.diskGiB}G`,
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
}
