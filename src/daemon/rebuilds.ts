import { Cron } from 'croner';
import type { Config } from '../config/index.ts';
import { errorText } from '../errors.ts';
import { buildImage, findRecipe, recipeOf, type Image, type ImageStore, type Recipe } from '../images/index.ts';
import type { Logger } from '../log.ts';
import type { Progress } from '../progress.ts';
import type { StateStore } from '../state/index.ts';

// Scheduled rebuilds ([images] rebuild): at each time an image's cron expression names, mayflyd
// builds it again from its recipe (the full build) and publishes the result as a new version.
// A failed rebuild keeps the previous version and is reported: an error log line and an
// `image_rebuild_failed` event, which `mayfly events` and `mayfly image ls` show.

export interface RebuildSchedule {
  image: string;
  cron: string;
  timezone: string;
}

export function rebuildSchedules(config: Config): RebuildSchedule[] {
  return Object.entries(config.images.rebuild).map(([image, s]) =>
    typeof s === 'string' ? { image, cron: s, timezone: 'UTC' } : { image, cron: s.cron, timezone: s.timezone },
  );
}

export interface RebuildDeps {
  images: ImageStore;
  recipeDirs: readonly string[];
  log: Logger;
  /** Called with what happened: the daemon records it as an event. */
  report(type: 'image_rebuilt' | 'image_rebuild_failed', data: Record<string, unknown>): void;
  /** After a new version: collect unused old ones. */
  afterPublish(image: Image): void;
  /** The build itself (tests may stand in a cheaper one). */
  build?: (store: ImageStore, recipe: Recipe, opts: { log: Logger; signal: AbortSignal; progress: Progress }) => Promise<Image>;
}

/** The recipe an image is rebuilt from: the one its newest version came from, else the one of its name. */
export function rebuildRecipe(images: ImageStore, name: string, recipeDirs: readonly string[]): Recipe {
  const newest = images.versions(name).at(-1);
  const fromImage = newest === undefined ? undefined : recipeOf(images.get(name, newest)!, recipeDirs);
  return fromImage ?? findRecipe(name, recipeDirs);
}

/** A build's progress as log lines (mayflyd has no terminal). */
function logProgress(log: Logger, image: string): Progress {
  return {
    step: (label) => log.info({ image, step: label }, 'scheduled rebuild'),
    detail: () => {},
    done: (summary) => log.info({ image, summary }, 'scheduled rebuild finished'),
    fail: () => {},
  };
}

export class ImageRebuilds {
  readonly #deps: RebuildDeps;
  readonly #jobs: { image: string; cron: Cron }[] = [];
  readonly #running = new Map<string, Promise<void>>();
  readonly #stop = new AbortController();

  constructor(schedules: readonly RebuildSchedule[], deps: RebuildDeps) {
    this.#deps = deps;
    for (const s of schedules) {
      // protect: a rebuild still running when the next time comes is not started twice.
      this.#jobs.push({ image: s.image, cron: new Cron(s.cron, { timezone: s.timezone, paused: true, protect: true }, () => this.rebuild(s.image)) });
    }
  }

  start(): void {
    for (const j of this.#jobs) j.cron.resume();
  }

  /** When each scheduled image is rebuilt next. */
  next(): { image: string; at: Date | null }[] {
    return this.#jobs.map((j) => ({ image: j.image, at: j.cron.nextRun() }));
  }

  /** Rebuilds now (one rebuild per image at a time); never throws: failures are reported. */
  rebuild(name: string): Promise<void> {
    const running = this.#running.get(name);
    if (running) return running;
    const p = this.#rebuild(name).finally(() => this.#running.delete(name));
    this.#running.set(name, p);
    return p;
  }

  async #rebuild(name: string): Promise<void> {
    const d = this.#deps;
    const t0 = Date.now();
    d.log.info({ image: name }, 'scheduled rebuild started');
    try {
      const recipe = rebuildRecipe(d.images, name, d.recipeDirs);
      const build = d.build ?? buildImage;
      const img = await build(d.images, recipe, { log: d.log, signal: this.#stop.signal, progress: logProgress(d.log, name) });
      d.report('image_rebuilt', { image: name, version: img.version, id: img.id, seconds: Math.round((Date.now() - t0) / 1000) });
      d.afterPublish(img);
    } catch (e) {
      if (this.#stop.signal.aborted) {
        d.log.warn({ image: name }, 'scheduled rebuild cancelled: mayflyd stops');
        return;
      }
      const previous = d.images.versions(name).at(-1);
      d.log.error({ image: name, err: errorText(e), kept: previous ?? null }, 'scheduled rebuild failed; the previous version stays');
      d.report('image_rebuild_failed', { image: name, error: errorText(e), kept: previous ?? null });
    }
  }

  /** Stops the schedule and cancels running rebuilds (their scratch dirs are removed). */
  async stop(): Promise<void> {
    for (const j of this.#jobs) j.cron.stop();
    this.#stop.abort(new Error('mayflyd stops'));
    await Promise.allSettled([...this.#running.values()]);
  }
}

/** Scheduled rebuilds whose last attempt failed and that no newer version has made up for. */
export function failedRebuilds(state: StateStore, images: readonly Image[]): { image: string; at: number; error: string }[] {
  const last = new Map<string, { type: string; at: number; error: string }>();
  for (const e of state.recentEvents(2000)) {
    if ((e.type === 'image_rebuilt' || e.type === 'image_rebuild_failed') && typeof e.data.image === 'string') {
      last.set(e.data.image, { type: e.type, at: e.at, error: String(e.data.error ?? '') });
    }
  }
  return [...last]
    .filter(([name, l]) => l.type === 'image_rebuild_failed' && !images.some((i) => i.name === name && Date.parse(i.createdAt) > l.at))
    .map(([image, l]) => ({ image, at: l.at, error: l.error }));
}
