import type { Command } from 'commander';
import { DaemonClient } from '../../daemon/client.ts';
import { buildApp, listen } from '../../daemon/http.ts';
import { Daemon, lockDataDir } from '../../daemon/service.ts';
import { ErrorCode, MayflyError } from '../../errors.ts';
import type { PoolStatus } from '../../pool/pool.ts';
import { sizeLabel } from '../../pool/sizes.ts';
import type { LeaseRecord } from '../../state/index.ts';
import { age, printJson, printList } from '../format.ts';
import { positiveInt, type ContextFactory } from '../main.ts';

async function client(context: ContextFactory): Promise<DaemonClient> {
  const socket = context().config.daemon.socket;
  const c = await DaemonClient.find(socket);
  if (!c) {
    throw new MayflyError(ErrorCode.DAEMON, `mayflyd does not answer on ${socket}`, {
      hint: 'start it with: mayfly daemon (or systemctl start mayflyd), or set daemon.socket in the config',
    });
  }
  return c;
}

export function registerDaemon(program: Command, context: ContextFactory): void {
  program
    .command('daemon')
    .description('run mayflyd in the foreground: the HTTP API, the warm pools and the reaper')
    .action(async () => {
      const ctx = context();
      // Signals are caught from the start, so one that arrives while starting still cleans up.
      const stopping = new Promise<string>((resolve) => {
        const stop = (sig: string) => {
          process.off('SIGTERM', stop);
          process.off('SIGINT', stop);
          resolve(sig);
        };
        process.on('SIGTERM', stop);
        process.on('SIGINT', stop);
      });
      const unlock = lockDataDir(ctx.opts.dataDir);
      const daemon = new Daemon({ dataDir: ctx.opts.dataDir, config: ctx.config, log: ctx.log });
      const app = buildApp(daemon);
      const server = await listen(app, daemon).catch(async (e: unknown) => {
        await daemon.stop();
        unlock();
        throw e;
      });
      ctx.log.info({ socket: server.socket, tcp: server.tcp, pools: daemon.pools.poolNames }, 'mayflyd listening');
      await Promise.race([daemon.start(), stopping]);
      ctx.log.info({ signal: await stopping }, 'mayflyd stopping');
      await daemon.stop(server.close);
      unlock();
      ctx.log.info('mayflyd stopped');
    });

  const pool = program.command('pool').description('the warm pools of mayflyd');
  pool
    .command('ls')
    .description('pools with their idle, leased and booting machines')
    .option('--json', 'JSON output')
    .action(async (o: { json?: boolean }) => {
      const list = await (await client(context)).call<PoolStatus[]>('GET', '/v1/pools');
      printList(list, {
        json: Boolean(o.json || context().opts.json),
        empty: 'no pools configured ([[pool]] in the config)',
        headers: ['POOL', 'IMAGE', 'SIZE', 'IDLE', 'WANTED', 'LEASED', 'BOOTING', 'WAITING', 'MAX', 'PERIOD', 'LAST ERROR'],
        row: (p) => [
          p.name, p.image, sizeLabel(p.size), String(p.idle), String(p.desiredIdle), String(p.leased), String(p.creating),
          String(p.waiting), String(p.maxInstances), p.period === null ? '-' : String(p.period),
          p.lastError ? `${p.lastError.split('\n')[0]!.slice(0, 60)} (${p.failures}x)` : '-',
        ],
      });
    });

  const lease = program.command('lease').description('take and give back pool machines by hand');
  lease
    .command('acquire')
    .description('lease a ready machine; prints the lease as JSON')
    .option('--pool <name>', 'the pool')
    .option('--image <name>', 'or: a pool serving this image')
    .option('--size <label>', 'and this size (small, 4cpu8gb50gb, …)')
    .option('--timeout <seconds>', 'how long to wait for a machine', positiveInt('--timeout'), 600)
    .option('--max-runtime <seconds>', 'kill the machine after this long', positiveInt('--max-runtime'))
    .option('--job <name>', 'a job name to record with the lease')
    .action(async (o: { pool?: string; image?: string; size?: string; timeout: number; maxRuntime?: number; job?: string }) => {
      const l = await (await client(context)).call('POST', '/v1/leases', {
        pool: o.pool, image: o.image, size: o.size, timeout: o.timeout, max_runtime: o.maxRuntime, job: o.job ? { name: o.job } : undefined,
      });
      printJson(l);
    });
  lease
    .command('ls')
    .description('leases held now (--all: every lease mayflyd has recorded)')
    .option('--all', 'include released, expired and lost leases')
    .option('--json', 'JSON output')
    .action(async (o: { all?: boolean; json?: boolean }) => {
      const list = await (await client(context)).call<LeaseRecord[]>('GET', `/v1/leases${o.all ? '?all=true' : ''}`);
      printList(list, {
        json: Boolean(o.json || context().opts.json),
        empty: 'no leases',
        headers: ['LEASE', 'POOL', 'INSTANCE', 'STATE', 'HELD', 'DEADLINE', 'JOB'],
        row: (l) => [
          l.id, l.pool, l.instance, l.state, age(l.leasedAt, l.releasedAt ?? Date.now()),
          l.deadline === null ? '-' : new Date(l.deadline).toISOString(), JSON.stringify(l.job),
        ],
      });
    });
  lease
    .command('release')
    .description('give a leased machine back (it is destroyed, or reused when max_use_count allows)')
    .argument('<id>', 'the lease id')
    .action(async (id: string) => {
      printJson(await (await client(context)).call('DELETE', `/v1/leases/${encodeURIComponent(id)}`));
    });

  program
    .command('events')
    .description("mayflyd's event log (queued, leased, ready, released, destroyed, …)")
    .option('--follow', 'keep printing events as they happen')
    .option('--after <id>', 'the events after this id (default: the newest --last)', positiveInt('--after'))
    .option('--last <n>', 'how many of the newest events', positiveInt('--last'), 100)
    .action(async (o: { follow?: boolean; after?: number; last: number }) => {
      const c = await client(context);
      const print = (e: unknown) => process.stdout.write(JSON.stringify(e) + '\n');
      if (!o.follow) {
        const query = o.after !== undefined ? `after=${o.after}` : `last=${o.last}`;
        for (const e of await c.call<unknown[]>('GET', `/v1/events?${query}`)) print(e);
        return;
      }
      const ac = new AbortController();
      process.once('SIGINT', () => ac.abort());
      process.once('SIGTERM', () => ac.abort());
      await c.follow(o.after, print, ac.signal);
    });
}
