import { chmodSync, chownSync, existsSync, mkdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { timingSafeEqual } from 'node:crypto';
import { dirname } from 'node:path';
import { execFileSync } from 'node:child_process';
import Fastify, { type FastifyInstance, type FastifyReply } from 'fastify';
import { ErrorCode, MayflyError, errorText, isMayflyError } from '../errors.ts';
import { parseSizeLabel, namedSizes } from '../pool/sizes.ts';
import { version } from '../version.ts';
import { JOB_DISK_MODES } from '../config/schema.ts';
import type { JobDiskMode } from '../pool/index.ts';
import { poolJobDisk, type Daemon } from './service.ts';

// mayflyd's HTTP API: JSON in and out, validated; errors are JSON {code, message, hint}.
// Served on a unix socket (0660, root and socket_group) and, when configured, on TCP with a
// required bearer token.

interface LeaseBody {
  pool?: string;
  image?: string;
  size?: string;
  job?: Record<string, string>;
  timeout?: number;
  max_runtime?: number;
  /** A local client's pid: when that process is gone, the lease is released for it. */
  holder_pid?: number;
  /** Only a pool with this job_disk serves the lease. */
  job_disk?: JobDiskMode;
}

interface ExecBody {
  argv: string[];
  env?: Record<string, string>;
  cwd?: string;
  user?: 'job' | 'root';
  stdin?: string;
}

const errorSchema = { type: 'object', properties: { code: { type: 'string' }, message: { type: 'string' }, hint: { type: 'string' } } };

function statusFor(e: MayflyError): number {
  switch (e.code) {
    case ErrorCode.LEASE_NOT_FOUND:
    case ErrorCode.INSTANCE_NOT_FOUND:
    case ErrorCode.IMAGE_NOT_FOUND:
      return 404;
    case ErrorCode.POOL_TIMEOUT:
      return 503;
    case ErrorCode.LEASE_EXPIRED:
      return 410;
    case ErrorCode.SHUTTING_DOWN:
      return 503;
    default:
      return e.exitCode === 2 ? 400 : 500;
  }
}

export function buildApp(daemon: Daemon, opts: { token?: string } = {}): FastifyInstance {
  // No type coercion and no silent removal of unknown keys: bad input is refused, never guessed at.
  const app = Fastify({
    logger: false,
    // On shutdown, open event streams and waiting requests must not hold the daemon up.
    forceCloseConnections: true,
    bodyLimit: 256 * 1024 * 1024,
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false, allErrors: true } },
  });
  const engine = daemon.engine;

  if (opts.token) {
    const expected = Buffer.from(`Bearer ${opts.token}`);
    const valid = (given: string | undefined) => {
      const g = Buffer.from(given ?? '');
      return g.length === expected.length && timingSafeEqual(g, expected);
    };
    app.addHook('onRequest', async (req, reply) => {
      // The unix socket is protected by its file mode; TCP needs the token.
      if (req.socket.remoteAddress !== undefined && !valid(req.headers.authorization)) {
        await reply.code(401).send({ code: 'MAYFLY_ERR_UNAUTHORIZED', message: 'a valid bearer token is required (Authorization: Bearer TOKEN)' });
      }
    });
  }

  app.setErrorHandler(async (err, _req, reply) => {
    if (isMayflyError(err)) {
      return reply.code(statusFor(err)).send({ code: err.code, message: err.message, hint: err.hint });
    }
    const e = err as { validation?: unknown; statusCode?: number; message: string };
    if (e.validation || (e.statusCode && e.statusCode < 500)) {
      return reply.code(e.statusCode ?? 400).send({ code: 'MAYFLY_ERR_BAD_REQUEST', message: e.message });
    }
    daemon.log.error({ err: errorText(err) }, 'API request failed');
    return reply.code(500).send({ code: 'MAYFLY_ERR_INTERNAL', message: e.message });
  });
  app.setNotFoundHandler(async (req, reply) =>
    reply.code(404).send({ code: 'MAYFLY_ERR_NOT_FOUND', message: `no route ${req.method} ${req.url}; see the README's API section` }),
  );

  app.get('/v1/health', async () => ({ ok: true, version, pid: process.pid }));
  app.get('/v1/pools', async () => daemon.pools.status());
  app.get('/v1/instances', async () => engine.instances());
  app.get<{ Querystring: { all?: string } }>('/v1/leases', async (req) =>
    req.query.all === 'true' ? engine.state.listLeases() : engine.state.listLeases(['leased', 'expired']),
  );

  app.post<{ Body: LeaseBody }>(
    '/v1/leases',
    {
      schema: {
        body: {
          type: 'object',
          additionalProperties: false,
          properties: {
            pool: { type: 'string', minLength: 1 },
            image: { type: 'string', minLength: 1 },
            size: { type: 'string', minLength: 1 },
            job: { type: 'object', additionalProperties: { type: 'string' } },
            timeout: { type: 'number', minimum: 0, maximum: 86400 },
            max_runtime: { type: 'number', minimum: 0, maximum: 604800 },
            holder_pid: { type: 'integer', minimum: 1 },
            job_disk: { type: 'string', enum: [...JOB_DISK_MODES] },
          },
        },
        response: { 400: errorSchema },
      },
    },
    async (req, reply) => {
      const b = req.body;
      const pool = b.pool ?? matchPool(daemon, b.image, b.size, b.job_disk);
      if (b.pool && b.job_disk && poolJobDisk(daemon.engine.config, b.pool) !== b.job_disk) {
        throw new MayflyError(ErrorCode.USAGE, `pool ${b.pool} keeps job data ${poolJobDisk(daemon.engine.config, b.pool)}, not ${b.job_disk}`, {
          hint: 'pick a pool with that job_disk, or leave out --job-disk to take the pool\'s',
        });
      }
      const ac = new AbortController();
      // A client that hangs up while waiting gives up its place in the queue. (The request's own
      // 'close' fires once its body is read; the response's fires only on a real disconnect.)
      reply.raw.on('close', () => {
        if (!reply.raw.writableFinished) ac.abort(new MayflyError(ErrorCode.USAGE, 'the client went away'));
      });
      const lease = await daemon.pools.acquire({
        pool,
        job: b.job,
        timeoutMs: (b.timeout ?? 600) * 1000,
        maxRuntimeMs: b.max_runtime === undefined ? undefined : b.max_runtime * 1000,
        holderPid: b.holder_pid,
        signal: ac.signal,
      });
      const m = lease.machine;
      try {
        if (ac.signal.aborted || reply.raw.destroyed) throw ac.signal.reason ?? new Error('the client went away');
        m.setOwner(`lease ${lease.id}${b.job?.name ? `: ${b.job.name}` : ''}`);
      } catch (e) {
        // Nobody will ever release a lease its client did not receive.
        await daemon.pools.release(lease.id);
        throw e;
      }
      return reply.code(201).send({
        id: lease.id,
        pool: lease.pool,
        waited_ms: lease.leasedAt - lease.queuedAt,
        deadline: lease.deadline,
        instance: { id: m.id, image: `${m.image.name}:${m.image.version}`, cpus: m.size.cpus, memory: m.size.memoryMiB, disk: m.size.diskGiB },
      });
    },
  );

  // Only `holder_pid: null` for now: the lease outlives the process that took it.
  app.patch<{ Params: { id: string }; Body: { holder_pid: null } }>(
    '/v1/leases/:id',
    {
      schema: {
        body: { type: 'object', additionalProperties: false, required: ['holder_pid'], properties: { holder_pid: { type: 'null' } } },
        response: { 400: errorSchema },
      },
    },
    async (req) => {
      daemon.pools.detach(req.params.id);
      const l = daemon.pools.lease(req.params.id)!;
      return { id: l.id, holder_pid: null, deadline: l.deadline };
    },
  );

  app.delete<{ Params: { id: string } }>('/v1/leases/:id', async (req, reply) => {
    const expired = daemon.pools.isExpired(req.params.id);
    await daemon.pools.release(req.params.id);
    return reply.code(200).send({ released: req.params.id, expired });
  });

  app.post<{ Params: { id: string }; Body: ExecBody }>(
    '/v1/leases/:id/exec',
    {
      schema: {
        body: {
          type: 'object',
          additionalProperties: false,
          required: ['argv'],
          properties: {
            argv: { type: 'array', minItems: 1, items: { type: 'string' } },
            env: { type: 'object', additionalProperties: { type: 'string' } },
            cwd: { type: 'string' },
            user: { enum: ['job', 'root'] },
            stdin: { type: 'string', contentEncoding: 'base64' },
          },
        },
      },
    },
    async (req, reply) => {
      const lease = daemon.pools.lease(req.params.id);
      if (!lease) throw new MayflyError(ErrorCode.LEASE_NOT_FOUND, `no lease '${req.params.id}'`);
      if (daemon.pools.isExpired(lease.id)) {
        throw new MayflyError(ErrorCode.LEASE_EXPIRED, `lease ${lease.id} ran past its max runtime; its machine was killed`);
      }
      const ch = req.body.user === 'root' ? await lease.machine.root() : lease.machine.guest;
      streamExec(reply, (frame) => reply.raw.write(JSON.stringify(frame) + '\n'), async (signal) =>
        ch.exec(req.body.argv, {
          env: req.body.env,
          cwd: req.body.cwd,
          stdin: req.body.stdin === undefined ? undefined : Buffer.from(req.body.stdin, 'base64'),
          stdout: (c) => reply.raw.write(JSON.stringify({ stdout: c.toString('base64') }) + '\n'),
          stderr: (c) => reply.raw.write(JSON.stringify({ stderr: c.toString('base64') }) + '\n'),
          signal,
        }),
      );
      return reply;
    },
  );

  app.get<{ Querystring: { after?: string; last?: string; follow?: string } }>('/v1/events', async (req, reply) => {
    // `after=ID`: everything after that event (up to 1000); otherwise the newest `last` (default 100).
    const past =
      req.query.after !== undefined
        ? engine.state.events(Number(req.query.after) || 0)
        : engine.state.recentEvents(Math.min(10_000, Number(req.query.last) || 100));
    if (req.query.follow === undefined || req.query.follow === 'false') return past;
    // Server-sent events: what happened since `after`, then everything as it happens.
    reply.hijack();
    reply.raw.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
    const send = (e: { id: number }) => reply.raw.write(`id: ${e.id}\nevent: mayfly\ndata: ${JSON.stringify(e)}\n\n`);
    for (const e of past) send(e);
    const listener = (e: { id: number }) => send(e);
    daemon.events.on('event', listener);
    req.raw.on('close', () => daemon.events.off('event', listener));
    return reply;
  });

  app.get('/metrics', async (_req, reply) => {
    daemon.metrics.setPools(daemon.pools.status());
    return reply.type(daemon.metrics.registry.contentType).send(await daemon.metrics.registry.metrics());
  });

  return app;
}

