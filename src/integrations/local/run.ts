import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { MachineSize } from '../../drivers/index.ts';
import type { DaemonClient } from '../../daemon/client.ts';
import type { Engine, Lease } from '../../pool/index.ts';
import { shellJoin } from '../../util/shell.ts';

// `mayfly run`: one command in one fresh machine, then the machine is gone.

export const workspace = '/builds';

export interface RunRequest {
  argv: string[];
  image?: string;
  size?: Partial<MachineSize>;
  env?: Record<string, string>;
  asRoot?: boolean;
  keep?: boolean;
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
  signal?: AbortSignal;
  /** Told the way to reach a kept machine. */
  onKept?: (howTo: string) => void;
}

/**
 * The same through mayflyd: a ready machine from the named pool (or the one whose image and
 * size match), the command run on the daemon's open connection, the lease released after.
 */
export async function runInPooledMachine(client: DaemonClient, req: RunRequest & { pool?: string; sizeLabel?: string }): Promise<number> {
  const lease = await client.call<{ id: string; waited_ms: number; instance: { id: string; image: string } }>(
    'POST',
    '/v1/leases',
    { pool: req.pool, image: req.pool ? undefined : req.image, size: req.sizeLabel, job: { name: `run: ${shellJoin(req.argv).slice(0, 60)}` } },
    undefined,
    req.signal,
  );
  req.stderr.write(`mayfly: machine ${lease.instance.id} (${lease.instance.image}) from the pool after ${(lease.waited_ms / 1000).toFixed(2)} s\n`);
  try {
    const r = await client.exec(
      lease.id,
      { argv: req.argv, env: req.env, cwd: workspace, user: req.asRoot ? 'root' : 'job' },
      { stdout: (c) => req.stdout.write(c), stderr: (c) => req.stderr.write(c), signal: req.signal },
    );
    return r.exitCode;
  } finally {
    await client.call('DELETE', `/v1/leases/${lease.id}`);
  }
}

/** Returns the command's exit status (128 + n when it died of signal n). */
export async function runInFreshMachine(engine: Engine, req: RunRequest): Promise<number> {
  const lease = await engine.lease({ image: req.image, size: req.size, owner: `run: ${shellJoin(req.argv).slice(0, 60)}`, signal: req.signal });
  try {
    const ch = req.asRoot ? await lease.machine.root() : lease.machine.guest;
    const r = await ch.exec(req.argv, {
      env: req.env,
      cwd: workspace,
      stdout: (c) => req.stdout.write(c),
      stderr: (c) => req.stderr.write(c),
      signal: req.signal,
    });
    return r.exitCode;
  } finally {
    if (req.keep && !req.signal?.aborted) {
      lease.machine.keep();
      req.onKept?.(keptHowTo(lease, req.asRoot ? 'root' : lease.machine.image.user));
    } else {
      await lease.release();
    }
  }
}

/** Writes a known_hosts file next to the machine's key and returns the ssh command that reaches it. */
export function keptHowTo(lease: Lease, user: string): string {
  const m = lease.machine;
  const ep = m.endpoint(user);
  const knownHosts = join(m.dir, 'known_hosts');
  writeFileSync(knownHosts, `[${ep.host}]:${ep.port} ${ep.hostKey}\n`);
  return [
    `machine ${m.id} is kept running.`,
    `  reach it: ssh -i ${join(m.dir, 'id_ed25519')} -o UserKnownHostsFile=${knownHosts} -p ${ep.port} ${user}@${ep.host}`,
    `  console:  ${m.started.consoleLog}`,
    `  remove:   mayfly rm ${m.id}`,
  ].join('\n');
}
