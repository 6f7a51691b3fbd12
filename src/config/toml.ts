// Loads TOML files (the main config, image recipes, ...) and validates them against a zod
// schema. Users edit these files by hand, so every problem is reported as `FILE:LINE: KEY:
// REASON`, all at once, so that one run shows everything that needs fixing.

import { readFileSync } from 'node:fs';
import { parse, TomlError } from 'smol-toml';
import * as z from 'zod';
import { ErrorCode, MayflyError, errorText } from '../errors.ts';

export type KeyPath = readonly (string | number)[];

/** Parses `text` (read from `file`, used in messages) and validates it against `schema`. */
export function parseToml<T>(text: string, file: string, schema: z.ZodType<T>, opts: { errorCode?: string } = {}): T {
  // A leading BOM is common in files saved by Windows editors and is not a TOML syntax error.
  const source = text.startsWith('\uFEFF') ? text.slice(1) : text;
  let data: unknown;
  try {
    data = parse(source);
  } catch (e) {
    throw syntaxError(e, file);
  }
  const result = schema.safeParse(data);
  if (result.success) return result.data;
  const message = describeIssues(result.error.issues, { text: source, file, schema, data });
  throw new MayflyError(opts.errorCode ?? ErrorCode.CONFIG_INVALID, message, { cause: result.error });
}

/**
 * Reads and validates a TOML file. With `optional`, a file that does not exist yields
 * `undefined`; any other read failure is still an error, since silently ignoring an unreadable
 * config would run with settings the user did not ask for.
 */
export function loadTomlFile<T>(
  path: string,
  schema: z.ZodType<T>,
  opts: { errorCode?: string; optional?: boolean } = {},
): T | undefined {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && opts.optional) return undefined;
    const why = code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : code === 'EISDIR' ? 'it is a directory' : errorText(e);
    throw new MayflyError(ErrorCode.CONFIG_NOT_FOUND, `cannot read ${path}: ${why}`, { cause: e });
  }
  return parseToml(text, path, schema, opts.errorCode === undefined ? {} : { errorCode: opts.errorCode });
}

function syntaxError(e: unknown, file: string): MayflyError {
  if (!(e instanceof TomlError)) {
    return new MayflyError(ErrorCode.CONFIG_PARSE, `${file}: invalid TOML: ${errorText(e)}`, { cause: e });
  }
  // smol-toml's message is "Invalid TOML document: REASON\n\nCODEBLOCK"; keep the reason and
  // show the code block (the offending line with a caret) below our own location prefix.
  const reason = (e.message.split('\n')[0] ?? '').replace(/^Invalid TOML document:\s*/, '');
  const snippet = e.codeblock.trimEnd();
  const message = `${file}:${e.line}:${e.column}: invalid TOML: ${reason}` + (snippet ? `\n\n${snippet}` : '');
  return new MayflyError(ErrorCode.CONFIG_PARSE, message, { cause: e });
}

// ---------------------------------------------------------------------------------------------
// Issue formatting

interface IssueContext {
  text: string;
  file: string;
  schema: z.ZodType;
  data: unknown;
}

/** One line per problem, ordered by line so the message reads top to bottom like the file. */
function describeIssues(issues: readonly z.core.$ZodIssue[], ctx: IssueContext): string {
  const locations = locateKeys(ctx.text);
  const lines: { line: number; text: string }[] = [];
  const add = (path: KeyPath, reason: string): void => {
    const line = lineForPath(locations, path);
    lines.push({ line, text: `${ctx.file}:${line}: ${formatKeyPath(path) || '(top level)'}: ${reason}` });
  };
  for (const issue of issues) {
    const path = issue.path.map((p) => (typeof p === 'number' ? p : String(p)));
    if (issue.code === 'unrecognized_keys') {
      const known = knownKeys(schemaAt(ctx.schema, path));
      for (const key of issue.keys) add([...path, key], unknownKeyReason(key, known));
    } else {
      add(path, issueReason(issue, path, ctx));
    }
  }
  return lines
    .sort((a, b) => a.line - b.line)
    .map((l) => l.text)
    .join('\n');
}

