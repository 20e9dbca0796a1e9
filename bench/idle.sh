#!/usr/bin/env bash
# What an idle client connection costs: edgelb, HAProxy (1 thread) and NGINX
# (1 worker) each front one nginx backend; N clients connect, send one
# request each, read the answer and stay connected and idle. The resident
# set of each balancer's processes is read before and after; the growth over
# N is the figure (KiB per idle connection). Every target starts fresh for
# every kind of connection, and they take turns within a round.
#
#   bench/idle.sh [-n N] [-r ROUNDS] [--modes h1,tls-h1,tls-h2] [--targets edgelb,haproxy,nginx]
#
# h1 = plain HTTP/1.1 keep-alive; tls-h1 = HTTP/1.1 over TLS; tls-h2 = HTTP/2
# over TLS (ALPN). One ECDSA P-256 certificate serves all three balancers.
# Needs haproxy, nginx, openssl, python3, curl. Loopback only: the backend
# is 127.0.0.2:19000, the balancers listen on 127.0.0.1:182xx.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=10000 ROUNDS=1 MODES=h1,tls-h1,tls-h2 TARGETS=edgelb,haproxy,nginx
while [ $# -gt 0 ]; do
  case "$1" in
    -n) N=$2; shift 2 ;;
    -r) ROUNDS=$2; shift 2 ;;
    --modes) MODES=$2; shift 2 ;;
    --targets) TARGETS=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "idle.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
for b in haproxy nginx openssl python3 curl; do
  command -v $b >/dev/null || { echo "idle.sh: missing $b" >&2; exit 2; }
done
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -gt $((N + 1000)) ] || { echo "idle.sh: open files limit $(ulimit -n) too low for -n $N" >&2; exit 2; }

