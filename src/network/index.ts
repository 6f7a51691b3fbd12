import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Config } from '../config/index.ts';
import { ErrorCode, MayflyError, errorText } from '../errors.ts';
import type { Logger } from '../log.ts';
import { takeDirLock } from '../util/lock.ts';
import { holderAlive } from '../util/proc.ts';
import { bridgePorts, deleteLink, egressInterfaces, hostNameservers, ip, link, nftApply, nftTableComment, routes, sysctl } from './host.ts';
import { renderRuleset, renderTeardown, type AttachedPort } from './rules.ts';
import { cidrText, conflictingRoute, firstFree, gatewayOf, intToIp, macFor, parseCidr, type Cidr } from './subnet.ts';

// Bridged networking: a bridge mayfly owns, one TAP (VMs) or veth (containers) per instance on
// it, an address from the configured subnet handed to the guest statically, and nftables
// isolation rendered from the list of attached instances (rules.ts). User-mode networking
// (QEMU slirp) needs none of this and stays the default.
//
// What is attached is recorded as one file per address in DATA/network/ports/, written under a
// lock together with the rules: the files are the truth the ruleset is rendered from, and what
// the reaper compares with the state store.

export type NetworkMode = 'user' | 'bridged';

export interface NetworkSettings {
  bridge: string;
  subnet: Cidr;
  gateway: string;
  /** Empty: the host's nameservers, looked up when an instance attaches. */
  dns: string[];
  hostPorts: number[];
  allow: string[];
}

/** What a driver needs to wire an instance in, and what the guest must be told. */
export interface Attachment {
  id: string;
  kind: 'tap' | 'veth';
  /** The host-side interface on the bridge (a TAP for QEMU's `-netdev tap,ifname=`). */
  hostIf: string;
  /** veth only: the other end, still in the host's namespace, for the container driver to move in. */
  peerIf?: string;
  /** The MAC the guest must use (the bridge drops frames from any other). */
  mac: string;
  address: string;
  prefixLength: number;
  gateway: string;
  dns: string[];
}

export interface AttachRequest {
  id: string;
  kind: 'tap' | 'veth';
  /** The pool's egress allowlist (CIDRs); absent: anything not blocked. */
  egressAllow?: string[];
}

/** The network API a driver (QEMU's tap, a container driver's veth) and the pool layer use. */
export interface InstanceNetwork {
  attachInstance(req: AttachRequest): Promise<Attachment>;
  /** Removes the instance's interface and rules; succeeds when there is nothing to remove. */
  detachInstance(id: string): Promise<void>;
}

interface PortRecord extends Attachment {
  egressAllow?: string[];
  createdAt: number;
}

/** Reads and checks the [network] section and every pool's egress_allow; all problems at once. */
export function networkSettings(config: Config): NetworkSettings {
  const n = config.network;
  const problems: string[] = [];
  const check = (where: string, text: string) => {
    try {
      return parseCidr(text);
    } catch (e) {
      problems.push(`${where}: ${errorText(e)}`);
      return undefined;
    }
  };
  const subnet = check('network.subnet', n.subnet);
  if (subnet && (subnet.prefix < 16 || subnet.prefix > 29)) {
    problems.push(`network.subnet: ${n.subnet} must be between a /16 and a /29 (the bridge takes one address, each instance one)`);
  }
  n.allow.forEach((a, i) => check(`network.allow[${i}]`, a));
  n.dns.forEach((a, i) => check(`network.dns[${i}]`, a));
  config.pool.forEach((p, i) => {
    p.egress_allow?.forEach((a, j) => check(`pool[${i}] (${p.name}).egress_allow[${j}]`, a));
    if (p.egress_allow && (p.network ?? config.defaults.network) !== 'bridged') {
      problems.push(`pool[${i}] (${p.name}).egress_allow: only bridged machines have an egress allowlist; set network = "bridged" in this pool`);
    }
  });
  if (problems.length > 0 || !subnet) {
    throw new MayflyError(ErrorCode.CONFIG_INVALID, problems.join('\n'), { hint: 'write networks as A.B.C.D/N with the host bits zero, e.g. "10.77.0.0/24"' });
  }
  return { bridge: n.bridge, subnet, gateway: intToIp(gatewayOf(subnet)), dns: n.dns, hostPorts: [...new Set(n.host_ports)], allow: n.allow };
}

