#!/bin/sh
# The job user of every mayfly image, VM or container: `ci` (uid 1000) with passwordless sudo,
# and the job workspace and GitLab's cache_dir (mayfly gitlab's defaults) owned by it.
set -eu
id ci >/dev/null 2>&1 || useradd --create-home --shell /bin/bash --uid 1000 --user-group ci
if [ -d /etc/sudoers.d ]; then
  echo 'ci ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/90-mayfly-ci
  chmod 0440 /etc/sudoers.d/90-mayfly-ci
fi
mkdir -p /builds /cache
chown ci:ci /builds /cache
