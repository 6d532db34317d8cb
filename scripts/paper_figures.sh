#!/usr/bin/env bash
# Reproduce the experiments of docs/experiments/*.md and redraw their figures.
#
#   scripts/paper_figures.sh              train what is missing, then draw
#   scripts/paper_figures.sh --plot-only  only redraw, from the stored runs
#
# Runs go to $RUNS (default runs/paper), figures to $FIGURES (default
# docs/figures/paper), tables to $RUNS/tables. Sweeps skip runs whose
# summary.json already holds the same configuration, so an interrupted script
# continues where it stopped. The settings are scaled to a 2-core machine; see
# docs/experiments/*.md for where they depart from the paper. SEEDS (default 5)
# sets the seeds of every sweep and of the representation runs.
set -euo pipefail

RUNS=${RUNS:-runs/paper}
FIGURES=${FIGURES:-docs/figures/paper}
SEEDS=${SEEDS:-5}
PLOT_ONLY=0
if [[ "${1:-}" == "--plot-only" ]]; then
  PLOT_ONLY=1
elif [[ $# -gt 0 ]]; then
  echo "usage: $0 [--plot-only]" >&2
  exit 2
fi

# Runs with identical configurations are shared between experiments instead of
# trained twice: the intact line runs of the lesion sweep are also T = 1 of the
# truncation sweep, width 400 of the granule sweep and the dense fan-in.
link_intact() {  # link_intact SWEEP_DIR VALUE_DIR MODEL SEEDS [LESION_SWEEP]
  local target seed
  for seed in $(seq 0 $(($4 - 1))); do
    target="$(cd "$RUNS" && pwd)/${5:-lesions-line}/lesion-intact/$3/seed$seed"
    mkdir -p "$RUNS/$1/$2/$3"
    ln -sfn "$target" "$RUNS/$1/$2/$3/seed$seed"
  done
}

if [[ $PLOT_ONLY == 0 ]]; then
  COMMON=(--no-progress --eval-every 2)

  # Captions: ccRNN against cRNN at T = 5, 5 seeds.
  if [[ ! -f "$RUNS/captions/crnn/seed4/summary.json" ]]; then
    ccdni compare --task captions --models ccrnn,crnn --seeds 5 --hidden 128 \
      --granule-width 512 --n-train 2500 --epochs 8 --no-progress --eval-every 2 \
      --out "$RUNS/captions"
  fi

  # Lesions at epoch 40 of 100 on line (also ataxia and trajectories).
  ccdni sweep --task line --lesions intact,cerebellum@40,olive@40 \
    --models ccrnn,crnn --seeds "$SEEDS" --epochs 100 "${COMMON[@]}" --out "$RUNS/lesions-line"

  # Truncation sweep on line (T = 1 shared with the lesion sweep).
  link_intact truncation-line truncation-1 ccrnn "$SEEDS"
  link_intact truncation-line truncation-1 crnn "$SEEDS"
  ccdni sweep --task line --truncations 1,2,3,5,7,full --models ccrnn,crnn --seeds "$SEEDS" \
    --epochs 100 "${COMMON[@]}" --out "$RUNS/truncation-line"

  # Lesions on digit drawing (digit-lines) at T = 2, 500 images.
  ccdni sweep --task digit-lines --truncation 2 --n-train 500 \
    --lesions intact,cerebellum@12,olive@12 --models ccrnn,crnn --seeds "$SEEDS" \
    --epochs 30 "${COMMON[@]}" --out "$RUNS/lesions-digit-lines"

  # Truncation sweep on digit drawing, the lesion sweep's settings (T = 2 shared).
  link_intact truncation-digit-lines truncation-2 ccrnn "$SEEDS" lesions-digit-lines
  link_intact truncation-digit-lines truncation-2 crnn "$SEEDS" lesions-digit-lines
  ccdni sweep --task digit-lines --n-train 500 --truncations 1,2,4,7,full \
    --models ccrnn,crnn --seeds "$SEEDS" --epochs 30 "${COMMON[@]}" \
    --out "$RUNS/truncation-digit-lines"

  # Representations over learning (seeds already recorded are kept).
  python -m orchestrator.representations --task line --seeds "$SEEDS" --epochs 100 \
    --eval-every 5 --no-progress --out "$RUNS/representations-line"

  # Granule layer: width and sparse mossy-fibre input.
  link_intact granule-width-line granule_width-400 ccrnn "$SEEDS"
  ccdni sweep --task line --granule-widths 25,100,400,1600 --models ccrnn \
    --seeds "$SEEDS" --epochs 100 "${COMMON[@]}" --out "$RUNS/granule-width-line"
  link_intact fan-in-line inputs_per_granule-all ccrnn "$SEEDS"
  ccdni sweep --task line --fan-ins 4,all --models ccrnn --seeds "$SEEDS" --epochs 100 \
    "${COMMON[@]}" --out "$RUNS/fan-in-line"

  # A killed cerebellum actor against the in-process lesion (Ray, one seed):
  # the 100 epochs of the line lesion runs, killed at epoch 40 (step 640).
  if [[ ! -f "$RUNS/distributed-lesion/distributed-lesion.json" ]]; then
    python -m orchestrator.lesions --task line --steps 1600 --kill-step 640 \
      --no-progress --out "$RUNS/distributed-lesion"
  fi
fi

python -m orchestrator.figures --runs "$RUNS" --figures "$FIGURES"
