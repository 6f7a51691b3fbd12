// Secrets this process knows of (a job's token, `-e` values marked secret, …), so that they
// are cut out of everything mayfly writes down: log lines (at the logger, see log.ts), events
// and records in the state store, and error messages. Field-name redaction in the logger
// catches `{ token: … }`; this catches a secret wherever its value turns up (inside a URL, a
// command line, an error text), and private keys by their PEM/OpenSSH markers whether
// registered or not.

export const redacted = '[redacted]';

const values = new Set<string>();
// Shorter values would also match ordinary words and numbers; no real token is this short.
const minLength = 6;

/** Names whose values are secrets whatever they hold (CI_JOB_TOKEN, DB_PASSWORD, AWS_SECRET_ACCESS_KEY, …). */
const secretName = /TOKEN|PASSWORD|PASSWD|SECRET|PRIVATE|CREDENTIAL|API_?KEY|ACCESS_KEY|_KEY$|^KEY$|AUTH|JWT|COOKIE|SESSION/i;

export function isSecretName(name: string): boolean {
  return secretName.test(name);
}

/** Remembers a secret value for redaction (process-wide); short or empty values are ignored. */
export function registerSecret(value: string | undefined): void {
  if (value === undefined) return;
  const v = value.trim();
  if (v.length < minLength) return;
  values.add(v);
  // Multi-line values (keys, certificates): each long line alone too, as logs split them.
  for (const line of v.split('\n')) if (line.trim().length >= 16) values.add(line.trim());
}

/** Registers every value of `env` whose name looks secret, or that holds a private key; `prefix` is stripped first. */
export function registerSecretsFromEnv(env: Record<string, string | undefined>, prefix = ''): void {
  for (const [k, v] of Object.entries(env)) {
    if (!k.startsWith(prefix) || v === undefined) continue;
    if (isSecretName(k.slice(prefix.length)) || privateKeyBlock().test(v)) registerSecret(v);
  }
}

/** Forgets every registered secret (tests). */
export function clearSecrets(): void {
  values.clear();
  pattern = undefined;
}

// A private key block, raw or as it appears inside a JSON string (newlines as \n).
const privateKeyBlock = () => /-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END ([A-Z0-9]+ )*PRIVATE KEY-----/g;
// Credentials in a URL: scheme://user:password@host
const urlCredentials = /\b([a-z][a-z0-9+.-]*:\/\/)[^\s/:@"'\\]+:[^\s/@"'\\]+@/gi;

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** `text` with every registered secret (also in its JSON-escaped form), private key and URL password replaced. */
export function redactSecrets(text: string): string {
  let out = text.replace(privateKeyBlock(), redacted).replace(urlCredentials, `$1${redacted}@`);
  if (values.size === 0) return out;
  return out.replace(valuesPattern(), redacted);
}

// Every log line goes through this: the pattern is rebuilt only when a secret was added.
let pattern: { size: number; re: RegExp } | undefined;
function valuesPattern(): RegExp {
  if (pattern?.size !== values.size) {
    // Longest first, so that a secret containing another is cut whole.
    const forms = new Set<string>();
    for (const v of values) {
      forms.add(v);
      forms.add(JSON.stringify(v).slice(1, -1));
    }
    pattern = { size: values.size, re: new RegExp([...forms].sort((a, b) => b.length - a.length).map(escapeRegExp).join('|'), 'g') };
  }
  return pattern.re;
}

/** A plain-data value (event data, a job description) with its strings redacted. */
export function redactData<T>(value: T): T {
  if (typeof value === 'string') return redactSecrets(value) as T;
  if (Array.isArray(value)) return value.map((v) => redactData(v)) as T;
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, redactData(v)])) as T;
  }
  return value;
}
