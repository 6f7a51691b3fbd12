// Schema of mayfly's main config file. Every section and key is optional and defaulted, so an
// empty or missing file is a valid config. Sections are strict: a misspelt key is an error
// rather than a silently ignored setting.
//
// To add a section, add an entry to `configSections`: a table with `section({...})`, or an
// array of tables (`[[pool]]`) with `z.array(z.strictObject({...})).default([])`.

import { isAbsolute } from 'node:path';
import { Cron } from 'croner';
import * as z from 'zod';

export const IMAGE_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;
export const ACCELS = ['auto', 'kvm', 'tcg'] as const;
export const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'silent'] as const;
/** How a machine starts: from a snapshot template (about a second), or a full boot. */
export const START_MODES = ['restore', 'boot'] as const;
/**
 * Where a job's working data (/builds, docker's data root) lives: on the machine's disk
 * (plain), on a dm-crypt disk keyed from the guest's RNG (encrypted), or in the guest's RAM (tmpfs).
 */
export const JOB_DISK_MODES = ['plain', 'encrypted', 'tmpfs'] as const;
/** A tmpfs size as mount(8) takes it: a share of the guest's RAM or an amount. */
export const TMPFS_SIZE = /^(100|[1-9]?[0-9])%$|^[1-9][0-9]*[kmg]$/;
const tmpfsSize = z.string().regex(TMPFS_SIZE, 'must be a share of the machine\'s memory like "50%" or an amount like "2g" or "512m"');

/** `storage.backend`: the directory clone backends (src/storage/detect.ts), fastest first, or auto. */
export const STORAGE_BACKENDS = ['auto', 'btrfs-snapshot', 'reflink', 'overlayfs', 'copy'] as const;
/** How a machine is networked: QEMU user-mode (slirp, no host setup) or a TAP on mayfly's bridge. */
export const NETWORK_MODES = ['user', 'bridged'] as const;

// An IPv4 network; whether host bits are set is checked where it is used (src/network).
const ipv4Cidr = z.string().regex(/^\d{1,3}(\.\d{1,3}){3}(\/\d{1,2})?$/, 'must be an IPv4 network such as "10.77.0.0/24" (or one address)');
const ipv4Addr = z.string().regex(/^\d{1,3}(\.\d{1,3}){3}$/, 'must be an IPv4 address');

const imageName = z.string().regex(IMAGE_NAME, {
  error: 'must be an image name: 1 to 63 characters of a-z, 0-9, ".", "_" or "-", starting with a letter or digit',
});

// NAME or NAME:VERSION
const imageRef = z.string().regex(/^[a-z0-9][a-z0-9._-]{0,62}(:\d+)?$/, {
  error: 'must be a mayfly image: NAME or NAME:VERSION (e.g. "debian-12" or "debian-12:3")',
});

// A duration: whole seconds, or a string such as "90s", "20m", "1h30m".
const duration = z.union([
  z.int().min(0),
  z.string().regex(/^(\d+h)?(\d+m)?(\d+s)?$/, 'must be seconds or a duration like "90s", "20m", "1h30m"').refine((s) => s !== '', 'must not be empty'),
]);

/** Seconds in a duration value as written in the config. */
export function durationSeconds(d: number | string): number {
  if (typeof d === 'number') return d;
  const m = /^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$/.exec(d)!;
  return Number(m[1] ?? 0) * 3600 + Number(m[2] ?? 0) * 60 + Number(m[3] ?? 0);
}

const sizeLabel = z.string().regex(/^[a-z][a-z0-9_-]{0,31}$/, 'size names are lower-case letters, digits, "_" or "-"');
const sizeSchema = z.strictObject({ cpus: z.int().min(1).max(64), memory: z.int().min(128).max(262144), disk: z.int().min(1).max(2048) });

const idlePolicy = {
  idle_count: z.int().min(0).max(1000).optional(),
  idle_count_min: z.int().min(0).max(1000).optional(),
  idle_scale_factor: z.number().min(0).max(100).optional(),
  idle_time: duration.optional(),
};

const periodSchema = z.strictObject({
  /** Cron expressions; the period applies while the current time matches any of them. */
  periods: z.array(z.string().min(1)).min(1),
  timezone: z.string().default('UTC'),
  ...idlePolicy,
});

