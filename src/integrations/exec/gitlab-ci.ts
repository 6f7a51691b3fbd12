// Reads a .gitlab-ci.yml the way GitLab does, far enough to run one job locally (`mayfly exec JOB`,
// standing in for the removed `gitlab-runner exec`). The order follows GitLab's own pipeline:
// YAML (anchors, merge keys) -> local includes -> `extends` -> `!reference` -> `default:` inheritance.
// Anything a job declares that we do not act on is reported, not silently dropped.

import { isMap, isNode, isScalar, LineCounter, parseDocument, visit } from 'yaml';
import type { CollectionTag, Scalar, ScalarTag, Tags } from 'yaml';
import { ErrorCode, errorText, MayflyError } from '../../errors.ts';

export interface CiJob {
  name: string;
  image: string | undefined;
  variables: Record<string, string>;
  beforeScript: string[];
  script: string[];
  afterScript: string[];
  /** Keywords on the resolved job that mayfly exec does not act on, sorted, for a warning. */
  ignoredKeywords: string[];
  file: string;
}

export interface CiFile {
  file: string;
  /** Jobs that can be run: not hidden, not keywords, and with a `script` (after `extends`). In file order. */
  jobNames: string[];
  warnings: string[];
  /** Includes that were not read (remote, project, template, component, or local without `readLocal`). */
  unfetchedIncludes: string[];
  /** Top-level config after includes, `extends` and `!reference` are resolved. */
  config: Record<string, unknown>;
  /** `file:line:col` of each top-level key (`at`) and of the value of each key directly under it. */
  positions: Record<string, { at: string; keys: Record<string, string> }>;
}

export interface ParseOptions {
  /**
   * Reads an `include: local:` file. GitLab resolves local includes from the repository root, so
   * the path is given as written minus any leading '/'; the caller maps it onto the checkout.
   * Without this, local includes are reported like remote ones.
   */
  readLocal?: (path: string) => string;
}

type Mapping = Record<string, unknown>;

const RESERVED = new Set([
  'default', 'include', 'stages', 'variables', 'workflow', 'image', 'services', 'cache', 'before_script',
  'after_script', 'types',
]);
// Deprecated top-level spellings of `default:` keys; `default:` wins when both are set.
const GLOBAL_DEFAULTS = ['image', 'services', 'cache', 'before_script', 'after_script'];
// Keywords mayfly exec acts on (or consumes: extends, inherit). `stage` is left out of the warning on
// purpose: it only orders jobs within a pipeline, and running one job alone loses nothing by it.
const HANDLED = new Set(['image', 'variables', 'before_script', 'script', 'after_script', 'extends', 'inherit', 'stage']);
const MAX_EXTENDS_DEPTH = 11; // GitLab: "up to 11 levels of inheritance"
const MAX_REFERENCE_DEPTH = 10; // GitLab: "up to 10 levels of nesting"
const MAX_INCLUDES = 150; // GitLab's default limit on included files
const MAX_ALIASES = 10_000; // yaml's default of 100 trips on ordinary anchor-heavy CI files

/** A `!reference [job, key, ...]` awaiting resolution; `at` is its `file:line:col`. */
class Reference {
  readonly path: string[];
  at = '';
  constructor(path: string[]) {
    this.path = path;
  }
}

export function parseCiFile(text: string, file: string, opts: ParseOptions = {}): CiFile {
  const warnings: string[] = [];
  const unfetchedIncludes: string[] = [];
  const loaded = loadWithIncludes(text, file, opts, { warnings, unfetchedIncludes, seen: new Set() });
  const { positions } = loaded;
  const ci: CiFile = { file, jobNames: [], warnings, unfetchedIncludes, config: {}, positions };
  ci.config = resolveReferences(resolveExtends(loaded.top, ci));

  for (const [name, value] of Object.entries(ci.config)) {
    if (RESERVED.has(name) || name.startsWith('.')) continue;
    if (isMapping(value) && value.script != null) ci.jobNames.push(name);
    else if (!(isMapping(value) && (value.trigger != null || value.run != null))) {
      warnings.push(`${where(ci, name)}: "${name}" is neither a keyword nor a job (it has no script or trigger); GitLab rejects this`);
    }
  }
  return ci;
}

