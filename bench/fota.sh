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

work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/fwrepo serve --storage "$work/storage" --keys "$work/keys" \
  --listen "127.0.0.1:$port" --set coap.tcp_listen= --set coap.udp_listen= --set coap.dtls_listen= \
  --set log.level=warn ${metadata:+--set "storage.metadata=$metadata"} 2>"$work/fwrepo.log" &
pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
target/release/examples/fota_bench "http://127.0.0.1:$port" "$pid" "$tasks" "$conc"
[ -n "$metadata" ] || echo "metadata on disk: $(du -sh "$work/storage/metadata" | cut -f1)"
