import { closeSync, existsSync, ftruncateSync, openSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ErrorCode, MayflyError } from '../../errors.ts';
import type { Image } from '../../images/store.ts';
import { silentLogger, type Logger } from '../../log.ts';
import { fileTail, lastLines, requireTool, run } from '../../util/exec.ts';
import { cmdlineIncludes, liveProcesses, processAlive } from '../../util/proc.ts';
import { shellQuote } from '../../util/shell.ts';
import type { Driver, HostMachine, StartSpec, StartedMachine } from '../types.ts';
import { chooseAccel, type AccelSetting } from './accel.ts';
import { networkLines, sendIdentity } from './agent.ts';
import { Qmp } from './qmp.ts';
import { writeNoCloudSeed } from './cloud-init.ts';

export interface QemuDriverOptions {
  binary: string;
  accel: AccelSetting;
  /** MiB of TCG translation cache; the default lets each guest's RSS grow towards 650 MB. */
  tcgTbSize: number;
  /** Where the KVM probe result is cached. */
  accelCacheFile: string;
}

// Marks every QEMU mayfly starts, so `ps` and the reaper can tell ours from anyone else's.
const nameTag = 'mayfly:';
const jobScsi = 'jobscsi';
/** The device set of a machine, for snapshot compatibility: a template made before a device was added cannot restore. */
const machineDevices = 'q35 virtio-blk virtio-net virtio-rng virtio-scsi(job) virtio-serial(agent)';
/** The file of an instance's job disk, and the serial the guest finds it by. */
export const jobDiskFile = 'job-disk.raw';
export const jobDiskSerial = 'mayfly-job';

/** A free loopback TCP port. Another process may take it before QEMU does; start() retries then. */
async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      srv.close(() => (typeof addr === 'object' && addr ? resolve(addr.port) : reject(new Error('no port'))));
    });
  });
}

/** `quiet` saves ~2 s of slow serial output under TCG, but leaves an empty console when a boot hangs. */
function kernelArgs(args: string, verbose = false): string {
  return verbose ? args.split(/\s+/).filter((a) => a !== 'quiet').join(' ') : args;
}

export class QemuDriver implements Driver {
  readonly name = 'qemu';
  readonly opts: QemuDriverOptions;
  #version: Promise<string> | undefined;

  constructor(opts: QemuDriverOptions) {
    this.opts = opts;
  }

