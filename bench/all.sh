#!/usr/bin/env bash
# Every performance row in one go, each against its peer on the same machine, printed as one
# table: fwrepo's figure, the peer's, the ratio (above 1: fwrepo ahead), the target and
# fwrepo's peak RSS during the row. Each row starts its own fwrepo and peer, so a row's RSS is
# its own, and runs alone when named. Runs alternate between fwrepo and the peer and the
# median is reported. Not part of the tests.
#
#   bench/all.sh [row ...]          (default: every row, in this order)
#     http-full http-range http-floor https-full https-range big-full big-range
#     coap-blocks coap-bert coap-clients coap-udp coap-10k fota-sled fota-pg upload
#   The upload row comes last: after its 12 GiB of writes (fwrepo's and dd's, three runs
#   each) the FOTA rows, which wait on fsyncs, ran 10-30% slower than alone, even with a
#   sync before each run.
#   RUNS=3           runs per row and side (the median is reported)
#   SECS=10          seconds per wrk run
#   FOTA_TASKS=20000 tasks per FOTA run
#   BENCH_PG=postgres://...  an empty database for fota-pg (default: a private cluster)
#   BENCH_FWREPO=path        another fwrepo build (to compare two commits)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-3}
secs=${SECS:-10}
fota_tasks=${FOTA_TASKS:-20000}
conns=64
all_rows=(http-full http-range http-floor https-full https-range big-full big-range
  coap-blocks coap-bert coap-clients coap-udp coap-10k fota-sled fota-pg upload)
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=("${all_rows[@]}")
for r in "${rows[@]}"; do
  [[ " ${all_rows[*]} " == *" $r "* ]] || { echo "unknown row: $r (rows: ${all_rows[*]})" >&2; exit 2; }
done

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v coap-server-notls >/dev/null || need+=(libcoap3-bin)
command -v openssl >/dev/null || need+=(openssl)
[[ " ${rows[*]} " != *" fota-pg "* || -n "${BENCH_PG:-}" ]] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet --bin fwrepo --example fota_bench --example coap_clients --example hyper_floor
ulimit -n 65536 2>/dev/null || ulimit -n 16384

. bench/lib.sh
chmod 755 "$work" # nginx workers run unprivileged

# stop_all: ends every process this row started.
stop_all() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
rss_mb() { awk '/VmHWM/ { printf "%.0f MB", $2 / 1024 }' "/proc/$1/status"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }

printf '%-44s %11s %11s %-7s %6s %8s %9s\n' row fwrepo peer unit ratio target "fw RSS"
emit() { # label fwrepo peer unit ratio target rss
  printf '%-44s %11s %11s %-7s %6s %8s %9s\n' "$@"
}

# --- files, made once ----------------------------------------------------------------------
image() { # name bytes: a random file in $work, once
  [ -f "$work/$1" ] || head -c "$2" /dev/urandom >"$work/$1"
}

# --- HTTP and HTTPS: wrk against fwrepo and nginx serving the same file ---------------------
tls_pair() {
  [ -f "$work/cert.pem" ] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -nodes -keyout "$work/key.pem" -out "$work/cert.pem" -days 2 -subj /CN=127.0.0.1 \
    -addext subjectAltName=IP:127.0.0.1 2>/dev/null
  chmod 644 "$work/key.pem"
}

# start_nginx FILE [tls]: nginx with its stock production tuning (sendfile, tcp_nopush, one
# worker per core) serving $work/FILE at /fw/FILE; sets ng_url.
start_nginx() {
  local file=$1 tls=${2:-} port
  port=$(free_port)
  mkdir -p "$work/www/fw" "$work/nginx"
  ln -f "$work/$file" "$work/www/fw/$file" 2>/dev/null || cp "$work/$file" "$work/www/fw/$file"
  chmod -R a+rX "$work/www"
  local listen="listen 127.0.0.1:$port;"
  [ -z "$tls" ] || listen="listen 127.0.0.1:$port ssl; ssl_certificate $work/cert.pem;
    ssl_certificate_key $work/key.pem; ssl_protocols TLSv1.3;"
  cat >"$work/nginx.conf" <<CONF
worker_processes auto;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  client_body_temp_path $work/nginx;
  proxy_temp_path $work/nginx;
  fastcgi_temp_path $work/nginx;
  uwsgi_temp_path $work/nginx;
  scgi_temp_path $work/nginx;
  server { $listen root $work/www; }
}
CONF
  nginx -c "$work/nginx.conf" -g 'daemon off;' &
  pids+=($!)
  local scheme=http
  [ -z "$tls" ] || scheme=https
  ng_url="$scheme://127.0.0.1:$port/fw/$file"
  for _ in $(seq 100); do curl -skf -o /dev/null "$ng_url" && break; sleep 0.1; done
}

