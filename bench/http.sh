#!/usr/bin/env bash
# HTTP download benchmark: fwrepo against nginx serving the same file, measured with wrk.
# Prints requests/s and MB/s for a 16 MiB full download and for random 4 KiB ranged reads,
# each at 64 connections, and the ratio fwrepo/nginx. Not part of the tests.
#
#   bench/http.sh [seconds-per-run]     (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=64

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cargo build --release --quiet

work=$(mktemp -d)
chmod 755 "$work"   # nginx workers run unprivileged
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
head -c $((16 << 20)) /dev/urandom > "$work/fw16m.bin"

# fwrepo on its embedded defaults in a scratch directory.
fw_port=$(free_port)
target/release/fwrepo serve --storage "$work/storage" --keys "$work/keys" \
  --listen "127.0.0.1:$fw_port" --set log.level=warn 2>"$work/fwrepo.log" &
pids+=($!)
fw_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$fw_port/healthz" >/dev/null && break; sleep 0.1; done
curl -sf -T "$work/fw16m.bin" "http://127.0.0.1:$fw_port/v1/firmware/fw16m.bin" >/dev/null

# nginx with its stock tuning (sendfile, one worker per core), serving the same file.
ng_port=$(free_port)
mkdir -p "$work/www/fw" "$work/nginx"
cp "$work/fw16m.bin" "$work/www/fw/"
chmod -R a+rX "$work/www"
cat > "$work/nginx.conf" <<CONF
worker_processes auto;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  client_body_temp_path $work/nginx;
  proxy_temp_path $work/nginx;
  fastcgi_temp_path $work/nginx;
  uwsgi_temp_path $work/nginx;
  scgi_temp_path $work/nginx;
  server { listen 127.0.0.1:$ng_port; root $work/www; }
}
CONF
nginx -c "$work/nginx.conf" -g 'daemon off;' &
pids+=($!)
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$ng_port/fw/fw16m.bin" && break; sleep 0.1; done

cat > "$work/range.lua" <<'LUA'
math.randomseed(os.time())
request = function()
  local off = math.random(0, 4095) * 4096
  wrk.headers["Range"] = "bytes=" .. off .. "-" .. (off + 4095)
  return wrk.format("GET", wrk.path)
end
LUA

# wrk prints "Requests/sec: N" and "Transfer/sec: N{KB,MB,GB}".
run() { # url [script]
  local out
  out=$(wrk -t2 -c"$conns" -d"${secs}s" ${2:+-s "$2"} "$1")
  if grep -q "Non-2xx" <<<"$out"; then echo "error responses from $1:" >&2; echo "$out" >&2; exit 1; fi
  local rps mbs
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  mbs=$(awk '/Transfer\/sec/ {v=$2; u=substr(v,length(v)-1); n=substr(v,1,length(v)-2);
        if (u=="GB") n*=1024; else if (u=="KB") n/=1024; else if (u!="MB") n/=1048576; printf "%.1f", n}' <<<"$out")
  echo "$rps $mbs"
}

printf '%-26s %12s %10s %12s %10s %8s\n' case "fwrepo req/s" "MB/s" "nginx req/s" "MB/s" ratio
for case in full range; do
  if [ $case = full ]; then
    label="16 MiB full download"; f=$(run "http://127.0.0.1:$fw_port/fw/fw16m.bin"); n=$(run "http://127.0.0.1:$ng_port/fw/fw16m.bin")
  else
    label="4 KiB ranged reads"; f=$(run "http://127.0.0.1:$fw_port/fw/fw16m.bin" "$work/range.lua"); n=$(run "http://127.0.0.1:$ng_port/fw/fw16m.bin" "$work/range.lua")
  fi
  read -r frps fmbs <<<"$f"; read -r nrps nmbs <<<"$n"
  ratio=$(awk -v a="$frps" -v b="$nrps" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
  printf '%-26s %12s %10s %12s %10s %8s\n' "$label" "$frps" "$fmbs" "$nrps" "$nmbs" "$ratio"
done
echo "fwrepo peak RSS: $(awk '/VmHWM/ {print $2, $3}' /proc/$fw_pid/status)"
echo "($conns connections, ${secs}s per run, wrk -t2 on the same $(nproc)-core machine)"
