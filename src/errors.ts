// One catalogue of user-facing errors. Each has a stable code (for scripts and docs) and a
// message that says what is wrong and what to do about it. The CLI prints `message` and exits
// with `exitCode`; stack traces only with --debug.

export class MayflyError extends Error {
  readonly code: string;
  readonly exitCode: number;
  readonly hint: string | undefined;

  constructor(code: string, message: string, opts: { hint?: string; cause?: unknown; exitCode?: number } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'MayflyError';
    this.code = code;
    this.hint = opts.hint;
    this.exitCode = opts.exitCode ?? (inputErrors.has(code) ? 2 : 1);
  }
}

/** Stable error codes. Add new ones here so the catalogue stays in one place. */
export const ErrorCode = {
  CONFIG_NOT_FOUND: 'MAYFLY_ERR_CONFIG_NOT_FOUND',
  CONFIG_PARSE: 'MAYFLY_ERR_CONFIG_PARSE',
  CONFIG_INVALID: 'MAYFLY_ERR_CONFIG_INVALID',
  USAGE: 'MAYFLY_ERR_USAGE',
  IMAGE_NOT_FOUND: 'MAYFLY_ERR_IMAGE_NOT_FOUND',
  IMAGE_IN_USE: 'MAYFLY_ERR_IMAGE_IN_USE',
  RECIPE_INVALID: 'MAYFLY_ERR_RECIPE_INVALID',
  IMAGE_BUILD_FAILED: 'MAYFLY_ERR_IMAGE_BUILD_FAILED',
  IMAGE_IMPORT_FAILED: 'MAYFLY_ERR_IMAGE_IMPORT_FAILED',
  MISSING_TOOL: 'MAYFLY_ERR_MISSING_TOOL',
  NOT_ROOT: 'MAYFLY_ERR_NOT_ROOT',
  SIZE_INVALID: 'MAYFLY_ERR_SIZE_INVALID',
  CLONE_FAILED: 'MAYFLY_ERR_CLONE_FAILED',
  CLONE_REMOVE_FAILED: 'MAYFLY_ERR_CLONE_REMOVE_FAILED',
  STORAGE_UNUSABLE: 'MAYFLY_ERR_STORAGE_UNUSABLE',
  MACHINE_START_FAILED: 'MAYFLY_ERR_MACHINE_START_FAILED',
  MACHINE_STOP_FAILED: 'MAYFLY_ERR_MACHINE_STOP_FAILED',
  RESTORE_FAILED: 'MAYFLY_ERR_RESTORE_FAILED',
  SNAPSHOT_CORRUPT: 'MAYFLY_ERR_SNAPSHOT_CORRUPT',
  SNAPSHOT_FAILED: 'MAYFLY_ERR_SNAPSHOT_FAILED',
  BOOT_TIMEOUT: 'MAYFLY_ERR_BOOT_TIMEOUT',
  GUEST_CHANNEL: 'MAYFLY_ERR_GUEST_CHANNEL',
  HOST_KEY_MISMATCH: 'MAYFLY_ERR_HOST_KEY_MISMATCH',
  INSTANCE_NOT_FOUND: 'MAYFLY_ERR_INSTANCE_NOT_FOUND',
  CI_FILE_NOT_FOUND: 'MAYFLY_ERR_CI_FILE_NOT_FOUND',
  CI_FILE_INVALID: 'MAYFLY_ERR_CI_FILE_INVALID',
  CI_JOB_NOT_FOUND: 'MAYFLY_ERR_CI_JOB_NOT_FOUND',
  NOT_A_GIT_REPO: 'MAYFLY_ERR_NOT_A_GIT_REPO',
  STATE: 'MAYFLY_ERR_STATE',
  POOL_TIMEOUT: 'MAYFLY_ERR_POOL_TIMEOUT',
  LEASE_NOT_FOUND: 'MAYFLY_ERR_LEASE_NOT_FOUND',
  LEASE_EXPIRED: 'MAYFLY_ERR_LEASE_EXPIRED',
  NO_MATCHING_POOL: 'MAYFLY_ERR_NO_MATCHING_POOL',
  SHUTTING_DOWN: 'MAYFLY_ERR_SHUTTING_DOWN',
  DAEMON: 'MAYFLY_ERR_DAEMON',
  NETWORK: 'MAYFLY_ERR_NETWORK',
  NETWORK_CONFIG: 'MAYFLY_ERR_NETWORK_CONFIG',
} as const;
export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

/** Errors in what the user gave (exit 2); every other failure exits 1. */
const inputErrors: ReadonlySet<string> = new Set<string>([
  ErrorCode.CONFIG_NOT_FOUND, ErrorCode.CONFIG_PARSE, ErrorCode.CONFIG_INVALID, ErrorCode.USAGE, ErrorCode.IMAGE_NOT_FOUND,
  ErrorCode.IMAGE_IN_USE, ErrorCode.RECIPE_INVALID, ErrorCode.SIZE_INVALID, ErrorCode.INSTANCE_NOT_FOUND,
  ErrorCode.CI_FILE_NOT_FOUND, ErrorCode.CI_FILE_INVALID, ErrorCode.CI_JOB_NOT_FOUND, ErrorCode.NOT_A_GIT_REPO,
  ErrorCode.LEASE_NOT_FOUND, ErrorCode.NO_MATCHING_POOL, ErrorCode.STORAGE_UNUSABLE, ErrorCode.NETWORK_CONFIG,
]);

export function isMayflyError(e: unknown): e is MayflyError {
  return e instanceof MayflyError;
}

/** Error text for anything thrown, for logs and for wrapping causes. */
export function errorText(e: unknown): string {
  if (e instanceof Error) return e.message;
  return String(e);
}
