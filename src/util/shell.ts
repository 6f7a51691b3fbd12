// Quoting for the POSIX shell that sshd runs a remote command with. Everything a user passes
// (arguments, environment values) is single-quoted, so nothing in it is ever interpreted.

export function shellQuote(s: string): string {
  if (s !== '' && /^[A-Za-z0-9_@%+=:,./-]+$/.test(s)) return s;
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

export function shellJoin(argv: readonly string[]): string {
  return argv.map(shellQuote).join(' ');
}

const envName = /^[A-Za-z_][A-Za-z0-9_]*$/;
export function isValidEnvName(name: string): boolean {
  return envName.test(name);
}
