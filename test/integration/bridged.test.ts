import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { collect, ensureImage, instanceDirs, mayflyBin, processesMentioning, projectRoot, testDataDir, waitFor, type CliResult } from '../helpers/env.ts';

// Bridged networking end to end, entirely inside network namespaces this test creates: a "host"
// namespace where mayfly runs (its bridge and nftables tables live there) and an "uplink"
// namespace standing for the internet, joined by a veth; the host's default route points at the
// uplink. Traffic goes to these namespaces only. Everything is removed at the end, on failure too.

const tag = Math.random().toString(36).slice(2, 7);
const HOST = `mfb-host-${tag}`;
const UPLINK = `mfb-up-${tag}`;
const UPLINK_IP = '198.51.100.1'; // TEST-NET-2: not a private range, so instances may reach it
const HOST_IP = '198.51.100.2';
const METADATA_IP = '169.254.169.254';
const OTHER_IP = '203.0.113.1'; // TEST-NET-3: more "internet", behind the uplink
const GATEWAY = '10.77.0.1';
const BRIDGE = 'mayfly0';

function sh(args: string[], allowFail = false): string {
  const r = spawnSync(args[0]!, args.slice(1), { encoding: 'utf8' });
  if (r.status !== 0 && !allowFail) throw new Error(`${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

const inHost = (...args: string[]) => sh(['ip', 'netns', 'exec', HOST, ...args], true);

const hasTools = spawnSync('sh', ['-c', 'command -v ip && command -v nft']).status === 0 && process.getuid?.() === 0;

describe('bridged networking', { timeout: 900_000, skip: hasTools ? false : 'needs root, iproute2 and nftables' }, () => {
  let cfgDir: string;
  let config: string;
  const servers: ChildProcess[] = [];

  const startMayfly = (args: string[]): ChildProcess =>
    spawn('ip', ['netns', 'exec', HOST, mayflyBin, '--data-dir', testDataDir(), '--config', config, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const mayfly = (args: string[]): Promise<CliResult> => collect(startMayfly(args));

  const serve = (ns: string, port: number, body: string) => {
    const code = `require('http').createServer((q, s) => s.end(${JSON.stringify(body + '\n')})).listen(${port}, () => console.log('listening'))`;
    const child = spawn('ip', ['netns', 'exec', ns, process.execPath, '-e', code], { stdio: ['ignore', 'pipe', 'inherit'] });
    servers.push(child);
    return new Promise<void>((resolve) => child.stdout!.once('data', () => resolve()));
  };

  function assertNoNetworkLeft(): void {
    assert.equal(inHost('ip', '-o', 'link', 'show', 'master', BRIDGE).trim(), '', 'no port is left on the bridge');
    assert.equal(inHost('ip', '-o', 'link', 'show', 'type', 'tun').trim(), '', 'no TAP is left');
    const rules = inHost('nft', 'list', 'ruleset');
    assert.doesNotMatch(rules, /comment "(vm|ct)-/, `no rule or set element names an instance:\n${rules}`);
    const ports = join(testDataDir(), 'network', 'ports');
    assert.deepEqual(existsSync(ports) ? readdirSync(ports) : [], [], 'no address is held');
  }

  function assertNothingLeft(): void {
    assert.deepEqual(instanceDirs(), [], 'no instance dir is left');
    assert.deepEqual(processesMentioning(join(testDataDir(), 'instances')), [], 'no qemu process is left');
    assertNoNetworkLeft();
  }

  before(async () => {
    await ensureImage();
    sh(['ip', 'netns', 'add', HOST]);
    sh(['ip', 'netns', 'add', UPLINK]);
    sh(['ip', '-n', HOST, 'link', 'set', 'lo', 'up']);
    sh(['ip', '-n', UPLINK, 'link', 'set', 'lo', 'up']);
    sh(['ip', 'link', 'add', 'mfbh0', 'netns', HOST, 'type', 'veth', 'peer', 'name', 'mfbu0', 'netns', UPLINK]);
    sh(['ip', '-n', HOST, 'addr', 'add', `${HOST_IP}/24`, 'dev', 'mfbh0']);
    sh(['ip', '-n', HOST, 'link', 'set', 'mfbh0', 'up']);
    sh(['ip', '-n', HOST, 'route', 'add', 'default', 'via', UPLINK_IP]);
    sh(['ip', '-n', UPLINK, 'addr', 'add', `${UPLINK_IP}/24`, 'dev', 'mfbu0']);
    sh(['ip', '-n', UPLINK, 'link', 'set', 'mfbu0', 'up']);
    // A cloud metadata endpoint, as far as the instance can tell.
    sh(['ip', '-n', UPLINK, 'addr', 'add', `${METADATA_IP}/32`, 'dev', 'lo']);
    sh(['ip', '-n', UPLINK, 'addr', 'add', `${OTHER_IP}/32`, 'dev', 'lo']);
    await serve(UPLINK, 8080, 'from the uplink');
    await serve(HOST, 8081, 'allowed host port');
    await serve(HOST, 8082, 'private host port');
    cfgDir = mkdtempSync('/var/tmp/mayfly-bridged-');
    config = join(cfgDir, 'config.toml');
    writeFileSync(config, `[network]\nbridge = "${BRIDGE}"\nsubnet = "10.77.0.0/24"\ndns = ["${UPLINK_IP}"]\nhost_ports = [8081]\n`);
  });

  after(async () => {
    // Machines first (they hold taps in the namespace), then the namespaces with all in them.
    await mayfly(['rm', '--all']).catch(() => undefined);
    for (const s of servers) s.kill('SIGKILL');
    for (const ns of [HOST, UPLINK]) sh(['ip', 'netns', 'del', ns], true);
    rmSync(join(testDataDir(), 'network'), { recursive: true, force: true });
    if (cfgDir) rmSync(cfgDir, { recursive: true, force: true });
  });

  test('an instance reaches the uplink, but not another instance, other host ports or the metadata address', async () => {
    // The controls: from the host namespace itself, everything the instance must not reach answers.
    assert.match(inHost('curl', '-s', '--max-time', '5', `http://${METADATA_IP}:8080/`), /from the uplink/);
    assert.match(inHost('curl', '-s', '--max-time', '5', `http://${HOST_IP}:8082/`), /private host port/);

    // The peer boots (the static address comes through fw_cfg) and is kept running.
    const peer = await mayfly(['run', '--keep', '--network', 'bridged', '--start', 'boot', '--', 'bash', '-c',
      `ip -4 -br addr show eth0; curl -s --max-time 10 http://${UPLINK_IP}:8080/`]);
    assert.equal(peer.code, 0, peer.stderr);
    assert.match(peer.stdout, /eth0 +UP +10\.77\.0\.\d+\/24/);
    assert.match(peer.stdout, /from the uplink/);
    const ps = JSON.parse((await mayfly(['ps', '--json'])).stdout) as { id: string; sshHost: string | null; sshPort: number }[];
    assert.equal(ps.length, 1);
    const peerIp = ps[0]!.sshHost!;
    assert.match(peerIp, /^10\.77\.0\.\d+$/, 'the state store records the bridged address');
    assert.equal(ps[0]!.sshPort, 22);
    // The host reaches the peer's sshd: what the instance is refused below is the rules' doing.
    assert.match(inHost('timeout', '5', 'bash', '-c', `exec 3<>/dev/tcp/${peerIp}/22; head -c 4 <&3`), /^SSH-/);
    // Another process finds it from the state store's record (as GitLab's later stages do).
    const attached = inHost(process.execPath, join(projectRoot, 'test/helpers/attach-exec.ts'), testDataDir(), ps[0]!.id, 'hostname');
    assert.equal(attached, `${ps[0]!.id}\n`);

    // The instance under test is restored from the snapshot template (the default start).
    const probe = (name: string, url: string) =>
      `if curl -s -o /dev/null --max-time 3 ${url}; then echo "${name} reached"; else echo "${name} blocked"; fi`;
    const script = [
      probe('uplink', `http://${UPLINK_IP}:8080/`),
      probe('other-internet', `http://${OTHER_IP}:8080/`),
      probe('metadata', `http://${METADATA_IP}:8080/`),
      probe('allowed-host-port', `http://${GATEWAY}:8081/`),
      probe('other-host-port', `http://${GATEWAY}:8082/`),
      probe('host-other-address', `http://${HOST_IP}:8082/`),
      `if timeout 3 bash -c 'exec 3<>/dev/tcp/${peerIp}/22'; then echo "peer reached"; else echo "peer blocked"; fi`,
      'grep -c nameserver /etc/resolv.conf',
    ].join('\n');
    const r = await mayfly(['--debug', 'run', '--network', 'bridged', '--', 'bash', '-c', script]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /"start":"restore"/, 'the instance was restored from the template');
    assert.equal(
      r.stdout,
      ['uplink reached', 'other-internet reached', 'metadata blocked', 'allowed-host-port reached', 'other-host-port blocked', 'host-other-address blocked', 'peer blocked', '1', ''].join('\n'),
    );

    const rm = await mayfly(['rm', ps[0]!.id]);
    assert.equal(rm.code, 0, rm.stderr);
    assertNothingLeft();
  });

  test('a bridged container: a veth with its own address; uplink reachable; a peer container, other host ports and the metadata address are not', async () => {
    await ensureImage('debian-12-container');
    const image = ['--image', 'debian-12-container'];
    // `ip netns exec` remounts /sys for the namespace, which hides the cgroup filesystem that
    // containers need: enter only the network namespace instead.
    const mayfly = (args: string[]): Promise<CliResult> =>
      collect(spawn('nsenter', [`--net=/run/netns/${HOST}`, mayflyBin, '--data-dir', testDataDir(), '--config', config, ...args], { stdio: ['ignore', 'pipe', 'pipe'] }));
    // The peer listens on a port; the host (the control) reaches it, the instance must not.
    const listener = `nohup perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalPort => 7000, Listen => 5, ReuseAddr => 1) or die; while ($c = $s->accept) { print $c "peer\\n"; close $c }' >/dev/null 2>&1 &`;
    const peer = await mayfly(['run', '--keep', '--network', 'bridged', ...image, '--', 'bash', '-c', `${listener} ip -4 -br addr show eth0; sleep 0.5`]);
    assert.equal(peer.code, 0, peer.stderr);
    const peerIp = /eth0(?:@\S+)? +UP +(10\.77\.0\.\d+)\/24/.exec(peer.stdout)?.[1];
    assert.ok(peerIp, `the peer has its address on eth0:\n${peer.stdout}`);
    assert.match(inHost('curl', '-s', '--max-time', '5', `telnet://${peerIp}:7000`), /peer/);

    const probe = (name: string, url: string) =>
      `if curl -s -o /dev/null --max-time 3 ${url}; then echo "${name} reached"; else echo "${name} blocked"; fi`;
    const script = [
      probe('uplink', `http://${UPLINK_IP}:8080/`),
      probe('metadata', `http://${METADATA_IP}:8080/`),
      probe('allowed-host-port', `http://${GATEWAY}:8081/`),
      probe('other-host-port', `http://${GATEWAY}:8082/`),
      `if timeout 3 bash -c 'exec 3<>/dev/tcp/${peerIp}/7000'; then echo "peer reached"; else echo "peer blocked"; fi`,
      'cat /etc/resolv.conf',
    ].join('\n');
    const r = await mayfly(['run', '--network', 'bridged', ...image, '--', 'bash', '-c', script]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(
      r.stdout,
      ['uplink reached', 'metadata blocked', 'allowed-host-port reached', 'other-host-port blocked', 'peer blocked', `nameserver ${UPLINK_IP}`, ''].join('\n'),
    );
    const ps = JSON.parse((await mayfly(['ps', '--json'])).stdout) as { id: string }[];
    const rm = await mayfly(['rm', ps[0]!.id]);
    assert.equal(rm.code, 0, rm.stderr);
    assertNothingLeft();
  });

  test('after a kill -9 of mayfly, `mayfly reap` removes the machine, its TAP and its rules', async () => {
    const child = startMayfly(['run', '--network', 'bridged', '--', 'sh', '-c', 'echo started; sleep 600']);
    const result = collect(child);
    let out = '';
    child.stdout!.on('data', (c: Buffer) => (out += c.toString()));
    await waitFor(() => out.includes('started'), 300_000, 'the command to start in the machine');
    child.kill('SIGKILL');
    await result;
    assert.notEqual(inHost('ip', '-o', 'link', 'show', 'master', BRIDGE).trim(), '', 'the killed run left its TAP');
    assert.match(inHost('nft', 'list', 'set', 'bridge', BRIDGE, 'ports'), /comment "vm-/, 'and its rules');

    const reap = await mayfly(['reap']);
    assert.equal(reap.code, 0, reap.stderr);
    assert.match(reap.stdout, /vm-[a-z2-7]+: removed/);
    await waitFor(() => processesMentioning(join(testDataDir(), 'instances')).length === 0, 20_000, 'the machine process to end');
    assertNothingLeft();
  });

  test('a bridged mayflyd pool: leased machines have their own address and the pool\'s egress allowlist; shutdown leaves no port behind', async () => {
    const socket = join(cfgDir, 'mayfly.sock');
    const daemonConfig = join(cfgDir, 'daemon.toml');
    writeFileSync(daemonConfig, [
      `[network]\nbridge = "${BRIDGE}"\ndns = ["${UPLINK_IP}"]\nhost_ports = [8081]`,
      `[daemon]\nsocket = "${socket}"\nreconcile_interval = 1`,
      '[[pool]]\nname = "bridged"\nimage = "debian-12"\nsize = "2cpu1024mb4gb"\nidle_count = 1\nmax_instances = 2\nnetwork = "bridged"',
      `egress_allow = ["${UPLINK_IP}/32"]`,
    ].join('\n') + '\n');
    const withConfig = (args: string[]) => spawn('ip', ['netns', 'exec', HOST, mayflyBin, '--data-dir', testDataDir(), '--config', daemonConfig, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    const daemon = withConfig(['daemon']);
    let log = '';
    daemon.stderr!.on('data', (c: Buffer) => (log += c.toString()));
    daemon.stdout!.on('data', (c: Buffer) => (log += c.toString()));
    const exited = collect(daemon);
    try {
      await waitFor(() => /"idle": 1\b/.test(spawnSync('ip', ['netns', 'exec', HOST, mayflyBin, '--data-dir', testDataDir(), '--config', daemonConfig, 'pool', 'ls', '--json'], { encoding: 'utf8' }).stdout), 180_000, `an idle bridged machine; daemon log:\n${log}`);
      const script = `ip -4 -br addr show eth0; curl -s --max-time 5 http://${UPLINK_IP}:8080/; curl -s --max-time 3 http://${OTHER_IP}:8080/ || echo "other-internet blocked"`;
      const r = await collect(withConfig(['run', '--pool', 'bridged', '--', 'bash', '-c', script]));
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stderr, /from pool bridged/);
      assert.match(r.stdout, /^eth0 +UP +10\.77\.0\.\d+\/24 *\nfrom the uplink\nother-internet blocked\n$/);
    } finally {
      daemon.kill('SIGTERM');
      await exited;
    }
    assertNothingLeft();
  });

  test('a subnet that overlaps a host route is refused before anything starts', async () => {
    const bad = join(cfgDir, 'overlap.toml');
    writeFileSync(bad, `[network]\nsubnet = "198.51.100.0/25"\n`);
    const r = await collect(spawn('ip', ['netns', 'exec', HOST, mayflyBin, '--data-dir', testDataDir(), '--config', bad, 'run', '--network', 'bridged', '--', 'true'], { stdio: ['ignore', 'pipe', 'pipe'] }));
    assert.equal(r.code, 125, r.stderr);
    assert.match(r.stderr, /network\.subnet 198\.51\.100\.0\/25 overlaps the host's route to 198\.51\.100\.0\/24 \(dev mfbh0\)/);
    assert.match(r.stderr, /choose a subnet that no network of this host uses/);
    assertNothingLeft();
  });

  test('network-down is refused while an instance is attached, then removes the bridge and both tables, and nothing else', async () => {
    // An attachment without a VM (the container path), so this test also runs alone.
    const api = (...args: string[]) => inHost(process.execPath, join(projectRoot, 'test/helpers/net-attach.ts'), testDataDir(), UPLINK_IP, ...args);
    assert.match(api('attach', 'ct-downtestaa', 'veth'), /"address":"10\.77\.0\.\d+"/);
    assert.match(inHost('nft', 'list', 'tables'), /table inet mayfly0\ntable bridge mayfly0/);
    const refused = await mayfly(['network-down']);
    assert.equal(refused.code, 1);
    assert.match(refused.stderr, /1 instance is still attached to mayfly0 \(ct-downtestaa\)/);
    api('detach', 'ct-downtestaa');
    const r = await mayfly(['network-down']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(inHost('nft', 'list', 'tables'), '');
    assert.equal(inHost('ip', '-o', 'link', 'show', 'type', 'bridge'), '');
    assert.match(inHost('ip', '-o', 'link', 'show', 'mfbh0'), /mfbh0/, 'the uplink veth is untouched');
  });
});
