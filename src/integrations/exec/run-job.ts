import { existsSync, mkdtempSync, readFileSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join, relative, resolve, sep } from 'node:path';
import { spawn } from 'node:child_process';
import { PassThrough } from 'node:stream';
import { ErrorCode, MayflyError } from '../../errors.ts';
import type { Engine } from '../../pool/index.ts';
import { run, runChecked } from '../../util/exec.ts';
import { isValidEnvName, shellQuote } from '../../util/shell.ts';
import type { JobMachine } from '../job-machine.ts';
import { workspace } from '../local/run.ts';
import { parseCiFile, resolveJob, type CiJob } from './gitlab-ci.ts';
import { registerSecretsFromEnv } from '../../secrets.ts';
import { expandVariables, refSlug } from './variables.ts';

// `mayfly exec JOB`: one job of a .gitlab-ci.yml, run locally in a fresh machine with a copy
// of the current git working tree, the way the removed `gitlab-runner exec` did.

export interface ExecJobRequest {
  job: string;
  file: string;
  /** Overrides the job's image. */
  image?: string;
  /** --var K=V: win over everything else. */
  vars?: Record<string, string>;
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
  signal?: AbortSignal;
}

interface Repo {
  root: string;
  name: string;
  sha: string;
  branch: string;
  title: string;
}

export interface PreparedJob {
  job: CiJob;
  repo: Repo;
  stage: string;
  warnings: string[];
}

/** Parses and resolves everything that can fail before a machine is started. */
export async function prepareJob(req: { job: string; file: string }): Promise<PreparedJob> {
  const file = resolve(req.file);
  if (!existsSync(file)) {
    throw new MayflyError(ErrorCode.CI_FILE_NOT_FOUND, `no CI file at ${file}`, {
      hint: 'run mayfly exec in the repository root, or point at the file with --file PATH',
    });
  }
  const repo = await gitRepo(dirname(file));
  const ci = parseCiFile(readFileSync(file, 'utf8'), relative(process.cwd(), file) || basename(file), {
    readLocal: (p) => readFileSync(insideRepo(repo.root, p), 'utf8'),
  });
  const job = resolveJob(ci, req.job);
  const jobConfig = ci.config[req.job] as { stage?: unknown } | undefined;
  const stage = typeof jobConfig?.stage === 'string' ? jobConfig.stage : 'test';
  const warnings = [...ci.warnings];
  if (job.ignoredKeywords.length > 0) {
    warnings.push(`job "${job.name}" uses keywords mayfly exec does not run: ${job.ignoredKeywords.join(', ')}`);
  }
  return { job, repo, stage, warnings };
}

/**
 * A local include's real path, refused when it leaves the repository (`../`, or a symlink out):
 * mayfly runs as root and a CI file is not trusted to read the host's files.
 */
function insideRepo(root: string, path: string): string {
  const realRoot = realpathSync(root);
  let real: string;
  try {
    real = realpathSync(resolve(realRoot, path));
  } catch {
    throw new MayflyError(ErrorCode.CI_FILE_INVALID, `include: local file '${path}' does not exist in the repository`);
  }
  if (real !== realRoot && !real.startsWith(realRoot + sep)) {
    throw new MayflyError(ErrorCode.CI_FILE_INVALID, `include: local file '${path}' is outside the repository`, {
      hint: 'local includes must name files inside the repository, as in GitLab',
    });
  }
  return real;
}

async function gitRepo(dir: string): Promise<Repo> {
  const top = await run('git', ['-C', dir, 'rev-parse', '--show-toplevel']);
  if (top.code !== 0) {
    throw new MayflyError(ErrorCode.NOT_A_GIT_REPO, `${dir} is not inside a git repository`, {
      hint: 'mayfly exec copies the git working tree into the machine; run it in a git checkout (git init works too)',
    });
  }
  const root = top.stdout.trim();
  const git = async (...args: string[]) => (await run('git', ['-C', root, ...args])).stdout.trim();
  return {
    root,
    name: basename(root),
    sha: (await git('rev-parse', '--verify', '-q', 'HEAD')) || '0000000000000000000000000000000000000000',
    branch: (await git('rev-parse', '--abbrev-ref', 'HEAD')) || 'main',
    title: await git('log', '-1', '--format=%s'),
  };
}

