#!/usr/bin/env bash
# Replaces the checked-in corpus of each target (or those named) by a
# small set: the seeds (seed-*, as written by the seeds test) plus the
# inputs of a set-cover merge (edges only) of the corpus and
# fuzz/corpus-work/<target>, smallest first, up to FUZZ_CORPUS_KB (default
# 24) KB per target. Uses the targets as fuzz/run-all.sh built them.
#
#   fuzz/minimize.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"

bin="target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"
budget=$(( ${FUZZ_CORPUS_KB:-24} * 1024 ))
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "corpus-work/$t"
  rm -rf "corpus-min/$t"
  mkdir -p "corpus-min/$t"
  nice -n 19 "$bin/$t" -set_cover_merge=1 -use_counters=0 "corpus-min/$t" "corpus/$t" \
    "corpus-work/$t" >"corpus-min/$t.log" 2>&1
  # The seeds stay under their names; a merged copy of one is left out.
  seeds=$(cd "corpus/$t" && for s in seed-*; do [ -e "$s" ] && sha1sum "$s" | cut -d' ' -f1; done)
  find "corpus/$t" -type f ! -name 'seed-*' -delete
  used=0
  while read -r size name; do
    grep -qx "$name" <<<"$seeds" && continue
    [ $((used + size)) -gt "$budget" ] && break
    cp "corpus-min/$t/$name" "corpus/$t/$name"
    used=$((used + size))
  done < <(cd "corpus-min/$t" && find . -type f -printf '%s %f\n' | sort -n)
  echo "$t: $(ls "corpus/$t" | wc -l) files, $(du -sb "corpus/$t" | cut -f1) bytes"
done
