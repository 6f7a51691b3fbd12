// Reaches a running machine from another process, as GitLab's later stages do (Engine.attach,
// from the state store's record), runs a command as root and prints its output. The tests start
// it with `ip netns exec` where the machine's network is.
import { defaultConfig } from '../../src/config/index.ts';
import { silentLogger } from '../../src/log.ts';
import { Engine } from '../../src/pool/index.ts';

const [dataDir, id, ...argv] = process.argv.slice(2);
const engine = new Engine({ dataDir: dataDir!, config: defaultConfig(), log: silentLogger });
const m = engine.attach(id!);
try {
  const ch = await m.channel('root');
  const r = await ch.exec(argv, { stdout: (c) => process.stdout.write(c) });
  process.exitCode = r.exitCode ?? 1;
} finally {
  m.close();
  engine.close();
}
