import { ErrorCode, MayflyError } from '../../errors.ts';

// What gitlab-runner's custom executor hands every exec in its environment
// (../shared/protocols/gitlab-custom-executor.md, section 3). Exit codes are read from the
// environment, never hard-coded: the runner defines them.

export interface ExecutorEnv {
  buildFailureExitCode: number;
  systemFailureExitCode: number;
  /** Host path where run_exec writes the script's own exit code. */
  buildExitCodeFile: string | undefined;
  /** A job variable (CUSTOM_ENV_<name>); undefined when unset. */
  job(name: string): string | undefined;
}

function exitCodeFrom(env: NodeJS.ProcessEnv, name: string, fallback: number): number {
  const v = env[name];
  if (v === undefined || v === '') return fallback;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > 255) {
    throw new MayflyError(ErrorCode.USAGE, `${name}='${v}' is not an exit code`, { hint: 'gitlab-runner sets it; run this command from its custom executor' });
  }
  return n;
}

export function executorEnv(env: NodeJS.ProcessEnv = process.env): ExecutorEnv {
  return {
    // The runner's values today; used only when a person runs the command by hand.
    buildFailureExitCode: exitCodeFrom(env, 'BUILD_FAILURE_EXIT_CODE', 1),
    systemFailureExitCode: exitCodeFrom(env, 'SYSTEM_FAILURE_EXIT_CODE', 2),
    buildExitCodeFile: env.BUILD_EXIT_CODE_FILE || undefined,
    job: (name) => env[`CUSTOM_ENV_${name}`],
  };
}

/** The job's identity across its prepare, run and cleanup processes. */
export interface GitlabJobId {
  /** "gitlab/<runner short token>/<job id>": unique per runner and job, the same in every attempt. */
  key: string;
  jobId: string;
  project: string;
}

export function gitlabJobId(e: ExecutorEnv): GitlabJobId {
  const jobId = e.job('CI_JOB_ID') ?? '';
  if (!/^\d{1,20}$/.test(jobId)) {
    throw new MayflyError(
      ErrorCode.USAGE,
      jobId === '' ? 'CUSTOM_ENV_CI_JOB_ID is not set: this command is run by gitlab-runner\'s custom executor' : `CUSTOM_ENV_CI_JOB_ID='${jobId}' is not a job id`,
      { hint: 'put the snippet from `mayfly gitlab toml` in the runner\'s config.toml; gitlab-runner then calls it for each job' },
    );
  }
  // Two runners on one host have different tokens; jobs of one runner have different ids.
  const token = (e.job('CI_RUNNER_SHORT_TOKEN') ?? '').replace(/[^A-Za-z0-9_-]/g, '') || 'runner';
  return { key: `gitlab/${token}/${jobId}`, jobId, project: e.job('CI_PROJECT_PATH') ?? '' };
}

/** Seconds the runner allows the job (CI_JOB_TIMEOUT), 1 h when absent or unreadable. */
export function jobTimeoutSeconds(e: ExecutorEnv): number {
  const n = Number(e.job('CI_JOB_TIMEOUT'));
  return Number.isInteger(n) && n > 0 ? n : 3600;
}
