#!/usr/bin/env bash
# Fleet benchmark: a release fwrepo on its embedded defaults (sled) in a scratch directory,
# loaded by examples/fleet_bench.rs over HTTP: import N devices, start a campaign over all of
# them, wait until each has its task, then drive every device through download and success.
# Prints devices/s, the start time, the status latency at 100 and N devices and peak RSS.
# A PostgreSQL URL as third argument puts the metadata there instead (an empty database).
# Not part of the tests.
#
#   bench/fleet.sh [devices] [concurrency] [postgres://...]     (default 100000 64, sled)
#   FLEET_BENCH_NO_ROLLOUT=1 stops after the start, the releases and the status queries.
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-100000}
conc=${2:-64}
metadata=${3:-}
cargo build --release --quiet --bin fwrepo --example fleet_bench

. bench/lib.sh
port=$(free_port)
start_fwrepo "$port" info ${metadata:+--set "storage.metadata=$metadata"}
backend=sled; [ -z "$metadata" ] || backend=PostgreSQL
echo "fleet benchmark: $devices devices, $conc connections, metadata $backend"
target/release/examples/fleet_bench "http://127.0.0.1:$port" "$fw_pid" "$devices" "$conc"
grep -o 'campaign members stored.*' "$work/fwrepo.log" | sed 's/\x1b\[[0-9;]*m//g' || true
