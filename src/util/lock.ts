import { mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { holderAlive } from './proc.ts';

// A lock between mayfly processes: a directory made with mkdir (atomic) holding the holder's
// pid. A lock whose holder is gone (pid reuse aware) is taken over, so a killed process never
// leaves a lock that blocks the next one for good.

export interface DirLockOptions {
  /** Give up waiting after this long: `timeout` makes the error, given the holder's pid (0: unknown). */
  timeoutMs: number;
  timeout: (holderPid: number) => Error;
  /** How often to look again while another process holds it. */
  pollMs: number;
  /** A lock dir still without a pid after this long belongs to a holder killed as it took it. */
  emptyStaleMs: number;
  signal?: AbortSignal;
  /** Asked after each wait; true ends the wait without the lock (what the holder made is there). */
  stopWaiting?: () => Promise<boolean>;
}

/** Takes the lock and returns its release, or undefined when `stopWaiting` ended the wait. */
export async function takeDirLock(lock: string, o: DirLockOptions): Promise<(() => void) | undefined> {
  const deadline = Date.now() + o.timeoutMs;
  for (;;) {
    o.signal?.throwIfAborted();
    try {
      mkdirSync(lock);
      writeFileSync(join(lock, 'pid'), String(process.pid));
      return () => rmSync(lock, { recursive: true, force: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    let holder = 0;
    let since = Date.now();
    try {
      holder = Number(readFileSync(join(lock, 'pid'), 'utf8')) || 0;
      since = statSync(lock).mtimeMs;
    } catch {
      // just released, or the holder has not written its pid yet
    }
    const stale = holder > 0 ? !holderAlive(holder, since) : Date.now() - since > o.emptyStaleMs;
    if (stale) rmSync(lock, { recursive: true, force: true });
    if (Date.now() > deadline) throw o.timeout(holder);
    if (!stale) await sleep(o.pollMs, undefined, { signal: o.signal }).catch(() => o.signal!.throwIfAborted());
    if (await o.stopWaiting?.()) return undefined;
  }
}
