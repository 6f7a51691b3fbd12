#!/bin/sh
# Runs last in a container root, after the recipe's commands and playbook.
set -eu
# The driver writes each clone's own machine-id and hostname before it starts.
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
echo mayfly > /etc/hostname
if command -v apt-get >/dev/null; then apt-get clean; fi
rm -rf /var/lib/apt/lists/* /tmp/mayfly-guest