cargo build --release --bin edgelb --manifest-path "$ROOT/Cargo.toml" >&2
BIN=$ROOT/target/release/edgelb
TMP=$(mktemp -d /tmp/edgelb-idle.XXXXXX); chmod 755 "$TMP"
STARTED=()
cleanup() {
  for p in "${STARTED[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=bench.local -addext subjectAltName=DNS:bench.local \
  -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
cat "$TMP/cert.pem" "$TMP/key.pem" > "$TMP/both.pem"
NGX_TEMPS="client_body_temp_path $TMP/cb; proxy_temp_path $TMP/px; fastcgi_temp_path $TMP/fc; uwsgi_temp_path $TMP/uw; scgi_temp_path $TMP/sc;"

cat > "$TMP/be.conf" <<EOF
worker_processes 1; pid $TMP/be.pid; error_log $TMP/be.err warn;
events { worker_connections 8192; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 600s; $NGX_TEMPS
  server { listen 127.0.0.2:19000; default_type text/plain; location / { return 200 "ok\n"; } } }
EOF
nginx -p "$TMP" -e "$TMP/be.err" -c "$TMP/be.conf" -g 'daemon off;' & STARTED+=($!)

cat > "$TMP/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn $(( N + 500 ))
defaults
  mode http
  timeout connect 2s
  timeout client 600s
  timeout server 600s
frontend fe
  bind 127.0.0.1:18281
  bind 127.0.0.1:18282 ssl crt $TMP/both.pem alpn h2,http/1.1
  default_backend be
backend be
  balance leastconn
  server s1 127.0.0.2:19000
EOF
cat > "$TMP/nginx.conf" <<EOF
worker_processes 1; worker_rlimit_nofile $((2 * N + 1000)); pid $TMP/ngx.pid; error_log $TMP/ngx.err warn;
events { worker_connections $((2 * N + 500)); }
http {
  access_log off; keepalive_requests 1000000; keepalive_timeout 600s; $NGX_TEMPS
  upstream be { server 127.0.0.2:19000; keepalive 64; }
  server {
    listen 127.0.0.1:18291; listen 127.0.0.1:18292 ssl http2;
    ssl_certificate $TMP/cert.pem; ssl_certificate_key $TMP/key.pem;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
cat > "$TMP/edgelb.toml" <<EOF
idle_timeout = "600s"
EOF
TOKEN=benchbenchbenchbenchbench

wait_http() { for _ in $(seq 1 100); do curl -sk -o /dev/null -m 1 "$1" && return 0; sleep 0.1; done; return 1; }
rss_kib() { # sum of VmRSS over the PIDs given
  local t=0 p v
  for p in "$@"; do v=$(awk '/^VmRSS:/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0); t=$((t + ${v:-0})); done
  echo $t
}
PIDS="" PLAIN="" SECURE=""
start() { # target -> sets PIDS PLAIN SECURE
  case "$1" in
    edgelb)
      rm -rf "$TMP/data"
      "$BIN" --config "$TMP/edgelb.toml" --data-dir "$TMP/data" --admin-addr 127.0.0.1:17370 \
        --cluster-addr 127.0.0.1:17371 --token "$TOKEN" --log warn > "$TMP/edgelb.log" 2>&1 &
      PIDS=$!; PLAIN=127.0.0.1:18271; SECURE=127.0.0.1:18272
      local api=http://127.0.0.1:17370
      wait_http "$api/healthz"
      a() { curl -sf -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' "$@" > /dev/null; }
      a -X POST "$api/v1/certificates" --data @<(python3 -c 'import json,sys; print(json.dumps({"name":"bench","chain":open(sys.argv[1]).read(),"private_key":open(sys.argv[2]).read()}))' "$TMP/cert.pem" "$TMP/key.pem")
      a -X POST "$api/v1/services" -d '{"name":"idle","domains":[{"name":"bench.local","certificate":{"name":"bench"}}],"services":[{"port":18271,"destination_port":19000,"handlers":["http"]},{"port":18272,"destination_port":19000,"handlers":["tls","http"]}]}'
      a -X POST "$api/v1/services/idle/instances" -d '{"address":"127.0.0.2"}' ;;
    haproxy)
      haproxy -db -f "$TMP/haproxy.cfg" > "$TMP/haproxy.log" 2>&1 &
      PIDS=$!; PLAIN=127.0.0.1:18281; SECURE=127.0.0.1:18282 ;;
    nginx)
      nginx -p "$TMP" -e "$TMP/ngx.err" -c "$TMP/nginx.conf" -g 'daemon off;' &
      PIDS=$!; PLAIN=127.0.0.1:18291; SECURE=127.0.0.1:18292 ;;
  esac
  STARTED+=($PIDS)
  wait_http "http://$PLAIN/" || { echo "idle.sh: $1 does not answer" >&2; cat "$TMP/$1.log" "$TMP/ngx.err" >&2 2>/dev/null; exit 1; }
  # nginx: the master and its worker
  [ "$1" = nginx ] && PIDS="$PIDS $(ps -o pid= --ppid "$PIDS" | tr -d ' ' | tr '\n' ' ')"
  # warm-up: a few connections of the kind measured, then closed
  python3 "$ROOT/bench/idle_clients.py" "$ADDR_OF" 20 "$MODE" bench.local < /dev/null > /dev/null 2>&1 || true
}
stop() { local p; for p in $PIDS; do kill -TERM "$p" 2>/dev/null || true; done; for p in $PIDS; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done; }

printf "# %s idle connections per target and kind; %s CPUs; haproxy %s, nginx %s\n" "$N" "$(nproc)" \
  "$(haproxy -v | awk 'NR==1{print $3}')" "$(nginx -v 2>&1 | sed 's|.*/||')"
printf "%-8s %-8s %5s %10s %10s %8s %9s\n" kind target round "rss0 KiB" "rss1 KiB" "KiB/conn" upstreams
IFS=, read -r -a MODE_LIST <<< "$MODES"
IFS=, read -r -a TARGET_LIST <<< "$TARGETS"
for MODE in "${MODE_LIST[@]}"; do
  for r in $(seq 1 "$ROUNDS"); do
    for t in "${TARGET_LIST[@]}"; do
      ADDR_OF=127.0.0.1:0
      case "$t" in edgelb) ADDR_OF=127.0.0.1:18271 ;; haproxy) ADDR_OF=127.0.0.1:18281 ;; nginx) ADDR_OF=127.0.0.1:18291 ;; esac
      [ "$MODE" = h1 ] || ADDR_OF=127.0.0.1:$(( ${ADDR_OF##*:} + 1 ))
      start "$t"
      sleep 1
      before=$(rss_kib $PIDS)
      coproc CLIENT { python3 "$ROOT/bench/idle_clients.py" "$ADDR_OF" "$N" "$MODE" bench.local 2> "$TMP/client.err"; }
      read -r -t 300 ready <&"${CLIENT[0]}" || ready="timeout"
      sleep 2
      after=$(rss_kib $PIDS)
      ups=$(ss -tn state established dst 127.0.0.2:19000 | tail -n +2 | wc -l)
      echo >&"${CLIENT[1]}"; wait "$CLIENT_PID" 2>/dev/null || true
      got=${ready#ready }; got=${got%%/*}
      [ "$ready" = "ready $N/$N" ] || echo "# $t $MODE: $ready ($(head -c 300 "$TMP/client.err"))" >&2
      printf "%-8s %-8s %5s %10s %10s %8.1f %9s\n" "$MODE" "$t" "$r" "$before" "$after" \
        "$(awk -v a="$after" -v b="$before" -v n="${got:-0}" 'BEGIN{print (n > 0 ? (a - b) / n : -1)}')" "$ups"
      stop
    done
  done
done
echo "# KiB/conn = growth of the balancer's resident set over the connections held open and idle"
echo "# (after one request each); upstreams = connections open to the backend at that moment."
