#!/usr/bin/env bash
# The loads bench/peers.sh (the shared HAProxy/NGINX benchmark, whose
# backends only say "ok") cannot make: 1 MiB responses, HTTP/2 over TLS with
# many streams, and 1,000 kept-alive connections. edgelb, HAProxy (1 thread)
# and NGINX (1 worker) each front one nginx backend (bench/lib.sh), and take
# turns within every round; the balancer's CPU time is read from /proc.
#
#   bench/more.sh [-d SECS] [-r ROUNDS] [--runs big,tcp-big,h2,many,tls,tls-new] [--targets edgelb,haproxy,nginx]
#     (--targets also takes edgelb-1w: the node with one worker, as HAProxy
#     and NGINX run here with one thread and one worker)
#
#   big      wrk -c16, GET /big (1 MiB), HTTP mode        MB/s, CPU ms per GB
#   tcp-big  the same through TCP mode (edgelb, haproxy)  MB/s, CPU ms per GB
#   h2       h2load -c16 -m32 over TLS (ALPN h2)          req/s, CPU µs per request
#   many     wrk -c1000 keep-alive, GET /                 req/s, p99, CPU µs per request
#   tls      wrk -c64 keep-alive over TLS (HTTP/1.1)      req/s, p99, CPU µs per request
#   tls-new  wrk -c64, a new TLS connection per request   req/s, p99, CPU µs per request
#
# Needs wrk and h2load (Debian: nghttp2-client) besides bench/lib.sh's
# tools. EDGELB_BIN measures another build of the node.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DUR=5 ROUNDS=3 RUNS=big,tcp-big,h2,many,tls,tls-new TARGETS=edgelb,haproxy,nginx
while [ $# -gt 0 ]; do
  case "$1" in
    -d) DUR=$2; shift 2 ;;
    -r) ROUNDS=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --targets) TARGETS=$2; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "more.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
for b in wrk h2load; do command -v $b >/dev/null || { echo "more.sh: missing $b" >&2; exit 2; }; done
BENCH_N=2000
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"
HZ=$(getconf CLK_TCK)
RAW=$TMP/raw.tsv; : > "$RAW"

# run KIND TARGET ROUND: one measurement, appended to $RAW as
# kind target round rate p99_ms cpu_s units(requests or MB) errors
run() {
  local kind=$1 t=$2 r=$3 out=$TMP/out.$1.$2.$3 c0 c1
  local http=127.0.0.1:$PORT_BASE tls=127.0.0.1:$((PORT_BASE + 1)) tcp=127.0.0.1:$((PORT_BASE + 2))
  c0=$(cpu_ticks $PIDS)
  case "$kind" in
    big)     timeout $((DUR + 20)) wrk -t1 -c16 -d"${DUR}s" --latency "http://$http/big" > "$out" 2>&1 ;;
    tcp-big) timeout $((DUR + 20)) wrk -t1 -c16 -d"${DUR}s" --latency "http://$tcp/big" > "$out" 2>&1 ;;
    many)    timeout $((DUR + 30)) wrk -t1 -c1000 -d"${DUR}s" --latency "http://$http/" > "$out" 2>&1 ;;
    tls)     timeout $((DUR + 30)) wrk -t1 -c64 -d"${DUR}s" --latency -H 'Host: bench.local' "https://$tls/" > "$out" 2>&1 ;;
    tls-new) timeout $((DUR + 30)) wrk -t1 -c64 -d"${DUR}s" --latency -H 'Host: bench.local' \
               -H 'Connection: close' "https://$tls/" > "$out" 2>&1 ;;
    h2)      timeout $((DUR + 30)) h2load -c16 -m32 -D "$DUR" --warm-up-time=1 \
               --connect-to="$tls" "https://bench.local:${tls##*:}/" > "$out" 2>&1 ;;
  esac
  c1=$(cpu_ticks $PIDS)
  awk -v kind="$kind" -v t="$t" -v r="$r" -v cpu="$(( c1 - c0 ))" -v hz="$HZ" -v dur="$DUR" '
    function ms(v,  x) { x = v + 0
      if (v ~ /us$/) return x / 1000; if (v ~ /ms$/) return x; if (v ~ /s$/) return x * 1000; return x }
    /Requests\/sec:/ { rps = $2 }
    /requests in/    { reqs = $1 }
    /^ +99%/         { p99 = ms($2) }
    /Socket errors:/ { gsub(/,/, ""); err += $4 + $6 + $8 + $10 }
    /Non-2xx/        { err += $NF }
    /^finished in/   { gsub(/,/, ""); rps = $4 }
    /^requests:/     { gsub(/,/, ""); reqs = $8; err += $10 + $12 }
    END {
      units = reqs; rate = rps
      if (kind ~ /big/) { units = reqs * 1.048576; rate = rps * 1.048576 }   # MB
      printf "%s\t%s\t%s\t%.1f\t%.2f\t%.3f\t%.1f\t%d\n", kind, t, r, rate, p99, cpu / hz, units, err
    }' "$out" >> "$RAW"
  grep -qE 'Requests/sec|finished in' "$out" || echo "# no result for $kind/$t round $r: $(tail -c 300 "$out")" >&2
}

