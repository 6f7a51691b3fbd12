import type { Config } from '../../config/index.ts';
import { version } from '../../version.ts';

// The [[runners]] entry of gitlab-runner's config.toml that puts mayfly behind a runner.

export interface RunnerTomlOptions {
  name: string;
  url?: string;
  token?: string;
  /** Absolute path of the mayfly executable: the runner resolves relative ones against a temp dir. */
  exe: string;
  /** Global options every exec needs (--data-dir, --config) when they are not the defaults. */
  globalArgs: string[];
  pool?: string;
  defaultImage?: string;
  config: Config;
}

const q = (s: string) => JSON.stringify(s); // a JSON string is a valid TOML basic string
const list = (a: string[]) => `[${a.map(q).join(', ')}]`;

export function runnerToml(o: RunnerTomlOptions): string {
  const g = o.config.gitlab;
  const prepareArgs = [...o.globalArgs, 'gitlab', 'prepare'];
  if (o.pool) prepareArgs.push('--pool', o.pool);
  if (o.defaultImage) prepareArgs.push('--default-image', o.defaultImage);
  // A cold boot may be retried once with a verbose console; leave room for both and the lease queue.
  const prepareTimeout = o.config.qemu.boot_timeout * (o.config.qemu.boot_retries + 1) + 600;
  return [
    `# mayfly ${version}: GitLab Runner custom executor.`,
    '# Replace the [[runners]] entry that `gitlab-runner register --executor custom` wrote in',
    '# /etc/gitlab-runner/config.toml with this one, keeping the url and token register wrote.',
    '[[runners]]',
    `  name = ${q(o.name)}`,
    `  url = ${q(o.url ?? 'https://gitlab.example.com/')}${o.url ? '' : '  # your GitLab'}`,
    `  token = ${q(o.token ?? 'REPLACE-WITH-THE-RUNNER-TOKEN')}${o.token ? '' : '  # from gitlab-runner register'}`,
    '  executor = "custom"',
    `  builds_dir = ${q(g.builds_dir)}`,
    `  cache_dir = ${q(g.cache_dir)}`,
    '  shell = "bash"',
    '  [runners.custom]',
    `    config_exec = ${q(o.exe)}`,
    `    config_args = ${list([...o.globalArgs, 'gitlab', 'config'])}`,
    '    config_exec_timeout = 60',
    `    prepare_exec = ${q(o.exe)}`,
    `    prepare_args = ${list(prepareArgs)}`,
    `    prepare_exec_timeout = ${prepareTimeout}`,
    `    run_exec = ${q(o.exe)}`,
    `    run_args = ${list([...o.globalArgs, 'gitlab', 'run'])}`,
    `    cleanup_exec = ${q(o.exe)}`,
    `    cleanup_args = ${list([...o.globalArgs, 'gitlab', 'cleanup'])}`,
    '    cleanup_exec_timeout = 600',
    '    # mayfly gives a cancelled stage\'s processes gitlab.kill_grace seconds before SIGKILL',
    `    graceful_kill_timeout = ${g.kill_grace + 30}`,
    '    force_kill_timeout = 10',
    '',
  ].join('\n');
}
