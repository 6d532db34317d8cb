#!/usr/bin/env bash
# Rerun every comparison in docs/EXPERIMENTS.md, then copy its figures into
# docs/figures/experiments/.
#
#   scripts/experiments.sh             train everything from scratch (about 40 min
#                                      on an idle 2-core machine), then draw
#   scripts/experiments.sh --plot-only redraw tables and figures from stored runs
#   scripts/experiments.sh --plot-only line digits
#                                      the same for some comparisons only (line,
#                                      digit-lines, digit-lines-t3, digits, patterns,
#                                      and the ccRNN with --time-context:
#                                      digit-lines-t3-time, digits-time,
#                                      patterns-time, patterns-label-time)
#
# Runs go to $RUNS (default runs/experiments), one `ccdni compare` folder per
# task. Every setting not named here is the task's default in TASK_DEFAULTS
# (orchestrator/config.py); the table in EXPERIMENTS.md lists them.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z ${VIRTUAL_ENV:-} && -f .venv/bin/activate ]]; then
    . .venv/bin/activate # the project's environment, where `ccdni` is installed
fi
RUNS=${RUNS:-runs/experiments}
FIGURES=docs/figures/experiments
SEEDS=${SEEDS:-5}

plot_only=()
if [[ ${1:-} == --plot-only ]]; then
    plot_only=(--plot-only)
    shift
fi
tasks=("$@")
if [[ ${#tasks[@]} -eq 0 ]]; then
    tasks=(line digit-lines digit-lines-t3 digits patterns
        digit-lines-t3-time digits-time patterns-time patterns-label-time)
fi

# One comparison per name: a task at its defaults, or digit-lines-t3, the
# digit-lines task at truncation 3 (BPTT does not depend on the truncation: its
# runs are those of digit-lines).
compare() {
    local name=$1
    local flags=(--task "$name" --models ccrnn,crnn,bptt)
    case $name in
    digit-lines-t3) flags=(--task digit-lines --truncation 3 --models ccrnn,crnn) ;;
    # The ccRNN alone with the time step (and the label) given to its
    # microzones; its cRNN is that of the comparison without the suffix.
    digit-lines-t3-time)
        flags=(--task digit-lines --truncation 3 --models ccrnn --time-context) ;;
    digits-time) flags=(--task digits --models ccrnn --time-context) ;;
    patterns-time) flags=(--task patterns --models ccrnn --time-context) ;;
    patterns-label-time)
        flags=(--task patterns --models ccrnn --context --time-context) ;;
    esac
    ccdni compare "${flags[@]}" --seeds "$SEEDS" --no-progress \
        --out "$RUNS/$name" "${plot_only[@]}"
}

figures() {
    local task=$1 model
    mkdir -p "$FIGURES"
    cp "$RUNS/$task/comparison.png" "$FIGURES/$task-comparison.png"
    if [[ $task == patterns* || $task == digit-lines-t3 || $task == *-time ]]; then
        return # patterns draws nothing; the others are side comparisons
    fi
    for model in ccrnn crnn; do
        ccdni report "$RUNS/$task/$model/seed0" >/dev/null
        cp "$RUNS/$task/$model/seed0/trajectories.png" \
            "$FIGURES/$task-trajectories-$model.png"
    done
}

# Per-seed differences ccRNN - cRNN (same seed: same data split and cortical
# initialisation), final epoch, for the text of EXPERIMENTS.md.
paired() {
    local base=${1%-label-time}
    base=${base%-time}
    python - "$RUNS/$1/comparison.json" "$RUNS/$base/comparison.json" <<'EOF_PY'
import json, statistics, sys

record = json.load(open(sys.argv[1]))
crnn = json.load(open(sys.argv[2]))["crnn"]
for key in ("validation_loss", "validation_metric", "dysmetria", "tremor"):
    if key not in record["ccrnn"]:
        continue
    diffs = [a - b for a, b in zip(record["ccrnn"][key], crnn[key])]
    text = " ".join(f"{d:+.3g}" for d in diffs)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    print(f"ccrnn - crnn {key}: {text} (mean {mean:+.3g} ± {sd:.2g})")
EOF_PY
}

# Seconds per epoch of ccRNN and cRNN at the line task's defaults, measured in
# alternating rounds so that both see the same load, as wall time and as this
# process's CPU time (which other jobs on a shared machine barely change).
timing() {
    python - <<'EOF_PY'
import statistics, time

from orchestrator.config import for_task
from orchestrator.tasks.registry import load_task
from orchestrator.trainer import Trainer

task = load_task("line", seed=0)
trainers = {m: Trainer(for_task("line", model=m), task) for m in ("ccrnn", "crnn")}
wall = {m: [] for m in trainers}
cpu = {m: [] for m in trainers}
for _ in range(5):
    for model, trainer in trainers.items():
        for _ in range(10):
            w, c = time.perf_counter(), time.process_time()
            trainer.train_epoch()
            wall[model].append(time.perf_counter() - w)
            cpu[model].append(time.process_time() - c)
for name, values in (("wall", wall), ("cpu", cpu)):
    cc, c = statistics.median(values["ccrnn"]), statistics.median(values["crnn"])
    print(f"line s/epoch ({name}, median of 50): ccrnn {cc:.3f}, crnn {c:.3f}, "
          f"ratio {cc / c:.2f}")
EOF_PY
}

if [[ ${#plot_only[@]} -eq 0 && " ${tasks[*]} " == *" line "* ]]; then
    timing
fi

for task in "${tasks[@]}"; do
    compare "$task"
    figures "$task"
    paired "$task"
done
