import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { projectRoot } from '../helpers/env.ts';

// The network API as a container driver uses it (a veth instead of a TAP), and a per-pool egress
// allowlist, without booting anything: a network namespace stands for the container. All in
// namespaces this test creates (host, uplink, two "containers"), removed at the end.

const tag = Math.random().toString(36).slice(2, 7);
const HOST = `mfv-host-${tag}`;
const UPLINK = `mfv-up-${tag}`;
const CT = [`mfv-ct1-${tag}`, `mfv-ct2-${tag}`];
const UPLINK_IP = '198.51.100.1';
const OTHER_IP = '203.0.113.1'; // a second "internet" address, behind the uplink
const hasTools = spawnSync('sh', ['-c', 'command -v ip && command -v nft']).status === 0 && process.getuid?.() === 0;

function sh(args: string[], allowFail = false): string {
  const r = spawnSync(args[0]!, args.slice(1), { encoding: 'utf8' });
  if (r.status !== 0 && !allowFail) throw new Error(`${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

interface Attachment {
  hostIf: string;
  peerIf: string;
  mac: string;
  address: string;
  prefixLength: number;
  gateway: string;
  dns: string[];
}

describe('bridged networking for containers (veth)', { timeout: 120_000, skip: hasTools ? false : 'needs root, iproute2 and nftables' }, () => {
  const dataDir = mkdtempSync('/var/tmp/mayfly-veth-');
  const servers: ChildProcess[] = [];
  const api = (...args: string[]) =>
    sh(['ip', 'netns', 'exec', HOST, process.execPath, join(projectRoot, 'test/helpers/net-attach.ts'), dataDir, UPLINK_IP, ...args]);
  const reach = (ns: string, url: string) =>
    spawnSync('ip', ['netns', 'exec', ns, 'curl', '-s', '-o', '/dev/null', '--max-time', '3', url]).status === 0;

  before(async () => {
    for (const ns of [HOST, UPLINK, ...CT]) {
      sh(['ip', 'netns', 'add', ns]);
      sh(['ip', '-n', ns, 'link', 'set', 'lo', 'up']);
    }
    sh(['ip', 'link', 'add', 'mfvh0', 'netns', HOST, 'type', 'veth', 'peer', 'name', 'mfvu0', 'netns', UPLINK]);
    sh(['ip', '-n', HOST, 'addr', 'add', '198.51.100.2/24', 'dev', 'mfvh0']);
    sh(['ip', '-n', HOST, 'link', 'set', 'mfvh0', 'up']);
    sh(['ip', '-n', HOST, 'route', 'add', 'default', 'via', UPLINK_IP]);
    sh(['ip', '-n', UPLINK, 'addr', 'add', `${UPLINK_IP}/24`, 'dev', 'mfvu0']);
    sh(['ip', '-n', UPLINK, 'addr', 'add', `${OTHER_IP}/32`, 'dev', 'lo']);
    sh(['ip', '-n', UPLINK, 'link', 'set', 'mfvu0', 'up']);
    const server = spawn('ip', ['netns', 'exec', UPLINK, process.execPath, '-e',
      "require('http').createServer((q, s) => s.end('ok')).listen(8080, () => console.log('listening'))"], { stdio: ['ignore', 'pipe', 'inherit'] });
    servers.push(server);
    await new Promise((resolve) => server.stdout!.once('data', resolve));
  });

  after(() => {
    for (const s of servers) s.kill('SIGKILL');
    for (const ns of [HOST, UPLINK, ...CT]) sh(['ip', 'netns', 'del', ns], true);
    rmSync(dataDir, { recursive: true, force: true });
  });

  test('a veth attachment works like a TAP; an egress allowlist limits one instance only; detach removes it all', () => {
    const limited = JSON.parse(api('attach', 'ct-limitedaaa', 'veth', `${UPLINK_IP}/32`)) as Attachment;
    const free = JSON.parse(api('attach', 'ct-freebbbbbb', 'veth')) as Attachment;
    assert.equal(limited.gateway, '10.77.0.1');
    assert.deepEqual(limited.dns, [UPLINK_IP]);
    assert.notEqual(limited.address, free.address);
    // What a container driver does with the other end: move it in and configure it.
    for (const [i, a] of [limited, free].entries()) {
      sh(['ip', '-n', HOST, 'link', 'set', a.peerIf, 'netns', CT[i]!]);
      sh(['ip', '-n', CT[i]!, 'link', 'set', a.peerIf, 'name', 'eth0']);
      sh(['ip', '-n', CT[i]!, 'addr', 'add', `${a.address}/${a.prefixLength}`, 'dev', 'eth0']);
      sh(['ip', '-n', CT[i]!, 'link', 'set', 'eth0', 'up']);
      sh(['ip', '-n', CT[i]!, 'route', 'add', 'default', 'via', a.gateway]);
    }
    assert.equal(reach(CT[0]!, `http://${UPLINK_IP}:8080/`), true, 'the allowed network is reached');
    assert.equal(reach(CT[0]!, `http://${OTHER_IP}:8080/`), false, 'anything else is not');
    assert.equal(reach(CT[1]!, `http://${UPLINK_IP}:8080/`), true);
    assert.equal(reach(CT[1]!, `http://${OTHER_IP}:8080/`), true, 'an instance without an allowlist reaches both');
    // A forged source address is dropped at the bridge.
    sh(['ip', '-n', CT[1]!, 'addr', 'add', '10.77.0.200/24', 'dev', 'eth0']);
    const forged = spawnSync('ip', ['netns', 'exec', CT[1]!, 'curl', '-s', '-o', '/dev/null', '--max-time', '3', '--interface', '10.77.0.200', `http://${UPLINK_IP}:8080/`]);
    assert.notEqual(forged.status, 0, 'a forged source address does not get out');

    api('detach', 'ct-limitedaaa');
    api('detach', 'ct-freebbbbbb');
    api('detach', 'ct-freebbbbbb'); // nothing left to remove is fine
    assert.equal(sh(['ip', '-n', HOST, '-o', 'link', 'show', 'master', 'mayfly0']).trim(), '');
    assert.equal(sh(['ip', '-n', CT[0]!, '-o', 'link', 'show', 'type', 'veth']).trim(), '', 'the container end went with the host end');
    assert.doesNotMatch(sh(['ip', 'netns', 'exec', HOST, 'nft', 'list', 'ruleset']), /comment "ct-/);
    assert.deepEqual(readdirSync(join(dataDir, 'network', 'ports')), []);
  });
});