export function resolveJob(ci: CiFile, name: string): CiJob {
  const job = get(ci.config, name);
  if (!ci.jobNames.includes(name) || !isMapping(job)) throw jobNotFound(ci, name, job);

  const inherit = job.inherit ?? {};
  if (!isMapping(inherit)) throw invalid(`${where(ci, name, 'inherit')}: job "${name}": inherit must be a mapping (default:, variables:)`);
  const inheritsDefault = inheritFilter(inherit.default, where(ci, name, 'inherit'), 'default');
  const inheritsVariable = inheritFilter(inherit.variables, where(ci, name, 'inherit'), 'variables');

  const defaults = get(ci.config, 'default') ?? {};
  if (!isMapping(defaults)) throw invalid(`${where(ci, 'default')}: default must be a mapping of keywords`);
  const globals = Object.fromEntries(GLOBAL_DEFAULTS.filter((k) => Object.hasOwn(ci.config, k)).map((k) => [k, ci.config[k]]));
  const inherited = Object.entries({ ...globals, ...defaults }).filter(([k]) => inheritsDefault(k));
  // Inheritance is per keyword: a job's own before_script replaces the default one, never appends.
  const full: Mapping = { ...Object.fromEntries(inherited), ...job };
  const at = (key: string) =>
    Object.hasOwn(job, key) ? where(ci, name, key) : Object.hasOwn(defaults, key) ? where(ci, 'default', key) : where(ci, key);

  const topVars = variablesOf(get(ci.config, 'variables'), where(ci, 'variables'), 'top-level variables');
  const jobVars = variablesOf(job.variables, at('variables'), `job "${name}": variables`);
  return {
    name,
    image: imageOf(full.image, at('image'), name),
    variables: Object.fromEntries([...topVars.filter(([k]) => inheritsVariable(k)), ...jobVars]),
    beforeScript: scriptOf(full.before_script, at('before_script'), name, 'before_script'),
    script: scriptOf(full.script, at('script'), name, 'script'),
    afterScript: scriptOf(full.after_script, at('after_script'), name, 'after_script'),
    ignoredKeywords: Object.keys(full).filter((k) => !HANDLED.has(k)).sort(),
    file: ci.file,
  };
}

// ---- YAML and includes ----

interface LoadState { warnings: string[]; unfetchedIncludes: string[]; seen: Set<string> }
interface Loaded { top: Mapping; positions: CiFile['positions'] }

function loadWithIncludes(text: string, file: string, opts: ParseOptions, state: LoadState): Loaded {
  const own = loadYaml(text, file, state.warnings);
  const include = own.top.include;
  if (include === undefined) return own;
  const includeAt = own.positions.include?.at ?? file;
  delete own.top.include;

  // GitLab deep-merges included files in order, then the including file on top of them.
  let merged: Loaded = { top: {}, positions: {} };
  const skipped: string[] = [];
  for (const entry of Array.isArray(include) ? include.flat() : [include]) {
    const local = localInclude(entry);
    if (local === undefined || opts.readLocal === undefined || local.includes('*')) {
      skipped.push(describeInclude(entry));
      continue;
    }
    if (state.seen.has(local)) continue;
    state.seen.add(local);
    if (state.seen.size > MAX_INCLUDES) throw invalid(`${includeAt}: more than ${MAX_INCLUDES} included files`);
    let content: string;
    try {
      content = opts.readLocal(local);
    } catch (e) {
      throw invalid(`${includeAt}: cannot read included file "${local}": ${errorText(e)}`, e);
    }
    merged = mergeLoaded(merged, loadWithIncludes(content, local, opts, state));
  }
  if (skipped.length > 0) {
    state.unfetchedIncludes.push(...skipped);
    state.warnings.push(
      `${includeAt}: mayfly exec does not fetch these includes, so jobs, templates and variables defined in them are missing: ${skipped.join('; ')}`,
    );
  }
  return mergeLoaded(merged, own);
}

function mergeLoaded(base: Loaded, over: Loaded): Loaded {
  const added = Object.entries(over.positions).map(([k, p]) => [k, { at: p.at, keys: { ...base.positions[k]?.keys, ...p.keys } }]);
  return { top: deepMerge(base.top, over.top), positions: { ...base.positions, ...Object.fromEntries(added) } };
}

function localInclude(entry: unknown): string | undefined {
  const path = typeof entry === 'string' && !/^https?:\/\//.test(entry) ? entry : isMapping(entry) ? entry.local : undefined;
  return typeof path === 'string' ? path.replace(/^\/+/, '') : undefined;
}

