# Sourced by the bench scripts: a scratch directory and the processes to stop with it, free
# ports, fwrepo started on its embedded defaults with only the listeners asked for, and rows
# of median timings.

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# free_port [udp]: a port the OS has free on 127.0.0.1 (TCP unless asked).
free_port() {
  python3 -c "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1:] == ['udp'] else socket.SOCK_STREAM); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])" "$@"
}

# start_fwrepo HTTP_PORT LOG_LEVEL [--set key=value ...]: the release fwrepo in $work with
# plain HTTP on HTTP_PORT and every CoAP listener off unless a --set turns it on; sets fw_pid
# and returns once it answers. BENCH_FWREPO runs another build (to compare two commits).
start_fwrepo() {
  local port=$1 level=$2; shift 2
  "${BENCH_FWREPO:-target/release/fwrepo}" serve --storage "$work/storage" --keys "$work/keys" \
    --listen "127.0.0.1:$port" --set coap.tcp_listen= --set coap.udp_listen= \
    --set coap.dtls_listen= --set "log.level=$level" "$@" 2>"$work/fwrepo.log" &
  fw_pid=$!
  pids+=("$fw_pid")
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && return; sleep 0.1; done
  echo "fwrepo did not answer on port $port; its log:" >&2
  tail -20 "$work/fwrepo.log" >&2
  return 1
}

# secs_of COMMAND...: wall seconds of one run.
secs_of() {
  local s e
  s=$(date +%s.%N); "$@"; e=$(date +%s.%N)
  awk -v s="$s" -v e="$e" 'BEGIN { printf "%.4f", e - s }'
}

# median NUMBER...: the middle one (the lower middle of an even count).
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

# timed COMMAND...: the median wall time of $runs runs.
timed() {
  local t=()
  for _ in $(seq "$runs"); do t+=("$(secs_of "$@")"); done
  median "${t[@]}"
}

# row LABEL FWREPO-COMMAND PEER-COMMAND: both timed, and the peer's time over fwrepo's.
row() {
  local f l
  f=$(timed $2); l=$(timed $3)
  printf '%-40s %10s %10s %8s\n' "$1" "$f" "$l" "$(awk -v f="$f" -v l="$l" 'BEGIN { printf "%.2f", l / f }')"
}
