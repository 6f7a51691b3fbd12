import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Driver } from '../../src/drivers/types.ts';
import { ErrorCode, MayflyError } from '../../src/errors.ts';
import { assertJobDiskSupported } from '../../src/pool/job-disk.ts';

// Which job data modes a driver can offer. (That they protect the data is shown with real
// machines: test/integration/job-disk.test.ts.)

const vm = { name: 'qemu', attachJobDisk: async () => ({ serial: 'x' }) } satisfies Pick<Driver, 'name' | 'attachJobDisk'>;
const container = { name: 'nspawn' } satisfies Pick<Driver, 'name' | 'attachJobDisk'>;

test('a VM driver offers every mode', () => {
  for (const mode of ['plain', 'encrypted', 'tmpfs'] as const) assertJobDiskSupported(vm, mode);
});

test('a driver without a disk to encrypt (containers) refuses encrypted with a clear error, and allows plain and tmpfs', () => {
  assertJobDiskSupported(container, 'plain');
  assertJobDiskSupported(container, 'tmpfs');
  assert.throws(
    () => assertJobDiskSupported(container, 'encrypted'),
    (e: unknown) =>
      e instanceof MayflyError && e.code === ErrorCode.USAGE && /not supported for nspawn machines/.test(e.message) && /job_disk = "tmpfs"/.test(e.hint ?? ''),
  );
});
