#!/usr/bin/env bash
# CoAP download benchmark: fwrepo against libcoap's own coap-server-notls serving the same
# images over CoAP over TCP, with libcoap's coap-client-notls as the client for both.
# Rows: a 16 MiB image with 1 KiB blocks, the same with BERT (client defaults), and 1,000
# concurrent clients each fetching a 256 KiB image. Prints seconds, the fwrepo/libcoap speed
# ratio (above 1: fwrepo faster) and each server's peak RSS. Not part of the tests.
#
#   bench/coap.sh [runs]     (default 3; the median run is reported)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
clients=1000

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
command -v coap-server-notls >/dev/null || {
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libcoap3-bin
}
cargo build --release --quiet
ulimit -n 65536 2>/dev/null || ulimit -n 4096

. bench/lib.sh

head -c $((16 << 20)) /dev/urandom > "$work/big.bin"
head -c $((256 << 10)) /dev/urandom > "$work/small.bin"

http_port=$(free_port); fw_port=$(free_port)
start_fwrepo "$http_port" warn --set "coap.tcp_listen=127.0.0.1:$fw_port"
curl -sf -T "$work/big.bin" "http://127.0.0.1:$http_port/v1/firmware/big" >/dev/null
curl -sf -T "$work/small.bin" "http://127.0.0.1:$http_port/v1/firmware/small" >/dev/null

# libcoap's server keeps what a client PUTs when started with -d (dynamic resources).
lc_port=$(free_port)
coap-server-notls -A 127.0.0.1 -p "$lc_port" -d 10 -v 0 &
pids+=($!); lc_pid=$!
sleep 0.5
coap-client-notls -m put -f "$work/big.bin" "coap+tcp://127.0.0.1:$lc_port/fw/big" >/dev/null
coap-client-notls -m put -f "$work/small.bin" "coap+tcp://127.0.0.1:$lc_port/fw/small" >/dev/null

want_big=$(sha256sum "$work/big.bin" | cut -d' ' -f1)
want_small=$(sha256sum "$work/small.bin" | cut -d' ' -f1)

one() { # port name sha extra-args...
  local port=$1 name=$2 sha=$3; shift 3
  local out="$work/out.$port"
  rm -f "$out"
  coap-client-notls -m get "$@" -o "$out" "coap+tcp://127.0.0.1:$port/fw/$name"
  [ "$(sha256sum "$out" | cut -d' ' -f1)" = "$sha" ] || { echo "bad digest from port $port" >&2; exit 1; }
}

many() { # port
  local port=$1 i
  for i in $(seq "$clients"); do
    coap-client-notls -m get -o "$work/m.$port.$i" "coap+tcp://127.0.0.1:$port/fw/small" &
  done
  wait
  for i in $(seq "$clients"); do
    [ "$(sha256sum "$work/m.$port.$i" | cut -d' ' -f1)" = "$want_small" ] || { echo "bad digest in client $i" >&2; exit 1; }
  done
  rm -f "$work"/m."$port".*
}


printf '%-40s %10s %10s %8s\n' case "fwrepo s" "libcoap s" speedup
row "16 MiB, 1 KiB blocks (-b 1024)" "one $fw_port big $want_big -b 1024" "one $lc_port big $want_big -b 1024"
row "16 MiB, BERT (client defaults)" "one $fw_port big $want_big" "one $lc_port big $want_big"
row "$clients concurrent clients x 256 KiB" "many $fw_port" "many $lc_port"
echo "peak RSS: fwrepo $(awk '/VmHWM/ {print $2, $3}' /proc/$fw_pid/status), libcoap $(awk '/VmHWM/ {print $2, $3}' /proc/$lc_pid/status)"
echo "(libcoap $(coap-client-notls 2>&1 | head -1 | awk '{print $2}'), $(nproc) cores shared by servers and clients; median of $runs runs)"
