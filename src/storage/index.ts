export type { Clone, CloneRequest, Probe, StorageBackend } from './types.ts';
export { qcow2Overlay, diskTooSmall } from './qcow2.ts';