/** Streams one command's output as NDJSON frames; a client that disconnects cancels the command. */
function streamExec(
  reply: FastifyReply,
  write: (frame: unknown) => void,
  run: (signal: AbortSignal) => Promise<{ exitCode: number; code: number | null; signal: string | null }>,
): void {
  const ac = new AbortController();
  reply.hijack();
  reply.raw.writeHead(200, { 'content-type': 'application/x-ndjson' });
  reply.raw.on('close', () => ac.abort(new Error('the client went away')));
  run(ac.signal)
    .then((r) => write({ exit: r }))
    .catch((e: unknown) => {
      if (!ac.signal.aborted) write({ error: { code: isMayflyError(e) ? e.code : 'MAYFLY_ERR_INTERNAL', message: errorText(e) } });
    })
    .finally(() => reply.raw.end());
}

/** The pool whose image and size match a request that names no pool. */
function matchPool(daemon: Daemon, image: string | undefined, size: string | undefined, jobDisk: JobDiskMode | undefined): string {
  const config = daemon.engine.config;
  const want = size === undefined ? undefined : parseSizeLabel(size, namedSizes(config.sizes));
  // A pool boots its image's newest version: it serves `NAME`, and `NAME:V` or an id only when
  // that is the version it boots now.
  const images = daemon.engine.images;
  const wantId = image === undefined || !/[:]|^(sha256:)?[0-9a-f]{8,}$/.test(image) ? undefined : images.resolve(image).id;
  const serves = (p: { image: string }) => {
    if (image === undefined) return true;
    if (wantId === undefined) return p.image === image;
    try {
      return images.resolve(p.image).id === wantId;
    } catch {
      return false;
    }
  };
  const candidates = daemon.pools.status().filter(
    (p) =>
      serves(p) &&
      (jobDisk === undefined || poolJobDisk(config, p.name) === jobDisk) &&
      (want === undefined || (p.size.cpus === want.cpus && p.size.memoryMiB === want.memoryMiB && p.size.diskGiB === want.diskGiB)),
  );
  if (candidates.length === 0) {
    throw new MayflyError(ErrorCode.NO_MATCHING_POOL, `no pool serves image ${image ?? '(any)'} with size ${size ?? '(any)'}${jobDisk ? ` and job_disk ${jobDisk}` : ''}`, {
      hint: `pools: ${daemon.pools.status().map((p) => `${p.name} (${p.image}, ${p.size.cpus}cpu/${p.size.memoryMiB}M/${p.size.diskGiB}G)`).join('; ') || 'none configured'}`,
    });
  }
  return candidates[0]!.name;
}