const poolSchema = z.strictObject({
  name: z.string().regex(/^[a-z0-9][a-z0-9._-]{0,62}$/, 'pool names are lower-case letters, digits, ".", "_" or "-"'),
  image: imageName,
  /** A size label (`small`, a [sizes.X] name, or `4cpu8gb50gb`); cpus/memory/disk override parts of it. */
  size: z.string().default('small'),
  cpus: z.int().min(1).max(64).optional(),
  memory: z.int().min(128).max(262144).optional(),
  disk: z.int().min(1).max(2048).optional(),
  idle_count: z.int().min(0).max(1000).default(0),
  idle_count_min: z.int().min(0).max(1000).default(0),
  idle_scale_factor: z.number().min(0).max(100).default(0),
  idle_time: duration.default(1200),
  max_instances: z.int().min(1).max(10000).default(10),
  max_use_count: z.int().min(1).max(100000).default(1),
  max_growth_rate: z.int().min(1).max(100).default(1),
  /** Longest a lease may run before its machine is killed (0: no limit). */
  max_runtime: duration.default(0),
  /** restore | boot; default: [images] start for the image, else [defaults] start. */
  start: z.enum(START_MODES).optional(),
  /** plain | encrypted | tmpfs; default: [defaults] job_disk. */
  job_disk: z.enum(JOB_DISK_MODES).optional(),
  /** user | bridged; default: [defaults] network. */
  network: z.enum(NETWORK_MODES).optional(),
  /** Bridged only: the networks this pool's machines may reach (DNS and [network] host_ports stay reachable). Absent: anything not blocked. */
  egress_allow: z.array(ipv4Cidr).optional(),
  period: z.array(periodSchema).default([]),
});

/** Whether croner takes the pattern (5 fields, or 6 with seconds first). */
function cronProblem(pattern: string): string | undefined {
  try {
    new Cron(pattern, { paused: true });
    return undefined;
  } catch (e) {
    return e instanceof Error ? e.message : String(e);
  }
}

const cronExpression = z.string().min(1).superRefine((p, ctx) => {
  const problem = cronProblem(p);
  if (problem) ctx.addIssue({ code: 'custom', message: `is not a cron expression (${problem}); e.g. "0 3 * * sun" for Sundays at 03:00` });
});

const timeZone = z.string().refine((tz) => {
  try {
    Intl.DateTimeFormat('en', { timeZone: tz });
    return true;
  } catch {
    return false;
  }
}, 'is not a time zone; use an IANA name such as "UTC" or "Europe/Berlin"');

/** A scheduled rebuild: a cron expression (in UTC), or one with its time zone. */
const rebuildSchedule = z.union([cronExpression, z.strictObject({ cron: cronExpression, timezone: timeZone.default('UTC') })]);

function int(min: number, max: number, fallback: number) {
  return z.int().min(min).max(max).default(fallback);
}

// prefault, not default: a missing table must still be parsed so its keys get their defaults.
function section<Shape extends z.core.$ZodLooseShape>(shape: Shape) {
  return z.strictObject(shape).prefault({} as z.input<z.ZodObject<Shape, z.core.$strict>>);
}

