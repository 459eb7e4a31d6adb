#!/usr/bin/env bash
# CoAP over DTLS benchmark: fwrepo against libcoap's coap-server-openssl with the same
# pre-shared key, libcoap's coap-client-openssl as the client for both. Rows: 1,000 PSK
# handshakes (each a new client process fetching a 16-byte resource, 8 at a time) and a 1 MiB
# download with 1 KiB blocks. Prints seconds, the fwrepo/libcoap speed ratio (above 1:
# fwrepo faster) and each server's peak RSS. Not part of the tests.
#
#   bench/dtls.sh [runs]     (default 3; the median run is reported)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
handshakes=1000
identity=bench-device
key=bench-key-0123456789

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
command -v coap-server-openssl >/dev/null || {
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libcoap3-bin
}
scripts/build-deps
cargo build --release --quiet

. bench/lib.sh

head -c $((1 << 20)) /dev/urandom > "$work/big.bin"
head -c 16 /dev/urandom > "$work/tiny.bin"

http_port=$(free_port); fw_port=$(free_port udp)
start_fwrepo "$http_port" warn --set "coap.dtls_listen=127.0.0.1:$fw_port"
curl -sf -T "$work/big.bin" "http://127.0.0.1:$http_port/v1/firmware/big" >/dev/null
curl -sf -T "$work/tiny.bin" "http://127.0.0.1:$http_port/v1/firmware/tiny" >/dev/null
curl -sf -X PUT -H 'content-type: application/json' \
  -d "{\"identity\":\"$identity\",\"key\":\"$(printf '%s' "$key" | od -An -tx1 | tr -d ' \n')\"}" \
  "http://127.0.0.1:$http_port/v1/devices/$identity/psk" >/dev/null

# libcoap's server keeps what a client PUTs when started with -d; coaps:// is on port + 1.
lc_port=$(free_port udp)
while ! python3 -c "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1', $lc_port + 1))" 2>/dev/null; do
  lc_port=$(free_port udp)
done
coap-server-openssl -A 127.0.0.1 -p "$lc_port" -d 10 -k "$key" -v 0 &
pids+=($!); lc_pid=$!
sleep 0.5
coap-client-openssl -m put -f "$work/big.bin" "coap://127.0.0.1:$lc_port/fw/big" >/dev/null
coap-client-openssl -m put -f "$work/tiny.bin" "coap://127.0.0.1:$lc_port/fw/tiny" >/dev/null
lc_dtls=$((lc_port + 1))

want_big=$(sha256sum "$work/big.bin" | cut -d' ' -f1)
want_tiny=$(sha256sum "$work/tiny.bin" | cut -d' ' -f1)

get() { # port name out extra-args...
  local port=$1 name=$2 out=$3; shift 3
  rm -f "$out"
  coap-client-openssl -m get -u "$identity" -k "$key" "$@" -o "$out" "coaps://127.0.0.1:$port/fw/$name"
}

one() { # port
  get "$1" big "$work/out.$1" -b 1024
  [ "$(sha256sum "$work/out.$1" | cut -d' ' -f1)" = "$want_big" ] || { echo "bad digest from port $1" >&2; exit 1; }
}

many() { # port: $handshakes sessions, 8 at a time
  export -f get; export identity key work
  seq "$handshakes" | xargs -P 8 -I{} bash -c "get $1 tiny \"$work/t.$1.{}\""
  local bad
  bad=$(for f in "$work"/t."$1".*; do sha256sum "$f"; done | awk -v w="$want_tiny" '$1 != w' | wc -l)
  [ "$bad" = 0 ] || { echo "$bad bad downloads from port $1" >&2; exit 1; }
  rm -f "$work"/t."$1".*
}


printf '%-40s %10s %10s %8s\n' case "fwrepo s" "libcoap s" speedup
row "$handshakes PSK handshakes (+16 B GET each)" "many $fw_port" "many $lc_dtls"
row "1 MiB, 1 KiB blocks (-b 1024)" "one $fw_port" "one $lc_dtls"
echo "peak RSS: fwrepo $(awk '/VmHWM/ {print $2, $3}' /proc/$fw_pid/status), libcoap $(awk '/VmHWM/ {print $2, $3}' /proc/$lc_pid/status)"
echo "(libcoap $(coap-client-openssl 2>&1 | head -1 | awk '{print $2}'), $(nproc) cores shared by servers and clients; median of $runs runs)"