function describeInclude(entry: unknown): string {
  if (!isMapping(entry)) return String(entry);
  const kinds = ['local', 'remote', 'template', 'project', 'file', 'ref', 'component'];
  return kinds.filter((k) => entry[k] !== undefined).map((k) => `${k}: ${String(entry[k])}`).join(', ');
}

function loadYaml(text: string, file: string, warnings: string[]): Loaded {
  const lc = new LineCounter();
  const pos = (offset: number) => {
    const { line, col } = lc.linePos(offset);
    return `${file}:${line}:${col}`;
  };
  const refs: Array<{ ref: Reference; offset: number }> = [];
  const referenceTag: CollectionTag = {
    tag: '!reference',
    collection: 'seq',
    resolve(seq, onError) {
      const path = seq.items.map((i) => (isScalar(i) && typeof i.value !== 'object' ? String(i.value) : undefined));
      if (path.length === 0 || path.includes(undefined)) {
        onError('!reference needs a list of plain names, like !reference [.setup, script]');
        return seq;
      }
      const ref = new Reference(path as string[]);
      // Point at the tag rather than the list after it, as yaml does for its own tag errors.
      const tagOffset = text.lastIndexOf('!reference', seq.range[0]);
      refs.push({ ref, offset: tagOffset >= 0 ? tagOffset : seq.range[0] });
      return ref;
    },
  };

  // GitLab reads YAML with Ruby's Psych, which is YAML 1.1: merge keys, and yes/no/on/off are
  // booleans (so `FOO: yes` is the variable "true"). Psych does not treat y/n as booleans, and
  // GitLab refuses dates, so those stay strings here.
  const doc = parseDocument(text, {
    version: '1.1',
    merge: true,
    uniqueKeys: false, // Psych lets a later duplicate key win; so does GitLab
    prettyErrors: false,
    lineCounter: lc,
    customTags: (tags: Tags) => [
      ...tags.filter((t) => typeof t === 'string' || (t.tag !== 'tag:yaml.org,2002:bool' && t.tag !== 'tag:yaml.org,2002:timestamp')),
      psychBool(true, /^(?:yes|true|on)$/i),
      psychBool(false, /^(?:no|false|off)$/i),
      referenceTag,
    ],
  });
  const error = doc.errors[0];
  if (error) throw invalid(`${pos(error.pos[0])}: invalid YAML: ${error.message}`, error);
  for (const w of doc.warnings) warnings.push(`${pos(w.pos[0])}: ${w.message}`);
  for (const { ref, offset } of refs) ref.at = pos(offset);

  const contents = doc.contents;
  if (contents === null || (isScalar(contents) && contents.value === null)) {
    throw invalid(`${file}: the file is empty; it needs at least one job with a script`);
  }
  if (!isMap(contents)) {
    throw invalid(`${pos(contents.range[0])}: the top level must be a mapping of jobs and keywords, not a ${isScalar(contents) ? 'scalar' : 'list'}`);
  }
  // yaml only notices an alias without an anchor when converting, and then without a position.
  visit(doc, {
    Alias(_, alias) {
      if (alias.resolve(doc) === undefined) {
        throw invalid(`${pos(alias.range?.[0] ?? 0)}: invalid YAML: alias *${alias.source} has no anchor &${alias.source} before it`);
      }
    },
  });
  let top: unknown;
  try {
    top = doc.toJS({ maxAliasCount: MAX_ALIASES });
  } catch (e) {
    throw invalid(`${file}: ${errorText(e)}`, e);
  }

  // Keys only as written in this file: ones pulled in by `<<` merges fall back to their parent's position.
  const offsetOf = (node: unknown, fallback: number) => (isNode(node) ? (node.range?.[0] ?? fallback) : fallback);
  const named = (pairs: Array<{ key: unknown; value: unknown }>) =>
    pairs.filter((p) => isScalar(p.key) && typeof p.key.value !== 'symbol') as Array<{ key: Scalar; value: unknown }>;
  const positions = Object.fromEntries(named(contents.items).map((pair) => {
    const keyOffset = offsetOf(pair.key, 0);
    const keys = isMap(pair.value)
      ? named(pair.value.items).map((p) => [String(p.key.value), pos(offsetOf(p.value, offsetOf(p.key, keyOffset)))])
      : [];
    return [String(pair.key.value), { at: pos(keyOffset), keys: Object.fromEntries(keys) }];
  }));
  return { top: top as Mapping, positions };
}

