import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ErrorCode, MayflyError } from '../errors.ts';
import { containerTarget } from '../drivers/nspawn/index.ts';
import { NsenterChannel, SshChannel, type GuestChannel } from '../guest/index.ts';
import type { Image } from '../images/store.ts';
import type { InstanceRecord } from '../state/index.ts';

// A running machine that another process created and handed over (Machine.handOver): a GitLab
// job's prepare boots it, each later stage reaches it from its own process through the keys
// kept in the instance dir.

export interface AttachedMachine {
  readonly record: InstanceRecord;
  readonly image: Image;
  /** A connection as `user` ('root' or the image's job user), opened on first use and kept. */
  channel(user: string): Promise<GuestChannel>;
  /** undefined while the machine's process runs; why it is gone otherwise. */
  deadReason(): string | undefined;
  close(): void;
}

export function attachInstance(
  rec: InstanceRecord,
  image: Image,
  deadReason: () => string | undefined,
): AttachedMachine {
  const container = rec.driver === 'nspawn';
  if ((rec.sshPort === null && !container) || rec.pid === null) {
    throw new MayflyError(ErrorCode.GUEST_CHANNEL, `machine ${rec.id} never finished starting (state ${rec.state})`);
  }
  const pid = rec.pid;
  let privateKey: string;
  let hostKey: string;
  try {
    privateKey = readFileSync(join(rec.dir, 'id_ed25519'), 'utf8');
    hostKey = readFileSync(join(rec.dir, 'known_host_key.pub'), 'utf8').trim();
  } catch (e) {
    throw new MayflyError(ErrorCode.GUEST_CHANNEL, `the keys of machine ${rec.id} are gone from ${rec.dir}: ${(e as Error).message}`, {
      hint: 'the machine was removed (mayfly rm, the reaper, or a cleanup); the job cannot continue on it',
    });
  }
  const channels = new Map<string, Promise<GuestChannel>>();
  return {
    record: rec,
    image,
    deadReason,
    channel(user) {
      const open = channels.get(user);
      if (open) {
        return open.then((c) => {
          if (!c.closed) return c;
          channels.delete(user);
          return this.channel(user);
        });
      }
      const p: Promise<GuestChannel> = container
        ? NsenterChannel.open(containerTarget(pid, rec.dir), user)
        : // User-mode networking forwards the guest's SSH port on the host's loopback; a bridged
          // guest is reached at its own address.
          SshChannel.connectOnce({ host: rec.sshHost ?? '127.0.0.1', port: rec.sshPort!, user, privateKey, hostKey }, 20_000);
      channels.set(user, p);
      p.catch(() => channels.delete(user));
      return p;
    },
    close() {
      for (const p of channels.values()) p.then((c) => c.close(), () => {});
      channels.clear();
    },
  };
}
