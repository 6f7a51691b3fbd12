import { randomBytes } from 'node:crypto';
import type { GuestNetwork, MachineIdentity } from '../types.ts';
import { connectUnixRetrying } from './unix-socket.ts';

// The host's side of the guest's restore agent (images/guest/mayfly-guest-restore): right after
// a clone resumes from a template's memory state, its identity goes down a virtio-serial port as
// `key value` lines (the private key one line at a time, random bytes in hex), and the guest
// answers "restored ID" once sshd runs with it.

/**
 * The guest's static network configuration as `net_*` lines: in the restore message, and as the
 * fw_cfg item `opt/mayfly/net` for a boot (mayfly-guest-init and mayfly-guest-restore read both).
 */
export function networkLines(n: GuestNetwork): string[] {
  const ipv4 = /^\d{1,3}(\.\d{1,3}){3}$/;
  for (const a of [n.address, n.gateway, ...n.dns]) if (!ipv4.test(a)) throw new Error(`'${a}' is not an IPv4 address`);
  if (!/^([0-9a-f]{2}:){5}[0-9a-f]{2}$/.test(n.mac)) throw new Error(`'${n.mac}' is not a MAC address`);
  return [`net_mac ${n.mac}`, `net_address ${n.address}/${n.prefixLength}`, `net_gateway ${n.gateway}`, ...n.dns.map((d) => `net_dns ${d}`)];
}

/** The message the guest reads; the time is taken at the last moment, the clock stood still since the save. */
export function identityMessage(identity: MachineIdentity, now = Date.now(), network?: GuestNetwork): string {
  const oneLine = (what: string, v: string) => {
    const t = v.trim();
    if (t.includes('\n')) throw new Error(`${what} must be one line`);
    return t;
  };
  for (const [what, v] of [['id', identity.id], ['hostname', identity.hostname]]) {
    if (!/^[a-z0-9][a-z0-9-]{0,62}$/.test(v!)) throw new Error(`the clone's ${what} '${v}' is not a host name`);
  }
  return [
    `id ${identity.id}`,
    `hostname ${identity.hostname}`,
    `machine_id ${randomBytes(16).toString('hex')}`,
    `time ${(now / 1000).toFixed(3)}`,
    `seed ${randomBytes(64).toString('hex')}`,
    ...identity.hostKey.privateKey.trim().split('\n').map((l) => `host_key_line ${l}`),
    `host_key_pub ${oneLine('the host public key', identity.hostKey.publicKey)}`,
    `authorized_key ${oneLine('the authorized key', identity.authorizedKey)}`,
    // The clone resumes with the template's (user-mode) address: a bridged clone gets its own.
    ...(network ? networkLines(network) : []),
    'end',
    '',
  ].join('\n');
}

/** Sends the identity and waits for the guest's acknowledgement. */
export async function sendIdentity(socketPath: string, identity: MachineIdentity, network?: GuestNetwork, timeoutMs = 30_000): Promise<void> {
  const sock = await connectUnixRetrying(socketPath, 5000);
  try {
    await new Promise<void>((resolve, reject) => {
      let seen = '';
      const timer = setTimeout(() => reject(new Error(`no answer from the guest's restore agent within ${timeoutMs / 1000} s`)), timeoutMs);
      sock.on('data', (c: Buffer) => {
        seen += c.toString('utf8');
        if (seen.includes(`restored ${identity.id}`)) {
          clearTimeout(timer);
          resolve();
        }
        const failed = /^failed (.*)$/m.exec(seen);
        if (failed) {
          clearTimeout(timer);
          reject(new Error(`the guest's restore agent failed: ${failed[1]}`));
        }
      });
      sock.on('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
      sock.on('close', () => {
        clearTimeout(timer);
        reject(new Error('the restore agent\'s port closed'));
      });
      sock.write(identityMessage(identity, Date.now(), network));
    });
  } finally {
    sock.destroy();
  }
}