function unknownKeyReason(key: string, known: readonly string[]): string {
  const guess = closestMatch(key, known);
  if (guess !== undefined) return `unknown key '${key}' — did you mean '${guess}'?`;
  if (known.length > 0 && known.length <= 12) return `unknown key '${key}' (valid keys here: ${known.join(', ')})`;
  return `unknown key '${key}'`;
}

function issueReason(issue: z.core.$ZodIssue, path: KeyPath, ctx: IssueContext): string {
  const value = valueAt(ctx.data, path);
  const got = showValue(value);
  switch (issue.code) {
    case 'invalid_type': {
      if (value === undefined) return 'required key is missing';
      // zod reports "number" for a non-number given to z.int(); the schema knows better.
      const schema = schemaAt(ctx.schema, path);
      const expected = schema instanceof z.ZodNumber && schema.isInt ? 'int' : issue.expected;
      return `expected ${expectedName(expected)}, got ${describeValue(value)}`;
    }
    case 'invalid_value': {
      const options = issue.values.map((v) => JSON.stringify(v));
      const guess = typeof value === 'string' ? closestMatch(value, issue.values.filter((v) => typeof v === 'string')) : undefined;
      const hint = guess === undefined ? '' : ` — did you mean "${guess}"?`;
      return `must be ${options.length === 1 ? options[0] : `one of ${options.join(', ')}`} (got ${got})${hint}`;
    }
    case 'too_small':
    case 'too_big':
      return sizeReason(issue, schemaAt(ctx.schema, path), got);
    case 'not_multiple_of':
      return `must be a multiple of ${String(issue.divisor)} (got ${got})`;
    default:
      // Format and custom checks carry the schema author's own wording (e.g. "must be an
      // absolute path"); the value is appended so the user sees what was rejected.
      return value === undefined || typeof value === 'object' ? issue.message : `${issue.message} (got ${got})`;
  }
}

function sizeReason(issue: z.core.$ZodIssueTooSmall | z.core.$ZodIssueTooBig, schema: z.ZodType | undefined, got: string): string {
  const small = issue.code === 'too_small';
  const bound = String(small ? issue.minimum : issue.maximum);
  if (issue.origin === 'number' || issue.origin === 'int' || issue.origin === 'bigint') {
    if (schema instanceof z.ZodNumber && isRealBound(schema.minValue) && isRealBound(schema.maxValue)) {
      const kind = schema.isInt ? 'an integer' : 'a number';
      return `must be ${kind} from ${schema.minValue} to ${schema.maxValue} (got ${got})`;
    }
    const cmp = small ? (issue.inclusive ? 'at least' : 'greater than') : issue.inclusive ? 'at most' : 'less than';
    return `must be ${cmp} ${bound} (got ${got})`;
  }
  if (issue.origin === 'string') {
    if (small && bound === '1') return 'must not be empty';
    return `must be ${small ? 'at least' : 'at most'} ${bound} characters long (got ${got})`;
  }
  if (issue.origin === 'array' || issue.origin === 'set') {
    if (small && bound === '1') return 'must not be empty';
    return `must have ${small ? 'at least' : 'at most'} ${bound} entries`;
  }
  return issue.message;
}

// z.int() reports ±MAX_SAFE_INTEGER and z.number() ±Infinity when no bound was set.
function isRealBound(n: number | null): n is number {
  return n !== null && Math.abs(n) < Number.MAX_SAFE_INTEGER;
}

function expectedName(expected: string): string {
  const names: Record<string, string> = {
    string: 'a string',
    number: 'a number',
    int: 'an integer',
    bigint: 'an integer',
    boolean: 'true or false',
    array: 'an array',
    object: 'a table',
    date: 'a date-time',
  };
  return names[expected] ?? expected;
}

/** The value as written in TOML, for "(got ...)"; containers are named rather than dumped. */
function showValue(value: unknown): string {
  if (typeof value === 'string') return JSON.stringify(value.length > 40 ? `${value.slice(0, 37)}...` : value);
  if (typeof value === 'number' || typeof value === 'bigint' || typeof value === 'boolean') return String(value);
  if (Array.isArray(value)) return 'an array';
  if (isTable(value)) return 'a table';
  if (value === undefined) return 'nothing';
  return 'a date-time';
}

