// Variable expansion as the runner does it before a job starts: `$NAME` and `${NAME}` in a
// value are replaced by variables defined earlier (unknown ones become empty), `$$` is a
// literal `$`. Expansion is one level deep, like the runner's.

export function expandVariables(vars: Record<string, string>, base: Record<string, string> = {}): Record<string, string> {
  const out: Record<string, string> = { ...base };
  for (const [k, v] of Object.entries(vars)) {
    out[k] = v.replace(/\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)/g, (m, a?: string, b?: string) =>
      m === '$$' ? '$' : (out[(a ?? b)!] ?? ''),
    );
  }
  return out;
}

/** GitLab's CI_COMMIT_REF_SLUG: lower-cased, non-alphanumerics to '-', at most 63 chars, no '-' at the ends. */
export function refSlug(ref: string): string {
  return ref
    .toLowerCase()
    .replace(/[^a-z0-9]/gu, '-')
    .slice(0, 63)
    .replace(/^-+|-+$/g, '');
}
