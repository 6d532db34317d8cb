#!/usr/bin/env bash
# Regenerate every number and figure of docs/BENCHMARKS.md on this machine.
#
#   scripts/bench.sh                 # headline configuration, the 1-4 chunk sweep,
#                                    # the profile (Predict and send alone), and
#                                    # locked/decoupled with 512 granule cells
#   scripts/bench.sh --repeats 5     # extra flags go to `ccdni bench`
#
# It writes docs/figures/bench/{bench.json,bench.md,*.png} and rewrites the part of
# docs/BENCHMARKS.md between its bench markers. The numbers are wall-clock speeds:
# run it on a quiet machine (it warns when the load average says otherwise).
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -x .venv/bin/ccdni ]]; then
    ccdni=.venv/bin/ccdni
else
    ccdni=ccdni
fi
out=docs/figures/bench
doc=docs/BENCHMARKS.md

cores=$(nproc)
read -r load _ < /proc/loadavg
echo "bench.sh: ${cores} CPUs, load average ${load} before the run"
if awk -v l="$load" -v c="$cores" 'BEGIN { exit !(l > 0.5 * c) }'; then
    echo "bench.sh: warning: the load average is above half the CPU count;" \
        "other work will slow some contenders more than others" >&2
fi

mkdir -p "$out"
rm -f "$out"/*.png
started=$(date +%s)
"$ccdni" bench \
    --sweep-chunks 1,2,3,4 \
    --profile \
    --out "$out" \
    --doc "$doc" \
    "$@"
# The same two ccdni schedules with the task's own cerebellum (four times the
# granule cells): how much of decoupled's shortfall is the cerebellum's CPU.
"$ccdni" bench \
    --schedules locked,decoupled \
    --granule-width 512 \
    --out "$out/granule-512" \
    "$@"
echo "bench.sh: done in $(( $(date +%s) - started )) s;" \
    "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