/** The value's TOML type, with the value itself when it is short. */
function describeValue(value: unknown): string {
  const kind =
    typeof value === 'string' ? 'a string'
    : typeof value === 'boolean' ? 'a boolean'
    : typeof value === 'bigint' || Number.isInteger(value) ? 'an integer'
    : typeof value === 'number' ? 'a float'
    : undefined;
  return kind === undefined ? showValue(value) : `${kind} (${showValue(value)})`;
}

function isTable(value: unknown): value is Record<string, unknown> {
  if (typeof value !== 'object' || value === null) return false;
  const proto: unknown = Object.getPrototypeOf(value);
  return proto === Object.prototype || proto === null;
}

function valueAt(data: unknown, path: KeyPath): unknown {
  let cur = data;
  for (const seg of path) {
    if (typeof seg === 'number') cur = Array.isArray(cur) ? cur[seg] : undefined;
    else cur = isTable(cur) ? cur[seg] : undefined;
  }
  return cur;
}

// ---------------------------------------------------------------------------------------------
// Schema introspection, for "did you mean" and for showing whole ranges. Anything not
// understood yields undefined, which only costs the message some detail.

function schemaAt(root: z.ZodType, path: KeyPath): z.ZodType | undefined {
  let cur: z.ZodType | undefined = unwrap(root);
  for (const seg of path) {
    if (typeof seg === 'number') cur = cur instanceof z.ZodArray ? unwrap(cur.element as z.ZodType) : undefined;
    else cur = cur instanceof z.ZodObject ? unwrap(cur.shape[seg] as z.ZodType | undefined) : undefined;
  }
  return cur;
}

function unwrap(schema: z.ZodType | undefined): z.ZodType | undefined {
  let cur = schema;
  for (;;) {
    if (
      cur instanceof z.ZodDefault ||
      cur instanceof z.ZodPrefault ||
      cur instanceof z.ZodOptional ||
      cur instanceof z.ZodNullable ||
      cur instanceof z.ZodReadonly ||
      cur instanceof z.ZodCatch
    ) {
      cur = cur.unwrap() as z.ZodType;
    } else if (cur instanceof z.ZodPipe) {
      cur = cur.in as z.ZodType;
    } else {
      return cur;
    }
  }
}

function knownKeys(schema: z.ZodType | undefined): string[] {
  return schema instanceof z.ZodObject ? Object.keys(schema.shape) : [];
}

/**
 * The candidate closest to `word`, if it is close enough to be a plausible typo. Case and
 * `-`/`_` are ignored because `Boot-Timeout` for `boot_timeout` is the same intent.
 */
export function closestMatch(word: string, candidates: readonly string[]): string | undefined {
  const norm = (s: string): string => s.toLowerCase().replaceAll('-', '_');
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const candidate of candidates) {
    const d = editDistance(norm(word), norm(candidate));
    const allowed = Math.min(3, Math.max(1, Math.floor(Math.max(word.length, candidate.length) / 3)));
    if (d <= allowed && d < bestDistance && d < Math.min(word.length, candidate.length)) {
      best = candidate;
      bestDistance = d;
    }
  }
  return best;
}

// Optimal string alignment distance: Levenshtein plus adjacent transpositions ("imgae").
function editDistance(a: string, b: string): number {
  const w = b.length + 1;
  const d = new Array<number>((a.length + 1) * w).fill(0);
  const at = (i: number, j: number): number => d[i * w + j] ?? 0;
  for (let i = 0; i <= a.length; i++) d[i * w] = i;
  for (let j = 0; j <= b.length; j++) d[j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let v = Math.min(at(i - 1, j) + 1, at(i, j - 1) + 1, at(i - 1, j - 1) + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) v = Math.min(v, at(i - 2, j - 2) + 1);
      d[i * w + j] = v;
    }
  }
  return at(a.length, b.length);
}

// ---------------------------------------------------------------------------------------------
// Key locator. smol-toml does not report where keys are, so this scans the text just well
// enough to map each key path to the line where it is first written. It only runs on text the
// parser already accepted, and must never throw: a wrong guess only costs a line number.

