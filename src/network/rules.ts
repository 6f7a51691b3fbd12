// The nftables ruleset of a bridged network, rendered from plain data. mayfly owns two tables
// named like its bridge (`inet` for routed traffic, `bridge` for frames between ports) and
// nothing else: it never touches another table or a global policy. Its chains accept by
// default and drop only what isolation needs; a drop in any base chain is final in nftables, an
// accept is not, so other tables' rules still apply to instance traffic.
//
// The whole ruleset is replaced in one nft transaction (`delete table` + `table {…}` in one
// file), so a change never leaves a half-written state and rendering from the list of attached
// instances is the only way rules come and go.

export interface AttachedPort {
  /** Instance id; nft comments carry it so a listing shows whose rule is whose. */
  id: string;
  /** Host side: the TAP (or veth) on the bridge. */
  ifname: string;
  mac: string;
  address: string;
  /** When set, the instance reaches only these networks (plus DNS and the allowed host ports). */
  egressAllow?: string[];
}

export interface RulesetSpec {
  /** Table name in both families; the bridge's name. */
  table: string;
  bridge: string;
  /** The instances' subnet, e.g. "10.77.0.0/24". */
  subnet: string;
  /** TCP ports on the host that instances may connect to (a cache proxy, say). */
  hostPorts: number[];
  /** Networks instances may reach although they are private or link-local. */
  allow: string[];
  /** DNS servers the instances use: port 53 on them is always allowed. */
  dns: string[];
  /** Who owns the tables (table comment), checked before a replacement. */
  owner: string;
  ports: AttachedPort[];
}

/** Never reached from an instance unless allowed: private, shared, loopback, link-local (cloud metadata), multicast, reserved. */
export const BLOCKED_RANGES = [
  '0.0.0.0/8', '10.0.0.0/8', '100.64.0.0/10', '127.0.0.0/8', '169.254.0.0/16', '172.16.0.0/12', '192.168.0.0/16', '224.0.0.0/3',
] as const;

const q = (s: string) => JSON.stringify(s);

function set(name: string, type: string, elements: string[], flags?: string): string {
  return [
    `  set ${name} {`,
    `    type ${type}`,
    ...(flags ? [`    flags ${flags}`] : []),
    ...(elements.length > 0 ? [`    elements = { ${elements.join(', ')} }`] : []),
    '  }',
  ].join('\n');
}

/** The nft script that replaces both tables atomically (declaring each first so `delete` never fails). */
export function renderRuleset(s: RulesetSpec): string {
  const br = q(s.bridge);
  const limited = s.ports.filter((p) => p.egressAllow !== undefined);
  const inet = [
    `table inet ${s.table} {`,
    `  comment ${q(s.owner)}`,
    set('blocked', 'ipv4_addr', [...BLOCKED_RANGES], 'interval'),
    set('allowed', 'ipv4_addr', s.allow, 'interval'),
    set('dns', 'ipv4_addr', s.dns),
    set('host_ports', 'inet_service', s.hostPorts.map(String)),
    // Instances with a per-pool allowlist, and (instance . allowed network) pairs.
    set('limited', 'ipv4_addr', limited.map((p) => `${p.address} comment ${q(p.id)}`)),
    set('egress', 'ipv4_addr . ipv4_addr', limited.flatMap((p) => p.egressAllow!.map((n) => `${p.address} . ${n} comment ${q(p.id)}`)), 'interval'),
    '',
    // Traffic from instances to the host itself.
    '  chain input {',
    '    type filter hook input priority filter; policy accept;',
    `    iifname ${br} ct state established,related accept`,
    `    iifname ${br} ip daddr @dns meta l4proto { tcp, udp } th dport 53 accept`,
    `    iifname ${br} tcp dport @host_ports accept`,
    `    iifname ${br} drop`,
    '  }',
    '',
    '  chain forward {',
    '    type filter hook forward priority filter; policy accept;',
    // Nothing outside starts a connection to an instance, and the host routes nothing from
    // one instance back to another.
    `    oifname ${br} ct state established,related accept`,
    `    oifname ${br} drop`,
    `    iifname ${br} ct state established,related accept`,
    `    iifname ${br} ip saddr != ${s.subnet} drop`,
    `    iifname ${br} meta nfproto ipv6 drop`,
    `    iifname ${br} ip daddr @dns meta l4proto { tcp, udp } th dport 53 accept`,
    `    iifname ${br} ip saddr @limited ip saddr . ip daddr != @egress drop`,
    `    iifname ${br} ip daddr @allowed accept`,
    `    iifname ${br} ip daddr @blocked drop`,
    '  }',
    '',
    '  chain postrouting {',
    '    type nat hook postrouting priority srcnat; policy accept;',
    `    ip saddr ${s.subnet} oifname != ${br} masquerade`,
    '  }',
    '}',
  ];
  const bridge = [
    `table bridge ${s.table} {`,
    `  comment ${q(s.owner)}`,
    // Each port may only send from its own MAC and address: the inet rules can then trust
    // source addresses, and no instance can answer ARP for another.
    set('ports', 'ifname . ether_addr . ipv4_addr', s.ports.map((p) => `${q(p.ifname)} . ${p.mac} . ${p.address} comment ${q(p.id)}`)),
    // (By port name: "meta ibrname" needs a kernel module that not every kernel has.)
    set('port_names', 'ifname', s.ports.map((p) => `${q(p.ifname)} comment ${q(p.id)}`)),
    '',
    '  chain prerouting {',
    '    type filter hook prerouting priority filter; policy accept;',
    '    iifname != @port_names accept',
    '    ether type arp iifname . arp saddr ether . arp saddr ip @ports accept',
    '    ether type ip iifname . ether saddr . ip saddr @ports accept',
    // IPv6 (link-local would reach the host around the inet rules), VLANs, anything else.
    '    drop',
    '  }',
    '',
    '  chain forward {',
    '    type filter hook forward priority filter; policy accept;',
    // A frame from an instance port that the bridge forwards goes to another port: instance to
    // instance. (Frames for the host take the input hook instead.)
    '    iifname @port_names drop',
    '  }',
    '}',
  ];
  return [
    `table inet ${s.table}`,
    `delete table inet ${s.table}`,
    ...inet,
    `table bridge ${s.table}`,
    `delete table bridge ${s.table}`,
    ...bridge,
    '',
  ].join('\n');
}

/** Removes both tables (the tables are declared first so that the deletes cannot fail). */
export function renderTeardown(table: string): string {
  return [`table inet ${table}`, `delete table inet ${table}`, `table bridge ${table}`, `delete table bridge ${table}`, ''].join('\n');
}
