import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { containerTarget } from '../../drivers/nspawn/index.ts';
import type { Lease } from '../../pool/index.ts';
import type { JobMachine } from '../job-machine.ts';

// `mayfly run`: one command in one fresh machine, then the machine is gone.

export const workspace = '/builds';

export interface RunRequest {
  argv: string[];
  env?: Record<string, string>;
  asRoot?: boolean;
  keep?: boolean;
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
  signal?: AbortSignal;
  /** Told the way to reach a kept machine. */
  onKept?: (howTo: string) => void;
}

/** Returns the command's exit status (128 + n when it died of signal n). */
export async function runCommand(machine: JobMachine, req: RunRequest): Promise<number> {
  try {
    const r = await machine.exec(req.argv, {
      env: req.env,
      cwd: workspace,
      root: req.asRoot,
      stdout: (c) => req.stdout.write(c),
      stderr: (c) => req.stderr.write(c),
      signal: req.signal,
    });
    return r.exitCode;
  } finally {
    if (req.keep && machine.local && !req.signal?.aborted) {
      machine.local.machine.keep();
      req.onKept?.(keptHowTo(machine.local, req.asRoot ? 'root' : machine.local.machine.image.user));
    } else {
      await machine.release();
    }
  }
}

/** Writes a known_hosts file next to the machine's key and returns the ssh command that reaches it. */
export function keptHowTo(lease: Lease, user: string): string {
  const m = lease.machine;
  if (!m.started.ssh) {
    const { leaderPid } = containerTarget(m.started.pid, m.dir);
    return [
      `container ${m.id} is kept running.`,
      `  enter it: nsenter --target ${leaderPid} --all runuser -l ${user}`,
      `  output:   ${m.started.consoleLog}`,
      `  remove:   mayfly rm ${m.id}`,
    ].join('\n');
  }
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