const BARE_KEY = /^[A-Za-z0-9_-]+$/;

/** `qemu.accel`, `pool[1].idle_count`, `env."A.B"` — the form used in messages and as map keys. */
export function formatKeyPath(path: KeyPath): string {
  let out = '';
  for (const seg of path) {
    if (typeof seg === 'number') out += `[${seg}]`;
    else out += (out === '' ? '' : '.') + (BARE_KEY.test(seg) ? seg : JSON.stringify(seg));
  }
  return out;
}

/** Line (1-based) of `path`, else of its nearest written ancestor (e.g. its table header), else 1. */
export function lineForPath(locations: ReadonlyMap<string, number>, path: KeyPath): number {
  for (let n = path.length; n > 0; n--) {
    const line = locations.get(formatKeyPath(path.slice(0, n)));
    if (line !== undefined) return line;
  }
  return 1;
}

/** Maps every key path written in `text` (see formatKeyPath) to the line it first appears on. */
export function locateKeys(text: string): Map<string, number> {
  return new KeyScanner(text).scan();
}

class KeyScanner {
  readonly #s: string;
  readonly #lineStarts: number[] = [0];
  readonly #found = new Map<string, number>();
  // Entries seen so far per array of tables (`[[pool]]`), keyed by resolved path, so that
  // `[pool.x]` and nested `[[pool.y]]` attach to the latest entry, as TOML specifies.
  readonly #arrayCounts = new Map<string, number>();
  #pos = 0;

  constructor(text: string) {
    this.#s = text;
    for (let i = 0; i < text.length; i++) if (text[i] === '\n') this.#lineStarts.push(i + 1);
  }

