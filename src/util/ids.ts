import { randomBytes } from 'node:crypto';

/** Short, readable, collision-safe ids: `prefix-` + 10 base32 chars (50 bits). */
export function newId(prefix: string): string {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz234567';
  const bytes = randomBytes(10);
  let s = '';
  for (const b of bytes) s += alphabet[b & 31];
  return `${prefix}-${s}`;
}
