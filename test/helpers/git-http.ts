import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync, chmodSync } from 'node:fs';
import { createServer, STATUS_CODES, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';

// Test fixtures for get_sources: local git repositories and a git smart-HTTP server in front of
// them (`git http-backend` run as a CGI program), protected by HTTP basic auth like GitLab's
// `gitlab-ci-token:<job token>` clone URLs.

const execFileP = promisify(execFile);

/** git with no system/global config of this machine, and a fixed identity and dates. */
function gitEnv(): NodeJS.ProcessEnv {
  return {
    ...process.env,
    GIT_CONFIG_NOSYSTEM: '1',
    GIT_CONFIG_GLOBAL: '/dev/null',
    GIT_AUTHOR_NAME: 'Mayfly Test',
    GIT_AUTHOR_EMAIL: 'test@mayfly.invalid',
    GIT_AUTHOR_DATE: '2024-01-01T00:00:00Z',
    GIT_COMMITTER_NAME: 'Mayfly Test',
    GIT_COMMITTER_EMAIL: 'test@mayfly.invalid',
    GIT_COMMITTER_DATE: '2024-01-01T00:00:00Z',
    GIT_TERMINAL_PROMPT: '0',
  };
}

async function git(args: string[], cwd?: string): Promise<string> {
  const { stdout } = await execFileP('git', args, { cwd, env: gitEnv(), maxBuffer: 64 * 1024 * 1024 });
  return stdout.trim();
}

export interface MakeRepoOptions {
  group?: string; // default 'group' (may contain slashes: 'a/b')
  project?: string; // default 'project'
  branch?: string; // default 'main'
  message?: string; // commit message, default 'test commit'
  executable?: string[]; // paths in `files` to commit with mode 755
}

export interface MadeRepo {
  bare: string; // <dir>/<group>/<project>.git
  sha: string; // the new commit
  ref: string; // the branch name
}

/**
 * Commits `files` (path → content) to `branch` of the bare repository `<dir>/<group>/<project>.git`,
 * creating it if needed; called again for the same repository it adds a commit on top.
 */
export async function makeRepo(dir: string, files: Record<string, string>, opts: MakeRepoOptions = {}): Promise<MadeRepo> {
  const group = opts.group ?? 'group';
  const project = opts.project ?? 'project';
  const branch = opts.branch ?? 'main';
  const bare = join(dir, group, `${project}.git`);
  const work = mkdtempSync(join(tmpdir(), 'mayfly-git-work-'));
  try {
    let fresh = !existsSync(bare);
    if (fresh) {
      mkdirSync(dirname(bare), { recursive: true });
      await git(['init', '-q', '--bare', bare]);
      await git(['symbolic-ref', 'HEAD', `refs/heads/${branch}`], bare);
    } else {
      const heads = await git(['for-each-ref', '--format=%(refname)', `refs/heads/${branch}`], bare);
      fresh = heads === '';
    }
    if (fresh) {
      await git(['init', '-q', work]);
      await git(['checkout', '-q', '-b', branch], work);
    } else {
      rmSync(work, { recursive: true, force: true });
      await git(['clone', '-q', '--branch', branch, bare, work]);
    }
    for (const [path, content] of Object.entries(files)) {
      const full = join(work, path);
      mkdirSync(dirname(full), { recursive: true });
      writeFileSync(full, content);
      if (opts.executable?.includes(path)) chmodSync(full, 0o755);
    }
    await git(['add', '-A'], work);
    await git(['commit', '-q', '--allow-empty', '-m', opts.message ?? 'test commit'], work);
    await git(['push', '-q', bare, `HEAD:refs/heads/${branch}`], work);
    const sha = await git(['rev-parse', 'HEAD'], work);
    return { bare, sha, ref: branch };
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

export interface GitServer {
  port: number;
  /** Requests received so far (all of them, including the 401 answers). */
  readonly requests: number;
  /** Requests that passed authentication and reached git http-backend. */
  readonly authorizedRequests: number;
  /** Method and URL of every request, in order. */
  readonly requestLog: string[];
  close(): Promise<void>;
}

/**
 * A git smart-HTTP server on 127.0.0.1 (random port) serving the repositories below `root`
 * (URL path = path below root), requiring HTTP basic auth with `auth`.
 */
export async function startGitServer(root: string, auth: { user: string; password: string }): Promise<GitServer> {
  const sockets = new Set<Socket>();
  const backends = new Set<ChildProcess>();
  const requestLog: string[] = [];
  let requests = 0;
  let authorizedRequests = 0;

  const handle = (req: IncomingMessage, res: ServerResponse): void => {
    requests++;
    requestLog.push(`${req.method} ${req.url}`);
    const user = checkAuth(req.headers.authorization, auth);
    if (user === undefined) {
      req.resume();
      res.writeHead(401, { 'WWW-Authenticate': 'Basic realm="git"', 'Content-Type': 'text/plain' });
      res.end('authentication required\n');
      return;
    }
    authorizedRequests++;
    const url = new URL(req.url ?? '/', 'http://localhost');
    const env: NodeJS.ProcessEnv = {
      PATH: process.env.PATH,
      HOME: process.env.HOME,
      GIT_CONFIG_NOSYSTEM: '1',
      GIT_CONFIG_GLOBAL: '/dev/null',
      GIT_PROJECT_ROOT: root,
      GIT_HTTP_EXPORT_ALL: '1',
      GATEWAY_INTERFACE: 'CGI/1.1',
      SERVER_PROTOCOL: `HTTP/${req.httpVersion}`,
      SERVER_SOFTWARE: 'mayfly-test-git-http',
      REQUEST_METHOD: req.method ?? 'GET',
      PATH_INFO: decodeURIComponent(url.pathname),
      QUERY_STRING: url.search.startsWith('?') ? url.search.slice(1) : url.search,
      REMOTE_USER: user,
      REMOTE_ADDR: req.socket.remoteAddress ?? '127.0.0.1',
      AUTH_TYPE: 'Basic',
    };
    if (req.headers['content-type'] !== undefined) env.CONTENT_TYPE = req.headers['content-type'];
    if (req.headers['content-length'] !== undefined) env.CONTENT_LENGTH = req.headers['content-length'];
    // CGI convention: every request header as HTTP_<NAME>. http-backend reads HTTP_CONTENT_ENCODING
    // (gzip request bodies) and HTTP_GIT_PROTOCOL (protocol v2) from there.
    for (const [name, value] of Object.entries(req.headers)) {
      if (value === undefined || name === 'authorization') continue;
      env[`HTTP_${name.toUpperCase().replace(/-/g, '_')}`] = Array.isArray(value) ? value.join(', ') : value;
    }

    const backend = spawn('git', ['http-backend'], { env, stdio: ['pipe', 'pipe', 'pipe'] });
    backends.add(backend);
    let stderr = '';
    backend.stderr!.on('data', (c: Buffer) => (stderr += c.toString('utf8')));
    backend.stdin!.on('error', () => {}); // the backend may answer without reading the whole body
    req.pipe(backend.stdin!);

    let head = Buffer.alloc(0);
    let headersDone = false;
    backend.stdout!.on('data', (chunk: Buffer) => {
      if (headersDone) {
        res.write(chunk);
        return;
      }
      head = Buffer.concat([head, chunk]);
      const parsed = parseCgiHead(head);
      if (!parsed) return;
      headersDone = true;
      res.writeHead(parsed.status, parsed.reason, parsed.headers);
      if (parsed.rest.length > 0) res.write(parsed.rest);
    });
    backend.on('error', (err) => {
      if (!res.headersSent) res.writeHead(500, { 'Content-Type': 'text/plain' });
      res.end(`git http-backend failed: ${err.message}\n`);
    });
    backend.on('close', (code) => {
      backends.delete(backend);
      if (!headersDone) {
        if (!res.headersSent) res.writeHead(500, { 'Content-Type': 'text/plain' });
        res.end(`git http-backend exited with ${code} before sending headers\n${stderr}`);
        return;
      }
      res.end();
    });
    res.on('close', () => {
      if (backend.exitCode === null && backend.signalCode === null) backend.kill('SIGKILL');
    });
  };

  const server = createServer(handle);
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as AddressInfo).port;

  return {
    port,
    get requests() {
      return requests;
    },
    get authorizedRequests() {
      return authorizedRequests;
    },
    requestLog,
    close: () =>
      new Promise<void>((resolve) => {
        for (const b of backends) b.kill('SIGKILL');
        server.close(() => resolve());
        server.closeAllConnections();
        for (const s of sockets) s.destroy();
      }),
  };
}

/** The user name when the Authorization header carries the expected basic credentials. */
function checkAuth(header: string | undefined, auth: { user: string; password: string }): string | undefined {
  if (!header) return undefined;
  const m = /^Basic\s+(\S+)$/i.exec(header);
  if (!m) return undefined;
  const decoded = Buffer.from(m[1]!, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon < 0) return undefined;
  const user = decoded.slice(0, colon);
  const password = decoded.slice(colon + 1);
  return user === auth.user && password === auth.password ? user : undefined;
}

interface CgiHead {
  status: number;
  reason: string;
  headers: Record<string, string | string[]>;
  rest: Buffer;
}

/** Splits a CGI response at the blank line; undefined while the header block is incomplete. */
function parseCgiHead(buf: Buffer): CgiHead | undefined {
  let end = -1;
  let sepLen = 0;
  for (let i = 0; i < buf.length; i++) {
    if (buf[i] !== 0x0a) continue;
    if (buf[i + 1] === 0x0a) {
      end = i;
      sepLen = 2;
      break;
    }
    if (buf[i + 1] === 0x0d && buf[i + 2] === 0x0a) {
      end = i;
      sepLen = 3;
      break;
    }
  }
  if (end < 0) return undefined;
  const text = buf.subarray(0, end).toString('latin1');
  let status = 200;
  let reason = 'OK';
  const headers: Record<string, string | string[]> = {};
  for (const raw of text.split('\n')) {
    const line = raw.replace(/\r$/, '');
    if (line === '') continue;
    const colon = line.indexOf(':');
    if (colon < 0) continue;
    const name = line.slice(0, colon).trim();
    const value = line.slice(colon + 1).trim();
    if (name.toLowerCase() === 'status') {
      const m = /^(\d{3})\s*(.*)$/.exec(value);
      if (m) {
        status = Number(m[1]);
        reason = m[2] || STATUS_CODES[status] || '';
      }
      continue;
    }
    const prev = headers[name];
    if (prev === undefined) headers[name] = value;
    else headers[name] = Array.isArray(prev) ? [...prev, value] : [prev, value];
  }
  return { status, reason, headers, rest: buf.subarray(end + sepLen) };
}
