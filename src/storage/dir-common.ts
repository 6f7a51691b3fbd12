import { lstatSync, mkdtempSync, statSync, type Stats } from 'node:fs';
import { isAbsolute, join } from 'node:path';
import { ErrorCode, MayflyError, errorText } from '../errors.ts';
import { lastLines, type RunResult } from '../util/exec.ts';
import { removeTree } from './mounts.ts';
import type { CloneRequest, Probe } from './types.ts';

// What the directory backends (btrfs-snapshot, reflink, overlayfs, copy) share: checking a
// clone request, the clone's place in the instance dir, and a scratch dir for probes.

/** Every directory clone is the instance dir's `root`, whichever backend made it. */
export const CLONE_ROOT = 'root';

export function lstatOrUndefined(path: string): Stats | undefined {
  try {
    return lstatSync(path);
  } catch {
    return undefined;
  }
}

/** Checks a directory clone request and returns where the clone goes. */
export function checkDirRequest(req: CloneRequest, backend: string): { base: string; root: string } {
  const bad = (message: string, hint?: string) => new MayflyError(ErrorCode.CLONE_FAILED, `${backend}: ${message}`, hint ? { hint } : {});
  if (!isAbsolute(req.base)) throw bad(`the image root must be an absolute path, got '${req.base}'`);
  if (!isAbsolute(req.instanceDir)) throw bad(`the instance dir must be an absolute path, got '${req.instanceDir}'`);
  let base: Stats;
  try {
    base = statSync(req.base);
  } catch {
    throw bad(`the image root ${req.base} does not exist`, 'the image is incomplete or was removed: rebuild it (mayfly image build)');
  }
  if (!base.isDirectory()) throw bad(`the image root ${req.base} is not a directory`, 'directory backends clone container images; VM disks use qcow2-overlay');
  const dir = lstatOrUndefined(req.instanceDir);
  if (!dir?.isDirectory()) throw bad(`the instance dir ${req.instanceDir} does not exist or is not a directory`);
  const root = join(req.instanceDir, CLONE_ROOT);
  if (lstatOrUndefined(root)) throw bad(`${root} already exists`, 'an instance dir holds one clone; remove the old one first');
  return { base: req.base, root };
}

/** The tail of a failed command's output, for error messages. */
export function output(r: RunResult): string {
  return lastLines((r.stderr || r.stdout).trim(), 5);
}

/**
 * Runs a probe in a fresh scratch dir inside `dir` (so it tests that filesystem) and removes the
 * scratch dir afterwards, unmounting anything left in it. A probe that throws counts as unusable.
 * `cleanup` runs first, for artifacts `rm` cannot remove (btrfs subvolumes).
 */
export async function withScratch(
  dir: string,
  backend: string,
  fn: (scratch: string) => Promise<Probe>,
  cleanup?: (scratch: string) => Promise<void>,
): Promise<Probe> {
  let scratch: string;
  try {
    scratch = mkdtempSync(join(dir, `.mayfly-probe-${backend}-`));
  } catch (e) {
    return { usable: false, reason: `cannot make a test dir in ${dir}: ${errorText(e)}` };
  }
  let result: Probe;
  try {
    result = await fn(scratch);
  } catch (e) {
    result = { usable: false, reason: `the test in ${dir} failed: ${errorText(e)}` };
  }
  try {
    if (cleanup) await cleanup(scratch);
    await removeTree(scratch);
  } catch (e) {
    // A backend whose own test leaves something behind is not one to trust with clones.
    result = { usable: false, reason: `could not clean up the test dir ${scratch}: ${errorText(e)}` };
  }
  return result;
}
