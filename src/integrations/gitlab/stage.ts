import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import { errorText } from '../../errors.ts';
import type { ExecResult } from '../../guest/index.ts';
import type { Logger } from '../../log.ts';
import type { JobMachine } from '../job-machine.ts';

// One stage script of a GitLab job, run in the job's machine. The runner's script is fed to
// bash on stdin (its body never reads stdin: the envelope runs it `< /dev/null`). The stage runs
// in a session of its own whose id is written to a file, so that a cancelled job can end every
// process the stage started — background ones and those run through sudo included — with a
// sweep of /proc run as root, not only the shell the SSH channel knows about.

/** Where a stage records its session id: one file per stage call, removed when it ends. */
export function sessionFile(): string {
  return `/tmp/.mayfly-stage-${randomBytes(6).toString('hex')}.sid`;
}

// The stage's bash is started in the background of a small wrapper, which is not a process
// group leader, so `setsid` makes the new session without forking; `wait` then reports the
// stage's status as a shell does (128+N when a signal ended it). A background job's stdin
// would be /dev/null: `<&0` hands it the script instead.
// The session file stays while processes of the session (its process group) live on, for
// the KILL sweep that will follow; the KILL sweep removes it then.
const stageWrapper = `setsid bash -c 'echo $$ > "$1"; exec bash' mayfly-stage "$1" <&0 &
pid=$!
wait $pid
status=$?
kill -0 -- "-$pid" 2>/dev/null || rm -f "$1"
exit $status`;

/** Runs the script on stdin with bash, as the leader of a new session whose id goes to `file`. */
export function stageArgv(file: string): string[] {
  return ['bash', '-c', stageWrapper, 'mayfly-stage-wrapper', file];
}

// Signals every process of the recorded session and prints how many there were. Plain bash and
// /proc only: imported images need not have procps. In /proc/PID/stat the fields after the
// command name ("...) ") are state, ppid, pgrp, session; zombies (state Z) are already over.
const sweepScript = `sig=$1 file=$2
# A stage cancelled as it starts may not have written its session id yet.
for i in 1 2 3 4 5 6 7 8 9 10; do [ -s "$file" ] && break; sleep 0.2; done
sid=$(cat "$file" 2>/dev/null) || { echo 0; exit 0; }
case $sid in ''|*[!0-9]*) echo 0; exit 0;; esac
n=0
for st in /proc/[0-9]*/stat; do
  read -r line < "$st" 2>/dev/null || continue
  set -- \${line##*) }
  if [ "$4" = "$sid" ] && [ "$1" != Z ]; then
    p=\${st#/proc/}; p=\${p%/stat}
    kill -s "$sig" "$p" 2>/dev/null && n=$((n + 1))
  fi
done
[ "$sig" = KILL ] && rm -f "$file"
echo $n`;

/** Sends `signal` to every process of the session recorded in `file`; prints how many. */
export function sweepArgv(signal: 'TERM' | 'KILL', file: string): string[] {
  return ['bash', '-c', sweepScript, 'mayfly-sweep', signal, file];
}

export interface StageOptions {
  stdout: (c: Buffer) => void;
  stderr: (c: Buffer) => void;
  /** Aborted when the runner cancels the stage (SIGTERM). */
  signal: AbortSignal;
  /** How long the stage's processes get between SIGTERM and SIGKILL. */
  killGraceMs: number;
  log: Logger;
}

export interface StageOutcome {
  /** The script's exit, when it ended on its own or through the signals sent on cancel. */
  result: ExecResult | undefined;
  cancelled: boolean;
}

export async function runStage(m: JobMachine, script: Buffer, o: StageOptions): Promise<StageOutcome> {
  // Cancelled before it started: nothing to stop.
  if (o.signal.aborted) return { result: undefined, cancelled: true };
  const file = sessionFile();
  // Ends the SSH channel itself only when the stage does not end after SIGKILL.
  const hangUp = new AbortController();
  const main = m.exec(stageArgv(file), { stdin: script, stdout: o.stdout, stderr: o.stderr, signal: hangUp.signal });
  const ended = main.then(
    () => true,
    () => true,
  );
  const sweep = async (sig: 'TERM' | 'KILL'): Promise<void> => {
    let out = '';
    try {
      await m.exec(sweepArgv(sig, file), { root: true, stdout: (c) => (out += c.toString()) });
      o.log.info({ machine: m.id, signal: sig, processes: Number(out.trim()) || 0 }, 'signalled the cancelled stage\'s processes');
    } catch (e) {
      o.log.warn({ machine: m.id, signal: sig, err: errorText(e) }, 'could not signal the cancelled stage\'s processes');
    }
  };
  const cancel = async (): Promise<void> => {
    await sweep('TERM');
    if (await Promise.race([ended, sleep(o.killGraceMs).then(() => false)])) return;
    await sweep('KILL');
    if (await Promise.race([ended, sleep(3000).then(() => false)])) return;
    hangUp.abort(new Error('the stage did not end after SIGKILL'));
  };
  let cancelling: Promise<void> | undefined;
  const onAbort = () => {
    cancelling ??= cancel();
  };
  o.signal.addEventListener('abort', onAbort, { once: true });
  try {
    const result = await main;
    return { result, cancelled: o.signal.aborted };
  } catch (e) {
    if (o.signal.aborted) return { result: undefined, cancelled: true };
    throw e;
  } finally {
    o.signal.removeEventListener('abort', onAbort);
    await cancelling;
  }
}
