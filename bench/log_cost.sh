#!/usr/bin/env bash
# What the access log costs per kept-alive request: two 1-worker nodes of one
# build, one logging and one not, are loaded at the same time (each by its own
# `wrk -t1 -c32`, four nginx backends), so that whatever else the machine does
# slows both alike. Each round reads both nodes' CPU time (/proc/PID/stat) and
# requests served; the figure is the logging node's CPU per request over the
# other's. A second pass swaps the two nodes' roles, so a difference between
# the two slots cancels out. Prints every round, then the geometric mean of
# the rounds' on/off ratios, their median and the mean's standard error.
#
#   bench/log_cost.sh [-r ROUNDS (10)] [-d SECS (4)] [--format json|text] [--to PATH]
#
# --to is where the log goes (default: a file in a new directory under /tmp;
# /dev/null measures the node's side alone). EDGELB_BIN measures another
# build. Needs nginx, wrk, curl. Loopback only: 127.0.0.1-5.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=10 SECS=4 FORMAT=json TO=
while [ $# -gt 0 ]; do
  case "$1" in
    -r) ROUNDS=$2; shift 2 ;;
    -d) SECS=$2; shift 2 ;;
    --format) FORMAT=$2; shift 2 ;;
    --to) TO=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "log_cost.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$ROUNDS" -ge 2 ] || { echo "log_cost.sh: -r must be at least 2" >&2; exit 2; }
NEEDS="nginx wrk curl"
# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"
TO=${TO:-$TMP/access.log}
TOKEN=log-cost-bench-token-0123456789

mkdir -p "$TMP/ng"
cat > "$TMP/ng/nginx.conf" <<EOF
worker_processes 1; pid $TMP/ng/nginx.pid; error_log $TMP/ng/err.log; daemon off;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.2:19000; listen 127.0.0.3:19000; listen 127.0.0.4:19000; listen 127.0.0.5:19000;
    location / { return 200 "ok\n"; } } }
EOF
nginx -p "$TMP/ng" -e "$TMP/ng/err.log" -c "$TMP/ng/nginx.conf" & STARTED+=($!)
for i in 2 3 4 5; do
  wait_http "http://127.0.0.$i:19000/" || { echo "log_cost.sh: nginx did not start" >&2; cat "$TMP/ng/err.log" >&2; exit 1; }
done

api() {
  curl -sf -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' "$@" >/dev/null ||
    { echo "log_cost.sh: the admin API refused: $*" >&2; return 1; }
}
# node NAME ADMIN_PORT HTTP_PORT LOG(0|1): starts a node, its PID in NODE_PID
node() {
  { echo "workers = 1"
    if [ "$4" = 1 ]; then printf 'access_log = "%s"\naccess_log_format = "%s"\n' "$TO" "$FORMAT"; fi
  } > "$TMP/$1.toml"
  "$BIN" --config "$TMP/$1.toml" --data-dir "$TMP/$1" --admin-addr "127.0.0.1:$2" \
    --cluster-addr "127.0.0.1:$(($2 + 1))" --token "$TOKEN" --log warn > "$TMP/$1.out" 2>&1 &
  NODE_PID=$!
  STARTED+=("$NODE_PID")
  local api=http://127.0.0.1:$2
  wait_http "$api/healthz" || { echo "log_cost.sh: node $1 did not start" >&2; cat "$TMP/$1.out" >&2; exit 1; }
  api -X POST "$api/v1/services" \
    -d "{\"name\":\"bench-http\",\"services\":[{\"port\":$3,\"destination_port\":19000,\"handlers\":[\"http\"]}]}"
  for i in 2 3 4 5; do api -X POST "$api/v1/services/bench-http/instances" -d "{\"address\":\"127.0.0.$i\"}"; done
  wait_http "http://127.0.0.1:$3/" || { echo "log_cost.sh: node $1 does not answer on :$3" >&2; cat "$TMP/$1.out" >&2; exit 1; }
}
TICK=$(getconf CLK_TCK)

printf "# %s rounds of %s s, both nodes loaded at once; log: %s to %s; %s CPUs\n" \
  "$ROUNDS" "$SECS" "$FORMAT" "$TO" "$(nproc)"
printf "%-5s %5s %12s %12s %8s\n" pass round "on us/req" "off us/req" "on/off"
RATIOS=()
for pass in 1 2; do
  # Pass 1 logs on the first node, pass 2 on the second.
  node "a$pass" 17370 18470 $((pass == 1)); a=$NODE_PID
  node "b$pass" 17380 18480 $((pass == 2)); b=$NODE_PID
  for r in $(seq 1 "$ROUNDS"); do
    [ "$TO" = /dev/null ] || : > "$TO"
    ca=$(cpu_ticks "$a"); cb=$(cpu_ticks "$b")
    wrk -t1 -c32 -d"${SECS}s" http://127.0.0.1:18470/ > "$TMP/wa" & wa=$!
    wrk -t1 -c32 -d"${SECS}s" http://127.0.0.1:18480/ > "$TMP/wb" & wb=$!
    wait $wa; wait $wb
    if grep -qE 'Non-2xx|Socket errors' "$TMP/wa" "$TMP/wb"; then
      echo "log_cost.sh: errors in round $r of pass $pass:" >&2; cat "$TMP/wa" "$TMP/wb" >&2; exit 1
    fi
    ca=$(( $(cpu_ticks "$a") - ca )); cb=$(( $(cpu_ticks "$b") - cb ))
    na=$(awk '/requests in/ {print $1}' "$TMP/wa"); nb=$(awk '/requests in/ {print $1}' "$TMP/wb")
    line=$(awk -v ca="$ca" -v cb="$cb" -v na="$na" -v nb="$nb" -v t="$TICK" -v p="$pass" 'BEGIN {
      ua = ca * 1e6 / t / na; ub = cb * 1e6 / t / nb
      on = (p == 1) ? ua : ub; off = (p == 1) ? ub : ua
      printf "%.2f %.2f %.4f", on, off, on / off }')
    read -r on off ratio <<< "$line"
    printf "%-5s %5s %12s %12s %8s\n" "$pass" "$r" "$on" "$off" "$ratio"
    RATIOS+=("$ratio")
  done
  kill -TERM "$a" "$b"; wait "$a" "$b" 2>/dev/null || true
  STARTED=("${STARTED[0]}")
done
printf "%s\n" "${RATIOS[@]}" | sort -n | awk '{v[NR] = $1; l = log($1); s += l; ss += l * l} END {
  n = NR; m = s / n; se = sqrt((ss - n * m * m) / (n - 1) / n)
  med = (n % 2) ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
  printf "on/off: geometric mean %+.1f %% (standard error %.1f %%), median %+.1f %%, %d rounds\n",
    (exp(m) - 1) * 100, se * 100, (med - 1) * 100, n }'
