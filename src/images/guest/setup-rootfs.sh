#!/bin/sh
# Runs inside a freshly bootstrapped rootfs (chroot) and turns it into a mayfly machine:
# the `ci` user, the /builds workspace, static user-mode networking, an sshd that takes its
# host key from the host at boot, and nothing that slows a boot or runs in the background.
# Runs before the recipe's own commands, so they can rely on all of this. Expects the guest
# files in /tmp/mayfly-guest; finalize-rootfs.sh runs after the recipe.
set -eu
g=/tmp/mayfly-guest
install -m 0755 "$g/mayfly-guest-init" /usr/local/sbin/mayfly-guest-init
install -m 0644 "$g/mayfly-guest-init.service" /etc/systemd/system/mayfly-guest-init.service
# Snapshot templates (see mayfly-guest-snapshot): not enabled, started only in a template.
install -m 0755 "$g/mayfly-guest-snapshot" /usr/local/sbin/mayfly-guest-snapshot
install -m 0755 "$g/mayfly-guest-restore" /usr/local/sbin/mayfly-guest-restore
install -m 0644 "$g/mayfly-guest-restore.service" /etc/systemd/system/mayfly-guest-restore.service
mkdir -p /etc/systemd/system/sysinit.target.wants
ln -sf /etc/systemd/system/mayfly-guest-init.service /etc/systemd/system/sysinit.target.wants/mayfly-guest-init.service

sh "$g/setup-ci-user.sh"

# sshd's config is mayfly's and fixed: skip the config test before every start (~0.1 s under
# TCG, paid at every boot and every snapshot restore).
mkdir -p /etc/systemd/system/ssh.service.d
printf '[Service]\nExecStartPre=\n' > /etc/systemd/system/ssh.service.d/mayfly.conf

mkdir -p /etc/ssh/sshd_config.d
cat > /etc/ssh/sshd_config.d/mayfly.conf <<'CONF'
HostKey /etc/ssh/ssh_host_ed25519_key
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UseDNS no
MaxSessions 64
MaxStartups 64:30:128
# A snapshot template listens on the guest's loopback only (see mayfly-guest-snapshot).
Include /run/mayfly-sshd-*.conf
CONF

# User-mode networking (slirp) always gives 10.0.2.15; static addressing skips DHCP.
mkdir -p /etc/systemd/network
cat > /etc/systemd/network/10-eth0.network <<'CONF'
[Match]
Name=eth0

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
DNS=10.0.2.3
CONF
systemctl enable systemd-networkd.service >/dev/null 2>&1 || true
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' > /etc/fstab

for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
    e2scrub_reap.service fstrim.timer getty@tty1.service systemd-networkd-wait-online.service \
    systemd-pstore.service man-db.timer; do
  systemctl mask "$unit" >/dev/null 2>&1 || true
done

