import { execFileSync } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { stringify } from 'yaml';
import { ErrorCode, MayflyError } from '../../errors.ts';
import { requireTool } from '../../util/exec.ts';
import type { MachineIdentity } from '../types.ts';

/**
 * Imported cloud images (Ubuntu, Debian genericcloud, …) take their identity from cloud-init.
 * A NoCloud seed (an ISO 9660 volume labelled "cidata" with meta-data and user-data) gives each
 * clone its host key, the authorized key for root and the job user, and its hostname.
 */
export function noCloudDocuments(identity: MachineIdentity, user: string): { metaData: string; userData: string } {
  // cloud-init reads YAML 1.1 (PyYAML), where e.g. `yes` or `12:30` are not strings.
  const yaml11 = { version: '1.1' } as const;
  const metaData = stringify({ 'instance-id': identity.id, 'local-hostname': identity.hostname }, yaml11);
  const userData =
    '#cloud-config\n' +
    stringify({
      hostname: identity.hostname,
      disable_root: false,
      ssh_pwauth: false,
      ssh_deletekeys: true,
      ssh_genkeytypes: [],
      ssh_keys: { ed25519_private: identity.hostKey.privateKey, ed25519_public: identity.hostKey.publicKey },
      users: [
        { name: 'root', ssh_authorized_keys: [identity.authorizedKey] },
        {
          name: user,
          shell: '/bin/bash',
          sudo: 'ALL=(ALL) NOPASSWD:ALL',
          lock_passwd: true,
          ssh_authorized_keys: [identity.authorizedKey],
        },
      ],
      runcmd: [['sh', '-c', 'mkdir -p /builds /cache && chown ' + user + ': /builds /cache']],
    }, yaml11);
  return { metaData, userData };
}

export function writeNoCloudSeed(dir: string, identity: MachineIdentity, user: string): string {
  requireTool('genisoimage');
  const src = join(dir, 'seed');
  mkdirSync(src, { mode: 0o700 });
  const { metaData, userData } = noCloudDocuments(identity, user);
  writeFileSync(join(src, 'meta-data'), metaData, { mode: 0o600 });
  writeFileSync(join(src, 'user-data'), userData, { mode: 0o600 });
  const iso = join(dir, 'seed.iso');
  try {
    execFileSync('genisoimage', ['-quiet', '-output', iso, '-volid', 'cidata', '-joliet', '-rock', join(src, 'meta-data'), join(src, 'user-data')], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
  } catch (e) {
    throw new MayflyError(ErrorCode.MACHINE_START_FAILED, `could not make the cloud-init seed: ${String((e as { stderr?: Buffer }).stderr ?? e)}`);
  } finally {
    rmSync(src, { recursive: true, force: true });
  }
  return iso;
}
