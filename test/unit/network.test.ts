import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { defaultConfig } from '../../src/config/index.ts';
import { ErrorCode, MayflyError } from '../../src/errors.ts';
import { identityMessage, networkLines } from '../../src/drivers/qemu/agent.ts';
import { hostNameservers } from '../../src/network/host.ts';
import { networkSettings } from '../../src/network/index.ts';
import { BLOCKED_RANGES, renderRuleset, renderTeardown, type RulesetSpec } from '../../src/network/rules.ts';
import { conflictingRoute, firstFree, macFor, parseCidr, type HostRoute } from '../../src/network/subnet.ts';

describe('subnets', () => {
  test('parseCidr reads networks and refuses host bits, bad prefixes and non-addresses', () => {
    assert.deepEqual(parseCidr('10.77.0.0/24'), { base: 0x0a4d0000, prefix: 24 });
    assert.deepEqual(parseCidr('203.0.113.7'), { base: 0xcb007107, prefix: 32 });
    assert.throws(() => parseCidr('10.77.0.5/24'), /host bits set; the network is 10\.77\.0\.0\/24/);
    assert.deepEqual(parseCidr('10.77.0.5/24', false), { base: 0x0a4d0000, prefix: 24 });
    assert.throws(() => parseCidr('10.77.0.0/33'), /bad prefix length/);
    assert.throws(() => parseCidr('10.77.0.256/32'), /not an IPv4 address/);
    assert.throws(() => parseCidr('fe80::/64'), /not an IPv4 address/);
  });

  test('a subnet overlapping a host route is found; default routes and the own bridge are not conflicts', () => {
    const subnet = parseCidr('10.77.0.0/24');
    const routes: HostRoute[] = [
      { dst: 'default', dev: 'eth0' },
      { dst: '192.0.2.0/24', dev: 'eth0' },
      { dst: '10.77.0.0/24', dev: 'mayfly0' },
      { dst: 'fe80::/64', dev: 'eth0' },
    ];
    assert.equal(conflictingRoute(subnet, routes, 'mayfly0'), undefined);
    // Wider, narrower and equal networks all overlap; a neighbour does not.
    for (const dst of ['10.0.0.0/8', '10.77.0.128/25', '10.77.0.0/24', '10.77.0.9']) {
      assert.equal(conflictingRoute(subnet, [...routes, { dst, dev: 'wg0' }], 'mayfly0')?.dst, dst, dst);
    }
    assert.equal(conflictingRoute(subnet, [...routes, { dst: '10.77.1.0/24', dev: 'wg0' }], 'mayfly0'), undefined);
    // A route of the same network on another bridge (another program's) is a conflict.
    assert.equal(conflictingRoute(subnet, [{ dst: '10.77.0.0/24', dev: 'virbr0' }], 'mayfly0')?.dev, 'virbr0');
  });

  test('addresses: the gateway and broadcast are never handed out; MACs are local, unique and stable', () => {
    const subnet = parseCidr('10.77.0.0/29');
    assert.equal(firstFree(subnet, new Set()), '10.77.0.2');
    assert.equal(firstFree(subnet, new Set(['10.77.0.2', '10.77.0.4'])), '10.77.0.3');
    assert.equal(firstFree(subnet, new Set(['10.77.0.2', '10.77.0.3', '10.77.0.4', '10.77.0.5', '10.77.0.6'])), undefined);
    assert.equal(macFor('10.77.0.2'), '02:6d:66:4d:00:02');
    assert.equal(macFor('10.77.1.255'), '02:6d:66:4d:01:ff');
    assert.notEqual(macFor('10.77.0.2'), macFor('10.77.0.3'));
  });
});