  scan(): Map<string, number> {
    const s = this.#s;
    let table: (string | number)[] = [];
    while (this.#skipBlank(), this.#pos < s.length) {
      const start = this.#pos;
      if (s[start] === '[') {
        const isArray = s[start + 1] === '[';
        this.#pos += isArray ? 2 : 1;
        table = this.#enterTable(this.#readKey(), isArray, this.#lineAt(start));
      } else {
        const keys = this.#readKey();
        if (keys.length > 0) {
          this.#recordChain(table, keys, this.#lineAt(start));
          this.#skipSpaces();
          if (s[this.#pos] === '=') this.#pos++;
          this.#skipSpaces();
          this.#skipValue([...table, ...keys]);
        }
      }
      // Only a comment or a header's closing brackets can remain on the line.
      while (this.#pos < s.length && s[this.#pos] !== '\n') this.#pos++;
      if (this.#pos === start) this.#pos++;
    }
    return this.#found;
  }

  #enterTable(keys: string[], isArray: boolean, line: number): (string | number)[] {
    const path: (string | number)[] = [];
    keys.forEach((key, i) => {
      path.push(key);
      const id = formatKeyPath(path);
      this.#record(path, line);
      if (isArray && i === keys.length - 1) {
        const n = this.#arrayCounts.get(id) ?? 0;
        this.#arrayCounts.set(id, n + 1);
        path.push(n);
        this.#record(path, line);
      } else {
        const n = this.#arrayCounts.get(id);
        if (n !== undefined) path.push(n - 1);
      }
    });
    return path;
  }

  // Skips one value, recording the positions of array elements and inline-table keys inside it.
  #skipValue(path: (string | number)[]): void {
    const s = this.#s;
    const c = s[this.#pos];
    if (c === '"' || c === "'") {
      this.#readString();
    } else if (c === '[') {
      this.#pos++;
      for (let i = 0; this.#skipBlank(), this.#pos < s.length; i++) {
        if (s[this.#pos] === ']') break;
        const before = this.#pos;
        this.#record([...path, i], this.#lineAt(before));
        this.#skipValue([...path, i]);
        this.#skipBlank();
        if (s[this.#pos] === ',') this.#pos++;
        if (this.#pos === before) this.#pos++;
      }
      this.#pos++;
    } else if (c === '{') {
      this.#pos++;
      while (this.#skipBlank(), this.#pos < s.length) {
        if (s[this.#pos] === '}') break;
        const before = this.#pos;
        const keys = this.#readKey();
        if (keys.length > 0) {
          this.#recordChain(path, keys, this.#lineAt(before));
          this.#skipSpaces();
          if (s[this.#pos] === '=') this.#pos++;
          this.#skipSpaces();
          this.#skipValue([...path, ...keys]);
        }
        this.#skipBlank();
        if (s[this.#pos] === ',') this.#pos++;
        if (this.#pos === before) this.#pos++;
      }
      this.#pos++;
    } else {
      // Numbers, booleans, dates (which may contain a space): up to a delimiter.
      while (this.#pos < s.length && !',]}#\n'.includes(s[this.#pos] ?? '')) this.#pos++;
    }
  }

  // A dotted key, `a."b.c".'d'`, as its unquoted parts; empty if there is no key here.
  #readKey(): string[] {
    const s = this.#s;
    const keys: string[] = [];
    for (;;) {
      this.#skipSpaces();
      const c = s[this.#pos];
      if (c === '"' || c === "'") {
        keys.push(this.#readString());
      } else {
        const m = /[A-Za-z0-9_-]+/y;
        m.lastIndex = this.#pos;
        const bare = m.exec(s)?.[0];
        if (bare === undefined) break;
        keys.push(bare);
        this.#pos += bare.length;
      }
      this.#skipSpaces();
      if (s[this.#pos] !== '.') break;
      this.#pos++;
    }
    return keys;
  }

  // Consumes a string of any of TOML's four kinds; returns its (unescaped) content.
  #readString(): string {
    const s = this.#s;
    const q = s[this.#pos] ?? '"';
    const basic = q === '"';
    const multi = s.startsWith(q.repeat(3), this.#pos);
    const close = multi ? q.repeat(3) : q;
    this.#pos += close.length;
    const start = this.#pos;
    while (this.#pos < s.length && !s.startsWith(close, this.#pos)) {
      if (!multi && s[this.#pos] === '\n') return s.slice(start, this.#pos);
      this.#pos += basic && s[this.#pos] === '\\' ? 2 : 1;
    }
    const raw = s.slice(start, this.#pos);
    this.#pos += close.length;
    // `"""a""""` ends with up to two quotes that belong to the content.
    for (let extra = 0; multi && extra < 2 && s[this.#pos] === q; extra++) this.#pos++;
    return basic ? unescapeBasic(raw) : raw;
  }

  #skipSpaces(): void {
    while (this.#pos < this.#s.length && ' \t\r'.includes(this.#s[this.#pos] ?? '')) this.#pos++;
  }

  // Whitespace, newlines and comments.
  #skipBlank(): void {
    const s = this.#s;
    for (;;) {
      this.#skipSpaces();
      if (s[this.#pos] === '\n') this.#pos++;
      else if (s[this.#pos] === '#') while (this.#pos < s.length && s[this.#pos] !== '\n') this.#pos++;
      else return;
    }
  }

  #recordChain(prefix: readonly (string | number)[], keys: readonly string[], line: number): void {
    for (let i = 1; i <= keys.length; i++) this.#record([...prefix, ...keys.slice(0, i)], line);
  }

  #record(path: readonly (string | number)[], line: number): void {
    const id = formatKeyPath(path);
    if (!this.#found.has(id)) this.#found.set(id, line);
  }

  #lineAt(pos: number): number {
    let lo = 0;
    let hi = this.#lineStarts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if ((this.#lineStarts[mid] ?? 0) <= pos) lo = mid;
      else hi = mid - 1;
    }
    return lo + 1;
  }
}

function unescapeBasic(raw: string): string {
  const simple: Record<string, string> = { b: '\b', t: '\t', n: '\n', f: '\f', r: '\r', e: '\x1b', '"': '"', '\\': '\\' };
  return raw.replace(/\\(?:u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|x([0-9A-Fa-f]{2})|(.))/g, (all, u4, u8, x2, ch) => {
    const hex = (u4 ?? u8 ?? x2) as string | undefined;
    if (hex !== undefined) return String.fromCodePoint(parseInt(hex, 16));
    return simple[ch as string] ?? all;
  });
}
