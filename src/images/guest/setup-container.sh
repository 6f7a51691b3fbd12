#!/bin/sh
# Runs inside a freshly bootstrapped container root (chroot): the `ci` user with passwordless
# sudo, the /builds workspace and GitLab's cache dir, as in VM images (setup-rootfs.sh). No
# init, kernel or sshd: nspawn runs the container, commands enter it with nsenter.
set -eu
id ci >/dev/null 2>&1 || useradd --create-home --shell /bin/bash --uid 1000 --user-group ci
if [ -d /etc/sudoers.d ]; then
  echo 'ci ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/90-mayfly-ci
  chmod 0440 /etc/sudoers.d/90-mayfly-ci
fi
mkdir -p /builds /cache
chown ci:ci /builds /cache
