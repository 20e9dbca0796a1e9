#!/usr/bin/env bash
# What an idle client connection costs: edgelb, HAProxy (1 thread) and NGINX
# (1 worker) each front one nginx backend; N clients connect, send one
# request each, read the answer and stay connected and idle. The resident
# set of each balancer's processes is read before and after; the growth over
# N is the figure (KiB per idle connection). Every target starts fresh for
# every kind of connection, and they take turns within a round.
#
#   bench/idle.sh [-n N (8000)] [-r ROUNDS] [--modes h1,tls-h1,tls-h2] [--targets edgelb,haproxy,nginx]
#
# h1 = plain HTTP/1.1 keep-alive; tls-h1 = HTTP/1.1 over TLS; tls-h2 = HTTP/2
# over TLS (ALPN). One ECDSA P-256 certificate serves all three balancers
# (bench/lib.sh has the layout). SETTLE (seconds, default 3) is how long the
# connections stay idle before the reading; EDGELB_BIN measures another
# build of the node.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=8000 ROUNDS=1 MODES=h1,tls-h1,tls-h2 TARGETS=edgelb,haproxy,nginx
while [ $# -gt 0 ]; do
  case "$1" in
    -n) N=$2; shift 2 ;;
    -r) ROUNDS=$2; shift 2 ;;
    --modes) MODES=$2; shift 2 ;;
    --targets) TARGETS=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "idle.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
BENCH_N=$N
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
# Each balancer holds N client sockets and its upstreams; edgelb budgets two
# descriptors per client connection and lowers max_connections to fit.
[ "$(ulimit -n)" -gt $((2 * N + 1000)) ] || { echo "idle.sh: open files limit $(ulimit -n) too low for -n $N (needs 2N + 1000)" >&2; exit 2; }

printf "# %s idle connections per target and kind; %s CPUs; haproxy %s, nginx %s\n" "$N" "$(nproc)" \
  "$(haproxy -v | awk 'NR==1{print $3}')" "$(nginx -v 2>&1 | sed 's|.*/||')"
printf "%-8s %-8s %5s %10s %10s %8s %9s\n" kind target round "rss0 KiB" "rss1 KiB" "KiB/conn" upstreams
IFS=, read -r -a MODE_LIST <<< "$MODES"
IFS=, read -r -a TARGET_LIST <<< "$TARGETS"
for MODE in "${MODE_LIST[@]}"; do
  for r in $(seq 1 "$ROUNDS"); do
    for t in "${TARGET_LIST[@]}"; do
      start_target "$t"
      port=$PORT_BASE; [ "$MODE" = h1 ] || port=$((PORT_BASE + 1))
      # warm-up: a few connections of the kind measured, then closed
      python3 "$ROOT/bench/idle_clients.py" "127.0.0.1:$port" 20 "$MODE" bench.local < /dev/null > /dev/null 2>&1 || true
      sleep 1
      before=$(rss_kib $PIDS)
      coproc CLIENT { python3 "$ROOT/bench/idle_clients.py" "127.0.0.1:$port" "$N" "$MODE" bench.local 2> "$TMP/client.err"; }
      read -r -t 300 ready <&"${CLIENT[0]}" || ready="timeout"
      sleep "${SETTLE:-3}"
      after=$(rss_kib $PIDS)
      ups=$(ss -tn state established dst 127.0.0.2:19000 | tail -n +2 | wc -l)
      echo >&"${CLIENT[1]}"; wait "$CLIENT_PID" 2>/dev/null || true
      got=${ready#ready }; got=${got%%/*}
      [ "$ready" = "ready $N/$N" ] || echo "# $t $MODE: $ready ($(head -c 300 "$TMP/client.err"))" >&2
      printf "%-8s %-8s %5s %10s %10s %8.1f %9s\n" "$MODE" "$t" "$r" "$before" "$after" \
        "$(awk -v a="$after" -v b="$before" -v n="${got:-0}" 'BEGIN{print (n > 0 ? (a - b) / n : -1)}')" "$ups"
      stop_target
    done
  done
done
echo "# KiB/conn = growth of the balancer's resident set over the connections held open and idle"
echo "# (after one request each); upstreams = connections open to the backend at that moment."
