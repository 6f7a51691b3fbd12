import type { Command } from 'commander';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { printJson } from '../format.ts';

interface PackageLicense {
  name: string;
  version: string;
  license: string;
  licenseFile: string | null;
  text: string | null;
}

const projectRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

interface PackageJson {
  name: string;
  version: string;
  license?: unknown;
  licenses?: { type?: string }[];
  dependencies?: Record<string, string>;
  optionalDependencies?: Record<string, string>;
}

function readPackage(dir: string): PackageJson {
  return JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8'));
}

/** Node's resolution: the nearest node_modules/NAME walking up from the requiring package. */
function resolvePackageDir(name: string, fromDir: string): string | undefined {
  for (let dir = fromDir; ; dir = dirname(dir)) {
    const candidate = join(dir, 'node_modules', name);
    if (existsSync(join(candidate, 'package.json'))) return candidate;
    if (dirname(dir) === dir) return undefined;
  }
}

function licenseOf(dir: string): PackageLicense {
  const pkg = readPackage(dir);
  const file = readdirSync(dir).find((f) => /^(licen[cs]e|copying)(\.|$)/i.test(f)) ?? null;
  // Old packages use a `licenses` array instead of an SPDX `license` string.
  const license =
    typeof pkg.license === 'string' ? pkg.license : (pkg.licenses?.map((l) => l.type).join(' OR ') || 'UNKNOWN');
  return {
    name: pkg.name,
    version: pkg.version,
    license,
    licenseFile: file ? join(dir, file) : null,
    text: file ? readFileSync(join(dir, file), 'utf8') : null,
  };
}

/** mayfly and every package it ships at run time (production dependencies, transitively). */
export function shippedLicenses(): PackageLicense[] {
  const out: PackageLicense[] = [licenseOf(projectRoot)];
  const seen = new Set<string>();
  const queue: string[] = [projectRoot];
  while (queue.length > 0) {
    const dir = queue.shift()!;
    const pkg = readPackage(dir);
    // Optional dependencies ship when npm installed them (a missing one resolves to nothing).
    for (const dep of Object.keys({ ...pkg.dependencies, ...pkg.optionalDependencies })) {
      const depDir = resolvePackageDir(dep, dir);
      if (!depDir || seen.has(depDir)) continue;
      seen.add(depDir);
      out.push(licenseOf(depDir));
      queue.push(depDir);
    }
  }
  return out.sort((a, b) => (a === out[0] ? -1 : b === out[0] ? 1 : a.name.localeCompare(b.name)));
}

export function registerLicenses(program: Command): void {
  program
    .command('licenses')
    .description("mayfly's license and those of every dependency it ships")
    .option('--full', 'print each license text too')
    .option('--json', 'JSON output')
    .action((o: { full?: boolean; json?: boolean }) => {
      const list = shippedLicenses();
      if (o.json || program.opts().json) {
        printJson(list.map(({ text, ...rest }) => (o.full ? { ...rest, text } : rest)));
        return;
      }
      for (const p of list) {
        process.stdout.write(`${p.name}@${p.version}  ${p.license}${p.licenseFile ? '' : '  (no license file shipped)'}\n`);
        if (o.full && p.text) process.stdout.write(`\n${p.text.trim()}\n\n${'-'.repeat(72)}\n`);
      }
    });
}
