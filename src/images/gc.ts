import type { Logger } from '../log.ts';
import type { StateStore } from '../state/index.ts';
import type { ImageStore } from './store.ts';

// Garbage collection of image versions. A version goes only when nothing can still need it:
// it is not among the newest `keep` versions of its image, no instance record (running, kept,
// or being made) is a clone of it, no job record names it, and no pool is pinned to it. The
// choice is a pure function of plain data so it can be tested without a data dir.

export interface VersionRef {
  name: string;
  version: number;
}

/** Something that holds on to an image: `NAME` alone holds the newest version, `NAME:V` that one. */
export interface Holder {
  image: string;
  /** Who holds it, for the report: "instance vm-…", "job gitlab/…", "pool default". */
  by: string;
}

export interface GcDecision extends VersionRef {
  why: string;
}

export interface GcPlan {
  remove: GcDecision[];
  keep: GcDecision[];
}

export function parseImageRef(ref: string): { name: string; version: number | null } | undefined {
  const m = /^([a-z0-9][a-z0-9._-]{0,62})(?::(\d+))?$/.exec(ref);
  if (!m) return undefined;
  return { name: m[1]!, version: m[2] === undefined ? null : Number(m[2]) };
}

export function planGc(versions: readonly VersionRef[], holders: readonly Holder[], keep: number): GcPlan {
  const byName = new Map<string, number[]>();
  for (const v of versions) byName.set(v.name, [...(byName.get(v.name) ?? []), v.version]);
  const heldBy = new Map<string, string[]>();
  const hold = (name: string, version: number, by: string) => {
    const k = `${name}:${version}`;
    heldBy.set(k, [...(heldBy.get(k) ?? []), by]);
  };
  for (const h of holders) {
    const ref = parseImageRef(h.image);
    if (!ref) continue;
    const newest = byName.get(ref.name)?.reduce((a, b) => Math.max(a, b));
    if (ref.version !== null) hold(ref.name, ref.version, h.by);
    else if (newest !== undefined) hold(ref.name, newest, h.by);
  }
  const plan: GcPlan = { remove: [], keep: [] };
  for (const [name, list] of [...byName].sort(([a], [b]) => a.localeCompare(b))) {
    const newestFirst = [...new Set(list)].sort((a, b) => b - a);
    newestFirst.forEach((version, i) => {
      const by = heldBy.get(`${name}:${version}`);
      if (i < Math.max(1, keep)) plan.keep.push({ name, version, why: i === 0 ? 'newest' : `one of the newest ${keep}` });
      else if (by) plan.keep.push({ name, version, why: `in use by ${by.join(', ')}` });
      else plan.remove.push({ name, version, why: `older than the newest ${keep} and unused` });
    });
  }
  return plan;
}

/** Every holder mayfly knows of on this host: instance records, job records, configured pools. */
export function holders(state: StateStore, pools: readonly { name: string; image: string }[]): Holder[] {
  const out: Holder[] = [];
  for (const i of state.listInstances()) out.push({ image: `${i.imageName}:${i.imageVersion}`, by: `instance ${i.id}` });
  for (const j of state.listJobs()) {
    // A job's machine is an instance (above); its record also names the image, which outlives
    // the instance while a retried prepare may still start another one of the same version.
    const image = j.data.image;
    if (typeof image === 'string' && parseImageRef(image)?.version != null) out.push({ image, by: `job ${j.key}` });
  }
  for (const p of pools) out.push({ image: p.image, by: `pool ${p.name}` });
  return out;
}

export interface GcDeps {
  images: ImageStore;
  state: StateStore;
  pools: readonly { name: string; image: string }[];
  keep: number;
  log?: Logger;
}

/**
 * Removes the versions `planGc` gives up (only of `names` when given). Holders are read again
 * right before each removal: a machine may have been started on a version meanwhile.
 */
export function collectImages(deps: GcDeps, opts: { dryRun?: boolean; names?: readonly string[] } = {}): GcPlan {
  const versions = () =>
    deps.images.names().filter((n) => !opts.names || opts.names.includes(n)).flatMap((name) => deps.images.versions(name).map((version) => ({ name, version })));
  const plan = planGc(versions(), holders(deps.state, deps.pools), deps.keep);
  if (opts.dryRun) return plan;
  const done: GcPlan = { remove: [], keep: plan.keep };
  for (const d of plan.remove) {
    const again = planGc(versions(), holders(deps.state, deps.pools), deps.keep);
    const still = again.remove.find((r) => r.name === d.name && r.version === d.version);
    if (!still) {
      const k = again.keep.find((r) => r.name === d.name && r.version === d.version);
      if (k) done.keep.push(k);
      continue;
    }
    deps.images.remove(d.name, d.version);
    deps.log?.info({ image: `${d.name}:${d.version}`, why: d.why }, 'removed an old image version');
    done.remove.push(d);
  }
  return done;
}

export function formatGc(plan: GcPlan, dryRun = false): string {
  const lines = [
    ...plan.remove.map((d) => `${dryRun ? 'would remove' : 'removed'} ${d.name}:${d.version} (${d.why})`),
    ...plan.keep.map((d) => `kept ${d.name}:${d.version} (${d.why})`),
  ];
  return lines.length > 0 ? lines.join('\n') + '\n' : 'no image versions\n';
}