  async start(spec: StartSpec, ctx: { log: Logger; signal?: AbortSignal }): Promise<StartedMachine> {
    requireTool(this.opts.binary);
    const { image, identity, size, dir } = spec;
    const accel = await chooseAccel({
      setting: this.opts.accel,
      qemu: this.opts.binary,
      kernel: image.kernelPath,
      initrd: image.initrdPath,
      cacheFile: this.opts.accelCacheFile,
      log: ctx.log,
    });
    ctx.log.debug({ instance: spec.id, accel: accel.accel, reason: accel.reason }, 'accelerator chosen');

    const consoleLog = join(dir, 'console.log');
    const pidFile = join(dir, 'qemu.pid');
    const identityArgs = this.#identityArgs(spec);
    // mayfly images carry the restore agent: a virtio-serial port, in every machine (a template
    // and its clones must have the same devices), through which a restored clone gets its identity.
    const agentArgs = this.canSnapshot(image)
      ? ['-device', 'virtio-serial-pci', '-chardev', `socket,id=agent,path=${join(dir, 'agent.sock')},server=on,wait=off`,
        '-device', 'virtserialport,chardev=agent,name=org.mayfly.agent']
      : [];
    if (spec.network && !(image.identity === 'fw_cfg' && (image.features ?? []).includes('static-net'))) {
      throw new MayflyError(ErrorCode.NETWORK_CONFIG, `image ${image.name}:${image.version} cannot take a bridged network address (${image.identity === 'fw_cfg' ? 'it was built before bridged networking existed' : 'imported images get their network from cloud-init, which mayfly does not configure for bridged mode yet'})`, {
        hint: image.identity === 'fw_cfg' ? 'rebuild the image (mayfly image build), or use --network user' : 'use --network user for imported images',
      });
    }
    if (spec.restore && !this.canSnapshot(image)) {
      throw new MayflyError(ErrorCode.RESTORE_FAILED, `image ${image.name}:${image.version} cannot be restored from a snapshot (its guest has no restore agent)`, {
        hint: 'images built by this version of mayfly have it: rebuild the image (mayfly image build)',
      });
    }

    const t0 = Date.now();
    for (let attempt = 1; ; attempt++) {
      ctx.signal?.throwIfAborted();
      // A bridged guest is reached at its own address; user-mode networking forwards a loopback port.
      const port = spec.network ? 22 : await freePort();
      const netdev = spec.network
        ? `tap,id=n0,ifname=${spec.network.hostIf},script=no,downscript=no`
        : `user,id=n0,hostfwd=tcp:127.0.0.1:${port}-:22`;
      const args = [
        '-name', `${nameTag}${spec.id}`,
        '-M', 'q35',
        ...(accel.accel === 'kvm' ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', `tcg,tb-size=${this.opts.tcgTbSize}`, '-cpu', 'max']),
        '-smp', String(size.cpus),
        '-m', String(size.memoryMiB),
        '-display', 'none', '-no-user-config', '-nodefaults',
        '-serial', `file:${consoleLog}`,
        ...(image.kernelPath ? ['-kernel', image.kernelPath] : []),
        ...(image.initrdPath ? ['-initrd', image.initrdPath] : []),
        ...(image.kernelPath && image.kernelArgs ? ['-append', kernelArgs(image.kernelArgs, spec.verbose)] : []),
        '-drive', `file=${spec.disk.path},if=none,id=d0,format=qcow2,cache=unsafe,discard=unmap`,
        '-device', 'virtio-blk-pci,drive=d0',
        // Only the backend differs between modes: a restored clone needs the template's exact
        // devices, so the NIC keeps QEMU's default MAC and the guest sets its own (bridged).
        '-netdev', netdev,
        '-device', 'virtio-net-pci,netdev=n0',
        // Templates are saved with user-mode networking, whose state is a section of the saved
        // state that QEMU refuses to load without a slirp to take it: a bridged clone gets one,
        // connected to nothing and restricted.
        ...(spec.network && spec.restore ? ['-netdev', 'user,id=template-slirp,restrict=on'] : []),
        '-device', 'virtio-rng-pci',
        // An empty SCSI controller that a job disk is hot-plugged into (attachJobDisk). Present in
        // every machine so that a template and its clones have the same devices; SCSI hotplug
        // needs no PCIe hotplug slot in the guest.
        '-device', `virtio-scsi-pci,id=${jobScsi}`,
        ...identityArgs,
        ...agentArgs,
        ...(spec.restore ? ['-incoming', 'defer'] : []),
        '-qmp', `unix:${join(dir, 'qmp.sock')},server=on,wait=off`,
        '-pidfile', pidFile,
        '-daemonize',
      ];
      writeFileSync(join(dir, 'qemu.args'), JSON.stringify(args) + '\n');
      // With -daemonize, QEMU returns only once the machine is set up, so its exit status
      // and stderr say whether the start worked.
      const r = await run(this.opts.binary, args);
      if (r.code === 0 && existsSync(pidFile)) {
        const pid = Number(readFileSync(pidFile, 'utf8').trim());
        this.#dropSecrets(dir);
        if (spec.restore) {
          try {
            ctx.log.debug({ instance: spec.id, ms: Date.now() - t0 }, 'QEMU started; loading the memory state');
            await this.#resume(spec, spec.restore.stateFile, ctx.log, t0);
          } catch (e) {
            await this.stop(pid, dir);
            throw e;
          }
        }
        return { pid, ssh: { host: spec.network?.address ?? '127.0.0.1', port }, consoleLog, accel: accel.accel };
      }
      const err = r.stderr.trim();
      if (/host forwarding rule|Address already in use/i.test(err) && attempt < 5) continue;
      this.#dropSecrets(dir);
      throw new MayflyError(ErrorCode.MACHINE_START_FAILED, `QEMU could not start instance ${spec.id}: ${lastLines(err, 8) || `exit ${r.code}`}`, {
        hint: `the full command line is in ${join(dir, 'qemu.args')}`,
      });
    }
  }

  canSnapshot(image: Image): boolean {
    return image.identity === 'fw_cfg' && image.kernelPath !== null && (image.features ?? []).includes('restore-agent');
  }

  async snapshotCompat(image: Image): Promise<Record<string, string>> {
    // The QEMU binary does not change under a running process: ask it once.
    this.#version ??= run(this.opts.binary, ['--version']).then((r) => r.stdout);
    const v = { stdout: await this.#version };
    const accel = await chooseAccel({
      setting: this.opts.accel, qemu: this.opts.binary, kernel: image.kernelPath, initrd: image.initrdPath, cacheFile: this.opts.accelCacheFile, log: silentLogger,
    });
    // (The TCG cache size is not part of the saved state: machines with another one restore fine.)
    return { qemu: v.stdout.split('\n')[0]!.trim(), accel: accel.accel, devices: machineDevices };
  }

  /** Loads the saved state into a QEMU started with -incoming defer, resumes it, and gives the guest its identity. */
  async #resume(spec: StartSpec, stateFile: string, log: Logger, t0: number): Promise<void> {
    const fail = (why: string) =>
      new MayflyError(ErrorCode.RESTORE_FAILED, `restoring ${spec.id} from ${stateFile} failed: ${why}`, {
        hint: 'mayfly boots the machine instead and makes the snapshot again; `mayfly --debug` shows the details',
      });
    const qmp = await Qmp.connect(join(spec.dir, 'qmp.sock'));
    try {
      await qmp.command('migrate-incoming', { uri: `exec:cat ${shellQuote(stateFile)}` });
      const m = await qmp.waitMigration(60_000);
      if (m.status !== 'completed') throw new Error(`the memory state did not load (${m.status}${m.error ? `: ${m.error}` : ''})`);
      await qmp.command('cont');
      log.debug({ instance: spec.id, ms: Date.now() - t0 }, 'memory state loaded; running');
    } catch (e) {
      // QEMU exits when an incoming migration fails, which closes QMP under us.
      const why = e instanceof MayflyError ? e.message : `the memory state did not load (${(e as Error).message})`;
      throw new MayflyError(ErrorCode.SNAPSHOT_CORRUPT, `restoring ${spec.id} from ${stateFile} failed: ${why}`, {
        hint: 'mayfly boots the machine instead and makes the snapshot template again',
      });
    } finally {
      qmp.close();
    }
    await sendIdentity(join(spec.dir, 'agent.sock'), spec.identity, spec.network).catch((e: Error) => {
      throw fail(`the guest did not take its identity: ${e.message}`);
    });
    log.debug({ instance: spec.id, ms: Date.now() - t0 }, 'the guest took its identity');
  }

  async saveSnapshot(pid: number, dir: string, stateFile: string): Promise<void> {
    const qmp = await Qmp.connect(join(dir, 'qmp.sock'));
    try {
      // QEMU caps migration at ~128 MiB/s by default; a file is no network.
      await qmp.command('migrate-set-parameters', { 'max-bandwidth': 10_000_000_000 });
      await qmp.command('stop');
      await qmp.command('migrate', { uri: `exec:cat > ${shellQuote(stateFile)}` });
      const m = await qmp.waitMigration(300_000);
      if (m.status !== 'completed') {
        throw new MayflyError(ErrorCode.SNAPSHOT_FAILED, `saving the machine's memory state failed (${m.status}${m.error ? `: ${m.error}` : ''})`);
      }
      await qmp.command('quit').catch(() => {}); // the connection may close before the answer
    } finally {
      qmp.close();
    }
    for (let i = 0; i < 100 && processAlive(pid); i++) await sleep(50);
    await this.stop(pid, dir);
  }

  /**
   * A second disk for the job's data, hot-plugged into the running machine (booted or restored
   * alike: a restored clone must start with exactly its template's devices). A sparse raw file
   * in the instance dir, removed with it; what the guest writes there is encrypted by the guest.
   */
  async attachJobDisk(dir: string, sizeBytes: number): Promise<{ serial: string }> {
    const file = join(dir, jobDiskFile);
    const fd = openSync(file, 'wx', 0o600);
    try {
      ftruncateSync(fd, sizeBytes);
    } finally {
      closeSync(fd);
    }
    const qmp = await Qmp.connect(join(dir, 'qmp.sock'));
    try {
      await qmp.command('blockdev-add', {
        // Like the root disk (cache=unsafe): the data must not survive the machine anyway.
        'node-name': 'jobdisk', driver: 'raw', discard: 'unmap', cache: { direct: false, 'no-flush': true },
        file: { driver: 'file', filename: file },
      });
      await qmp.command('device_add', { driver: 'scsi-hd', bus: `${jobScsi}.0`, drive: 'jobdisk', id: 'jobdisk', serial: jobDiskSerial });
    } catch (e) {
      throw new MayflyError(ErrorCode.MACHINE_START_FAILED, `adding the job disk to the machine failed: ${(e as Error).message}`, {
        hint: 'machines started by an older mayfly have no job disk controller: destroy them (mayfly rm) and start new ones',
      });
    } finally {
      qmp.close();
    }
    return { serial: jobDiskSerial };
  }

  /** The clone's identity, handed to the guest at boot (fw_cfg for mayfly images, a NoCloud seed for imported ones). */
  #identityArgs(spec: StartSpec): string[] {
    const { dir, identity } = spec;
    if (spec.image.identity === 'cloud-init') {
      const seed = writeNoCloudSeed(dir, identity, spec.image.user);
      return ['-drive', `file=${seed},if=none,id=seed,format=raw,readonly=on`, '-device', 'virtio-blk-pci,drive=seed'];
    }
    const items: Record<string, string> = {
      id: identity.id,
      hostname: identity.hostname,
      host_key: identity.hostKey.privateKey,
      host_key_pub: identity.hostKey.publicKey,
      authorized_keys: identity.authorizedKey + '\n',
    };
    // A restored clone's guest read fw_cfg at the template's boot and never again: it gets its
    // address with the identity message instead.
    if (spec.network && !spec.restore) items.net = networkLines(spec.network).join('\n') + '\n';
    return Object.entries(items).flatMap(([name, value]) => {
      const file = join(dir, `fwcfg-${name}`);
      writeFileSync(file, value, { mode: 0o600 });
      return ['-fw_cfg', `name=opt/mayfly/${name},file=${file}`];
    });
  }

