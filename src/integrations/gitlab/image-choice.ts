import { ErrorCode, MayflyError } from '../../errors.ts';
import type { Image, ImageStore } from '../../images/store.ts';

// Which mayfly image a GitLab job runs on. A job's `image:` is a container reference
// ("ruby:3.3", "registry.example.com/ci/base:2"); mayfly images are built from recipes. The
// config maps the one to the other; a job may also name a mayfly image directly.

export interface ImageChoiceRules {
  /** [gitlab.images]: CI_JOB_IMAGE → NAME or NAME:VERSION. */
  map: Record<string, string>;
  /** For jobs that name no image. */
  defaultImage: string;
}

export interface ImageChoice {
  image: Image;
  /** How it was chosen, for the job log. */
  why: string;
}

export function chooseImage(jobImage: string | undefined, rules: ImageChoiceRules, images: ImageStore): ImageChoice {
  const requested = jobImage?.trim() ?? '';
  if (requested === '') {
    return { image: resolveOrExplain(images, rules.defaultImage, `the default image ${rules.defaultImage}`), why: 'the job names no image: default' };
  }
  const mapped = rules.map[requested];
  if (mapped !== undefined) {
    return { image: resolveOrExplain(images, mapped, `image ${mapped} (mapped from ${requested})`), why: `${requested} → ${mapped} (gitlab.images)` };
  }
  const direct = /^([a-z0-9][a-z0-9._-]{0,62})(?::(\d+))?$/.exec(requested);
  if (direct && images.versions(direct[1]!).length > 0) {
    return { image: resolveOrExplain(images, requested, `image ${requested}`), why: 'the job names a mayfly image' };
  }
  throw new MayflyError(ErrorCode.IMAGE_NOT_FOUND, `the job's image '${requested}' is not a mayfly image and is not mapped to one. ${available(images, rules)}`, {
    hint: `change the job's image: to one of those, or map it in mayfly's config:\n    [gitlab.images]\n    "${requested}" = "debian-12"`,
  });
}

function resolveOrExplain(images: ImageStore, ref: string, what: string): Image {
  try {
    return images.resolve(ref);
  } catch (e) {
    if (!(e instanceof MayflyError && e.code === ErrorCode.IMAGE_NOT_FOUND)) throw e;
    const name = ref.split(':')[0]!;
    throw new MayflyError(ErrorCode.IMAGE_NOT_FOUND, `${what} is not built on this runner host (${e.message})`, {
      hint: images.versions(name).length > 0 ? (e.hint ?? '') : `build it on the runner host: mayfly image build ${name}`,
    });
  }
}

function available(images: ImageStore, rules: ImageChoiceRules): string {
  const built = images.names().map((n) => `${n} (versions ${images.versions(n).join(', ')})`);
  const mapped = Object.entries(rules.map).map(([k, v]) => `"${k}" → ${v}`);
  return [
    built.length > 0 ? `Images on this runner: ${built.join(', ')}.` : 'No image is built on this runner yet.',
    mapped.length > 0 ? `Mapped job images: ${mapped.join(', ')}.` : 'No job image is mapped ([gitlab.images] in the config).',
  ].join(' ');
}