# start_fw_http FILE [tls]: fwrepo serving $work/FILE at /fw/FILE; sets fw_url.
start_fw_http() {
  local file=$1 tls=${2:-} port tport
  port=$(free_port)
  local extra=()
  if [ -n "$tls" ]; then
    tport=$(free_port)
    extra=(--set "https.listen=127.0.0.1:$tport" --set "https.cert=$work/cert.pem" --set "https.key=$work/key.pem")
  fi
  rm -rf "$work/storage"
  start_fwrepo "$port" warn "${extra[@]}"
  curl -sf -T "$work/$file" "http://127.0.0.1:$port/v1/firmware/$file" >/dev/null
  fw_url="http://127.0.0.1:$port/fw/$file"
  [ -z "$tls" ] || fw_url="https://127.0.0.1:$tport/fw/$file"
}

# wrk_rate URL BLOCKS: one wrk run's rate. BLOCKS = 0: whole downloads, in MiB/s (wrk counts
# the bytes of responses still under way, so large files measure fairly); BLOCKS > 0: random
# 4 KiB ranges among the first BLOCKS 4 KiB blocks, in requests/s.
wrk_rate() {
  local url=$1 blocks=$2 out
  cat >"$work/range.lua" <<LUA
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
request = function()
  if $blocks > 0 then
    local off = math.random(0, $blocks - 1) * 4096
    wrk.headers["Range"] = "bytes=" .. off .. "-" .. (off + 4095)
  end
  return wrk.format("GET", wrk.path)
end
LUA
  out=$(wrk -t2 -c"$conns" -d"${secs}s" --timeout 60s -s "$work/range.lua" "$url")
  if grep -q "Non-2xx\|Socket errors" <<<"$out"; then echo "errors from $url:" >&2; echo "$out" >&2; exit 1; fi
  if [ "$blocks" = 0 ]; then
    awk '/Transfer\/sec/ { v = $2; u = substr(v, length(v) - 1); n = substr(v, 1, length(v) - 2)
      if (u == "GB") n *= 1024; else if (u == "KB") n /= 1024; else if (u != "MB") n /= 1048576
      printf "%.0f", n }' <<<"$out"
  else
    awk '/Requests\/sec/ { printf "%.0f", $2 }' <<<"$out"
  fi
}

http_row() { # label file bytes blocks tls target
  local label=$1 file=$2 bytes=$3 blocks=$4 tls=$5 target=$6 f=() n=() fw_pid_row
  image "$file" "$bytes"
  [ -z "$tls" ] || tls_pair
  start_fw_http "$file" "$tls"; fw_pid_row=$fw_pid
  start_nginx "$file" "$tls"
  for _ in $(seq "$runs"); do
    f+=("$(wrk_rate "$fw_url" "$blocks")")
    n+=("$(wrk_rate "$ng_url" "$blocks")")
  done
  local fm nm
  fm=$(median "${f[@]}"); nm=$(median "${n[@]}")
  local unit=req/s
  [ "$blocks" != 0 ] || unit=MiB/s
  emit "$label" "$fm" "$nm" "$unit" "$(ratio "$fm" "$nm")" "$target" "$(rss_mb "$fw_pid_row")"
  stop_all
}