/** Listens on the unix socket (and TCP when configured); `close` stops both. */
export async function listen(app: FastifyInstance, daemon: Daemon): Promise<{ socket: string; tcp?: string; close: () => Promise<void> }> {
  const d = daemon.engine.config.daemon;
  mkdirSync(dirname(d.socket), { recursive: true, mode: 0o755 });
  if (existsSync(d.socket)) {
    if (await socketAnswers(d.socket)) {
      throw new MayflyError(ErrorCode.USAGE, `another mayflyd already listens on ${d.socket}`, { hint: 'stop it first, or set daemon.socket' });
    }
    rmSync(d.socket, { force: true });
  }
  // Created under a umask that never lets others in, then opened to the group.
  const umask = process.umask(0o117);
  try {
    await app.listen({ path: d.socket });
  } finally {
    process.umask(umask);
  }
  chmodSync(d.socket, 0o660);
  if (d.socket_group) {
    try {
      const gid = Number(execFileSync('getent', ['group', d.socket_group], { encoding: 'utf8' }).split(':')[2]);
      chownSync(d.socket, process.getuid?.() ?? 0, gid);
    } catch (e) {
      await app.close();
      throw new MayflyError(ErrorCode.CONFIG_INVALID, `cannot give group '${d.socket_group}' the socket ${d.socket}: ${errorText(e)}`, {
        hint: 'daemon.socket_group must name an existing group, and mayflyd must run as root to use it',
      });
    }
  }
  let tcpApp: FastifyInstance | undefined;
  if (d.listen) {
    const at = d.listen.lastIndexOf(':');
    tcpApp = buildApp(daemon, { token: readToken(d.token_file) });
    await tcpApp.listen({ host: d.listen.slice(0, at), port: Number(d.listen.slice(at + 1)) });
  }
  return {
    socket: d.socket,
    tcp: d.listen || undefined,
    close: async () => {
      await tcpApp?.close();
      await app.close();
      rmSync(d.socket, { force: true });
    },
  };
}

