import type { Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCode, MayflyError } from '../../errors.ts';
import { connectUnix } from './unix-socket.ts';

// A QMP client (QEMU's JSON machine protocol on a unix socket): greeting, capabilities
// negotiation, then one command at a time, each answered by a `return` or an `error` with the
// same id; asynchronous events in between are ignored. Small enough to own: the npm QMP
// clients are unmaintained, and mayfly needs only a handful of commands.

type Pending = { resolve: (v: unknown) => void; reject: (e: Error) => void };

export class Qmp {
  #sock: Socket;
  #buf = '';
  #next = 1;
  #pending = new Map<number, Pending>();
  #greeting: Promise<void>;
  #closedError: Error | undefined;

  private constructor(sock: Socket) {
    this.#sock = sock;
    let greeted: () => void;
    let failed: (e: Error) => void;
    this.#greeting = new Promise((res, rej) => {
      greeted = res;
      failed = rej;
    });
    sock.on('data', (chunk: Buffer) => {
      this.#buf += chunk.toString('utf8');
      let nl: number;
      while ((nl = this.#buf.indexOf('\n')) >= 0) {
        const line = this.#buf.slice(0, nl).trim();
        this.#buf = this.#buf.slice(nl + 1);
        if (!line) continue;
        let msg: { QMP?: unknown; return?: unknown; error?: { class: string; desc: string }; id?: number };
        try {
          msg = JSON.parse(line);
        } catch {
          continue;
        }
        if (msg.QMP) greeted();
        else if (msg.id !== undefined && this.#pending.has(msg.id)) {
          const p = this.#pending.get(msg.id)!;
          this.#pending.delete(msg.id);
          if (msg.error) p.reject(new Error(`${msg.error.class}: ${msg.error.desc}`));
          else p.resolve(msg.return);
        }
      }
    });
    const onEnd = (e?: Error) => {
      this.#closedError ??= e ?? new Error('QEMU closed the QMP connection');
      failed(this.#closedError);
      for (const p of this.#pending.values()) p.reject(this.#closedError);
      this.#pending.clear();
    };
    sock.on('error', onEnd);
    sock.on('close', () => onEnd());
  }

  /** Connects (retrying while QEMU creates the socket) and negotiates capabilities. */
  static async connect(path: string, timeoutMs = 10_000): Promise<Qmp> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      let q: Qmp | undefined;
      try {
        q = new Qmp(await connectUnix(path));
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([
          q.#greeting,
          new Promise((_, reject) => (timer = setTimeout(() => reject(new Error('no QMP greeting within 10 s')), 10_000))),
        ]).finally(() => clearTimeout(timer));
        await q.command('qmp_capabilities');
        return q;
      } catch (e) {
        // QEMU serves one monitor client at a time: let go before trying again.
        q?.close();
        if (Date.now() > end) {
          throw new MayflyError(ErrorCode.MACHINE_START_FAILED, `cannot talk to QEMU over QMP at ${path}: ${(e as Error).message}`);
        }
        await sleep(50);
      }
    }
  }

  /** One command; a QEMU that does not answer within `timeoutMs` is given up on (the connection closes). */
  command<T = unknown>(execute: string, args?: Record<string, unknown>, timeoutMs = 60_000): Promise<T> {
    if (this.#closedError) return Promise.reject(this.#closedError);
    const id = this.#next++;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new Error(`QEMU did not answer ${execute} within ${timeoutMs / 1000} s`));
        this.close();
      }, timeoutMs);
      const settle = <A>(f: (a: A) => void) => (a: A) => {
        clearTimeout(timer);
        f(a);
      };
      this.#pending.set(id, { resolve: settle(resolve as (v: unknown) => void), reject: settle(reject) });
      this.#sock.write(JSON.stringify({ execute, ...(args ? { arguments: args } : {}), id }) + '\n');
    });
  }

  /** Polls query-migrate until the migration ends; returns its final status, with the error if it failed. */
  async waitMigration(timeoutMs: number): Promise<{ status: string; error?: string }> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const r = await this.command<{ status?: string; 'error-desc'?: string }>('query-migrate');
      const status = r.status ?? 'none';
      if (status === 'completed') return { status };
      if (status === 'failed' || status === 'cancelled') return { status, error: r['error-desc'] };
      if (Date.now() > end) return { status, error: `still ${status} after ${timeoutMs / 1000} s` };
      await sleep(20);
    }
  }

  close(): void {
    this.#sock.destroy();
  }
}
