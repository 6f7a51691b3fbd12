// Runs the network API in whatever network namespace it is started in (the tests start it with
// `ip netns exec`): `attach ID KIND [CIDR,…]` prints the attachment as JSON, `detach ID`.
import { defaultConfig } from '../../src/config/index.ts';
import { silentLogger } from '../../src/log.ts';
import { BridgedNetwork, networkSettings } from '../../src/network/index.ts';

const [dataDir, dns, op, id, kind, allow] = process.argv.slice(2);
const config = defaultConfig();
config.network.dns = [dns!];
const net = new BridgedNetwork({ dataDir: dataDir!, settings: networkSettings(config), log: silentLogger });
if (op === 'attach') {
  const a = await net.attachInstance({ id: id!, kind: kind as 'tap' | 'veth', ...(allow ? { egressAllow: allow.split(',') } : {}) });
  process.stdout.write(JSON.stringify(a) + '\n');
} else if (op === 'detach') {
  await net.detachInstance(id!);
} else {
  throw new Error(`unknown operation ${op}`);
}
