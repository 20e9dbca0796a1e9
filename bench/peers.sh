#!/usr/bin/env bash
# Runs the shared side-by-side benchmark (../shared/bench/peers.sh: HAProxy and
# NGINX on loopback) with an edgelb node as an extra target, in the same
# interleaved rounds. Arguments are passed to peers.sh (e.g. -d 5 -r 3 -c 64).
#
#   bench/peers.sh                 # HTTP keep-alive + close, all peers
#   bench/peers.sh -d 3 -r 2       # shorter
#   bench/peers.sh --access-log    # and a third node, the access log on
#
# Two nodes run from temp data dirs: one with the default data-plane threads
# (one per CPU; admin API 127.0.0.1:17070, HTTP mode on :18200, TCP mode on
# :18210) and one with `workers = 1` (admin :17080, :18201 and :18211), the
# match for HAProxy's nbthread 1. Both balance over the four peers.sh
# backends 127.0.0.2-5:19000. With --access-log, a third node like the
# second (admin :17090, :18202 and :18212) writes an access log line (JSON)
# per request to a file in the temp dir: edgelb-http-1w-log against
# edgelb-http-1w is the log's cost, measured in the same rounds.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-$ROOT/../shared/bench/peers.sh}
[ -x "$PEERS" ] || [ -f "$PEERS" ] || { echo "missing $PEERS" >&2; exit 2; }
LOG_NODE=0 ARGS=()
for a in "$@"; do
  if [ "$a" = --access-log ]; then LOG_NODE=1; else ARGS+=("$a"); fi
done
command -v haproxy >/dev/null && command -v wrk >/dev/null || bash "$(dirname "$PEERS")/install-peers.sh"

cargo build --release --bin edgelb --manifest-path "$ROOT/Cargo.toml"
TMP=$(mktemp -d /tmp/edgelb-bench.XXXXXX)
TOKEN=benchbenchbenchbenchbench
PIDS=()
trap 'kill -TERM "${PIDS[@]}" 2>/dev/null; wait "${PIDS[@]}" 2>/dev/null; rm -rf "$TMP"' EXIT
api() { curl -sf -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' "$@" >/dev/null; }
start() { # name admin-port http-port tcp-port [workers [config line]]
  local api=http://127.0.0.1:$2
  [ -z "${5:-}" ] || printf 'workers = %s\n%s\n' "$5" "${6:-}" > "$TMP/$1.toml"
  "$ROOT/target/release/edgelb" ${5:+--config "$TMP/$1.toml"} --data-dir "$TMP/$1" --admin-addr 127.0.0.1:$2 \
    --cluster-addr 127.0.0.1:$(($2 + 1)) --token "$TOKEN" --log warn > "$TMP/$1.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do curl -sf -o /dev/null "$api/healthz" && break; sleep 0.1; done
  api -X POST "$api/v1/services" -d "{\"name\":\"bench-http\",\"services\":[{\"port\":$3,\"destination_port\":19000,\"handlers\":[\"http\"]}]}"
  api -X POST "$api/v1/services" -d "{\"name\":\"bench-tcp\",\"services\":[{\"port\":$4,\"destination_port\":19000,\"handlers\":[]}]}"
  for g in bench-http bench-tcp; do
    for i in 2 3 4 5; do api -X POST "$api/v1/services/$g/instances" -d "{\"address\":\"127.0.0.$i\"}"; done
  done
  for _ in $(seq 1 50); do curl -s -o /dev/null "http://127.0.0.1:$3/" && break; sleep 0.1; done
}
start node 17070 18200 18210
start node-1w 17080 18201 18211 1
TARGETS=("edgelb-http=127.0.0.1:18200@${PIDS[0]}" "edgelb-tcp=127.0.0.1:18210@${PIDS[0]}"
  "edgelb-http-1w=127.0.0.1:18201@${PIDS[1]}" "edgelb-tcp-1w=127.0.0.1:18211@${PIDS[1]}")
if [ "$LOG_NODE" = 1 ]; then
  start node-1w-log 17090 18202 18212 1 "access_log = \"$TMP/access.log\""
  TARGETS+=("edgelb-http-1w-log=127.0.0.1:18202@${PIDS[2]}")
fi
bash "$PEERS" "${ARGS[@]}" "${TARGETS[@]}"
