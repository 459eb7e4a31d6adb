#!/usr/bin/env bash
# FOTA engine benchmark: a release fwrepo on its embedded defaults (sled, fsync per change) in a
# scratch directory, loaded by examples/fota_bench.rs over HTTP: create N tasks, stay idle
# 10 s (CPU used is printed), deliver every task, then three reports each. Not part of the tests.
# A PostgreSQL URL as third argument puts the metadata there instead (an empty database).
#
#   bench/fota.sh [tasks] [concurrency] [postgres://...]     (default 100000 64, sled)
set -euo pipefail
cd "$(dirname "$0")/.."
tasks=${1:-100000}
conc=${2:-64}
metadata=${3:-}
cargo build --release --quiet --bin fwrepo --example fota_bench

. bench/lib.sh
port=$(free_port)
start_fwrepo "$port" warn ${metadata:+--set "storage.metadata=$metadata"}
target/release/examples/fota_bench "http://127.0.0.1:$port" "$fw_pid" "$tasks" "$conc"
[ -n "$metadata" ] || echo "metadata on disk: $(du -sh "$work/storage/metadata" | cut -f1)"
