export type { Driver, HostMachine, MachineIdentity, MachineSize, StartSpec, StartedMachine } from './types.ts';
export { QemuDriver, type QemuDriverOptions } from './qemu/index.ts';
export { chooseAccel, type AccelChoice, type AccelSetting } from './qemu/accel.ts';
export { NspawnDriver, type NspawnDriverOptions } from './nspawn/index.ts';