/** The predefined variables that make sense for a local run. */
export function predefinedVariables(p: PreparedJob, image: string): Record<string, string> {
  const projectDir = `${workspace}/${p.repo.name}`;
  return {
    CI: 'true',
    GITLAB_CI: 'true',
    CI_SERVER: 'yes',
    CI_BUILDS_DIR: workspace,
    CI_PROJECT_DIR: projectDir,
    CI_PROJECT_NAME: p.repo.name,
    CI_JOB_NAME: p.job.name,
    CI_JOB_NAME_SLUG: refSlug(p.job.name),
    CI_JOB_STAGE: p.stage,
    CI_JOB_ID: String(Date.now() % 1_000_000_000),
    CI_JOB_IMAGE: p.job.image ?? image,
    CI_COMMIT_SHA: p.repo.sha,
    CI_COMMIT_SHORT_SHA: p.repo.sha.slice(0, 8),
    CI_COMMIT_REF_NAME: p.repo.branch,
    CI_COMMIT_BRANCH: p.repo.branch,
    CI_COMMIT_REF_SLUG: refSlug(p.repo.branch),
    CI_COMMIT_TITLE: p.repo.title,
  };
}

/** A bash script that exports the variables, enters the project and runs each line echoed, like the runner. */
export function jobScript(env: Record<string, string>, lines: readonly string[], failFast: boolean): string {
  // Names are written into the script unquoted; one that is not an identifier could run code.
  const bad = Object.keys(env).find((k) => !isValidEnvName(k));
  if (bad !== undefined) {
    throw new MayflyError(ErrorCode.CI_FILE_INVALID, `'${bad}' is not a valid variable name`, {
      hint: 'variable names are letters, digits and _, not starting with a digit',
    });
  }
  const out = ['#!/usr/bin/env bash', failFast ? 'set -eo pipefail' : 'set +e'];
  for (const [k, v] of Object.entries(env)) out.push(`export ${k}=${shellQuote(v)}`);
  out.push('cd "$CI_PROJECT_DIR"');
  for (const line of lines) {
    out.push(`printf '\\033[32m$ %s\\033[0m\\n' ${shellQuote(line.split('\n')[0]!)}`);
    out.push(line);
  }
  return out.join('\n') + '\n';
}

/** `obtain` gives the job its machine: booted here, or leased from mayflyd's pool. */
export async function execJob(
  engine: Engine,
  req: ExecJobRequest,
  obtain: (image: string, owner: string) => Promise<JobMachine>,
): Promise<number> {
  const p = await prepareJob(req);
  const say = (s: string) => req.stderr.write(`mayfly exec: ${s}\n`);
  for (const w of p.warnings) say(`warning: ${w}`);

  const imageRef = pickImage(engine, p.job.image, req.image, say);
  const vars = expandVariables({ ...p.job.variables, ...req.vars }, predefinedVariables(p, imageRef));
  // Variables named like secrets (…_TOKEN, …_PASSWORD, …) never reach mayfly's log or state.
  registerSecretsFromEnv(vars);
  const mainScript = jobScript(vars, [...p.job.beforeScript, ...p.job.script], true); // validates names before a boot
  say(`job "${p.job.name}" (stage ${p.stage}) from ${p.job.file} in a fresh ${imageRef} machine`);

  const machine = await obtain(imageRef, `exec: ${p.job.name}`);
  try {
    say(`machine ${machine.id} (${machine.image}) ${machine.origin}`);
    await copyWorkingTree(p.repo.root, machine, vars.CI_PROJECT_DIR!, req.signal);
    const out = { stdout: (c: Buffer) => req.stdout.write(c), stderr: (c: Buffer) => req.stderr.write(c), signal: req.signal };

    const main = await runStep(machine, 'script', mainScript, out);
    if (p.job.afterScript.length > 0) {
      say('running after_script');
      const status = main === 0 ? 'success' : 'failed';
      const after = await runStep(machine, 'after_script', jobScript({ ...vars, CI_JOB_STATUS: status }, p.job.afterScript, true), out);
      if (after !== 0) say(`warning: after_script failed with exit code ${after} (it does not change the job's result)`);
    }
    say(main === 0 ? 'job succeeded' : `job failed: exit code ${main}`);
    return main;
  } finally {
    await machine.release();
  }
}