function psychBool(value: boolean, test: RegExp): ScalarTag {
  return { tag: 'tag:yaml.org,2002:bool', default: true, test, identify: (v) => v === value, resolve: () => value };
}

// ---- extends and !reference ----

function resolveExtends(top: Mapping, ci: CiFile): Mapping {
  // `lineage` is the longest extends path from the job up, for the nesting limit and its message.
  const done = new Map<string, { merged: Mapping; lineage: string[] }>();
  const visit = (name: string, own: Mapping, chain: string[]): { merged: Mapping; lineage: string[] } => {
    const cached = done.get(name);
    if (cached) return cached;
    if (own.extends === undefined) return { merged: own, lineage: [name] };

    const at = where(ci, name, 'extends');
    const parents = typeof own.extends === 'string' ? [own.extends] : own.extends;
    if (!Array.isArray(parents) || !parents.every((p) => typeof p === 'string')) {
      throw invalid(`${at}: job "${name}": extends must be a job name or a list of job names`);
    }
    let merged: Mapping = {};
    let longest: string[] = [];
    for (const parent of parents) {
      if (parent === name || chain.includes(parent)) {
        throw invalid(`${at}: extends cycle: ${[...chain, name, parent].join(' -> ')}`);
      }
      const base = get(top, parent);
      if (base === undefined) {
        const templates = Object.keys(top).filter((k) => k.startsWith('.'));
        const known = templates.length > 0 ? `templates: ${templates.join(', ')}` : 'the file defines no templates';
        throw invalid(`${at}: job "${name}" extends "${parent}" which does not exist (${known})`, undefined,
          ci.unfetchedIncludes.length > 0 ? 'It may be defined in an include, which mayfly exec does not fetch.' : undefined);
      }
      if (!isMapping(base)) throw invalid(`${at}: job "${name}" extends "${parent}", which is not a mapping of keywords`);
      const resolved = visit(parent, base, [...chain, name]);
      // Later parents win over earlier ones; the job's own keys win over all of them.
      merged = deepMerge(merged, resolved.merged);
      if (resolved.lineage.length > longest.length) longest = resolved.lineage;
    }
    const lineage = [name, ...longest];
    if (lineage.length - 1 > MAX_EXTENDS_DEPTH) {
      throw invalid(`${at}: job "${name}" extends ${lineage.length - 1} levels deep, more than GitLab's ${MAX_EXTENDS_DEPTH}: ${lineage.join(' -> ')}`);
    }
    const { extends: _consumed, ...rest } = own;
    const result = { merged: deepMerge(merged, rest), lineage };
    done.set(name, result);
    return result;
  };
  return Object.fromEntries(Object.entries(top).map(([k, v]) => [k, isMapping(v) ? visit(k, v, []).merged : v]));
}

// Runs after `extends`, like GitLab, so a reference sees the referenced job's inherited keys too.
function resolveReferences(config: Mapping): Mapping {
  const lookup = (ref: Reference, depth: number): unknown => {
    const shown = `!reference [${ref.path.join(', ')}]`;
    if (depth > MAX_REFERENCE_DEPTH) {
      throw invalid(`${ref.at}: ${shown} nests references more than ${MAX_REFERENCE_DEPTH} levels deep (does it refer to itself?)`);
    }
    let value: unknown = config;
    for (const [i, key] of ref.path.entries()) {
      const next = isMapping(value) ? get(value, key) : undefined;
      if (next === undefined) {
        const missing = i === 0 ? `there is no top-level "${key}"` : `"${ref.path.slice(0, i).join('.')}" has no key "${key}"`;
        throw invalid(`${ref.at}: ${shown} cannot be resolved: ${missing}`);
      }
      value = next;
    }
    return walk(value, depth + 1);
  };
  const walk = (value: unknown, depth: number): unknown => {
    if (value instanceof Reference) return lookup(value, depth);
    if (Array.isArray(value)) return value.map((v) => walk(v, depth));
    if (isMapping(value)) return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, walk(v, depth)]));
    return value;
  };
  return walk(config, 0) as Mapping;
}

// ---- job fields ----

function inheritFilter(setting: unknown, at: string, what: string): (key: string) => boolean {
  if (setting === undefined || setting === true) return () => true;
  if (setting === false) return () => false;
  if (Array.isArray(setting) && setting.every((s) => typeof s === 'string')) return (key) => setting.includes(key);
  throw invalid(`${at}: inherit: ${what}: must be true, false or a list of names`);
}