function readToken(file: string): string {
  if (!file) {
    throw new MayflyError(ErrorCode.CONFIG_INVALID, 'daemon.listen is set but daemon.token_file is empty: TCP clients must authenticate', {
      hint: 'write a long random token to a file readable only by root and set daemon.token_file to it',
    });
  }
  // A token others can read is no secret: refuse it rather than serve TCP with it.
  const mode = statSync(file).mode & 0o777;
  if (mode & 0o077) {
    throw new MayflyError(ErrorCode.CONFIG_INVALID, `daemon.token_file ${file} is readable by others (mode ${mode.toString(8).padStart(4, '0')})`, {
      hint: `chmod 600 ${file} (owned by the user mayflyd runs as)`,
    });
  }
  const token = readFileSync(file, 'utf8').trim();
  if (token.length < 16) throw new MayflyError(ErrorCode.CONFIG_INVALID, `the token in ${file} is shorter than 16 characters`);
  return token;
}

async function socketAnswers(path: string): Promise<boolean> {
  const { request } = await import('node:http');
  return new Promise((resolve) => {
    const r = request({ socketPath: path, path: '/v1/health', timeout: 1000 }, (res) => {
      res.resume();
      resolve(res.statusCode === 200);
    });
    r.on('error', () => resolve(false));
    r.on('timeout', () => {
      r.destroy();
      resolve(false);
    });
    r.end();
  });
}