/** Writes the step's script into the machine and runs it, in one round trip. */
async function runStep(
  machine: JobMachine,
  name: string,
  script: string,
  out: { stdout: (c: Buffer) => void; stderr: (c: Buffer) => void; signal?: AbortSignal },
): Promise<number> {
  // The script holds the job's variables, secrets included: it goes to the guest's RAM
  // (/dev/shm, else /tmp), 0600, and its name is removed before bash runs it (bash reads it
  // through the open descriptor), so it never reaches the machine's disk, even with job_disk =
  // "plain". cat takes the script from stdin up to its end; bash then runs it with that (empty) stdin.
  const wrapper = `umask 077 && d=/dev/shm && { [ -d "$d" ] && [ -w "$d" ] || d=/tmp; } && f=$(mktemp "$d/.mayfly-$1.XXXXXX") && cat > "$f" && exec 3< "$f" && rm -f "$f" && exec bash /dev/fd/3`;
  const argv = ['sh', '-c', wrapper, 'sh', name];
  return (await machine.exec(argv, { ...out, stdin: Buffer.from(script) })).exitCode;
}

/**
 * The job's image when it names a mayfly image, else the default with a note. Container image
 * names such as `ruby:3.3` cannot run as VMs; they are reported, not guessed at.
 */
function pickImage(engine: Engine, jobImage: string | undefined, override: string | undefined, say: (s: string) => void): string {
  if (override) return override;
  const fallback = engine.config.defaults.image;
  if (!jobImage) return fallback;
  try {
    const img = engine.images.resolve(jobImage);
    return `${img.name}:${img.version}`;
  } catch (e) {
    if (!(e instanceof MayflyError && e.code === ErrorCode.IMAGE_NOT_FOUND)) throw e;
    say(`note: the job's image "${jobImage}" is not a mayfly image; using ${fallback} (choose one with --image)`);
    return fallback;
  }
}

/** Tracked and untracked-but-not-ignored files, plus .git, streamed as a tar into the machine. */
async function copyWorkingTree(root: string, machine: JobMachine, dest: string, signal?: AbortSignal): Promise<void> {
  const ls = await runChecked('git', ['-C', root, 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], {
    code: ErrorCode.NOT_A_GIT_REPO,
  });
  const files = ls.stdout.split('\0').filter((f) => f && existsSync(join(root, f)));
  if (existsSync(join(root, '.git'))) files.push('.git');
  const tmp = mkdtempSync(join(tmpdir(), 'mayfly-exec-'));
  const list = join(tmp, 'files');
  writeFileSync(list, files.join('\0'));
  try {
    const tar = spawn('tar', ['-C', root, '--null', '-T', list, '-cf', '-'], { stdio: ['ignore', 'pipe', 'pipe'] });
    const tarErr: Buffer[] = [];
    tar.stderr.on('data', (c: Buffer) => tarErr.push(c));
    const tarDone = new Promise<number>((res) => {
      tar.on('error', (e) => {
        tarErr.push(Buffer.from(e.message));
        res(127);
      });
      tar.on('close', (c) => res(c ?? 1));
    });
    const unpackErr: Buffer[] = [];
    // Held in a PassThrough from the start: Node drains an unread child stdout when the child
    // exits, which a small tree's tar does before the remote command is ready to read it.
    const archive = tar.stdout.pipe(new PassThrough({ highWaterMark: 4 << 20 }));
    let r: { exitCode: number };
    try {
      r = await machine.exec(['sh', '-c', 'mkdir -p "$1" && tar -x -C "$1" -f -', 'sh', dest], {
        stdin: archive,
        stderr: (c) => unpackErr.push(c),
        signal,
      });
    } finally {
      // If the unpacking side stopped early nobody reads the archive any more: the local tar
      // would block on a full pipe forever.
      tar.stdout.unpipe();
      archive.destroy();
      if (tar.exitCode === null && tar.signalCode === null) tar.kill('SIGKILL');
    }
    const tarCode = await tarDone;
    if (tarCode !== 0 || r.exitCode !== 0) {
      const why = Buffer.concat([...tarErr, ...unpackErr]).toString().trim();
      throw new MayflyError(
        ErrorCode.GUEST_CHANNEL,
        `copying the working tree into the machine failed (tar exit ${tarCode}, unpack exit ${r.exitCode})${why ? `: ${why}` : ''}`,
      );
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}