function variablesOf(value: unknown, at: string, what: string): Array<[string, string]> {
  if (value == null) return [];
  if (!isMapping(value)) throw invalid(`${at}: ${what} must be a mapping of NAME: value`);
  return Object.entries(value).map(([name, v]) => {
    // The `{value:, description:}` form is for prefilled manual-pipeline variables; only value matters here.
    const raw = isMapping(v) ? (v.value ?? '') : v;
    if (raw === null) return [name, ''];
    if (typeof raw === 'string' || typeof raw === 'number' || typeof raw === 'boolean') return [name, String(raw)];
    throw invalid(`${at}: ${what}: ${name} must be a string, number or boolean (or {value: ...}), not a ${kindOf(raw)}`);
  });
}

function imageOf(value: unknown, at: string, job: string): string | undefined {
  if (value == null) return undefined;
  if (typeof value === 'string') return value;
  if (isMapping(value) && typeof value.name === 'string') return value.name;
  throw invalid(`${at}: job "${job}": image must be a name or a mapping with name:`);
}

function scriptOf(value: unknown, at: string, job: string, key: string): string[] {
  if (value == null) return [];
  // GitLab allows nested arrays in scripts, which is what an array-valued !reference becomes.
  const lines: unknown[] = Array.isArray(value) ? value.flat(Infinity) : [value];
  return lines.map((line, i) => {
    if (typeof line === 'string') return line;
    const hint = isMapping(line) ? ' (a line containing ": " must be quoted)' : ' (quote it)';
    throw invalid(`${at}: job "${job}": ${key} line ${i + 1} is a ${kindOf(line)}, not a string${hint}`);
  });
}

function jobNotFound(ci: CiFile, name: string, value: unknown): MayflyError {
  const jobs = ci.jobNames.length > 0 ? `jobs: ${ci.jobNames.join(', ')}` : `${ci.file} defines no runnable jobs`;
  let problem: string;
  let hint: string | undefined;
  if (value === undefined) {
    problem = `no job "${name}" in ${ci.file}`;
    if (ci.unfetchedIncludes.length > 0) hint = 'It may be defined in an include, which mayfly exec does not fetch.';
  } else if (name.startsWith('.')) {
    problem = `"${name}" is a hidden job (its name starts with "."), which GitLab never runs, so mayfly exec cannot either`;
    hint = 'Run a job that extends it, or copy it to a name without the leading ".".';
  } else if (RESERVED.has(name)) {
    problem = `"${name}" is a top-level keyword in ${ci.file}, not a job`;
  } else if (isMapping(value) && value.trigger != null) {
    problem = `"${name}" is a trigger job: it starts a downstream pipeline and has no script to run`;
  } else {
    problem = `"${name}" in ${ci.file} is not a runnable job: it has no script`;
  }
  return new MayflyError(ErrorCode.CI_JOB_NOT_FOUND, `${problem}; ${jobs}`, hint === undefined ? {} : { hint });
}

// ---- helpers ----

function isMapping(v: unknown): v is Mapping {
  if (v === null || typeof v !== 'object') return false;
  const proto: unknown = Object.getPrototypeOf(v);
  return proto === Object.prototype || proto === null;
}

/** Own keys only: job and key names come from the file, and "constructor" must not find Object's. */
function get(m: Mapping, key: string): unknown {
  return Object.hasOwn(m, key) ? m[key] : undefined;
}

/** GitLab's deep_merge: mappings merge key by key; lists and scalars are replaced. */
function deepMerge(base: Mapping, over: Mapping): Mapping {
  const merged = Object.entries(over).map(([k, v]): [string, unknown] => {
    const b = get(base, k);
    return [k, isMapping(b) && isMapping(v) ? deepMerge(b, v) : v];
  });
  return { ...base, ...Object.fromEntries(merged) };
}

function where(ci: CiFile, top: string, key?: string): string {
  const p = Object.hasOwn(ci.positions, top) ? ci.positions[top] : undefined;
  return (key === undefined ? undefined : p?.keys[key]) ?? p?.at ?? ci.file;
}

function kindOf(v: unknown): string {
  if (Array.isArray(v)) return 'list';
  if (isMapping(v)) return 'mapping';
  return v === null ? 'null' : typeof v;
}

function invalid(message: string, cause?: unknown, hint?: string): MayflyError {
  return new MayflyError(ErrorCode.CI_FILE_INVALID, message, {
    ...(cause === undefined ? {} : { cause }),
    ...(hint === undefined ? {} : { hint }),
  });
}
