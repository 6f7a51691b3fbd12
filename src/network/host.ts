import { readFileSync, writeFileSync } from 'node:fs';
import { ErrorCode, MayflyError } from '../errors.ts';
import { lastLines, run } from '../util/exec.ts';
import type { HostRoute } from './subnet.ts';

// The host's side of bridged networking: iproute2 and nft invocations, and sysctls. Every
// change is to an object mayfly names (its bridge, its taps, its tables) or to a forwarding
// switch of one interface.

async function cmd(tool: string, args: string[], input?: string): Promise<string> {
  const r = await run(tool, args, input === undefined ? {} : { input });
  if (r.code !== 0) {
    throw new MayflyError(ErrorCode.NETWORK, `${tool} ${args.join(' ')} failed: ${lastLines(r.stderr.trim(), 6) || `exit ${r.code}`}`, {
      hint: 'bridged networking needs root, iproute2 and nftables (mayfly doctor shows what this host offers)',
    });
  }
  return r.stdout;
}

export const ip = (...args: string[]) => cmd('ip', args);

async function ipJson<T>(...args: string[]): Promise<T[]> {
  const out = (await ip('-j', ...args)).trim();
  return out ? (JSON.parse(out) as T[]) : [];
}

export async function routes(): Promise<HostRoute[]> {
  return ipJson<HostRoute>('-4', 'route', 'show', 'table', 'all');
}

/** Interfaces of the IPv4 default routes: where instance traffic leaves the host. */
export async function egressInterfaces(): Promise<string[]> {
  const rs = await ipJson<HostRoute>('-4', 'route', 'show', 'default');
  return [...new Set(rs.map((r) => r.dev).filter((d): d is string => Boolean(d)))];
}

export interface LinkInfo {
  ifname: string;
  ifalias?: string;
  master?: string;
  linkinfo?: { info_kind?: string };
}

export async function link(name: string): Promise<LinkInfo | undefined> {
  const r = await run('ip', ['-j', '-d', 'link', 'show', 'dev', name]);
  if (r.code !== 0) return undefined; // "Device does not exist"
  return (JSON.parse(r.stdout) as LinkInfo[])[0];
}

/** The interfaces enslaved to `bridge`. */
export async function bridgePorts(bridge: string): Promise<LinkInfo[]> {
  const r = await run('ip', ['-j', 'link', 'show', 'master', bridge]);
  if (r.code !== 0 || !r.stdout.trim()) return [];
  return JSON.parse(r.stdout) as LinkInfo[];
}

export async function deleteLink(name: string): Promise<void> {
  if (!(await link(name))) return;
  try {
    await ip('link', 'del', 'dev', name);
  } catch (e) {
    // A container's veth goes away by itself once its network namespace is torn down, which
    // the kernel finishes asynchronously after the container's last process: gone is done.
    if (await link(name)) throw e;
  }
}

/** Sets a sysctl under /proc/sys; returns the value it had. */
export function sysctl(path: string, value: string): string {
  const file = `/proc/sys/${path.replaceAll('.', '/')}`;
  const before = readFileSync(file, 'utf8').trim();
  if (before !== value) writeFileSync(file, value + '\n');
  return before;
}

export async function nftApply(script: string): Promise<void> {
  await cmd('nft', ['-f', '-'], script);
}

/** The comment of table `family name`, '' for a table without one, undefined when there is no such table. */
export async function nftTableComment(family: string, name: string): Promise<string | undefined> {
  const r = await run('nft', ['list', 'table', family, name]);
  if (r.code !== 0) return undefined;
  return /^\s*comment "(.*)"\s*$/m.exec(r.stdout)?.[1] ?? '';
}

/** IPv4 nameservers of the host's resolv.conf that an instance could use (not loopback). */
export function hostNameservers(resolvConf = '/etc/resolv.conf'): string[] {
  let text = '';
  try {
    text = readFileSync(resolvConf, 'utf8');
  } catch {
    return [];
  }
  return [...text.matchAll(/^\s*nameserver\s+(\d+\.\d+\.\d+\.\d+)\s*$/gm)].map((m) => m[1]!).filter((a) => !a.startsWith('127.'));
}
