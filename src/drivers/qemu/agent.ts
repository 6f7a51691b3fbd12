import { randomBytes } from 'node:crypto';
import type { MachineIdentity } from '../types.ts';
import { connectUnixRetrying } from './unix-socket.ts';

// The host's side of the guest's restore agent (images/guest/mayfly-guest-restore): right after
// a clone resumes from a template's memory state, its identity goes down a virtio-serial port as
// `key value` lines (the private key one line at a time, random bytes in hex), and the guest
// answers "restored ID" once sshd runs with it.

/** The message the guest reads; the time is taken at the last moment, the clock stood still since the save. */
export function identityMessage(identity: MachineIdentity, now = Date.now()): string {
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
    'end',
    '',
  ].join('\n');
}

/** Sends the identity and waits for the guest's acknowledgement. */
export async function sendIdentity(socketPath: string, identity: MachineIdentity, timeoutMs = 30_000): Promise<void> {
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
      sock.write(identityMessage(identity));
    });
  } finally {
    sock.destroy();
  }
}
