import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, existsSync, rmSync } from 'node:fs';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { ErrorCode, MayflyError, errorText } from '../errors.ts';

// A file a recipe brings into the image (e.g. the gitlab-runner helper binary): from a path on
// the build host or an http(s) URL, accepted only when its SHA-256 is the one the recipe names.

async function sha256Of(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(path)) h.update(c as Buffer);
  return h.digest('hex');
}

export async function fetchVerified(source: string, sha256: string, dest: string, what: string, signal?: AbortSignal): Promise<void> {
  try {
    if (/^https?:\/\//.test(source)) {
      let res: Response;
      try {
        res = await fetch(source, { signal, redirect: 'follow' });
      } catch (e) {
        throw new MayflyError(ErrorCode.IMAGE_BUILD_FAILED, `${what}: cannot download ${source}: ${errorText((e as Error).cause ?? e)}`);
      }
      if (!res.ok || !res.body) throw new MayflyError(ErrorCode.IMAGE_BUILD_FAILED, `${what}: downloading ${source} answered HTTP ${res.status}`);
      await pipeline(Readable.fromWeb(res.body as import('node:stream/web').ReadableStream), createWriteStream(dest, { mode: 0o600 }), { signal });
    } else {
      if (!existsSync(source)) {
        throw new MayflyError(ErrorCode.RECIPE_INVALID, `${what}: ${source} does not exist`, { hint: 'give an absolute path on the build host, a path relative to the recipe, or an http(s) URL' });
      }
      await pipeline(createReadStream(source), createWriteStream(dest, { mode: 0o600 }), { signal });
    }
    const actual = await sha256Of(dest);
    if (actual !== sha256.toLowerCase()) {
      throw new MayflyError(ErrorCode.IMAGE_BUILD_FAILED, `${what}: ${source} has SHA-256 ${actual}, but the recipe expects ${sha256.toLowerCase()}`, {
        hint: 'the file is not the one the recipe names; check the source, or update sha256 in the recipe if the new file is trusted',
      });
    }
  } catch (e) {
    rmSync(dest, { force: true });
    throw e;
  }
}
