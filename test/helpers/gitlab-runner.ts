import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { hostname as osHostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { posix } from 'node:path';

// An imitation of gitlab-runner driving a custom executor, for integration tests of
// `mayfly gitlab config|prepare|run|cleanup` without a GitLab instance or a real runner.
// It follows /work/shared/protocols/gitlab-custom-executor.md (gitlab-runner 19.4): per-attempt temp
// dir, response.json, config_exec JSON, prepare retries, one run_exec per stage with a generated
// bash script, exit-code mapping incl. BUILD_EXIT_CODE_FILE, SIGTERM → SIGKILL termination of the
// process group, and cleanup_exec once per attempt. Written from the protocol description, not from
// gitlab-runner's code.
//
// Not imitated: cache and artifact stages (restore_cache, download_artifacts, archive_cache*,
// upload_artifacts*) because a JobSpec has no cache or artifacts; services; `step_<name>` steps;
// GITLAB_ENV; submodules; PowerShell/sh dialects; RUNNER_SCRIPT_TIMEOUT / RUNNER_AFTER_SCRIPT_TIMEOUT,
// prepare_timeout and get_sources_timeout (only the job timeout and the per-exec timeouts of
// config/prepare/cleanup are enforced); the runner's masking of well-known token prefixes.

export const RUNNER_VERSION = '19.4.0';
export const RUNNER_REVISION = 'd79f3e7b';

const PREPARATION_RETRIES = 3;
const BUILD_FAILURE_EXIT_CODE = 1;
const SYSTEM_FAILURE_EXIT_CODE = 2;

export interface RunnerConfig {
  /** [config_exec, ...config_args] (absolute paths; relative ones resolve against the temp dir, as in the runner). */
  configExec?: string[];
  prepareExec?: string[];
  /** [run_exec, ...run_args]; the runner appends `<script path> <stage>`. */
  runExec: string[];
  cleanupExec?: string[];
  /** config.toml `builds_dir` / `cache_dir`, used when config_exec does not return them. */
  buildsDir?: string;
  cacheDir?: string;
  /** Added to the runner's own process.env for every exec. */
  env?: Record<string, string>;
  /** CI_RUNNER_SHORT_TOKEN, default 'abcd1234'. */
  shortToken?: string;
  /** graceful_kill_timeout, default 600_000. */
  gracefulKillTimeoutMs?: number;
  /** force_kill_timeout, default 10_000. */
  forceKillTimeoutMs?: number;
  /** PreparationRetryInterval, default 3000. */
  prepareRetryIntervalMs?: number;
  /** CI_CONCURRENT_ID and CI_CONCURRENT_PROJECT_ID, default 0. */
  concurrentId?: number;
  /** config_exec_timeout / prepare_exec_timeout / cleanup_exec_timeout, default 3_600_000 each. */
  configExecTimeoutMs?: number;
  prepareExecTimeoutMs?: number;
  cleanupExecTimeoutMs?: number;
  /** Runner name in the log header. */
  name?: string;
}

export interface JobVariable {
  key: string;
  value: string;
  /** File-type variable: scripts get a path to a file holding the value; CUSTOM_ENV_ gets the content. */
  file?: boolean;
  /** Masked in the job log (JobResult.log), in clear text everywhere else. */
  masked?: boolean;
  /** Not $VAR-expanded. */
  raw?: boolean;
}

export interface JobSpec {
  id: number; // CI_JOB_ID
  token: string; // CI_JOB_TOKEN
  /** Sets CUSTOM_ENV_CI_JOB_IMAGE (unset when absent). */
  image?: string;
  /** e.g. http://10.0.2.2:PORT/group/project.git: slug group/project, CI_REPOSITORY_URL gets gitlab-ci-token:<token>@. */
  repoUrl: string;
  sha: string;
  ref: string;
  beforeSha?: string;
  variables?: JobVariable[];
  script: string[];
  afterScript?: string[];
  gitStrategy?: 'fetch' | 'clone' | 'none' | 'empty';
  gitDepth?: number;
  getSourcesAttempts?: number;
  /** CI_JOB_TIMEOUT, default 3600; the job is stopped (failed, job_execution_timeout) when it runs out. */
  timeoutSeconds?: number;
  /**
   * Cancel the job once the output of the named exec contains the text: a run_exec stage name
   * (`build_script`, `get_sources`, …) or `config_exec` / `prepare_exec`. Only the first exec with
   * that name is watched. Cancel in build_script runs after_script (CI_JOB_STATUS=canceled) and
   * cleanup_file_variables; cancel anywhere else runs no further stage.
   */
  cancel?: { stage: string; whenOutputIncludes: string };
  /** CI_JOB_NAME / CI_JOB_STAGE, default 'test' / 'test'. */
  name?: string;
  stage?: string;
  projectId?: number; // default 1
  pipelineId?: number; // default 1000 + id
}

export type ExecKind = 'config' | 'prepare' | 'run' | 'cleanup';

export interface ExecCall {
  kind: ExecKind;
  argv: string[];
  cwd: string;
  stage?: string;
  /** Prepare attempt (1..3) this call belongs to. */
  attempt: number;
  /** What the runner put on top of its own environment: cfg.env, TMPDIR…, job_env, CUSTOM_ENV_*. */
  env: Record<string, string>;
  /** run: the generated script. */
  script?: string;
  exitCode: number | null;
  signal: string | null;
  /** The process could not be started. */
  error?: string;
  /** Killed because an exec timeout (config/prepare/cleanup) ran out. */
  timedOut?: boolean;
  /** Still running or holding its pipes after SIGKILL + force_kill_timeout; the runner gave up. */
  abandoned?: boolean;
  stdout: string;
  stderr: string;
  /** stdout and stderr interleaved as received. */
  output: string;
  startedAt: number;
  /** When the process itself exited (endedAt also waits for EOF on stdout/stderr). */
  exitedAt?: number;
  endedAt: number;
  termSentAt?: number;
  killSentAt?: number;
}

export interface JobResult {
  status: 'success' | 'failed' | 'canceled' | 'system_failure';
  /** For 'failed' by a script failure: first line of BUILD_EXIT_CODE_FILE, else 1. */
  exitCode?: number;
  failureReason?: string;
  /** The job log as GitLab shows it (masked values replaced by [MASKED]). */
  log: string;
  /** The same without masking. */
  rawLog: string;
  /** The runner's own log: warnings and cleanup_exec output (not part of the job log). */
  runnerLog: string;
  calls: ExecCall[];
  stagesRun: string[];
  prepareAttempts: number;
  tmpDirs: string[];
  /** CI_PROJECT_DIR of the last attempt that got through config ('' if none did). */
  projectDir: string;
}

/** The executor's four stages as `mayfly gitlab …` commands, as a runner's [runners.custom] section would name them. */
export function mayflyStages(mayfly: string, args: readonly string[], prepareArgs: readonly string[] = []): Pick<RunnerConfig, 'configExec' | 'prepareExec' | 'runExec' | 'cleanupExec'> {
  return {
    configExec: [mayfly, ...args, 'gitlab', 'config'],
    prepareExec: [mayfly, ...args, 'gitlab', 'prepare', ...prepareArgs],
    runExec: [mayfly, ...args, 'gitlab', 'run'],
    cleanupExec: [mayfly, ...args, 'gitlab', 'cleanup'],
  };
}

export async function runJob(cfg: RunnerConfig, job: JobSpec): Promise<JobResult> {
  return new JobRun(cfg, job).run();
}

// ---------------------------------------------------------------------------------------------
// Shell generation (bash, the runner's default shell on Linux)

/** Quotes `s` as a bash ANSI-C string: $'…' with \\ \' \n \t and other control characters as \xHH. */
export function bashQuote(s: string): string {
  let out = "$'";
  for (const ch of s) {
    const c = ch.codePointAt(0)!;
    if (ch === '\\') out += '\\\\';
    else if (ch === "'") out += "\\'";
    else if (ch === '\n') out += '\\n';
    else if (ch === '\t') out += '\\t';
    else if (c < 0x20 || c === 0x7f) out += `\\x${c.toString(16).padStart(2, '0')}`;
    else out += ch; // printable ASCII and non-ASCII characters (written as UTF-8)
  }
  return out + "'";
}

/** The envelope every generated script gets; the body runs in a subshell through eval. */
export function bashScript(body: string, trace = false): string {
  return [
    '#!/usr/bin/env bash',
    '',
    "trap 'exit 1' TERM",
    '',
    'case "$(set -o)" in *"pipefail"*) set -o pipefail;; esac; set -o errexit',
    'set +o noclobber',
    ...(trace ? ['set -o xtrace'] : []),
    `(trap 'exit 1' TERM; eval ${bashQuote(body)}) < /dev/null`,
    'exit 0',
    '',
  ].join('\n');
}

const q = bashQuote;
const VALID_KEY = /^[A-Za-z_][A-Za-z0-9_]*$/;

// ---------------------------------------------------------------------------------------------

type JobStatusVar = 'running' | 'success' | 'failed' | 'canceled' | 'timedout';

interface Attempt {
  n: number;
  tmp: string;
  /** Set once builds_dir/cache_dir are resolved. */
  configured: boolean;
  buildsDir: string;
  cacheDir: string;
  projectDir: string;
  hostname: string;
  jobEnv: Record<string, string>;
}

type Outcome =
  | { ok: true }
  | { ok: false; kind: 'build'; exitCode: number; message: string }
  | { ok: false; kind: 'system'; message: string }
  | { ok: false; kind: 'config'; message: string };

const OK: Outcome = { ok: true };

interface ExecOptions {
  kind: ExecKind;
  at: Attempt;
  argv: string[];
  stage?: string;
  script?: string;
  /** Which streams go to the job log. */
  logMode: 'all' | 'stderr' | 'none';
  /** Name matched against JobSpec.cancel.stage. */
  cancelName?: string;
  /** Stopped by cancel and the job timeout (everything except cleanup_exec). */
  interruptible: boolean;
  timeoutMs?: number;
}

interface ConfigOutput {
  builds_dir?: string;
  cache_dir?: string;
  builds_dir_is_shared?: boolean;
  hostname?: string;
  driver?: { name?: string; version?: string };
  job_env?: Record<string, string>;
  shell?: string;
}

class JobRun {
  readonly cfg: RunnerConfig;
  readonly job: JobSpec;
  readonly slug: string;
  readonly serverUrl: URL;
  readonly tokenRepoUrl: string;
  readonly shortToken: string;
  readonly timeoutSeconds: number;

  rawLog = '';
  runnerLog = '';
  calls: ExecCall[] = [];
  stagesRun: string[] = [];
  tmpDirs: string[] = [];
  prepareAttempts = 0;
  projectDir = '';

  jobStatus: JobStatusVar = 'running';
  canceled = false;
  cancelFired = false;
  cancelStage: string | undefined;
  timedOut = false;
  active: { terminate: () => Promise<void> } | undefined;

  constructor(cfg: RunnerConfig, job: JobSpec) {
    this.cfg = cfg;
    this.job = job;
    this.serverUrl = new URL(job.repoUrl);
    this.slug = projectSlug(job);
    const withToken = new URL(job.repoUrl);
    withToken.username = 'gitlab-ci-token';
    withToken.password = job.token;
    this.tokenRepoUrl = withToken.toString();
    this.shortToken = cfg.shortToken ?? 'abcd1234';
    this.timeoutSeconds = job.timeoutSeconds ?? 3600;
  }

  // ---- logs

  log(line: string): void {
    if (this.rawLog !== '' && !this.rawLog.endsWith('\n')) this.rawLog += '\n';
    this.rawLog += line + '\n';
  }

  note(line: string): void {
    this.runnerLog += line + '\n';
  }

  stopped(): boolean {
    return this.canceled || this.timedOut;
  }

  // ---- the job

  async run(): Promise<JobResult> {
    const deadline = setTimeout(() => {
      this.timedOut = true;
      void this.active?.terminate();
    }, this.timeoutSeconds * 1000);
    try {
      this.log(`Running with gitlab-runner ${RUNNER_VERSION} (${RUNNER_REVISION}) [test imitation]`);
      this.log(`  on ${this.cfg.name ?? 'mayfly-test-runner'} ${this.shortToken}, system ID: s_000000000000`);
      const prep = await this.prepareUnit();
      if (!prep.at) return this.finish(prep.outcome);
      const at = prep.at;
      let outcome: Outcome = OK;
      try {
        if (!this.stopped()) outcome = await this.stages(at);
      } finally {
        await this.cleanupAttempt(at);
      }
      return this.finish(outcome);
    } finally {
      clearTimeout(deadline);
    }
  }

  /** Up to 3 attempts of: temp dir, response.json, config_exec, prepare_exec. */
  async prepareUnit(): Promise<{ at?: Attempt; outcome: Outcome }> {
    let last: Outcome = OK;
    for (let n = 1; n <= PREPARATION_RETRIES; n++) {
      this.prepareAttempts = n;
      const at = this.newAttempt(n);
      this.log('Preparing the "custom" executor');
      const r = await this.configureAndPrepare(at);
      if (r.ok && !this.stopped()) return { at, outcome: OK };
      await this.cleanupAttempt(at);
      last = r;
      if (this.stopped() || r.ok) break;
      if (r.kind === 'build' || r.kind === 'config') break; // a build error is never retried
      if (n < PREPARATION_RETRIES) {
        this.log(`WARNING: Preparation failed: ${r.message}`);
        this.log(`Will be retried in ${formatSeconds(this.cfg.prepareRetryIntervalMs ?? 3000)} ...`);
        await sleep(this.cfg.prepareRetryIntervalMs ?? 3000);
        if (this.stopped()) break;
      }
    }
    return { outcome: last };
  }

  newAttempt(n: number): Attempt {
    const tmp = mkdtempSync(join(tmpdir(), 'custom-executor'));
    this.tmpDirs.push(tmp);
    writeFileSync(join(tmp, 'response.json'), JSON.stringify(this.payload()) + '\n', { mode: 0o600 });
    return { n, tmp, configured: false, buildsDir: '', cacheDir: '', projectDir: '', hostname: osHostname(), jobEnv: {} };
  }

  async configureAndPrepare(at: Attempt): Promise<Outcome> {
    let conf: ConfigOutput = {};
    if (this.cfg.configExec) {
      const call = await this.exec({
        kind: 'config',
        at,
        argv: this.cfg.configExec,
        logMode: 'stderr',
        cancelName: 'config_exec',
        interruptible: true,
        timeoutMs: this.cfg.configExecTimeoutMs ?? 3_600_000,
      });
      const r = this.outcome(call, at);
      if (!r.ok) return r;
      try {
        conf = parseConfigOutput(call.stdout);
      } catch (err) {
        return { ok: false, kind: 'system', message: `error while parsing JSON output of config_exec: ${(err as Error).message}` };
      }
    }
    const buildsDir = conf.builds_dir || this.cfg.buildsDir || '';
    const cacheDir = conf.cache_dir || this.cfg.cacheDir || '';
    if (!buildsDir) return { ok: false, kind: 'config', message: 'the builds_dir is not configured' };
    if (!cacheDir) return { ok: false, kind: 'config', message: 'the cache_dir is not configured' };
    if (conf.shell !== undefined && conf.shell !== 'bash') {
      return { ok: false, kind: 'config', message: `shell ${JSON.stringify(conf.shell)} is not supported by this imitation` };
    }
    at.configured = true;
    at.buildsDir = buildsDir;
    at.cacheDir = cacheDir;
    at.jobEnv = conf.job_env ?? {};
    if (conf.hostname) at.hostname = conf.hostname;
    const shared = conf.builds_dir_is_shared ? `/${this.shortToken}/${this.cfg.concurrentId ?? 0}` : '';
    const suffix = this.job.gitStrategy === 'empty' ? '-empty' : '';
    at.projectDir = posix.join(buildsDir + shared, this.slug) + suffix;
    this.projectDir = at.projectDir;
    const driver = conf.driver?.name ? ` with driver ${conf.driver.name}${conf.driver.version ? ` ${conf.driver.version}` : ''}` : '';
    this.log(`Using Custom executor${driver}...`);

    if (this.cfg.prepareExec) {
      const call = await this.exec({
        kind: 'prepare',
        at,
        argv: this.cfg.prepareExec,
        logMode: 'all',
        cancelName: 'prepare_exec',
        interruptible: true,
        timeoutMs: this.cfg.prepareExecTimeoutMs ?? 3_600_000,
      });
      const r = this.outcome(call, at);
      if (!r.ok) return { ...r, message: `prepare environment: ${r.message}` };
    }
    return OK;
  }

  /** run_exec stages after a successful preparation. */
  async stages(at: Attempt): Promise<Outcome> {
    this.log('Preparing environment');
    const prepared = await this.runStage(at, 'prepare_script');
    if (!prepared.ok || this.stopped()) return prepared; // nothing else, not even cleanup_file_variables

    this.log('Getting source from Git repository');
    const attempts = Math.min(10, Math.max(1, this.job.getSourcesAttempts ?? 1));
    let sources: Outcome = OK;
    for (let i = 1; i <= attempts; i++) {
      if (i > 1) {
        this.log(`WARNING: Retrying get_sources (attempt ${i} of ${attempts})...`);
        await this.runStage(at, 'clear_worktree');
        if (this.stopped()) break;
      }
      sources = await this.runStage(at, 'get_sources');
      if (sources.ok || this.stopped()) break;
    }

    let result: Outcome = sources;
    let canceledInScript = false;
    if (sources.ok && !this.stopped()) {
      this.log('Executing "step_script" stage of the job script');
      result = await this.runStage(at, 'build_script');
      canceledInScript = this.canceled && this.cancelStage === 'build_script';
      if (this.timedOut) return result;
      this.jobStatus = canceledInScript ? 'canceled' : result.ok ? 'success' : 'failed';
      if (this.job.afterScript?.length && (!this.canceled || canceledInScript)) {
        this.log('Running after_script');
        const after = await this.runStage(at, 'after_script');
        if (!after.ok) this.log(`WARNING: after_script failed, but job will continue unaffected: ${after.message}`);
      }
    } else {
      this.jobStatus = 'failed';
    }

    if (this.timedOut || (this.canceled && !canceledInScript)) return result;
    this.log('Cleaning up project directory and file based variables');
    const cleaned = await this.runStage(at, 'cleanup_file_variables');
    if (!cleaned.ok) this.note(`WARNING: cleanup_file_variables failed: ${cleaned.message}`);
    return result;
  }

  async runStage(at: Attempt, stage: string): Promise<Outcome> {
    const script = bashScript(this.stageBody(at, stage), this.variable('CI_DEBUG_TRACE') === 'true');
    const dir = mkdtempSync(join(at.tmp, 'script'));
    chmodSync(dir, 0o700);
    const path = join(dir, 'script');
    writeFileSync(path, script, { mode: 0o700 });
    this.stagesRun.push(stage);
    const call = await this.exec({
      kind: 'run',
      at,
      argv: [...this.cfg.runExec, path, stage],
      stage,
      script,
      logMode: 'all',
      cancelName: stage,
      interruptible: true,
    });
    return this.outcome(call, at);
  }

  async cleanupAttempt(at: Attempt): Promise<void> {
    if (this.cfg.cleanupExec) {
      const call = await this.exec({
        kind: 'cleanup',
        at,
        argv: this.cfg.cleanupExec,
        logMode: 'none',
        interruptible: false,
        timeoutMs: this.cfg.cleanupExecTimeoutMs ?? 3_600_000,
      });
      if (call.stdout) this.note(call.stdout.trimEnd());
      if (call.stderr) this.note(`WARNING: cleanup_exec: ${call.stderr.trimEnd()}`);
      const r = this.outcome(call, at);
      if (!r.ok) this.note(`WARNING: Cleanup script failed: ${r.message}`);
    }
    rmSync(at.tmp, { recursive: true, force: true });
  }

  finish(outcome: Outcome): JobResult {
    const base = {
      calls: this.calls,
      stagesRun: this.stagesRun,
      prepareAttempts: this.prepareAttempts,
      tmpDirs: this.tmpDirs,
      projectDir: this.projectDir,
    };
    let status: JobResult['status'];
    let exitCode: number | undefined;
    let failureReason: string | undefined;
    if (this.canceled) {
      status = 'canceled';
      this.log('ERROR: Job failed: canceled');
    } else if (this.timedOut) {
      status = 'failed';
      failureReason = 'job_execution_timeout';
      this.log(`ERROR: Job failed: execution took longer than ${this.timeoutSeconds} seconds`);
    } else if (outcome.ok) {
      status = 'success';
      this.log('Job succeeded');
    } else if (outcome.kind === 'build') {
      status = 'failed';
      exitCode = outcome.exitCode;
      failureReason = 'script_failure';
      this.log(`ERROR: Job failed: exit code ${outcome.exitCode}`);
    } else if (outcome.kind === 'config') {
      status = 'failed';
      failureReason = 'script_failure';
      this.log(`ERROR: Job failed: ${outcome.message}`);
    } else {
      status = 'system_failure';
      failureReason = 'runner_system_failure';
      this.log(`ERROR: Job failed (system failure): ${outcome.message}`);
    }
    const result: JobResult = { status, log: this.mask(this.rawLog), rawLog: this.rawLog, runnerLog: this.runnerLog, ...base };
    if (exitCode !== undefined) result.exitCode = exitCode;
    if (failureReason !== undefined) result.failureReason = failureReason;
    return result;
  }

  mask(text: string): string {
    const secrets = new Set<string>([this.job.token]);
    for (const v of this.job.variables ?? []) if (v.masked && v.value) secrets.add(v.value);
    let out = text;
    for (const s of [...secrets].filter((s) => s !== '').sort((a, b) => b.length - a.length)) out = out.split(s).join('[MASKED]');
    return out;
  }

  // ---- exit status mapping (command.go)

  outcome(call: ExecCall, at: Attempt): Outcome {
    if (call.error !== undefined && call.exitCode === null && call.signal === null && !call.abandoned) {
      return { ok: false, kind: 'system', message: `failed to start ${call.argv[0]}: ${call.error}` };
    }
    const timedOut = call.timedOut ? `${call.kind}_exec timed out; ` : '';
    if (call.abandoned) {
      return { ok: false, kind: 'system', message: `${timedOut}failed to kill process: it still runs or something holds its stdout/stderr open` };
    }
    if (call.timedOut) return { ok: false, kind: 'system', message: `${call.kind}_exec timed out` };
    if (call.exitCode === null) {
      return { ok: false, kind: 'system', message: `unknown Custom executor executable exit code -1 (killed by ${call.signal})` };
    }
    const code = call.exitCode;
    if (code === 0) return OK;
    if (code === BUILD_FAILURE_EXIT_CODE) {
      const file = join(at.tmp, 'build_exit_code');
      if (!existsSync(file)) return { ok: false, kind: 'build', exitCode: 1, message: 'exit code 1' };
      const first = (readFileSync(file, 'utf8').split('\n')[0] ?? '').trim();
      if (!/^[+-]?\d+$/.test(first)) {
        return { ok: false, kind: 'system', message: `invalid content of BUILD_EXIT_CODE_FILE: ${JSON.stringify(first)}` };
      }
      const n = Number(first);
      return { ok: false, kind: 'build', exitCode: n, message: `exit code ${n}` };
    }
    if (code === SYSTEM_FAILURE_EXIT_CODE) return { ok: false, kind: 'system', message: `exit status ${code}` };
    return { ok: false, kind: 'system', message: `unknown Custom executor executable exit code ${code}` };
  }

  // ---- starting and stopping execs

  exec(o: ExecOptions): Promise<ExecCall> {
    const env = this.execEnv(o.at, o.kind);
    const call: ExecCall = {
      kind: o.kind,
      argv: [...o.argv],
      cwd: o.at.tmp,
      attempt: o.at.n,
      env,
      exitCode: null,
      signal: null,
      stdout: '',
      stderr: '',
      output: '',
      startedAt: Date.now(),
      endedAt: 0,
    };
    if (o.stage !== undefined) call.stage = o.stage;
    if (o.script !== undefined) call.script = o.script;
    this.calls.push(call);

    return new Promise<ExecCall>((resolve) => {
      let finished = false;
      let terminating = false;
      let markDone: () => void = () => {};
      const done = new Promise<void>((r) => (markDone = r));
      const timers: NodeJS.Timeout[] = [];
      const finish = (): void => {
        if (finished) return;
        finished = true;
        for (const t of timers) clearTimeout(t);
        if (this.active === active) this.active = undefined;
        call.endedAt = Date.now();
        markDone();
        resolve(call);
      };

      let child: ChildProcess;
      try {
        child = spawn(o.argv[0]!, o.argv.slice(1), {
          cwd: o.at.tmp,
          env: { ...process.env, ...env },
          stdio: ['ignore', 'pipe', 'pipe'], // stdin is /dev/null
          detached: true, // own process group (the runner uses Setpgid; node's detached is setsid)
        });
      } catch (err) {
        call.error = (err as Error).message;
        finish();
        return;
      }

      const waitDone = (ms: number): Promise<boolean> =>
        new Promise<boolean>((r) => {
          const t = setTimeout(() => r(false), ms);
          void done.then(() => {
            clearTimeout(t);
            r(true);
          });
        });
      const signalGroup = (sig: NodeJS.Signals): void => {
        if (child.pid === undefined) return;
        try {
          process.kill(-child.pid, sig);
        } catch {
          // the group is gone
        }
      };
      const terminate = async (): Promise<void> => {
        if (terminating || finished) return;
        terminating = true;
        call.termSentAt = Date.now();
        signalGroup('SIGTERM');
        if (await waitDone(this.cfg.gracefulKillTimeoutMs ?? 600_000)) return;
        call.killSentAt = Date.now();
        signalGroup('SIGKILL');
        if (await waitDone(this.cfg.forceKillTimeoutMs ?? 10_000)) return;
        call.abandoned = true;
        child.stdout?.destroy();
        child.stderr?.destroy();
        child.unref();
        finish();
      };
      const active = { terminate };
      if (o.interruptible) {
        this.active = active;
        // A user-script cancel does not stop after_script and cleanup_file_variables; the job timeout does.
        if (this.timedOut) void terminate();
      }
      if (o.timeoutMs !== undefined) {
        timers.push(
          setTimeout(() => {
            call.timedOut = true;
            void terminate();
          }, o.timeoutMs),
        );
      }

      const watchCancel = o.cancelName !== undefined && this.job.cancel?.stage === o.cancelName && !this.cancelFired;
      if (watchCancel) this.cancelFired = true; // only the first exec with that name is watched
      let canceledHere = false;
      const onData = (stream: 'stdout' | 'stderr') => (text: string) => {
        if (finished) return;
        call[stream] += text;
        call.output += text;
        if (o.logMode === 'all' || (o.logMode === 'stderr' && stream === 'stderr')) this.rawLog += text;
        if (watchCancel && !canceledHere) {
          const needle = this.job.cancel!.whenOutputIncludes;
          if (call.output.slice(-(text.length + needle.length)).includes(needle)) {
            canceledHere = true;
            this.canceled = true;
            this.cancelStage = o.cancelName;
            void terminate();
          }
        }
      };
      child.stdout!.setEncoding('utf8');
      child.stderr!.setEncoding('utf8');
      child.stdout!.on('data', onData('stdout'));
      child.stderr!.on('data', onData('stderr'));
      child.on('error', (err) => {
        call.error = err.message;
        if (child.pid === undefined) finish();
      });
      child.on('exit', () => {
        call.exitedAt = Date.now();
      });
      child.on('close', (code, signal) => {
        if (finished) return;
        call.exitCode = code;
        call.signal = signal;
        finish();
      });
    });
  }

  // ---- environment and variables

  execEnv(at: Attempt, kind: ExecKind): Record<string, string> {
    const env: Record<string, string> = { ...this.cfg.env };
    env.TMPDIR = at.tmp;
    env.BUILD_FAILURE_EXIT_CODE = String(BUILD_FAILURE_EXIT_CODE);
    env.SYSTEM_FAILURE_EXIT_CODE = String(SYSTEM_FAILURE_EXIT_CODE);
    env.BUILD_EXIT_CODE_FILE = join(at.tmp, 'build_exit_code');
    env.JOB_RESPONSE_FILE = join(at.tmp, 'response.json');
    if (kind !== 'config') Object.assign(env, at.jobEnv);
    for (const v of this.variables(at)) env[`CUSTOM_ENV_${v.key}`] = v.value;
    env.CUSTOM_ENV_CI_JOB_SERVICES = '';
    return env;
  }

  /** The value of a variable as GitLab sends it (last definition wins). */
  variable(key: string): string | undefined {
    const all = this.gitlabVariables();
    for (let i = all.length - 1; i >= 0; i--) if (all[i]!.key === key) return all[i]!.value;
    return undefined;
  }

  /** Variables in the payload (what GitLab sends), unexpanded. */
  gitlabVariables(): (JobVariable & { public: boolean })[] {
    const j = this.job;
    const u = this.serverUrl;
    const server = `${u.protocol}//${u.host}`;
    const parts = this.slug.split('/');
    const name = parts[parts.length - 1] ?? this.slug;
    const namespace = parts.slice(0, -1).join('/');
    const projectId = j.projectId ?? 1;
    const pipelineId = j.pipelineId ?? 1000 + j.id;
    const projectUrl = `${server}/${this.slug}`;
    const list: (JobVariable & { public: boolean })[] = [];
    const add = (key: string, value: string, extra: Partial<JobVariable & { public: boolean }> = {}): void => {
      list.push({ key, value, public: true, file: false, masked: false, raw: false, ...extra });
    };
    add('CI_PIPELINE_ID', String(pipelineId));
    add('CI_PIPELINE_IID', '1');
    add('CI_PIPELINE_SOURCE', 'push');
    add('CI_PIPELINE_URL', `${projectUrl}/-/pipelines/${pipelineId}`);
    add('CI_JOB_ID', String(j.id));
    add('CI_JOB_URL', `${projectUrl}/-/jobs/${j.id}`);
    add('CI_JOB_TOKEN', j.token, { public: false, masked: true });
    add('CI_JOB_NAME', j.name ?? 'test');
    add('CI_JOB_NAME_SLUG', slugify(j.name ?? 'test'));
    add('CI_JOB_STAGE', j.stage ?? 'test');
    add('CI_JOB_STARTED_AT', new Date().toISOString().replace(/\.\d+Z$/, 'Z'));
    add('CI_NODE_TOTAL', '1');
    add('CI_BUILD_TOKEN', j.token, { public: false, masked: true }); // deprecated alias GitLab still sends
    add('CI_REGISTRY_USER', 'gitlab-ci-token');
    add('CI_REGISTRY_PASSWORD', j.token, { public: false, masked: true });
    add('CI_REPOSITORY_URL', this.tokenRepoUrl, { public: false });
    add('CI', 'true');
    add('GITLAB_CI', 'true');
    add('CI_SERVER_URL', server);
    add('CI_SERVER_HOST', u.hostname);
    add('CI_SERVER_PORT', u.port || (u.protocol === 'https:' ? '443' : '80'));
    add('CI_SERVER_PROTOCOL', u.protocol.replace(/:$/, ''));
    add('CI_SERVER_NAME', 'GitLab');
    add('CI_API_V4_URL', `${server}/api/v4`);
    add('CI_PROJECT_ID', String(projectId));
    add('CI_PROJECT_NAME', name);
    add('CI_PROJECT_TITLE', name);
    add('CI_PROJECT_PATH', this.slug);
    add('CI_PROJECT_PATH_SLUG', slugify(this.slug));
    add('CI_PROJECT_NAMESPACE', namespace);
    add('CI_PROJECT_ROOT_NAMESPACE', namespace.split('/')[0] ?? '');
    add('CI_PROJECT_URL', projectUrl);
    add('CI_PROJECT_VISIBILITY', 'private');
    add('CI_DEFAULT_BRANCH', j.ref);
    add('CI_COMMIT_SHA', j.sha);
    add('CI_COMMIT_SHORT_SHA', j.sha.slice(0, 8));
    add('CI_COMMIT_BEFORE_SHA', j.beforeSha ?? '0'.repeat(40));
    add('CI_COMMIT_REF_NAME', j.ref);
    add('CI_COMMIT_REF_SLUG', slugify(j.ref));
    add('CI_COMMIT_BRANCH', j.ref);
    add('CI_COMMIT_REF_PROTECTED', 'false');
    add('CI_RUNNER_ID', '1');
    add('CI_RUNNER_DESCRIPTION', this.cfg.name ?? 'mayfly-test-runner');
    add('CI_RUNNER_TAGS', '[]');
    add('GITLAB_USER_ID', '1');
    add('GITLAB_USER_LOGIN', 'root');
    if (j.image !== undefined) add('CI_JOB_IMAGE', j.image);
    if (j.gitStrategy !== undefined) add('GIT_STRATEGY', j.gitStrategy);
    if (j.gitDepth !== undefined) add('GIT_DEPTH', String(j.gitDepth));
    if (j.getSourcesAttempts !== undefined) add('GET_SOURCES_ATTEMPTS', String(j.getSourcesAttempts));
    for (const v of j.variables ?? []) add(v.key, v.value, { public: !v.masked, file: !!v.file, masked: !!v.masked, raw: !!v.raw });
    return list;
  }

  /** All job variables as the runner sees them at this point, $VAR-expanded. */
  variables(at: Attempt): JobVariable[] {
    const proj = at.configured ? at.projectDir : '';
    const list: JobVariable[] = [];
    const add = (key: string, value: string): void => {
      list.push({ key, value });
    };
    add('CI_RUNNER_SHORT_TOKEN', this.shortToken);
    if (this.job.image !== undefined) add('CI_JOB_IMAGE', this.job.image);
    add('CI_BUILDS_DIR', at.configured ? at.buildsDir : '');
    add('CI_PROJECT_DIR', proj);
    add('CI_CONCURRENT_ID', String(this.cfg.concurrentId ?? 0));
    add('CI_CONCURRENT_PROJECT_ID', String(this.cfg.concurrentId ?? 0));
    add('CI_SERVER', 'yes');
    add('CI_JOB_STATUS', this.jobStatus);
    add('CI_JOB_TIMEOUT', String(this.timeoutSeconds));
    for (const v of this.gitlabVariables()) list.push({ key: v.key, value: v.value, file: !!v.file, masked: !!v.masked, raw: !!v.raw });
    add('CI_SHARED_ENVIRONMENT', 'true');
    add('CI_RUNNER_VERSION', RUNNER_VERSION);
    add('CI_RUNNER_REVISION', RUNNER_REVISION);
    add('CI_RUNNER_EXECUTABLE_ARCH', 'linux/amd64');
    add('RUNNER_TEMP_PROJECT_DIR', `${proj}.tmp`);

    const lookup = (key: string): string | undefined => {
      for (let i = list.length - 1; i >= 0; i--) if (list[i]!.key === key) return list[i]!.value;
      return undefined;
    };
    return list.map((v) => (v.raw ? v : { ...v, value: expandVariables(v.value, lookup) }));
  }

  // ---- scripts

  stageBody(at: Attempt, stage: string): string {
    const proj = at.projectDir;
    const tmpProj = `${proj}.tmp`;
    const vars = this.variables(at);
    const lines: string[] = [];
    const exportAll = (): void => {
      for (const v of vars) {
        if (!VALID_KEY.test(v.key)) continue;
        if (v.file) {
          const path = `${tmpProj}/${v.key}`;
          lines.push(`mkdir -p ${q(tmpProj)}`);
          lines.push(`printf '%s' ${q(v.value)} > ${q(path)}`);
          lines.push(`export ${v.key}=${q(path)}`);
        } else {
          lines.push(`export ${v.key}=${q(v.value)}`);
        }
      }
    };
    const userCommands = (commands: string[]): void => {
      for (const cmd of commands) {
        lines.push(`echo ${q(`$ ${cmd}`)}`);
        lines.push(cmd);
      }
    };

    switch (stage) {
      case 'prepare_script':
        lines.push(`echo "Running on $(hostname) via "${q(at.hostname)}"..."`);
        lines.push(`rm -f ${q(`${tmpProj}/gitlab_runner_env`)} ${q(`${tmpProj}/masking.db`)}`);
        break;
      case 'get_sources':
        exportAll();
        this.getSourcesBody(at, lines);
        break;
      case 'clear_worktree':
        // Before a get_sources retry: start the next attempt from an empty project dir.
        lines.push(`echo ${q(`Deleting ${proj} before retrying get_sources...`)}`);
        lines.push(`rm -rf -- ${q(proj)}`);
        break;
      case 'build_script':
        exportAll();
        lines.push(`cd ${q(proj)}`);
        userCommands(this.job.script);
        break;
      case 'after_script':
        exportAll();
        lines.push(`cd ${q(proj)}`);
        lines.push('echo "Running after script..."');
        userCommands(this.job.afterScript ?? []);
        break;
      case 'cleanup_file_variables': {
        const files = vars.filter((v) => v.file && VALID_KEY.test(v.key)).map((v) => q(`${tmpProj}/${v.key}`));
        if (files.length) lines.push(`rm -f -- ${files.join(' ')}`);
        lines.push(`rm -f -- ${q(`${tmpProj}/.gitlab-runner.ext.conf`)}`);
        break;
      }
      default:
        throw new Error(`no script for stage ${stage}`);
    }
    return lines.join('\n') + '\n';
  }

  getSourcesBody(at: Attempt, lines: string[]): void {
    const proj = at.projectDir;
    const tmpProj = `${proj}.tmp`;
    const template = `${tmpProj}/git-template`;
    const ext = `${tmpProj}/.gitlab-runner.ext.conf`;
    const strategy = this.job.gitStrategy ?? 'fetch';
    const depth = this.job.gitDepth ?? 0;
    lines.push('export GIT_TERMINAL_PROMPT=0', 'export GCM_INTERACTIVE=Never', 'export GIT_LFS_SKIP_SMUDGE=1');

    if (strategy === 'none') {
      lines.push(`mkdir -p ${q(proj)}`);
      lines.push('echo "Skipping Git repository setup"', 'echo "Skipping Git checkout"', 'echo "Skipping Git submodules setup"');
      return;
    }
    if (strategy === 'empty') {
      lines.push(`rm -rf -- ${q(proj)}`, `mkdir -p ${q(proj)}`);
      lines.push('echo "Skipping Git repository setup and creating an empty build directory"');
      return;
    }

    const depthText = depth > 0 ? ` with git depth set to ${depth}` : '';
    if (strategy === 'clone') {
      lines.push(`rm -rf -- ${q(proj)}`);
      lines.push(`echo ${q(`Cloning repository for ${this.job.ref}${depthText}...`)}`);
    } else {
      lines.push(`echo ${q(`Fetching changes${depthText}...`)}`);
    }
    const plainUrl = new URL(this.job.repoUrl);
    plainUrl.username = '';
    plainUrl.password = '';
    const plainBase = `${plainUrl.protocol}//${plainUrl.host}`;
    const tokenUrl = new URL(this.tokenRepoUrl);
    const tokenBase = `${tokenUrl.protocol}//${tokenUrl.username}:${tokenUrl.password}@${tokenUrl.host}`;
    const refspecs = [`+${this.job.sha}:refs/pipelines/${this.job.pipelineId ?? 1000 + this.job.id}`, `+refs/heads/${this.job.ref}:refs/remotes/origin/${this.job.ref}`];

    lines.push(`mkdir -p ${q(template)}`);
    // leftovers of an interrupted earlier run in the same builds dir
    lines.push(`rm -f -- ${q(`${proj}/.git`)}/*.lock ${q(`${proj}/.git/config`)}`);
    lines.push(`rm -rf -- ${q(`${proj}/.git/hooks`)}`);
    lines.push(`git config -f ${q(`${template}/config`)} fetch.recurseSubmodules false`);
    // The job-token URL lives only in this file, included on the command line of fetch/lfs.
    lines.push(`rm -f -- ${q(ext)}`);
    lines.push(`git config -f ${q(ext)} ${q(`url.${tokenBase}.insteadOf`)} ${q(plainBase)}`);
    lines.push(`git init ${q(proj)} --template ${q(template)}`);
    lines.push(`cd ${q(proj)}`);
    lines.push(
      `if git remote add origin ${q(plainUrl.toString())} 2>/dev/null; then echo "Created fresh repository."; else git remote set-url origin ${q(plainUrl.toString())}; fi`,
    );
    const fetch = ['git', '-c', q(`include.path=${ext}`), 'fetch', 'origin', '--no-recurse-submodules', ...refspecs.map(q)];
    if (depth > 0) fetch.push('--depth', String(depth));
    fetch.push('--prune', '--quiet');
    lines.push(fetch.join(' '));
    lines.push(`echo ${q(`Checking out ${this.job.sha.slice(0, 8)} as detached HEAD (ref is ${this.job.ref})...`)}`);
    lines.push(`git checkout -f -q ${q(this.job.sha)}`);
    lines.push('git clean -ffdx');
    lines.push(`if git lfs version >/dev/null 2>&1; then git -c ${q(`include.path=${ext}`)} lfs pull; fi`);
    lines.push('echo "Skipping Git submodules setup"');
  }

  // ---- JOB_RESPONSE_FILE

  payload(): unknown {
    const j = this.job;
    const pipelineId = j.pipelineId ?? 1000 + j.id;
    const steps: unknown[] = [
      { name: 'script', script: j.script, timeout: this.timeoutSeconds, when: 'on_success', allow_failure: false },
    ];
    if (j.afterScript?.length) {
      steps.push({ name: 'after_script', script: j.afterScript, timeout: this.timeoutSeconds, when: 'always', allow_failure: true });
    }
    return {
      id: j.id,
      token: j.token,
      allow_git_fetch: true,
      job_info: {
        id: j.id,
        name: j.name ?? 'test',
        stage: j.stage ?? 'test',
        project_id: j.projectId ?? 1,
        project_name: this.slug.split('/').pop(),
        project_jobs_count: 1,
        time_in_queue_seconds: 0,
      },
      git_info: {
        repo_url: this.tokenRepoUrl,
        repo_object_format: 'sha1',
        ref: j.ref,
        sha: j.sha,
        before_sha: j.beforeSha ?? '0'.repeat(40),
        ref_type: 'branch',
        refspecs: [`+refs/pipelines/${pipelineId}:refs/pipelines/${pipelineId}`, `+refs/heads/${j.ref}:refs/remotes/origin/${j.ref}`],
        depth: j.gitDepth ?? 0,
        protected: false,
      },
      runner_info: { timeout: this.timeoutSeconds, runner_session_url: null },
      variables: this.gitlabVariables().map((v) => ({
        key: v.key,
        value: v.value,
        public: v.public,
        file: !!v.file,
        masked: !!v.masked,
        raw: !!v.raw,
      })),
      steps,
      image: { name: j.image ?? '', alias: '', entrypoint: null, command: null, ports: [], pull_policy: null, executor_opts: {} },
      services: [],
      artifacts: null,
      cache: [],
      credentials: [],
      dependencies: [],
      features: { trace_sections: true, failure_reasons: ['script_failure', 'runner_system_failure', 'job_execution_timeout'] },
      hooks: [],
    };
  }
}

// ---------------------------------------------------------------------------------------------

/** `group/project` from the repository URL's path (no leading slash, no .git); project-<id> without a host. */
function projectSlug(job: JobSpec): string {
  const u = new URL(job.repoUrl);
  const slug = u.pathname.replace(/^\/+/, '').replace(/\.git$/, '').replace(/\/+$/, '');
  return u.host && slug ? slug : `project-${job.projectId ?? 1}`;
}

function slugify(s: string): string {
  return s
    .toLowerCase()
    .replace(/[^a-z0-9]/g, '-')
    .slice(0, 63)
    .replace(/^-+|-+$/g, '');
}

/** $NAME and ${NAME} replaced by the variable (empty when undefined), $$ by $. */
function expandVariables(value: string, lookup: (key: string) => string | undefined): string {
  return value.replace(/\$(?:(\$)|\{([A-Za-z0-9_]+)\}|([A-Za-z_][A-Za-z0-9_]*))/g, (_m, dollar?: string, braced?: string, bare?: string) =>
    dollar ? '$' : (lookup((braced ?? bare)!) ?? ''),
  );
}

function parseConfigOutput(stdout: string): ConfigOutput {
  if (stdout.trim() === '') return {};
  const doc: unknown = JSON.parse(stdout); // throws on garbage and on more than one document
  if (doc === null) return {};
  if (typeof doc !== 'object' || Array.isArray(doc)) throw new Error('config_exec output is not a JSON object');
  const o = doc as Record<string, unknown>;
  const out: ConfigOutput = {};
  const str = (key: string): string | undefined => {
    const v = o[key];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== 'string') throw new Error(`${key}: expected a string`);
    return v;
  };
  const bd = str('builds_dir');
  if (bd !== undefined) out.builds_dir = bd;
  const cd = str('cache_dir');
  if (cd !== undefined) out.cache_dir = cd;
  const hn = str('hostname');
  if (hn !== undefined) out.hostname = hn;
  const sh = str('shell');
  if (sh !== undefined) out.shell = sh;
  const shared = o.builds_dir_is_shared;
  if (shared !== undefined && shared !== null) {
    if (typeof shared !== 'boolean') throw new Error('builds_dir_is_shared: expected a boolean');
    out.builds_dir_is_shared = shared;
  }
  const driver = o.driver;
  if (driver !== undefined && driver !== null) {
    if (typeof driver !== 'object' || Array.isArray(driver)) throw new Error('driver: expected an object');
    const d = driver as Record<string, unknown>;
    out.driver = {};
    for (const k of ['name', 'version'] as const) {
      const v = d[k];
      if (v === undefined || v === null) continue;
      if (typeof v !== 'string') throw new Error(`driver.${k}: expected a string`);
      out.driver[k] = v;
    }
  }
  const jobEnv = o.job_env;
  if (jobEnv !== undefined && jobEnv !== null) {
    if (typeof jobEnv !== 'object' || Array.isArray(jobEnv)) throw new Error('job_env: expected an object');
    out.job_env = {};
    for (const [k, v] of Object.entries(jobEnv as Record<string, unknown>)) {
      if (typeof v !== 'string') throw new Error(`job_env.${k}: expected a string`);
      out.job_env[k] = v;
    }
  }
  return out;
}

function formatSeconds(ms: number): string {
  return ms % 1000 === 0 ? `${ms / 1000}s` : `${ms}ms`;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