  /** QEMU has read the fw_cfg files into memory by now; the private host key need not stay on disk. */
  #dropSecrets(dir: string): void {
    for (const f of readdirSync(dir)) if (f.startsWith('fwcfg-') || f === 'seed.iso') rmSync(join(dir, f), { force: true });
  }

  deadReason(pid: number, dir: string): string | undefined {
    if (processAlive(pid)) return undefined;
    const tail = this.consoleTail(dir, 15);
    return `the QEMU process (pid ${pid}) has exited${tail ? `; last console lines:\n${tail}` : ''}`;
  }

  async stop(pid: number | null, dir: string): Promise<void> {
    // A start that failed half-way may have left a process whose pid only the pidfile knows.
    if (pid === null) {
      try {
        pid = Number(readFileSync(join(dir, 'qemu.pid'), 'utf8').trim()) || null;
      } catch {
        pid = null;
      }
    }
    if (pid !== null && processAlive(pid) && this.#isOurs(pid, dir)) {
      try {
        process.kill(pid, 'SIGTERM');
      } catch {
        // already gone
      }
      for (let i = 0; i < 50 && processAlive(pid); i++) await sleep(100);
      if (processAlive(pid)) {
        try {
          process.kill(pid, 'SIGKILL');
        } catch {
          // already gone
        }
        for (let i = 0; i < 50 && processAlive(pid); i++) await sleep(100);
      }
    }
  }

  killNow(pid: number | null, dir: string): void {
    try {
      if (pid !== null && this.#isOurs(pid, dir)) process.kill(pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }

  /** Guards against killing a recycled pid that now belongs to some other program. */
  #isOurs(pid: number, dir: string): boolean {
    return cmdlineIncludes(pid, dir);
  }

  consoleTail(dir: string, lines: number): string {
    return fileTail(join(dir, 'console.log'), lines);
  }

  listHost(): HostMachine[] {
    const out: HostMachine[] = [];
    for (const { pid, argv } of liveProcesses()) {
      const i = argv.indexOf('-name');
      const name = i >= 0 ? argv[i + 1] : undefined;
      if (!name?.startsWith(nameTag)) continue;
      const pidfile = argv[argv.indexOf('-pidfile') + 1] ?? '';
      out.push({ id: name.slice(nameTag.length), pid, dir: pidfile.replace(/\/qemu\.pid$/, '') });
    }
    return out;
  }
}
