// IPv4 arithmetic for the bridged network: plain functions on CIDR strings, no host access.

export interface Cidr {
  /** The network address as an unsigned 32-bit number. */
  base: number;
  prefix: number;
}

export function ipToInt(ip: string): number {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(ip);
  if (!m) throw new Error(`'${ip}' is not an IPv4 address`);
  const parts = m.slice(1).map(Number);
  if (parts.some((p) => p > 255)) throw new Error(`'${ip}' is not an IPv4 address`);
  return ((parts[0]! << 24) | (parts[1]! << 16) | (parts[2]! << 8) | parts[3]!) >>> 0;
}

export function intToIp(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

function mask(prefix: number): number {
  return prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
}

/**
 * Parses "A.B.C.D/N" (or a bare address as /32). With `strict`, host bits must be zero, so a
 * typo such as 10.0.0.5/24 is refused rather than silently meaning 10.0.0.0/24.
 */
export function parseCidr(text: string, strict = true): Cidr {
  const [addr, len, ...rest] = text.trim().split('/');
  if (rest.length > 0 || addr === undefined) throw new Error(`'${text}' is not an IPv4 network (A.B.C.D/N)`);
  const ip = ipToInt(addr);
  const prefix = len === undefined ? 32 : Number(len);
  if (!/^\d{1,2}$/.test(len ?? '32') || prefix > 32) throw new Error(`'${text}' has a bad prefix length (0 to 32)`);
  const base = (ip & mask(prefix)) >>> 0;
  if (strict && base !== ip) throw new Error(`'${text}' has host bits set; the network is ${intToIp(base)}/${prefix}`);
  return { base, prefix };
}

export function cidrText(c: Cidr): string {
  return `${intToIp(c.base)}/${c.prefix}`;
}

export function contains(net: Cidr, ip: number): boolean {
  return ((ip & mask(net.prefix)) >>> 0) === net.base;
}

export function overlaps(a: Cidr, b: Cidr): boolean {
  const p = Math.min(a.prefix, b.prefix);
  return ((a.base & mask(p)) >>> 0) === ((b.base & mask(p)) >>> 0);
}

/** A route of the host, as `ip -j route show table all` reports it. */
export interface HostRoute {
  dst: string;
  dev?: string;
  table?: string;
  type?: string;
}

/**
 * The first host route that overlaps `subnet`, ignoring default routes (they cover everything)
 * and the routes of mayfly's own bridge (which exist once the bridge is up).
 */
export function conflictingRoute(subnet: Cidr, routes: readonly HostRoute[], ownBridge: string): HostRoute | undefined {
  return routes.find((r) => {
    if (r.dev === ownBridge || r.dst === 'default') return false;
    // Broadcast routes name one address; a local route of the host names its own address.
    let dst: Cidr;
    try {
      dst = parseCidr(r.dst, false);
    } catch {
      return false; // not IPv4
    }
    return dst.prefix > 0 && overlaps(subnet, dst);
  });
}

/** The bridge's own address (the instances' gateway): the subnet's first host address. */
export function gatewayOf(subnet: Cidr): number {
  return subnet.base + 1;
}

/** Addresses handed to instances: all hosts of the subnet after the gateway, without broadcast. */
export function instanceRange(subnet: Cidr): { first: number; last: number } {
  const size = 2 ** (32 - subnet.prefix);
  return { first: subnet.base + 2, last: subnet.base + size - 2 };
}

/** The lowest address of the range that `taken` does not hold. */
export function firstFree(subnet: Cidr, taken: ReadonlySet<string>): string | undefined {
  const { first, last } = instanceRange(subnet);
  for (let n = first; n <= last; n++) {
    const ip = intToIp(n);
    if (!taken.has(ip)) return ip;
  }
  return undefined;
}

/**
 * A locally administered MAC derived from the address: unique within the subnet, and the same
 * for every instance that gets the address later, so the host's neighbour cache is never stale.
 */
export function macFor(ip: string): string {
  const n = ipToInt(ip);
  return ['02', '6d', '66', (n >>> 16) & 255, (n >>> 8) & 255, n & 255]
    .map((b) => (typeof b === 'string' ? b : b.toString(16).padStart(2, '0')))
    .join(':');
}
