import { realpathSync } from 'node:fs';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Command } from 'commander';
import { ErrorCode, MayflyError } from '../../errors.ts';
import { executorEnv } from '../../integrations/gitlab/executor-env.ts';
import { gitlabCleanup, gitlabConfig, gitlabPrepare, gitlabRun, type ExecutorDeps } from '../../integrations/gitlab/executor.ts';
import { runnerToml } from '../../integrations/gitlab/toml.ts';
import { Machine } from '../../pool/index.ts';
import { redactSecrets, registerSecretsFromEnv } from '../../secrets.ts';
import type { Context } from '../context.ts';
import { defaultDataDir } from '../context.ts';
import type { ContextFactory } from '../main.ts';

// `mayfly gitlab …`: the programs gitlab-runner's custom executor calls. Their stdout and
// stderr are the job log, so mayfly's own log is human lines at warning level here.

function deps(ctx: Context): ExecutorDeps {
  // The job's variables (tokens, masked values in clear text) are read from a copy; QEMU and
  // the other programs mayfly starts, which inherit this process's environment, never see them.
  const env = { ...process.env };
  // The job token (CI_JOB_TOKEN, and inside CI_REPOSITORY_URL), registry and deploy passwords
  // and any variable named like a secret are cut out of every log line and state record.
  registerSecretsFromEnv(env, 'CUSTOM_ENV_');
  for (const k of Object.keys(process.env)) if (k.startsWith('CUSTOM_ENV_') || k === 'JOB_RESPONSE_FILE') delete process.env[k];
  return {
    env,
    config: ctx.config,
    log: ctx.log,
    engine: () => ctx.engine(),
    // mayfly's own lines in the job log; the job's output is passed on untouched (GitLab masks it).
    out: (s) => process.stdout.write(redactSecrets(s)),
    err: (s) => process.stderr.write(redactSecrets(s)),
  };
}

/**
 * SIGTERM (the runner cancels the job or hits a timeout) aborts the body so that it can stop
 * what it started in the machine; a second signal kills this process's machines at once.
 */
async function withCancel(body: (signal: AbortSignal) => Promise<number>): Promise<number> {
  const ac = new AbortController();
  const sigs = ['SIGTERM', 'SIGINT', 'SIGHUP'] as const;
  const h = (sig: string) => {
    if (ac.signal.aborted) {
      Machine.killAllNow();
      process.exit(executorEnv().systemFailureExitCode);
    }
    ac.abort(new Error(`cancelled by ${sig}`));
  };
  for (const s of sigs) process.on(s, h);
  try {
    return await body(ac.signal);
  } finally {
    for (const s of sigs) process.off(s, h);
  }
}

/** The absolute path of the `mayfly` command that is running (bin/mayfly exports it). */
function mayflyExe(): string {
  const fromWrapper = process.env.MAYFLY_EXE;
  if (fromWrapper && isAbsolute(fromWrapper)) return resolve(fromWrapper);
  return realpathSync(join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'bin', 'mayfly'));
}

export function registerGitlab(program: Command, context: ContextFactory): void {
  const gitlab = program
    .command('gitlab')
    .description("GitLab Runner's custom executor: every job in a fresh machine (see `mayfly gitlab toml`)");
  const ctxFor = () => context({ level: 'warn', human: true });

  gitlab
    .command('config')
    .description('config_exec: print the JSON document gitlab-runner reads (builds_dir, cache_dir, driver)')
    .action(() => {
      process.stdout.write(gitlabConfig(ctxFor().config) + '\n');
    });

  gitlab
    .command('prepare')
    .description("prepare_exec: get a ready machine for the job (from mayflyd's pool, else booted) and record it")
    .option('--pool <name>', 'lease from this mayflyd pool (default: gitlab.pool, else a pool serving the image and size)')
    .option('--default-image <ref>', 'mayfly image for jobs that name none (default: gitlab.default_image, else defaults.image)')
    .action(async (o: { pool?: string; defaultImage?: string }) => {
      const ctx = ctxFor();
      process.exitCode = await withCancel((signal) => gitlabPrepare(deps(ctx), { ...o, signal }));
    });

  gitlab
    .command('run')
    .description("run_exec: run one stage script of the job in the job's machine")
    .argument('<script>', 'the stage script (a path on this host, written by gitlab-runner)')
    .argument('<stage>', 'the stage name (prepare_script, get_sources, build_script, step_*, after_script, …)')
    .action(async (scriptPath: string, stage: string) => {
      const ctx = ctxFor();
      process.exitCode = await withCancel((signal) =>
        gitlabRun(deps(ctx), {
          scriptPath: resolve(scriptPath),
          stage,
          signal,
          stdout: (c) => process.stdout.write(c),
          stderr: (c) => process.stderr.write(c),
        }),
      );
    });

  gitlab
    .command('cleanup')
    .description("cleanup_exec: release the job's machine and remove everything of the job (idempotent)")
    .action(async () => {
      process.exitCode = await gitlabCleanup(deps(ctxFor()));
    });

  gitlab
    .command('toml')
    .description("print the [[runners]] entry for gitlab-runner's config.toml")
    .option('--name <name>', 'the runner name', 'mayfly')
    .option('--url <url>', 'your GitLab URL')
    .option('--token <token>', 'the runner token (from gitlab-runner register)')
    .option('--pool <name>', 'lease every job from this mayflyd pool')
    .option('--default-image <ref>', 'mayfly image for jobs that name none')
    .option('--exe <path>', 'absolute path of mayfly as the runner should call it (default: this one)')
    .action((o: { name: string; url?: string; token?: string; pool?: string; defaultImage?: string; exe?: string }) => {
      const ctx = ctxFor();
      if (o.exe !== undefined && !isAbsolute(o.exe)) {
        throw new MayflyError(ErrorCode.USAGE, `--exe ${o.exe} is not an absolute path`, {
          hint: 'gitlab-runner resolves relative exec paths against a per-job temp dir, where they never work',
        });
      }
      const globalArgs: string[] = [];
      if (ctx.opts.dataDir !== defaultDataDir) globalArgs.push('--data-dir', resolve(ctx.opts.dataDir));
      if (ctx.opts.config) globalArgs.push('--config', resolve(ctx.opts.config));
      process.stdout.write(
        runnerToml({
          name: o.name, url: o.url, token: o.token, exe: o.exe ?? mayflyExe(), globalArgs, pool: o.pool, defaultImage: o.defaultImage, config: ctx.config,
        }),
      );
    });
}