describe('network settings', () => {
  test('defaults are valid; bad networks are reported together, naming each key', () => {
    const s = networkSettings(defaultConfig());
    assert.equal(s.gateway, '10.77.0.1');
    assert.equal(s.bridge, 'mayfly0');
    const c = defaultConfig();
    c.network.subnet = '10.77.0.1/24';
    c.network.allow = ['10.1.0.0/16', '10.2.0.0/33'];
    c.pool.push({ ...({} as (typeof c.pool)[number]), name: 'p', egress_allow: ['203.0.113.0/24'] });
    const e = assert.throws(() => networkSettings(c), (err: unknown) => {
      assert.ok(err instanceof MayflyError);
      assert.equal(err.code, ErrorCode.CONFIG_INVALID);
      assert.match(err.message, /^network\.subnet: '10\.77\.0\.1\/24' has host bits set/m);
      assert.match(err.message, /^network\.allow\[1\]: '10\.2\.0\.0\/33' has a bad prefix length/m);
      assert.match(err.message, /^pool\[0\] \(p\)\.egress_allow: only bridged machines have an egress allowlist; set network = "bridged"/m);
      return true;
    });
    void e;
    const tiny = defaultConfig();
    tiny.network.subnet = '10.77.0.0/30';
    assert.throws(() => networkSettings(tiny), /between a \/16 and a \/29/);
  });

  test('the host\'s nameservers: IPv4, not loopback', () => {
    const dir = mkdtempSync('/tmp/mayfly-resolv-');
    try {
      writeFileSync(join(dir, 'r'), 'nameserver 127.0.0.53\nnameserver 192.0.2.53\n# nameserver 1.1.1.1\nnameserver 2001:db8::1\noptions edns0\n');
      assert.deepEqual(hostNameservers(join(dir, 'r')), ['192.0.2.53']);
      assert.deepEqual(hostNameservers(join(dir, 'missing')), []);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

const spec: RulesetSpec = {
  table: 'mayfly0',
  bridge: 'mayfly0',
  subnet: '10.77.0.0/24',
  hostPorts: [3128],
  allow: ['10.9.0.0/16'],
  dns: ['192.0.2.53'],
  owner: 'mayfly /var/lib/mayfly',
  ports: [
    { id: 'vm-a', ifname: 'mfa', mac: '02:6d:66:4d:00:02', address: '10.77.0.2' },
    { id: 'vm-b', ifname: 'mfb', mac: '02:6d:66:4d:00:03', address: '10.77.0.3', egressAllow: ['203.0.113.0/24', '198.51.100.7/32'] },
  ],
};

describe('the nftables ruleset', () => {
  const text = renderRuleset(spec);
  /** A chain's body (first table that has it), up to its closing brace at two spaces. */
  const chain = (name: string) => {
    const from = text.indexOf(`chain ${name} {\n`);
    return text.slice(from + `chain ${name} {\n`.length, text.indexOf('\n  }', from));
  };

  test('touches only its own two tables, replacing them in one transaction', () => {
    const tables = [...text.matchAll(/^(?:delete )?table (\S+) (\S+)/gm)].map((m) => `${m[1]} ${m[2]}`);
    assert.deepEqual([...new Set(tables)], ['inet mayfly0', 'bridge mayfly0']);
    assert.match(text, /^table inet mayfly0\ndelete table inet mayfly0\ntable inet mayfly0 \{/);
    // No flush of anything global, no policy other than accept, no other table named.
    assert.doesNotMatch(text, /flush ruleset|policy drop|table ip |table ip6 /);
    for (const m of text.matchAll(/policy (\w+)/g)) assert.equal(m[1], 'accept');
    assert.equal(renderTeardown('mayfly0'), 'table inet mayfly0\ndelete table inet mayfly0\ntable bridge mayfly0\ndelete table bridge mayfly0\n');
  });

  test('drops instance-to-host except allowed ports and DNS, inbound connections, private and link-local ranges', () => {
    const lines = chain('input').split('\n').map((l) => l.trim());
    assert.deepEqual(lines.slice(1), [
      'iifname "mayfly0" ct state established,related accept',
      'iifname "mayfly0" ip daddr @dns meta l4proto { tcp, udp } th dport 53 accept',
      'iifname "mayfly0" tcp dport @host_ports accept',
      'iifname "mayfly0" drop',
    ]);
    assert.match(text, /set host_ports \{\n\s+type inet_service\n\s+elements = \{ 3128 \}/);
    const forward = chain('forward');
    const order = ['oifname "mayfly0" ct state established,related accept', 'oifname "mayfly0" drop', '@limited', '@allowed accept', '@blocked drop'];
    const at = order.map((o) => forward.indexOf(o));
    assert.ok(at.every((i, k) => i >= 0 && (k === 0 || i > at[k - 1]!)), `forward rules in order: ${at.join(', ')}\n${forward}`);
    for (const r of ['10.0.0.0/8', '169.254.0.0/16', '172.16.0.0/12', '192.168.0.0/16', '100.64.0.0/10', '127.0.0.0/8']) {
      assert.ok((BLOCKED_RANGES as readonly string[]).includes(r), r);
      assert.ok(text.includes(r), `${r} is in the blocked set`);
    }
    assert.match(text, /ip saddr 10\.77\.0\.0\/24 oifname != "mayfly0" masquerade/);
  });

  test('per-instance elements carry the instance id: anti-spoofing, isolation, egress allowlists', () => {
    assert.match(text, /"mfa" \. 02:6d:66:4d:00:02 \. 10\.77\.0\.2 comment "vm-a"/);
    assert.match(text, /"mfb" comment "vm-b"/);
    assert.match(text, /elements = \{ 10\.77\.0\.3 comment "vm-b" \}/);
    assert.match(text, /10\.77\.0\.3 \. 203\.0\.113\.0\/24 comment "vm-b", 10\.77\.0\.3 \. 198\.51\.100\.7\/32 comment "vm-b"/);
    assert.doesNotMatch(text, /10\.77\.0\.2 \. /, 'an instance without an allowlist is not limited');
    assert.match(text, /chain forward \{\n\s+type filter hook forward priority filter; policy accept;\n\s+iifname @port_names drop/);
    // Without instances the sets are empty, not missing.
    const empty = renderRuleset({ ...spec, ports: [], hostPorts: [], allow: [], dns: [] });
    assert.doesNotMatch(empty, /comment "vm-/);
    assert.match(empty, /set ports \{\n\s+type ifname \. ether_addr \. ipv4_addr\n\s+\}/);
  });

  // The kernel is the judge of the syntax: load it into a namespace made for this (root only).
  const root = process.getuid?.() === 0 && spawnSync('sh', ['-c', 'command -v nft && command -v ip']).status === 0;
  test('the kernel accepts it, twice in a row (replacement), and the teardown', { skip: root ? false : 'needs root and nft' }, () => {
    const ns = `mfunit-${process.pid}`;
    assert.equal(spawnSync('ip', ['netns', 'add', ns]).status, 0);
    try {
      for (const script of [text, text, renderTeardown('mayfly0')]) {
        const r = spawnSync('ip', ['netns', 'exec', ns, 'nft', '-f', '-'], { input: script, encoding: 'utf8' });
        assert.equal(r.status, 0, r.stderr);
      }
      assert.equal(spawnSync('ip', ['netns', 'exec', ns, 'nft', 'list', 'tables'], { encoding: 'utf8' }).stdout, '');
    } finally {
      spawnSync('ip', ['netns', 'del', ns]);
    }
  });
});

describe('the guest\'s network configuration', () => {
  const net = { hostIf: 'mfa', mac: '02:6d:66:4d:00:02', address: '10.77.0.2', prefixLength: 24, gateway: '10.77.0.1', dns: ['192.0.2.53', '192.0.2.54'] };

  test('is lines the guest scripts read, in the restore message before its end', () => {
    assert.deepEqual(networkLines(net), [
      'net_mac 02:6d:66:4d:00:02', 'net_address 10.77.0.2/24', 'net_gateway 10.77.0.1', 'net_dns 192.0.2.53', 'net_dns 192.0.2.54',
    ]);
    const identity = { id: 'vm-a', hostname: 'vm-a', hostKey: { privateKey: 'k', publicKey: 'p' }, authorizedKey: 'a' };
    const msg = identityMessage(identity, 0, net);
    assert.match(msg, /net_address 10\.77\.0\.2\/24\nnet_gateway 10\.77\.0\.1\nnet_dns 192\.0\.2\.53\nnet_dns 192\.0\.2\.54\nend\n$/);
    assert.doesNotMatch(identityMessage(identity, 0), /net_/, 'user-mode networking sends none');
    assert.throws(() => networkLines({ ...net, dns: ['1.2.3.4\nend'] }), /not an IPv4 address/);
    assert.throws(() => networkLines({ ...net, mac: 'zz' }), /not a MAC address/);
  });
});
