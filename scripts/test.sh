#!/bin/sh
# The README's test command (and all of .ci/run): set up, type-check, then every test.
# Integration tests boot real VMs (TCG where KVM cannot run guests); they share one image
# built into a fresh temporary data dir, removed at the end.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
PATH="$root/.node/bin:$PATH"
export PATH
cd "$root"

echo "typecheck: tsc --noEmit"
node node_modules/typescript/bin/tsc --noEmit -p .

MAYFLY_TEST_DATA_DIR=$(mktemp -d /var/tmp/mayfly-test.XXXXXX)
export MAYFLY_TEST_DATA_DIR
cleanup() { "$root/bin/mayfly" --data-dir "$MAYFLY_TEST_DATA_DIR" rm --all >/dev/null 2>&1 || true; rm -rf "$MAYFLY_TEST_DATA_DIR"; }
trap cleanup EXIT INT TERM

# One test file at a time: TCG guests are CPU-bound and the host has 2 cores.
node --test --test-concurrency=1 --test-reporter=spec "test/unit/*.test.ts" "test/integration/*.test.ts"
