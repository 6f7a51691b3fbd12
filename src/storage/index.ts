export type { Clone, CloneRequest, Probe, StorageBackend, StorageKind } from './types.ts';
export { qcow2Overlay, diskTooSmall } from './qcow2.ts';
export { btrfsSnapshot } from './btrfs-snapshot.ts';
export { reflink } from './reflink.ts';
export { overlayfs } from './overlayfs.ts';
export { copy } from './copy.ts';
export { createBaseDir, removeBaseDir, type BaseDir } from './base-dir.ts';
export {
  DIR_BACKENDS,
  DISK_BACKENDS,
  backendByName,
  backendsOf,
  chooseStorage,
  detectStorage,
  probeStorage,
  type Detection,
  type ProbeResult,
  type StorageReport,
  type StorageSetting,
} from './detect.ts';
export { filesystemOf, mountsUnder, type FilesystemInfo } from './mounts.ts';
export { removeInstanceDir } from './instance-dir.ts';
