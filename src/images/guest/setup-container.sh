#!/bin/sh
# Runs inside a freshly bootstrapped container root (chroot): the `ci` user, /builds and /cache
# as in VM images (setup-ci-user.sh). No init, kernel or sshd: nspawn runs the container,
# commands enter it with nsenter.
set -eu
sh /tmp/mayfly-guest/setup-ci-user.sh