export const configSections = {
  /** What `mayfly run` uses when flags are absent. */
  defaults: section({
    image: imageName.default('debian-12'),
    cpus: int(1, 64, 2),
    memory: int(128, 262144, 1024), // MiB
    disk: int(1, 2048, 4), // GiB
    start: z.enum(START_MODES).default('restore'),
    job_disk: z.enum(JOB_DISK_MODES).default('plain'),
    /** Size of the tmpfs for job_disk = "tmpfs". */
    job_tmpfs_size: tmpfsSize.default('50%'),
    network: z.enum(NETWORK_MODES).default('user'),
  }),
  /** Bridged networking (opt-in per pool, in [defaults] or with --network bridged). */
  network: section({
    /** The bridge mayfly creates and owns; its nftables tables have the same name. */
    bridge: z.string().regex(/^[a-z][a-z0-9]{0,14}$/, 'must be 1 to 15 lower-case letters or digits, starting with a letter (it names the bridge and the nftables tables)').default('mayfly0'),
    /** Instances' addresses; the bridge takes the first one. Must not overlap a route of the host. */
    subnet: ipv4Cidr.default('10.77.0.0/24'),
    /** DNS servers handed to instances; empty: the host's (non-loopback) ones from /etc/resolv.conf. */
    dns: z.array(ipv4Addr).default([]),
    /** TCP ports on the host that instances may connect to (e.g. a cache proxy); every other one is dropped. */
    host_ports: z.array(z.int().min(1).max(65535)).default([]),
    /** Networks instances may reach although private, link-local or otherwise blocked. */
    allow: z.array(ipv4Cidr).default([]),
  }),
  qemu: section({
    binary: z.string().min(1).default('qemu-system-x86_64'),
    accel: z.enum(ACCELS).default('auto'),
    boot_timeout: int(5, 3600, 120), // seconds
    boot_retries: int(0, 5, 1), // extra attempts after a boot timeout
    tcg_tb_size: int(16, 2048, 64), // MiB
  }),
  /** Containers (images of kind "container"). */
  nspawn: section({
    binary: z.string().min(1).default('systemd-nspawn'),
    /** Containers get only a loopback interface instead of sharing the host's network. */
    private_network: z.boolean().default(false),
    start_timeout: int(1, 600, 30), // seconds
    /** Most processes (threads) one container may have at once: a fork bomb stops there. */
    pids_max: int(64, 4194304, 8192),
  }),
  images: section({
    recipe_dirs: z.array(z.string().refine((p) => isAbsolute(p), 'must be an absolute path')).default([]),
    keep_versions: int(1, 100, 3),
    /** Per image name: restore | boot, overriding [defaults] start. */
    start: z.record(imageName, z.enum(START_MODES)).default({}),
    /**
     * Per image name: when mayflyd rebuilds it from its recipe (a full build), e.g.
     * `rebuild = { "debian-12" = "0 3 * * sun" }` or `{ "debian-12" = { cron = "0 3 * * *", timezone = "Europe/Berlin" } }`.
     */
    rebuild: z.record(imageName, rebuildSchedule).default({}),
    /** Seconds between mayflyd's garbage collections of unused image versions (also after every publish). */
    gc_interval: int(60, 604800, 3600),
  }),
  log: section({
    level: z.enum(LOG_LEVELS).default('info'),
  }),
  /** How container roots are cloned; VM disks are always qcow2 overlays. */
  storage: section({
    backend: z.enum(STORAGE_BACKENDS).default('auto'),
    /**
     * Where instance dirs (clones, console logs, sockets) go; empty: DATA/instances. Point it at
     * a tmpfs to keep every machine's writes in host RAM.
     */
    instances_dir: z
      .string()
      .refine((p) => p === '' || isAbsolute(p), 'must be an absolute path (or empty for DATA/instances)')
      .refine((p) => !p.includes(','), 'must not contain a comma (QEMU\'s option syntax cannot take one)')
      .default(''),
  }),
  /** Named machine sizes; `small`, `medium` and `large` always exist and may be redefined. */
  sizes: z.record(sizeLabel, sizeSchema).default({}),
  /** Host capacity guard: the pool never starts machines beyond these. */
  capacity: section({
    cpu_overcommit: z.number().min(0.1).max(64).default(4), // total vCPUs <= host cores x this
    memory_overcommit: z.number().min(0.1).max(16).default(1), // total guest MiB <= (host MiB - reserve) x this
    memory_reserve: int(0, 1048576, 1024), // MiB kept for the host itself
  }),
  daemon: section({
    socket: z.string().refine((p) => isAbsolute(p), 'must be an absolute path').default('/run/mayfly/mayfly.sock'),
    socket_group: z.string().default(''), // group allowed to use the socket (mode 0660); empty: root only
    listen: z.string().regex(/^$|^[^:\s]+:\d{1,5}$/, 'must be HOST:PORT, e.g. "127.0.0.1:8787"').default(''),
    token_file: z.string().default(''), // bearer token for TCP clients; required when listen is set
    reconcile_interval: int(1, 3600, 5), // seconds between autoscaler passes
    reap_interval: int(5, 86400, 60), // seconds between reaper passes
    delete_instances_on_shutdown: z.boolean().default(true),
  }),
  pool: z.array(poolSchema).default([]),
  /** `mayfly gitlab …`: GitLab Runner's custom executor. */
  gitlab: section({
    builds_dir: z.string().refine((p) => isAbsolute(p), 'must be an absolute path in the machine').default('/builds'),
    cache_dir: z.string().refine((p) => isAbsolute(p), 'must be an absolute path in the machine').default('/cache'),
    /** Image for jobs that name none; empty: [defaults] image. */
    default_image: z.union([z.literal(''), imageRef]).default(''),
    /** mayflyd pool for every job; empty: a pool serving the job's image and size, else a machine booted for the job. */
    pool: z.string().default(''),
    /** A job's `image:` (CI_JOB_IMAGE) → mayfly image (NAME or NAME:VERSION). */
    images: z.record(z.string().min(1), imageRef).default({}),
    /** The job variable that picks a size (a size name or a label like 4cpu8gb50gb). */
    size_variable: z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'must be a variable name').default('MAYFLY_SIZE'),
    /** Seconds between SIGTERM and SIGKILL to a cancelled stage's processes in the machine. */
    kill_grace: int(0, 600, 10),
  }),
};

export const ConfigSchema = z.strictObject(configSections);

/** The config with every default filled in. */
export type Config = z.output<typeof ConfigSchema>;
