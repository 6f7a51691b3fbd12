import { randomBytes } from 'node:crypto';
import { connect, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import type { MachineIdentity } from '../types.ts';

// The host's side of the guest's restore agent (images/guest/mayfly-guest-restore): right after
// a clone resumes from a template's memory state, its identity goes down a virtio-serial port as
// `key value` lines, and the guest answers "restored ID" once sshd runs with it. Binary values
// are base64 so that every value is one word on one line.

/** The message the guest reads; the time is taken at the last moment, the clock stood still since the save. */
export function identityMessage(identity: MachineIdentity, now = Date.now()): string {
  const b64 = (s: string | Buffer) => Buffer.from(s).toString('base64');
  return [
    `id ${identity.id}`,
    `hostname ${identity.hostname}`,
    `machine_id ${randomBytes(16).toString('hex')}`,
    `time ${(now / 1000).toFixed(3)}`,
    `seed ${b64(randomBytes(64))}`,
    `host_key ${b64(identity.hostKey.privateKey)}`,
    `host_key_pub ${b64(identity.hostKey.publicKey)}`,
    `authorized_key ${b64(identity.authorizedKey + '\n')}`,
    'end',
    '',
  ].join('\n');
}

async function connectRetrying(path: string, timeoutMs: number): Promise<Socket> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<Socket>((resolve, reject) => {
        const s = connect(path);
        s.once('connect', () => resolve(s));
        s.once('error', reject);
      });
    } catch (e) {
      if (Date.now() > end) throw e;
      await sleep(20);
    }
  }
}

/** Sends the identity and waits for the guest's acknowledgement. */
export async function sendIdentity(socketPath: string, identity: MachineIdentity, timeoutMs = 30_000): Promise<void> {
  const sock = await connectRetrying(socketPath, 5000);
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
