import { request, type IncomingMessage } from 'node:http';
import { ErrorCode, MayflyError } from '../errors.ts';
import type { ExecResult } from '../guest/index.ts';

// The CLI's side of mayflyd's API, over the unix socket.

export class DaemonClient {
  readonly socket: string;

  constructor(socket: string) {
    this.socket = socket;
  }

  /** A client when a daemon answers on the socket, undefined otherwise. */
  static async find(socket: string): Promise<DaemonClient | undefined> {
    const c = new DaemonClient(socket);
    try {
      await c.call('GET', '/v1/health', undefined, 2000);
      return c;
    } catch {
      return undefined;
    }
  }

  #open(method: string, path: string, body: unknown, timeoutMs?: number, signal?: AbortSignal): Promise<IncomingMessage> {
    return new Promise((resolve, reject) => {
      const data = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
      const req = request(
        {
          socketPath: this.socket,
          method,
          path,
          headers: data ? { 'content-type': 'application/json', 'content-length': data.length } : {},
          // No agent: the global one closes sockets idle for 5 s, and a lease request may wait
          // minutes for a machine, an exec stream for a silent command even longer.
          agent: false,
          signal,
        },
        resolve,
      );
      if (timeoutMs !== undefined) {
        req.setTimeout(timeoutMs, () => req.destroy(new Error(`mayflyd did not answer within ${timeoutMs} ms`)));
      }
      req.on('error', (e) =>
        reject(signal?.aborted ? signal.reason : new MayflyError(ErrorCode.DAEMON, `cannot talk to mayflyd at ${this.socket}: ${e.message}`)),
      );
      req.end(data);
    });
  }

  /** One JSON request; an error answer becomes the MayflyError the daemon described. */
  async call<T>(method: string, path: string, body?: unknown, timeoutMs?: number, signal?: AbortSignal): Promise<T> {
    const res = await this.#open(method, path, body, timeoutMs, signal);
    const json = await readJson(res);
    if ((res.statusCode ?? 500) >= 400) throw daemonError(res, json);
    return json as T;
  }

  /** Runs a command in a leased machine through the daemon's open connection, streaming output. */
  async exec(
    leaseId: string,
    body: { argv: string[]; env?: Record<string, string>; cwd?: string; user?: 'job' | 'root'; stdin?: string },
    out: { stdout: (c: Buffer) => void; stderr: (c: Buffer) => void; signal?: AbortSignal },
  ): Promise<ExecResult> {
    const res = await this.#open('POST', `/v1/leases/${encodeURIComponent(leaseId)}/exec`, body, undefined, out.signal);
    if ((res.statusCode ?? 500) >= 400) throw daemonError(res, await readJson(res));
    let partial = '';
    let result: ExecResult | undefined;
    let failure: MayflyError | undefined;
    for await (const chunk of res) {
      partial += (chunk as Buffer).toString('utf8');
      const lines = partial.split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) {
        if (!line) continue;
        const f = JSON.parse(line) as { stdout?: string; stderr?: string; exit?: ExecResult; error?: { code: string; message: string } };
        if (f.stdout !== undefined) out.stdout(Buffer.from(f.stdout, 'base64'));
        else if (f.stderr !== undefined) out.stderr(Buffer.from(f.stderr, 'base64'));
        else if (f.exit) result = f.exit;
        else if (f.error) failure = new MayflyError(f.error.code, f.error.message);
      }
    }
    if (failure) throw failure;
    if (!result) throw new MayflyError(ErrorCode.DAEMON, 'mayflyd ended the command without an exit status (did it stop?)');
    return result;
  }

  /** Server-sent events from `after` on; calls `onEvent` for each until the signal aborts. */
  async follow(after: number | undefined, onEvent: (e: unknown) => void, signal?: AbortSignal): Promise<void> {
    const from = after === undefined ? 'last=10' : `after=${after}`;
    const res = await this.#open('GET', `/v1/events?follow=true&${from}`, undefined, undefined, signal);
    let buf = '';
    try {
      for await (const chunk of res) {
        buf += (chunk as Buffer).toString('utf8');
        let i: number;
        while ((i = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const data = block.split('\n').find((l) => l.startsWith('data: '));
          if (data) onEvent(JSON.parse(data.slice(6)));
        }
      }
    } catch (e) {
      if (!signal?.aborted) throw e;
    }
  }
}

async function readJson(res: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  for await (const c of res) chunks.push(c as Buffer);
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? (JSON.parse(text) as unknown) : undefined;
}

/** The MayflyError a daemon's error answer describes ({code, message, hint}). */
function daemonError(res: IncomingMessage, json: unknown): MayflyError {
  const e = json as { code?: string; message?: string; hint?: string } | undefined;
  return new MayflyError(e?.code ?? ErrorCode.DAEMON, e?.message ?? `mayflyd answered ${res.statusCode}`, { hint: e?.hint });
}
