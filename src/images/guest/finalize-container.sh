#!/bin/sh
# Runs last in a container root, after the recipe's commands and playbook.
set -eu
# The driver writes each clone's own machine-id and hostname before it starts.
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id
echo mayfly > /etc/hostname
apt-get clean
rm -rf /var/lib/apt/lists/* /tmp/mayfly-guest
