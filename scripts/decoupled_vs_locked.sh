#!/usr/bin/env bash
# Does decoupled training learn as well as locked on the same chunks?
# Two chunks (ccRNN) on the sequential-digits task, both schedules, 5 seeds, the
# same number of examples; then a table of validation accuracy (mean ± sd) and
# the cerebellum's relative prediction error at the start and end of each run.
#
#   scripts/decoupled_vs_locked.sh [OUT] [STEPS] [FLAG ...]
#                           (default runs/dvl, 520 steps; FLAGs go to ccdni train,
#                           for both schedules alike, e.g. --context --time-context)
#   scripts/decoupled_vs_locked.sh OUT --table-only   (redraw from stored runs)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${VIRTUAL_ENV:-}" && -x .venv/bin/ccdni ]]; then
    PATH="$PWD/.venv/bin:$PATH"
fi
out=${1:-runs/dvl}
steps=${2:-520}
shift $(( $# < 2 ? $# : 2 ))
if [ "$steps" != "--table-only" ]; then
    for seed in 0 1 2 3 4; do
        for schedule in locked decoupled; do
            dir="$out/$schedule/seed$seed"
            [ -f "$dir/summary.json" ] && continue
            ccdni train --distributed --task patterns --model ccrnn --chunks 2 \
                --schedule "$schedule" --steps "$steps" --seed "$seed" \
                --checkpoint-every 0 --out "$dir" --no-progress "$@"
        done
    done
fi
python - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| schedule | seeds | steps | validation accuracy | steps/s | cerebellum relative error (first → last sample) |")
print("|---|---|---|---|---|---|")
for schedule in ("locked", "decoupled"):
    runs = sorted((out / schedule).glob("seed*/summary.json"))
    summaries = [json.loads(p.read_text()) for p in runs]
    acc = [s["validation_metric"] for s in summaries]
    rate = [s["steps_per_second"] for s in summaries]
    trends = []
    for p in runs:
        log = [json.loads(x) for x in (p.parent / "cerebellum.jsonl").read_text().splitlines()]
        log = [x for x in log if x["zones"]]
        if len(log) >= 2:
            for zone in sorted(log[-1]["zones"]):
                seen = [x["zones"][zone]["relative_error"] for x in log if zone in x["zones"]]
                seen = [v for v in seen if v == v]  # the first samples precede any update
                if seen:
                    trends.append(f"{zone} {seen[0]:.2f}→{seen[-1]:.2f}")
    sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
    print(f"| {schedule} | {len(acc)} | {summaries[0]['steps']} | {statistics.fmean(acc):.3f} ± {sd:.3f} | "
          f"{statistics.fmean(rate):.2f} | {'; '.join(trends[:4])} |")
PY
