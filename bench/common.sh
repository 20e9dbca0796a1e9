# Shared by the bench scripts (sourced, not run). Callers set ROOT (the
# checkout) and NEEDS (the commands they call). Checks NEEDS; picks the
# node's binary as BIN (EDGELB_BIN, else a release build of the checkout);
# makes TMP, removed on exit; and on exit stops the processes whose PIDs
# are in STARTED. Helpers: wait_http, cpu_ticks.

for b in $NEEDS; do
  command -v "$b" >/dev/null || { echo "bench: missing $b" >&2; exit 2; }
done
if [ -n "${EDGELB_BIN:-}" ]; then BIN=$EDGELB_BIN; else
  cargo build --release --bin edgelb --manifest-path "$ROOT/Cargo.toml" >&2
  BIN=$ROOT/target/release/edgelb
fi
TMP=$(mktemp -d /tmp/edgelb-bench.XXXXXX); chmod 755 "$TMP"
STARTED=()
cleanup() {
  for p in "${STARTED[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

# wait_http URL: until it answers (any status; TLS unchecked), at most 10 s.
wait_http() { for _ in $(seq 1 100); do curl -sk -o /dev/null -m 1 "$1" && return 0; sleep 0.1; done; return 1; }
cpu_ticks() { # utime + stime over the PIDs given (threads included)
  local t=0 p v
  for p in "$@"; do v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12+$13}') && t=$((t + ${v:-0})); done
  echo $t
}
