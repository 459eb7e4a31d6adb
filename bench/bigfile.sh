#!/usr/bin/env bash
# Streams a large image through fwrepo (upload, then full download) and reports the server's
# peak RSS before and after, to show neither direction holds the image in memory.
#
#   bench/bigfile.sh [size-in-MiB]     (default 2048)
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-2048}
cargo build --release --quiet
work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/fwrepo serve --storage "$work/storage" --keys "$work/keys" \
  --listen "127.0.0.1:$port" --set log.level=warn 2>"$work/fwrepo.log" &
pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
hwm() { awk '/VmHWM/ {print $2}' "/proc/$pid/status"; }

head -c $((mib << 20)) /dev/urandom > "$work/image.bin"
want=$(sha256sum "$work/image.bin" | cut -d' ' -f1)
start_kb=$(hwm)
t0=$(date +%s.%N)
got=$(curl -sf -T "$work/image.bin" "http://127.0.0.1:$port/v1/firmware/big.bin" | python3 -c 'import json,sys; print(json.load(sys.stdin)["sha256"])')
t1=$(date +%s.%N)
up_kb=$(hwm)
[ "$got" = "$want" ] || { echo "digest mismatch: $got != $want"; exit 1; }
rm "$work/image.bin"
down=$(curl -sf "http://127.0.0.1:$port/fw/big.bin" | sha256sum | cut -d' ' -f1)
t2=$(date +%s.%N)
down_kb=$(hwm)
[ "$down" = "$want" ] || { echo "download digest mismatch"; exit 1; }
awk -v m="$mib" -v s="$start_kb" -v u="$up_kb" -v d="$down_kb" -v t0="$t0" -v t1="$t1" -v t2="$t2" 'BEGIN {
  printf "image: %d MiB, sha256 verified after upload and after download\n", m
  printf "upload:   %.1f s (%.0f MiB/s)\n", t1 - t0, m / (t1 - t0)
  printf "download: %.1f s (%.0f MiB/s, including sha256sum)\n", t2 - t1, m / (t2 - t1)
  printf "peak RSS: %.1f MiB at start, %.1f MiB after upload, %.1f MiB after download (+%.1f MiB)\n",
    s / 1024, u / 1024, d / 1024, (d - s) / 1024
}'
