#!/bin/sh
# The README's first command: set up, build the default image if there is none, and run the
# demo job from examples/demo in a fresh VM.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
if ! mayfly image inspect debian-12 >/dev/null 2>&1; then
  mayfly image build debian-12
fi
cd "$root/examples/demo"
exec mayfly exec hello
