export { GuestChannel, generateKeyPair, remoteCommand } from './ssh.ts';
export type { ExecOptions, ExecResult, GuestEndpoint } from './ssh.ts';
