export { captureOutput, remoteCommand, type ExecOptions, type ExecResult, type GuestChannel } from './channel.ts';
export { SshChannel, generateKeyPair, type GuestEndpoint } from './ssh.ts';
export { NsenterChannel, containerLeader, type ContainerTarget } from './nsenter.ts';
