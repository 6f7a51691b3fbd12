import { connect, type Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

// QEMU's own unix sockets (QMP, the restore agent's chardev) appear only once QEMU has set them
// up; the host connects with retries.

/** One connection attempt. */
export function connectUnix(path: string): Promise<Socket> {
  return new Promise<Socket>((resolve, reject) => {
    const s = connect(path);
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
}

/** Connects, retrying every `intervalMs` until `timeoutMs` has passed (then the last error). */
export async function connectUnixRetrying(path: string, timeoutMs: number, intervalMs = 20): Promise<Socket> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await connectUnix(path);
    } catch (e) {
      if (Date.now() > end) throw e;
      await sleep(intervalMs);
    }
  }
}
