// A storage backend makes the per-instance writable copy of an image in O(1) and removes it.
// VM disks today are qcow2 overlays; btrfs snapshots, reflink copies and overlayfs upper dirs
// (for container roots) implement the same interface.

export interface CloneRequest {
  /** Absolute path of the image's read-only base (a disk file, or a root directory). */
  base: string;
  /** Directory of the instance; the clone is created inside it. */
  instanceDir: string;
  /** Wanted size of the clone in bytes (disk clones); at least the base's size. */
  sizeBytes?: number;
}

export interface Clone {
  backend: string;
  /** What the driver attaches: a disk file or a root directory. */
  path: string;
}

export interface Probe {
  usable: boolean;
  reason: string;
}

export interface StorageBackend {
  readonly name: string;
  /** Whether this backend works for `dir` on this host, and why not. */
  probe(dir: string): Promise<Probe>;
  clone(req: CloneRequest): Promise<Clone>;
  /** Removes the clone; succeeds when it is already gone. */
  remove(clone: Clone): Promise<void>;
}