export class BridgedNetwork implements InstanceNetwork {
  readonly settings: NetworkSettings;
  readonly dir: string;
  readonly #owner: string;
  readonly #log: Logger;

  constructor(opts: { dataDir: string; settings: NetworkSettings; log: Logger }) {
    this.settings = opts.settings;
    this.dir = join(opts.dataDir, 'network');
    this.#owner = `mayfly ${opts.dataDir}`;
    this.#log = opts.log;
  }

  get #portsDir(): string {
    return join(this.dir, 'ports');
  }

  /** Whether this data dir ever set up its bridge (the reaper leaves hosts that never did alone). */
  get used(): boolean {
    try {
      return statSync(this.#portsDir).isDirectory();
    } catch {
      return false;
    }
  }

  async attachInstance(req: AttachRequest): Promise<Attachment> {
    return this.#locked(async () => {
      await this.#ensureBridge();
      const records = this.#records();
      const address = firstFree(this.settings.subnet, new Set(records.map((r) => r.address)));
      if (!address) {
        throw new MayflyError(ErrorCode.NETWORK, `every address of ${cidrText(this.settings.subnet)} is in use (${records.length} instances)`, {
          hint: 'choose a larger network.subnet, or run fewer bridged machines at once',
        });
      }
      const dns = this.settings.dns.length > 0 ? this.settings.dns : hostNameservers();
      if (dns.length === 0) {
        // A host behind a local resolver (127.0.0.53) has none an instance could reach.
        this.#log.warn({ instance: req.id }, 'bridged instances get no DNS server: /etc/resolv.conf names only loopback ones; set [network] dns');
      }
      // Interface names: 15 characters at most; the id's random part keeps them unique.
      const suffix = req.id.slice(req.id.lastIndexOf('-') + 1).replace(/[^a-z0-9]/gi, '').toLowerCase().slice(0, 11);
      if (!suffix) throw new MayflyError(ErrorCode.NETWORK, `cannot name an interface after the instance id '${req.id}'`);
      const rec: PortRecord = {
        id: req.id,
        kind: req.kind,
        hostIf: `mf${suffix}`,
        ...(req.kind === 'veth' ? { peerIf: `mfp${suffix}` } : {}),
        mac: macFor(address),
        address,
        prefixLength: this.settings.subnet.prefix,
        gateway: this.settings.gateway,
        dns,
        ...(req.egressAllow ? { egressAllow: req.egressAllow } : {}),
        createdAt: Date.now(),
      };
      writeFileSync(join(this.#portsDir, address), JSON.stringify(rec) + '\n', { flag: 'wx' });
      try {
        await this.#createPort(rec);
        await this.#applyRules();
      } catch (e) {
        await deleteLink(rec.hostIf).catch(() => {});
        rmSync(join(this.#portsDir, address), { force: true });
        await this.#applyRules().catch(() => {});
        throw e;
      }
      this.#log.debug({ instance: req.id, address, hostIf: rec.hostIf }, 'attached to the bridge');
      const { createdAt: _c, egressAllow: _e, ...attachment } = rec;
      return attachment;
    });
  }

  async detachInstance(id: string): Promise<void> {
    if (!this.used || !this.#records().some((r) => r.id === id)) return;
    await this.#locked(async () => {
      const mine = this.#records().filter((r) => r.id === id);
      for (const r of mine) await deleteLink(r.hostIf);
      for (const r of mine) rmSync(join(this.#portsDir, r.address), { force: true });
      await this.#applyRules();
      this.#log.debug({ instance: id }, 'detached from the bridge');
    });
  }

  /**
   * Removes ports and rules of instances that `exists` does not know, and interfaces on the
   * bridge that no record names (a process killed between creating a TAP and recording it).
   */
  async reap(exists: (id: string) => boolean): Promise<{ id: string; hostIf: string }[]> {
    if (!this.used) return [];
    return this.#locked(async () => {
      const removed: { id: string; hostIf: string }[] = [];
      const records = this.#records();
      for (const r of records) {
        if (exists(r.id)) continue;
        await deleteLink(r.hostIf);
        rmSync(join(this.#portsDir, r.address), { force: true });
        removed.push({ id: r.id, hostIf: r.hostIf });
      }
      const known = new Set(records.filter((r) => exists(r.id)).map((r) => r.hostIf));
      for (const p of await bridgePorts(this.settings.bridge)) {
        const id = /^mayfly:(.+)$/.exec(p.ifalias ?? '')?.[1];
        if (known.has(p.ifname) || (id !== undefined && exists(id))) continue;
        // Only interfaces mayfly named: the bridge is ours, but never delete what we did not make.
        if (!p.ifname.startsWith('mf')) continue;
        await deleteLink(p.ifname);
        removed.push({ id: id ?? '?', hostIf: p.ifname });
      }
      // Applied on every pass while the bridge exists, so rules someone flushed come back.
      if (removed.length > 0 || (await link(this.settings.bridge))) await this.#applyRules();
      for (const r of removed) this.#log.warn({ instance: r.id, hostIf: r.hostIf }, 'reaped an orphaned network port and its rules');
      return removed;
    });
  }

  /** Removes the bridge and both tables; refused while instances are attached. */
  async down(): Promise<void> {
    await this.#locked(async () => {
      const records = this.#records();
      if (records.length > 0) {
        throw new MayflyError(ErrorCode.NETWORK, `${records.length === 1 ? '1 instance is' : `${records.length} instances are`} still attached to ${this.settings.bridge} (${records.map((r) => r.id).join(', ')})`, {
          hint: 'remove them first (mayfly rm), then try again',
        });
      }
      await this.#checkOwnership();
      const b = this.settings.bridge;
      if ((await nftTableComment('inet', b)) !== undefined || (await nftTableComment('bridge', b)) !== undefined) await nftApply(renderTeardown(b));
      if (await link(b)) await ip('link', 'del', 'dev', b);
    });
  }

  #records(): PortRecord[] {
    let names: string[];
    try {
      names = readdirSync(this.#portsDir);
    } catch {
      return [];
    }
    const out: PortRecord[] = [];
    for (const n of names) {
      try {
        out.push(JSON.parse(readFileSync(join(this.#portsDir, n), 'utf8')) as PortRecord);
      } catch {
        // a record being written right now, or a broken one: its address stays taken until reaped
        out.push({ id: '?', kind: 'tap', hostIf: '', mac: '', address: n, prefixLength: 0, gateway: '', dns: [], createdAt: 0 });
      }
    }
    return out;
  }

  /** Refuses a bridge or table of the same name that another program or data dir made. */
  async #checkOwnership(): Promise<void> {
    const b = this.settings.bridge;
    const l = await link(b);
    if (l && l.ifalias !== this.#owner) {
      throw new MayflyError(ErrorCode.NETWORK_CONFIG, `the interface ${b} exists and is not this mayfly's bridge (${l.ifalias ? `its alias is '${l.ifalias}'` : 'it has no mayfly alias'})`, {
        hint: `mayfly only uses a bridge it created itself: set [network] bridge to a name no interface has`,
      });
    }
    for (const family of ['inet', 'bridge']) {
      const c = await nftTableComment(family, b);
      if (c !== undefined && c !== this.#owner) {
        throw new MayflyError(ErrorCode.NETWORK_CONFIG, `the nftables table '${family} ${b}' exists and is not this mayfly's (comment '${c}')`, {
          hint: `mayfly only replaces tables it made: set [network] bridge to another name`,
        });
      }
    }
  }

  async #ensureBridge(): Promise<void> {
    const s = this.settings;
    await this.#checkOwnership();
    const conflict = conflictingRoute(s.subnet, await routes(), s.bridge);
    if (conflict) {
      throw new MayflyError(ErrorCode.NETWORK_CONFIG, `network.subnet ${cidrText(s.subnet)} overlaps the host's route to ${conflict.dst}${conflict.dev ? ` (dev ${conflict.dev})` : ''}`, {
        hint: 'choose a subnet that no network of this host uses, e.g. another 10.x.y.0/24, in [network] subnet',
      });
    }
    mkdirSync(this.#portsDir, { recursive: true, mode: 0o700 });
    if (!(await link(s.bridge))) {
      await ip('link', 'add', 'name', s.bridge, 'type', 'bridge');
      await ip('link', 'set', 'dev', s.bridge, 'alias', this.#owner);
      this.#log.info({ bridge: s.bridge, subnet: cidrText(s.subnet) }, 'created the bridge for bridged networking');
    }
    // No IPv6 on the bridge: a link-local address would let instances reach the host around the rules.
    if (existsSync('/proc/sys/net/ipv6')) sysctl(`net.ipv6.conf.${s.bridge}.disable_ipv6`, '1');
    await ip('addr', 'replace', `${s.gateway}/${s.subnet.prefix}`, 'dev', s.bridge);
    await ip('link', 'set', 'dev', s.bridge, 'up');
    // Forwarding only where instance traffic passes: into the host from the bridge, and back in
    // from the egress interfaces. The global switch (net.ipv4.ip_forward) is left as it is.
    for (const dev of [s.bridge, ...(await egressInterfaces())]) {
      const before = sysctl(`net.ipv4.conf.${dev}.forwarding`, '1');
      if (before !== '1' && dev !== s.bridge) this.#log.info({ dev }, 'enabled IPv4 forwarding on the egress interface');
    }
  }

  async #createPort(r: PortRecord): Promise<void> {
    await deleteLink(r.hostIf); // a leftover of an instance that had this id: never
    if (r.kind === 'tap') {
      // Persistent, so it exists before QEMU opens it and after QEMU exits until mayfly removes it.
      await ip('tuntap', 'add', 'dev', r.hostIf, 'mode', 'tap');
    } else {
      await ip('link', 'add', 'name', r.hostIf, 'type', 'veth', 'peer', 'name', r.peerIf!, 'address', r.mac);
    }
    await ip('link', 'set', 'dev', r.hostIf, 'alias', `mayfly:${r.id}`);
    await ip('link', 'set', 'dev', r.hostIf, 'master', this.settings.bridge);
    // Isolated ports cannot exchange frames with each other, only with the host (the nft bridge
    // table drops such frames too).
    await ip('link', 'set', 'dev', r.hostIf, 'type', 'bridge_slave', 'isolated', 'on', 'learning', 'on');
    await ip('link', 'set', 'dev', r.hostIf, 'up');
  }

  async #applyRules(): Promise<void> {
    const s = this.settings;
    const ports: AttachedPort[] = this.#records()
      .filter((r) => r.hostIf)
      .map((r) => ({ id: r.id, ifname: r.hostIf, mac: r.mac, address: r.address, ...(r.egressAllow ? { egressAllow: r.egressAllow } : {}) }));
    const dns = [...new Set([...(s.dns.length > 0 ? s.dns : hostNameservers())])];
    await nftApply(renderRuleset({
      table: s.bridge, bridge: s.bridge, subnet: cidrText(s.subnet), hostPorts: s.hostPorts, allow: s.allow, dns, owner: this.#owner, ports,
    }));
  }

  /** One change of ports and rules at a time, across every mayfly process of this data dir. */
  async #locked<T>(fn: () => Promise<T>): Promise<T> {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const lock = join(this.dir, 'lock');
    const release = (await takeDirLock(lock, {
      timeoutMs: 60_000,
      pollMs: 20,
      emptyStaleMs: 5000,
      timeout: (holder) => new MayflyError(ErrorCode.NETWORK, `waited a minute for the network lock ${lock} (held by pid ${holder || '?'})`),
    }))!;
    try {
      return await fn();
    } finally {
      release();
    }
  }
}