IFS=, read -r -a RUN_LIST <<< "$RUNS"
IFS=, read -r -a TARGET_LIST <<< "$TARGETS"
echo "# more.sh: $(nproc) CPUs, $DUR s per run, $ROUNDS interleaved rounds; haproxy $(haproxy -v | awk 'NR==1{print $3}'), nginx $(nginx -v 2>&1 | sed 's|.*/||'), $(h2load --version | head -1)"
for r in $(seq 1 "$ROUNDS"); do
  for t in "${TARGET_LIST[@]}"; do
    start_target "$t"
    # warm-up (discarded)
    timeout 20 wrk -t1 -c16 -d1s "http://127.0.0.1:$PORT_BASE/" > /dev/null 2>&1 || true
    for k in "${RUN_LIST[@]}"; do
      [ "$k" = tcp-big ] && [ "$t" = nginx ] && continue
      run "$k" "$t" "$r"; sleep 0.5
    done
    stop_target
  done
done

echo
printf "%-8s %-8s %11s %17s %8s %12s %6s\n" run target rate "(min-max)" "p99 ms" "CPU/unit" errs
awk -F'\t' '
  function med(s,  a, k, i, j, t) { k = split(s, a, " ")
    for (i = 2; i <= k; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j+1] = a[j]; a[j+1] = t }
    return (k % 2) ? a[(k+1)/2] : (a[k/2] + a[k/2+1]) / 2 }
  { key = $1 "\t" $2; if (!(key in R)) order[++n] = key
    R[key] = R[key] " " $4; P[key] = P[key] " " $5
    U[key] = U[key] " " ($7 > 0 ? ($1 ~ /big/ ? 1e3 * $6 / ($7 / 1024) : 1e6 * $6 / $7) : -1)
    if (!(key in lo) || $4 + 0 < lo[key]) lo[key] = $4 + 0
    if (!(key in hi) || $4 + 0 > hi[key]) hi[key] = $4 + 0
    E[key] += $8 }
  END { for (i = 1; i <= n; i++) { split(order[i], kt, "\t"); k = order[i]
      unit = kt[1] ~ /big/ ? "ms/GB" : "us/req"; rate = kt[1] ~ /big/ ? "MB/s" : "req/s"
      printf "%-8s %-8s %6.0f %-5s %17s %8s %6.1f %-6s %6d\n", kt[1], kt[2], med(R[k]), rate,
        sprintf("(%.0f-%.0f)", lo[k], hi[k]), kt[1] == "h2" ? "-" : sprintf("%.2f", med(P[k])), med(U[k]), unit, E[k] } }' "$RAW" | sort -s -k1,1
echo "# CPU/unit = the balancer's CPU time (all its processes and threads) per GB moved or per request;"
echo "# rate and CPU are medians over the rounds. Load generator, backend and balancer share $(nproc) CPUs."
