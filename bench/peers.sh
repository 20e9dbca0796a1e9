#!/usr/bin/env bash
# Runs the shared side-by-side benchmark (../shared/bench/peers.sh: HAProxy and
# NGINX on loopback) with an edgelb node as an extra target, in the same
# interleaved rounds. Arguments are passed to peers.sh (e.g. -d 5 -r 3 -c 64).
#
#   bench/peers.sh                 # HTTP keep-alive + close, all peers
#   bench/peers.sh -d 3 -r 2       # shorter
#
# The node runs from a temp data dir with its admin API on 127.0.0.1:17070,
# publishes 127.0.0.1:18200 (HTTP mode) and 127.0.0.1:18210 (TCP mode), both
# balancing over the four peers.sh backends 127.0.0.2-5:19000.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-$ROOT/../shared/bench/peers.sh}
[ -x "$PEERS" ] || [ -f "$PEERS" ] || { echo "missing $PEERS" >&2; exit 2; }
command -v haproxy >/dev/null && command -v wrk >/dev/null || bash "$(dirname "$PEERS")/install-peers.sh"

cargo build --release --bin edgelb --manifest-path "$ROOT/Cargo.toml"
TMP=$(mktemp -d /tmp/edgelb-bench.XXXXXX)
TOKEN=benchbenchbenchbenchbench
API=http://127.0.0.1:17070
"$ROOT/target/release/edgelb" --data-dir "$TMP/data" --admin-addr 127.0.0.1:17070 \
  --cluster-addr 127.0.0.1:17071 --token "$TOKEN" --log warn > "$TMP/edgelb.log" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$TMP"' EXIT
for _ in $(seq 1 100); do curl -sf -o /dev/null "$API/healthz" && break; sleep 0.1; done
api() { curl -sf -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' "$@" >/dev/null; }
api -X POST "$API/v1/services" -d '{"name":"bench-http","services":[{"port":18200,"destination_port":19000,"handlers":["http"]}]}'
api -X POST "$API/v1/services" -d '{"name":"bench-tcp","services":[{"port":18210,"destination_port":19000,"handlers":[]}]}'
for g in bench-http bench-tcp; do
  for i in 2 3 4 5; do api -X POST "$API/v1/services/$g/instances" -d "{\"address\":\"127.0.0.$i\"}"; done
done
for _ in $(seq 1 50); do curl -s -o /dev/null "http://127.0.0.1:18200/" && break; sleep 0.1; done
bash "$PEERS" "$@" "edgelb-http=127.0.0.1:18200@$PID" "edgelb-tcp=127.0.0.1:18210@$PID"
