# Shared by bench/idle.sh and bench/more.sh (sourced, not run): one nginx
# backend on 127.0.0.2:19000 (it answers "ok\n" on / and 1 MiB on /big), a
# self-signed ECDSA P-256 certificate for bench.local, and the three
# balancers under test with the same ports layout:
#
#   target    plain HTTP   TLS (h2, http/1.1)   TCP mode
#   edgelb    :18271       :18272               :18273   (a worker per CPU)
#   edgelb-1w :18271       :18272               :18273   (1 worker)
#   haproxy   :18281       :18282               :18283   (nbthread 1)
#   nginx     :18291       :18292               -        (1 worker)
#
# Needs haproxy, nginx, openssl, python3, curl. Loopback only.
# Callers set ROOT and BENCH_N (connections the balancers must hold);
# PARK_AFTER sets the node's park_after (else its default).

NEEDS="haproxy nginx openssl python3 curl ${NEEDS:-}"
# shellcheck source=bench/common.sh
. "$ROOT/bench/common.sh"
ulimit -n "$(ulimit -Hn)"
BENCH_N=${BENCH_N:-4096}

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=bench.local -addext subjectAltName=DNS:bench.local \
  -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
cat "$TMP/cert.pem" "$TMP/key.pem" > "$TMP/both.pem"
head -c 1048576 /dev/urandom > "$TMP/big.bin"
chmod 644 "$TMP"/*.pem "$TMP/big.bin"
NGX_TEMPS="client_body_temp_path $TMP/cb; proxy_temp_path $TMP/px; fastcgi_temp_path $TMP/fc; uwsgi_temp_path $TMP/uw; scgi_temp_path $TMP/sc;"

cat > "$TMP/be.conf" <<EOF
worker_processes 1; pid $TMP/be.pid; error_log $TMP/be.err warn;
events { worker_connections 8192; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 600s; $NGX_TEMPS
  server { listen 127.0.0.2:19000; default_type text/plain;
    location = /big { alias $TMP/big.bin; }
    location / { return 200 "ok\n"; } } }
EOF
nginx -p "$TMP" -e "$TMP/be.err" -c "$TMP/be.conf" -g 'daemon off;' & STARTED+=($!)

cat > "$TMP/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn $(( BENCH_N + 500 ))
defaults
  timeout connect 2s
  timeout client 600s
  timeout server 600s
frontend fe
  mode http
  bind 127.0.0.1:18281
  bind 127.0.0.1:18282 ssl crt $TMP/both.pem alpn h2,http/1.1
  default_backend be
backend be
  mode http
  balance leastconn
  server s1 127.0.0.2:19000
frontend fe_tcp
  mode tcp
  bind 127.0.0.1:18283
  default_backend be_tcp
backend be_tcp
  mode tcp
  balance leastconn
  server s1 127.0.0.2:19000
EOF
cat > "$TMP/nginx.conf" <<EOF
worker_processes 1; worker_rlimit_nofile $((2 * BENCH_N + 1000)); pid $TMP/ngx.pid; error_log $TMP/ngx.err warn;
events { worker_connections $((2 * BENCH_N + 500)); }
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
${PARK_AFTER:+park_after = \"$PARK_AFTER\"}
EOF
{ cat "$TMP/edgelb.toml"; echo "workers = 1"; } > "$TMP/edgelb-1w.toml"
BENCH_TOKEN=benchbenchbenchbenchbench

rss_kib() { # sum of VmRSS over the PIDs given
  local t=0 p v
  for p in "$@"; do v=$(awk '/^VmRSS:/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0); t=$((t + ${v:-0})); done
  echo $t
}

# start_target NAME: sets PIDS (the balancer's processes) and PORT_BASE
# (plain HTTP; TLS is +1, TCP mode +2).
PIDS="" PORT_BASE=""
start_target() {
  case "$1" in
    edgelb|edgelb-1w)
      rm -rf "$TMP/data"
      "$BIN" --config "$TMP/$1.toml" --data-dir "$TMP/data" --admin-addr 127.0.0.1:17370 \
        --cluster-addr 127.0.0.1:17371 --token "$BENCH_TOKEN" --log warn > "$TMP/$1.log" 2>&1 &
      PIDS=$!; PORT_BASE=18271
      local api=http://127.0.0.1:17370
      wait_http "$api/healthz"
      a() { curl -sf -H "Authorization: Bearer $BENCH_TOKEN" -H 'content-type: application/json' "$@" > /dev/null; }
      a -X POST "$api/v1/certificates" --data @<(python3 -c 'import json,sys; print(json.dumps({"name":"bench","chain":open(sys.argv[1]).read(),"private_key":open(sys.argv[2]).read()}))' "$TMP/cert.pem" "$TMP/key.pem")
      a -X POST "$api/v1/services" -d '{"name":"bench","domains":[{"name":"bench.local","certificate":{"name":"bench"}}],"services":[{"port":18271,"destination_port":19000,"handlers":["http"]},{"port":18272,"destination_port":19000,"handlers":["tls","http"]}]}'
      a -X POST "$api/v1/services/bench/instances" -d '{"address":"127.0.0.2"}'
      a -X POST "$api/v1/services" -d '{"name":"bench-tcp","services":[{"port":18273,"destination_port":19000,"handlers":[]}]}'
      a -X POST "$api/v1/services/bench-tcp/instances" -d '{"address":"127.0.0.2"}' ;;
    haproxy)
      haproxy -db -f "$TMP/haproxy.cfg" > "$TMP/haproxy.log" 2>&1 &
      PIDS=$!; PORT_BASE=18281 ;;
    nginx)
      nginx -p "$TMP" -e "$TMP/ngx.err" -c "$TMP/nginx.conf" -g 'daemon off;' &
      PIDS=$!; PORT_BASE=18291 ;;
    *) echo "bench: unknown target $1" >&2; exit 2 ;;
  esac
  STARTED+=($PIDS)
  wait_http "http://127.0.0.1:$PORT_BASE/" || {
    echo "bench: $1 does not answer" >&2; cat "$TMP/$1.log" "$TMP/ngx.err" >&2 2>/dev/null; exit 1; }
  # nginx: the master and its worker
  if [ "$1" = nginx ]; then PIDS="$PIDS $(ps -o pid= --ppid "$PIDS" | tr -d ' ' | tr '\n' ' ')"; fi
  return 0
}
stop_target() {
  local p
  for p in $PIDS; do kill -TERM "$p" 2>/dev/null || true; done
  for p in $PIDS; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
}
