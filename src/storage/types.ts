// A storage backend makes the per-instance writable copy of an image in O(1) and removes it.
// VM disks are qcow2 overlays; container roots are directory clones: btrfs snapshots, reflink
// copies, overlayfs mounts, or a plain copy as the last resort. Every backend implements this
// one interface, so a driver never knows which one made its clone.

export interface CloneRequest {
  /** Absolute path of the image's read-only base (a disk file, or a root directory). */
  base: string;
  /** Directory of the instance (it must exist); the clone is created inside it. */
  instanceDir: string;
  /**
   * Wanted size of the clone in bytes, for disk clones (at least the base's size). Directory
   * clones have no size of their own and ignore it: they share the data dir's free space.
   */
  sizeBytes?: number;
}

export interface Clone {
  /** Name of the backend that made it; only that backend can remove it. */
  backend: string;
  /** What the driver attaches: a disk file, or the root directory of a container. */
  path: string;
}

export interface Probe {
  usable: boolean;
  /** Why (not), in words a user can act on, e.g. "ext4 has no reflink". */
  reason: string;
}

/** What a backend clones: VM disk files or container root directories. */
export type StorageKind = 'disk' | 'dir';

export interface StorageBackend {
  readonly name: string;
  readonly kind: StorageKind;
  /**
   * Whether this backend works for `dir` on this host, found by really trying it there (a test
   * snapshot, reflink or mount), and why not. Leaves nothing behind in `dir`; never throws.
   */
  probe(dir: string): Promise<Probe>;
  clone(req: CloneRequest): Promise<Clone>;
  /** Removes the clone; succeeds when it is already gone. */
  remove(clone: Clone): Promise<void>;
}
