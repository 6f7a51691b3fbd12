import type { Command } from 'commander';
import { execJob } from '../../integrations/exec/run-job.ts';
import { collectPairs, positiveInt, type ContextFactory } from '../main.ts';
import { jobDiskOption, networkOption, obtainJobMachine, startOption, type MachineChoice } from '../job-machine.ts';
import { withSignals } from '../signals.ts';
import { registerSecretsFromEnv } from '../../secrets.ts';

export function registerExec(program: Command, context: ContextFactory): void {
  program
    .command('exec')
    .description('run one job of a .gitlab-ci.yml locally, in a fresh machine (like the removed gitlab-runner exec)')
    .argument('<job>', 'the job name')
    .option('-f, --file <path>', 'the CI file', '.gitlab-ci.yml')
    .option('--image <ref>', 'mayfly image to use instead of the job\'s')
    .option('--var <KEY=VALUE>', 'set a CI variable (repeatable; wins over the file)', collectPairs, {})
    .option('--cpus <n>', 'virtual CPUs', positiveInt('--cpus'))
    .option('--memory <MiB>', 'memory in MiB', positiveInt('--memory'))
    .option('--disk <GiB>', 'disk size in GiB', positiveInt('--disk'))
    .option('--pool <name>', 'take a ready machine from this mayflyd pool')
    .option('--no-daemon', 'boot a machine in this process even when mayflyd runs')
    .addOption(startOption())
    .addOption(jobDiskOption())
    .addOption(networkOption())
    .action(async (job: string, o: MachineChoice & { file: string; var: Record<string, string> }) => {
      const ctx = context();
      registerSecretsFromEnv(o.var);
      process.exitCode = await withSignals(ctx, (signal) =>
        execJob(
          ctx.engine(),
          { job, file: o.file, image: o.image, vars: o.var, stdout: process.stdout, stderr: process.stderr, signal },
          (image, owner) => obtainJobMachine(ctx, { ...o, image }, owner, signal),
        ),
      );
    });
}
