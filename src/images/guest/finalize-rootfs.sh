#!/bin/sh
# Runs last in the rootfs, after the recipe's commands and playbook: removes what must not be
# shared by every clone, makes the small initrd, and drops caches.
set -eu

# Every clone gets its own host key at boot (see mayfly-guest-init); none may be baked in.
rm -f /etc/ssh/ssh_host_*

# systemd makes a new machine-id at first boot when the file is empty, so clones differ.
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
echo mayfly > /etc/hostname

# slirp's DNS; set last because the recipe's commands still use the host's resolver.
rm -f /etc/resolv.conf
echo 'nameserver 10.0.2.3' > /etc/resolv.conf

# A small initrd boots noticeably faster under TCG than the default "most modules" one.
if [ -d /etc/initramfs-tools ] && ls /boot/vmlinuz-* >/dev/null 2>&1; then
  sed -i 's/^MODULES=.*/MODULES=list/' /etc/initramfs-tools/initramfs.conf
  # Idempotent: image maintenance runs this again on a finished image.
  for m in virtio_pci virtio_blk virtio_net virtio_scsi; do
    grep -qx "$m" /etc/initramfs-tools/modules 2>/dev/null || echo "$m" >> /etc/initramfs-tools/modules
  done
  update-initramfs -u -k all >/dev/null
fi

apt-get clean
rm -rf /var/lib/apt/lists/* /tmp/mayfly-guest
