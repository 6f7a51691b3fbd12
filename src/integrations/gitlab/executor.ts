import { readFileSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import type { Config } from '../../config/index.ts';
import { DaemonClient } from '../../daemon/client.ts';
import type { MachineSize } from '../../drivers/index.ts';
import { ErrorCode, MayflyError, errorText, isMayflyError } from '../../errors.ts';
import type { Logger } from '../../log.ts';
import type { Engine } from '../../pool/index.ts';
import { checkSize, hostLimits, namedSizes, parseSizeLabel } from '../../pool/sizes.ts';
import { version } from '../../version.ts';
import { leaseJobMachine, localJobMachine, type JobMachine } from '../job-machine.ts';
import { executorEnv, gitlabJobId, jobTimeoutSeconds, type ExecutorEnv } from './executor-env.ts';
import { chooseImage } from './image-choice.ts';
import { integration, jobMachine, jobOwner, releaseJob } from './job.ts';
import { runStage } from './stage.ts';

// The four execs of gitlab-runner's custom executor (protocol reference:
// ../shared/protocols/gitlab-custom-executor.md). Each returns the exit code the runner
// expects; what the job log should show goes to `out`/`err`.

export interface ExecutorDeps {
  config: Config;
  log: Logger;
  engine(): Engine;
  out: (s: string) => void;
  err: (s: string) => void;
  env?: NodeJS.ProcessEnv;
}

/** config_exec: exactly one JSON document on stdout, nothing else. */
export function gitlabConfig(config: Config): string {
  return JSON.stringify({
    builds_dir: config.gitlab.builds_dir,
    cache_dir: config.gitlab.cache_dir,
    // Every job has a machine of its own: no need for per-runner subdirectories.
    builds_dir_is_shared: false,
    hostname: hostname(),
    driver: { name: 'mayfly', version },
    shell: 'bash',
  });
}

/** How a failure is reported to the runner: a problem with the job's own input is a build failure (no retry). */
function failure(e: unknown, env: ExecutorEnv, d: ExecutorDeps): number {
  const text = isMayflyError(e) ? `${e.message}${e.hint ? `\n  hint: ${e.hint}` : ''}` : errorText(e);
  const build = isMayflyError(e) && e.code === ErrorCode.SIZE_INVALID;
  d.err(`mayfly: ${build ? 'error' : 'system failure'}: ${text}\n`);
  return build ? env.buildFailureExitCode : env.systemFailureExitCode;
}

// Used only when the environment itself cannot be read: the runner's codes today.
const fallbackEnv: ExecutorEnv = { buildFailureExitCode: 1, systemFailureExitCode: 2, buildExitCodeFile: undefined, job: () => undefined };

export interface PrepareOptions {
  pool?: string;
  defaultImage?: string;
  signal: AbortSignal;
}

export async function gitlabPrepare(d: ExecutorDeps, o: PrepareOptions): Promise<number> {
  let env: ExecutorEnv = fallbackEnv;
  try {
    env = executorEnv(d.env);
    const id = gitlabJobId(env);
    const engine = d.engine();
    const gl = d.config.gitlab;

    // The runner retries prepare after a cleanup; anything still recorded is a leftover.
    const leftovers = await releaseJob(engine, d.config, id.key, d.log);
    for (const l of leftovers) d.err(`mayfly: before preparing: ${l}\n`);
    // Without mayflyd nothing else collects what crashed runners left (expired job records).
    await engine.reap(d.log);
    if (env.job('CI_JOB_SERVICES')) d.err('mayfly: warning: services: are not supported yet; the job runs without them\n');

    const pool = o.pool || gl.pool || undefined;
    const jobImage = env.job('CI_JOB_IMAGE')?.trim() || undefined;
    const label = env.job(gl.size_variable)?.trim() || undefined;
    // A fixed pool decides image and size; the job's choices are reported, not applied.
    const choice = pool ? undefined : chooseImage(jobImage, { map: gl.images, defaultImage: o.defaultImage || gl.default_image || d.config.defaults.image }, engine.images);
    const size = pool || !label ? undefined : jobSize(d.config, label);
    if (pool && (jobImage || label)) {
      d.err(`mayfly: the runner takes every job from pool ${pool}: ${[jobImage && `image ${jobImage}`, label && `${gl.size_variable}=${label}`].filter(Boolean).join(' and ')} not applied\n`);
    }

    // The machine must outlive this process; the record (and mayflyd's deadline) must not
    // outlive the job by much: the job's timeout, plus the hour cleanup_exec may take.
    const holdSeconds = jobTimeoutSeconds(env) + 3600;
    const owner = jobOwner(id.key, id.jobId, id.project);
    const t0 = Date.now();
    const client = await DaemonClient.find(d.config.daemon.socket);
    if (pool && !client) {
      throw new MayflyError(ErrorCode.DAEMON, `pool ${pool} needs mayflyd, and none answers on ${d.config.daemon.socket}`, {
        hint: 'start it (systemctl start mayflyd), or drop --pool / gitlab.pool to boot a machine per job',
      });
    }
    const ref = choice ? `${choice.image.name}:${choice.image.version}` : undefined;
    const why = choice ? choice.why : `pool ${pool}`;
    let line: string | undefined;
    if (client) {
      try {
        const m = await leaseJobMachine(client, {
          pool, image: ref, size, owner, job: { gitlab_job: id.key, project: id.project },
          maxRuntime: Math.min(holdSeconds, maxLeaseSeconds), signal: o.signal,
        });
        try {
          engine.state.putJob({
            key: id.key, integration, instance: m.id, lease: m.lease.id, createdAt: t0, expiresAt: t0 + holdSeconds * 1000,
            data: { socket: client.socket, pool: m.lease.pool, image: m.image },
          });
          // From now on the lease belongs to the job, not to this process.
          await client.call('PATCH', `/v1/leases/${encodeURIComponent(m.lease.id)}`, { holder_pid: null }).catch((e: unknown) => {
            if (isMayflyError(e) && /no route/.test(e.message)) {
              throw new MayflyError(ErrorCode.DAEMON, 'mayflyd is older than this mayfly (it cannot hand a lease to a job)', { hint: 'restart mayflyd' });
            }
            throw e;
          });
          await ensureWorkDirs(m, [gl.builds_dir, gl.cache_dir], engine.images.resolve(m.image).user);
        } catch (e) {
          await m.release().catch(() => {});
          engine.state.deleteJob(id.key);
          throw e;
        }
        const i = m.lease.instance;
        line = `machine ${m.id}: ${m.image} (${why}), ${i.cpus} CPU, ${i.memory} MiB, ${i.disk} GiB disk, ${m.origin}`;
      } catch (e) {
        if (!(isMayflyError(e) && e.code === ErrorCode.NO_MATCHING_POOL) || pool) throw e;
        d.err(`mayfly: no mayflyd pool serves ${ref}${size ? ` at ${label}` : ''}; booting a machine for this job\n`);
      }
    }
    if (!line) {
      const lease = await engine.lease({ image: ref, size, owner, signal: o.signal });
      const m = lease.machine;
      try {
        engine.state.putJob({
          key: id.key, integration, instance: m.id, lease: null, createdAt: t0, expiresAt: t0 + holdSeconds * 1000, data: { image: `${m.image.name}:${m.image.version}` },
        });
        await ensureWorkDirs(localJobMachine(lease), [gl.builds_dir, gl.cache_dir], m.image.user);
        m.handOver(owner);
      } catch (e) {
        await lease.release().catch(() => {});
        engine.state.deleteJob(id.key);
        throw e;
      }
      line = `machine ${m.id}: ${m.image.name}:${m.image.version} (${why}), ${m.size.cpus} CPU, ${m.size.memoryMiB} MiB, ${m.size.diskGiB} GiB disk, ${m.startedHow} in ${((Date.now() - t0) / 1000).toFixed(1)} s`;
    }
    d.out(`mayfly: ${line}\n`);
    return 0;
  } catch (e) {
    if (o.signal.aborted) {
      d.err(`mayfly: prepare cancelled (${errorText(o.signal.reason)})\n`);
      return env.systemFailureExitCode;
    }
    return failure(e, env, d);
  }
}

/** mayflyd's longest lease (its API's max_runtime limit). */
const maxLeaseSeconds = 604_800;

/** The size a job asks for through its size variable; refused when the host cannot run it. */
function jobSize(config: Config, label: string): MachineSize {
  const name = config.gitlab.size_variable;
  try {
    return checkSize(parseSizeLabel(label, namedSizes(config.sizes)), hostLimits(config.capacity.memory_reserve), `${name}=${label}`);
  } catch (e) {
    if (isMayflyError(e)) throw new MayflyError(e.code, `the job variable ${e.message.startsWith(name) ? '' : `${name}: `}${e.message}`, { hint: e.hint });
    throw e;
  }
}

/**
 * builds_dir and cache_dir must exist and be the job user's: the runner's scripts create
 * project dirs under them and never check. Made as root only when missing (imported images,
 * paths changed in the config), so a ready machine usually pays one quick command.
 */
async function ensureWorkDirs(m: JobMachine, dirs: string[], user: string): Promise<void> {
  const usable = await m.exec(['bash', '-c', 'for d; do [ -d "$d" ] && [ -w "$d" ] || exit 1; done', 'mayfly-check', ...dirs]);
  if (usable.exitCode === 0) return;
  let err = '';
  const made = await m.exec(['install', '-d', '-o', user, '-g', user, ...dirs], { root: true, stderr: (c) => (err += c.toString()) });
  if (made.exitCode !== 0) {
    throw new MayflyError(ErrorCode.GUEST_CHANNEL, `could not create ${dirs.join(' and ')} in the machine for ${user}: ${err.trim() || `exit ${made.exitCode}`}`, {
      hint: 'gitlab.builds_dir and gitlab.cache_dir must be paths the machine can create',
    });
  }
}

export interface RunOptions {
  scriptPath: string;
  stage: string;
  signal: AbortSignal;
  stdout: (c: Buffer) => void;
  stderr: (c: Buffer) => void;
}

export async function gitlabRun(d: ExecutorDeps, o: RunOptions): Promise<number> {
  let env: ExecutorEnv = fallbackEnv;
  try {
    env = executorEnv(d.env);
    const id = gitlabJobId(env);
    let script: Buffer;
    try {
      script = readFileSync(o.scriptPath);
    } catch (e) {
      throw new MayflyError(ErrorCode.USAGE, `cannot read the ${o.stage} script ${o.scriptPath}: ${errorText(e)}`);
    }
    const engine = d.engine();
    const job = engine.state.getJob(id.key);
    if (!job) {
      throw new MayflyError(ErrorCode.INSTANCE_NOT_FOUND, `no machine is recorded for ${id.key}: prepare did not succeed, or cleanup already ran`, {
        hint: 'the runner calls prepare_exec before run_exec; check that prepare_exec is `mayfly gitlab prepare` in config.toml',
      });
    }
    const m = jobMachine(engine, d.config, job);
    const outcome = await runStage(m, script, {
      stdout: o.stdout, stderr: o.stderr, signal: o.signal, killGraceMs: d.config.gitlab.kill_grace * 1000, log: d.log,
    });
    m.disconnect?.();
    if (!outcome.result) {
      d.err(`mayfly: the ${o.stage} stage was cancelled and its processes killed\n`);
      return env.systemFailureExitCode;
    }
    if (outcome.result.exitCode === 0) return 0;
    if (env.buildExitCodeFile) {
      // One integer, rewritten every time: the file is shared by all stages of the attempt.
      writeFileSync(env.buildExitCodeFile, `${outcome.result.exitCode}\n`);
    } else {
      // Runners before 17.9: the job fails with exit code 1 whatever the script's was.
      d.err(`mayfly: the script exited with ${outcome.result.exitCode} (BUILD_EXIT_CODE_FILE is not set: gitlab-runner 17.9 or later reports the code itself)\n`);
    }
    return env.buildFailureExitCode;
  } catch (e) {
    return failure(e, env, d);
  }
}

export async function gitlabCleanup(d: ExecutorDeps): Promise<number> {
  let id;
  try {
    id = gitlabJobId(executorEnv(d.env));
  } catch (e) {
    d.err(`mayfly: ${errorText(e)}\n`);
    return 1;
  }
  try {
    const done = await releaseJob(d.engine(), d.config, id.key, d.log);
    d.out(done.length > 0 ? `mayfly: ${id.key}: ${done.join('; ')}\n` : `mayfly: ${id.key}: nothing to clean up\n`);
    return 0;
  } catch (e) {
    d.err(`mayfly: cleaning up ${id.key} failed: ${errorText(e)}\n`);
    return 1;
  }
}
