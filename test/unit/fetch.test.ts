import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { ErrorCode, MayflyError } from '../../src/errors.ts';
import { fetchVerified } from '../../src/images/fetch.ts';
import { parseRecipe } from '../../src/images/recipe.ts';

const dir = mkdtempSync(join(tmpdir(), 'mayfly-fetch-'));
after(() => rmSync(dir, { recursive: true, force: true }));

const content = '#!/bin/sh\necho "Version: 0.0.0-test"\n';
const sum = createHash('sha256').update(content).digest('hex');
const src = join(dir, 'gitlab-runner-src');
writeFileSync(src, content);

async function rejects(p: Promise<unknown>, code: string, pattern: RegExp): Promise<void> {
  await assert.rejects(p, (e: unknown) => e instanceof MayflyError && e.code === code && pattern.test(e.message));
}

test('a file with the right checksum is copied; a wrong one is refused and not kept', async () => {
  const dest = join(dir, 'out-1');
  await fetchVerified(src, sum.toUpperCase(), dest, 'gitlab_runner');
  assert.equal(readFileSync(dest, 'utf8'), content);
  const bad = join(dir, 'out-2');
  await rejects(fetchVerified(src, '0'.repeat(64), bad, 'gitlab_runner'), ErrorCode.IMAGE_BUILD_FAILED, new RegExp(`has SHA-256 ${sum}, but the recipe expects 0{64}`));
  assert.equal(existsSync(bad), false);
  await rejects(fetchVerified(join(dir, 'missing'), sum, join(dir, 'out-3'), 'gitlab_runner'), ErrorCode.RECIPE_INVALID, /missing does not exist/);
});

test('a URL is downloaded and checked the same way', async () => {
  const server = createServer((req, res) => {
    if (req.url === '/gitlab-runner') res.end(content);
    else res.writeHead(404).end('no');
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  try {
    const dest = join(dir, 'out-url');
    await fetchVerified(`${base}/gitlab-runner`, sum, dest, 'gitlab_runner');
    assert.equal(readFileSync(dest, 'utf8'), content);
    await rejects(fetchVerified(`${base}/other`, sum, join(dir, 'out-404'), 'gitlab_runner'), ErrorCode.IMAGE_BUILD_FAILED, /answered HTTP 404/);
  } finally {
    server.close();
  }
});

test('a recipe resolves a relative gitlab_runner path against its own file and checks the checksum format', () => {
  const r = parseRecipe(`name = "x"\n[gitlab_runner]\nsource = "bin/gitlab-runner"\nsha256 = "${sum}"\n`, '/srv/recipes/x.toml');
  assert.equal(r.gitlab_runner?.source, '/srv/recipes/bin/gitlab-runner');
  const url = parseRecipe(`name = "x"\n[gitlab_runner]\nsource = "https://example.invalid/gr"\nsha256 = "${sum}"\n`, '/srv/recipes/x.toml');
  assert.equal(url.gitlab_runner?.source, 'https://example.invalid/gr');
  assert.throws(
    () => parseRecipe('name = "x"\n[gitlab_runner]\nsource = "gr"\nsha256 = "abc"\n', '/srv/x.toml'),
    (e: unknown) => e instanceof MayflyError && /gitlab_runner.sha256: must be the file's SHA-256/.test(e.message),
  );
});