# floor_row LABEL: examples/hyper_floor (hyper alone, one fixed 4 KiB 206 for every request)
# against nginx's 4 KiB ranges, as in http-range: how far any handler on hyper can go.
floor_row() {
  local f=() n=() port pid
  image fw16m.bin $((16 << 20))
  port=$(free_port)
  target/release/examples/hyper_floor "127.0.0.1:$port" &
  pid=$!; pids+=("$pid")
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
  start_nginx fw16m.bin
  for _ in $(seq "$runs"); do
    f+=("$(wrk_rate "http://127.0.0.1:$port/fw/fw16m.bin" 4096)")
    n+=("$(wrk_rate "$ng_url" 4096)")
  done
  local fm nm
  fm=$(median "${f[@]}"); nm=$(median "${n[@]}")
  emit "$1" "$fm" "$nm" req/s "$(ratio "$fm" "$nm")" - "$(rss_mb "$pid")"
  stop_all
}

# --- CoAP: libcoap's client (or examples/coap_clients) against fwrepo and libcoap's server ---
# start_coap_pair FILE...: fwrepo with CoAP over TCP and UDP, and coap-server-notls, both
# holding the files; sets fw_coap, lc_coap (host:port) and lc_pid.
start_coap_pair() {
  local http tcp udp f
  http=$(free_port); tcp=$(free_port); udp=$(free_port udp)
  rm -rf "$work/storage"
  start_fwrepo "$http" warn --set "coap.tcp_listen=127.0.0.1:$tcp" --set "coap.udp_listen=127.0.0.1:$udp"
  for f in "$@"; do curl -sf -T "$work/$f" "http://127.0.0.1:$http/v1/firmware/$f" >/dev/null; done
  fw_tcp=127.0.0.1:$tcp; fw_udp=127.0.0.1:$udp
  local lc
  lc=$(free_port)
  coap-server-notls -A 127.0.0.1 -p "$lc" -d 20 -v 0 &
  lc_pid=$!; pids+=("$lc_pid")
  for _ in $(seq 50); do coap-client-notls -m get -B 1 "coap+tcp://127.0.0.1:$lc/" >/dev/null 2>&1 && break; sleep 0.1; done
  for f in "$@"; do coap-client-notls -m put -f "$work/$f" "coap+tcp://127.0.0.1:$lc/fw/$f" >/dev/null; done
  lc_tcp=127.0.0.1:$lc; lc_udp=127.0.0.1:$lc
}

coap_get() { # scheme host:port file args...
  local scheme=$1 at=$2 file=$3; shift 3
  rm -f "$work/got"
  coap-client-notls -m get "$@" -o "$work/got" "$scheme://$at/fw/$file"
  cmp -s "$work/got" "$work/$file" || { echo "wrong bytes from $at" >&2; exit 1; }
}

coap_many() { # host:port file clients
  local at=$1 file=$2 n=$3 i
  for i in $(seq "$n"); do
    coap-client-notls -m get -o "$work/m.$i" "coap+tcp://$at/fw/$file" &
  done
  wait # runs in secs_of's subshell: only these clients are its children
  for i in $(seq "$n"); do
    cmp -s "$work/m.$i" "$work/$file" || {
      echo "client $i got $(wc -c <"$work/m.$i" 2>/dev/null || echo no) bytes, not the file's, from $at (fwrepo: $fw_tcp)" >&2
      exit 1
    }
  done
  rm -f "$work"/m.*
}

# coap_row LABEL TARGET FWREPO-COMMAND PEER-COMMAND: a run that fails (wrong bytes) is told on
# stderr and left out; a side with no good run shows "fail".
coap_row() {
  local label=$1 target=$2 fcmd=$3 lcmd=$4 f=() l=() t
  for _ in $(seq "$runs"); do
    if t=$(secs_of $fcmd); then f+=("$t"); fi
    if t=$(secs_of $lcmd); then l+=("$t"); fi
  done
  local fm=fail lm=fail r=-
  [ ${#f[@]} = 0 ] || fm=$(median "${f[@]}")
  [ ${#l[@]} = 0 ] || lm=$(median "${l[@]}")
  [ "$fm" = fail ] || [ "$lm" = fail ] || r=$(ratio "$lm" "$fm")
  emit "$label" "$fm" "$lm" "s" "$r" "$target" "$(rss_mb "$fw_pid")"
}

coap_10k() {
  local sha out fw_line lc_line
  image fw64k.bin $((64 << 10))
  sha=$(sha256sum "$work/fw64k.bin" | cut -d' ' -f1)
  start_coap_pair fw64k.bin
  fw_line=$(target/release/examples/coap_clients "$fw_tcp" fw/fw64k.bin 10000 1024 "$sha")
  lc_line=$(target/release/examples/coap_clients "$lc_tcp" fw/fw64k.bin 10000 1024 "$sha" || true)
  local fs ls fok lok
  fs=$(sed -n 's/.*seconds=\([0-9.]*\).*/\1/p' <<<"$fw_line"); fok=$(sed -n 's/.*ok=\([0-9]*\).*/\1/p' <<<"$fw_line")
  ls=$(sed -n 's/.*seconds=\([0-9.]*\).*/\1/p' <<<"$lc_line"); lok=$(sed -n 's/.*ok=\([0-9]*\).*/\1/p' <<<"$lc_line")
  [ "$fok" = 10000 ] || { echo "fwrepo: $fw_line" >&2; fs="fail"; }
  [ "${lok:-0}" = 10000 ] || { echo "libcoap: $lc_line" >&2; ls="fail"; }
  local r=-
  [ "$ls" = fail ] || [ "$fs" = fail ] || r=$(ratio "$ls" "$fs")
  emit "10,000 CoAP/TCP clients x 64 KiB, 1 KiB" "$fs" "$ls" "s" "$r" "<200MB" "$(rss_mb "$fw_pid")"
  stop_all
}

# --- Upload of a 2 GiB image against writing the same bytes with fsync ----------------------
upload_row() {
  local f=() d=() port fw_peak=0
  image fw2g.bin $((2048 << 20))
  cat "$work/fw2g.bin" >/dev/null # both sides read it from the page cache
  for i in $(seq "$runs"); do
    port=$(free_port)
    rm -rf "$work/storage"
    sync
    start_fwrepo "$port" warn
    f+=("$(secs_of curl -sf -o /dev/null -T "$work/fw2g.bin" "http://127.0.0.1:$port/v1/firmware/up-$i")")
    fw_peak=$(awk -v a="$fw_peak" '/VmHWM/ { print ($2 > a ? $2 : a) }' "/proc/$fw_pid/status")
    stop_all
    rm -rf "$work/storage"
    sync
    d+=("$(secs_of dd if="$work/fw2g.bin" of="$work/copy.bin" bs=1M conv=fsync status=none)")
    rm -f "$work/copy.bin"
  done
  local fm dm
  fm=$(awk -v s="$(median "${f[@]}")" 'BEGIN { printf "%.0f", 2048 / s }')
  dm=$(awk -v s="$(median "${d[@]}")" 'BEGIN { printf "%.0f", 2048 / s }')
  emit "upload 2 GiB (hash, sign, fsync) vs dd fsync" "$fm" "$dm" "MiB/s" "$(ratio "$fm" "$dm")" "0.85" \
    "$(awk -v k="$fw_peak" 'BEGIN { printf "%.0f MB", k / 1024 }')"
}

# --- FOTA engine: examples/fota_bench.rs, against the issue's targets -----------------------
fota_row() { # backend target metadata-url
  local backend=$1 target=$2 url=$3 c=() d=() r=() out port peak=0
  for _ in $(seq "$runs"); do
    port=$(free_port)
    rm -rf "$work/storage"
    # A quiet disk: the rows before (the upload's 2 GiB files) leave writeback behind that
    # would slow every fsync of the first runs.
    sync
    [ -z "$url" ] || reset_pg
    start_fwrepo "$port" warn ${url:+--set "storage.metadata=$url"}
    out=$(FOTA_BENCH_IDLE_SECS=0 target/release/examples/fota_bench "http://127.0.0.1:$port" "$fw_pid" "$fota_tasks" "$conns")
    c+=("$(awk '/^create tasks/ { print $(NF-7) }' <<<"$out" | tr -d /s)")
    d+=("$(awk '/^device work requests/ { print $(NF-7) }' <<<"$out" | tr -d /s)")
    r+=("$(awk '/^reports:/ { s += $(NF-7) + 0; n++ } END { printf "%.0f", s / n }' <<<"$out")")
    peak=$(awk -v a="$peak" '/VmHWM/ { print ($2 > a ? $2 : a) }' "/proc/$fw_pid/status")
    stop_all
  done
  local rss
  rss=$(awk -v k="$peak" 'BEGIN { printf "%.0f MB", k / 1024 }')
  local cm dm rm_
  cm=$(median "${c[@]}"); dm=$(median "${d[@]}"); rm_=$(median "${r[@]}")
  emit "FOTA $backend: create tasks" "$cm" "-" "/s" "$(ratio "$cm" "$target")" "$target" "$rss"
  emit "FOTA $backend: device work requests" "$dm" "-" "/s" "$(ratio "$dm" "$target")" "$target" "$rss"
  emit "FOTA $backend: reports (mean of 3 kinds)" "$rm_" "-" "/s" "$(ratio "$rm_" "$target")" "$target" "$rss"
}

pg_url=${BENCH_PG:-}
reset_pg() {
  if [ -z "${BENCH_PG:-}" ]; then
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    if [ -z "${pg_port:-}" ]; then
      pg_port=$(free_port)
      mkdir -p "$work/pg"
      [ "$(id -u)" != 0 ] || chown postgres "$work/pg"
      run_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
      run_pg "$pg_bin/initdb" -D "$work/pg/data" -U fwrepo -A trust >/dev/null
      run_pg "$pg_bin/pg_ctl" -D "$work/pg/data" -o "-p $pg_port -k $work/pg -c listen_addresses=127.0.0.1" \
        -l "$work/pg/log" -w start >/dev/null
      trap 'run_pg "$pg_bin/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null; cleanup' EXIT
    fi
    pg_url="postgres://fwrepo@127.0.0.1:$pg_port/bench"
  fi
  local admin=${pg_url%/*}/postgres db=${pg_url##*/}
  psql -q "$admin" -c "DROP DATABASE IF EXISTS \"$db\"" -c "CREATE DATABASE \"$db\"" >/dev/null 2>&1
}

for r in "${rows[@]}"; do
  case $r in
  http-full) http_row "HTTP 16 MiB full, $conns conns" fw16m.bin $((16 << 20)) 0 "" 1.05 ;;
  http-range) http_row "HTTP 4 KiB ranges of 16 MiB, $conns conns" fw16m.bin $((16 << 20)) 4096 "" 1.2 ;;
  http-floor) floor_row "hyper alone, fixed 4 KiB 206 (the floor)" ;;
  https-full) http_row "HTTPS 16 MiB full, $conns conns" fw16m.bin $((16 << 20)) 0 tls 1.05 ;;
  https-range) http_row "HTTPS 4 KiB ranges of 16 MiB, $conns conns" fw16m.bin $((16 << 20)) 4096 tls 1.2 ;;
  big-full) http_row "HTTP 256 MiB (beyond cache) full" fw256m.bin $((256 << 20)) 0 "" 0.9 ;;
  big-range) http_row "HTTP 4 KiB ranges of 256 MiB" fw256m.bin $((256 << 20)) 65536 "" 0.9 ;;
  coap-blocks | coap-bert | coap-clients | coap-udp)
    image fw16m.bin $((16 << 20)); image fw256k.bin $((256 << 10)); image fw1m.bin $((1 << 20))
    start_coap_pair fw16m.bin fw256k.bin fw1m.bin
    case $r in
    coap-blocks) coap_row "CoAP/TCP 16 MiB, 1 KiB blocks" 1.2 \
      "coap_get coap+tcp $fw_tcp fw16m.bin -b 1024" "coap_get coap+tcp $lc_tcp fw16m.bin -b 1024" ;;
    coap-bert) coap_row "CoAP/TCP 16 MiB, BERT" 1.2 \
      "coap_get coap+tcp $fw_tcp fw16m.bin" "coap_get coap+tcp $lc_tcp fw16m.bin" ;;
    coap-clients) coap_row "CoAP/TCP 1,000 clients x 256 KiB" 1.2 \
      "coap_many $fw_tcp fw256k.bin 1000" "coap_many $lc_tcp fw256k.bin 1000" ;;
    coap-udp) coap_row "CoAP/UDP 1 MiB, 1 KiB blocks" 1.0 \
      "coap_get coap $fw_udp fw1m.bin -b 1024" "coap_get coap $lc_udp fw1m.bin -b 1024" ;;
    esac
    stop_all ;;
  coap-10k) coap_10k ;;
  upload) upload_row ;;
  fota-sled) fota_row sled 20000 "" ;;
  fota-pg) reset_pg; fota_row PostgreSQL 10000 "$pg_url" ;;
  esac
done
echo "($(nproc) cores shared by fwrepo, the peer and the load generator; $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo);"
echo " median of $runs runs per side; wrk -t2 -c$conns ${secs}s; libcoap $(dpkg-query -W -f '${Version}' libcoap3-bin 2>/dev/null); nginx $(nginx -v 2>&1 | cut -d/ -f2); FOTA $fota_tasks tasks)"
