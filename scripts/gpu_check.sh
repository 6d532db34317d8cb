#!/usr/bin/env bash
# The bench's schedules on this machine's GPUs: one GPU per actor through Ray (and
# one per PyTorch stage, NCCL), a short table at the end. Sized to finish within
# 8 minutes; nothing is written outside OUT (default runs/gpu-check).
#
#   scripts/gpu_check.sh [OUT]
#
# With 2 chunks the decoupled contender needs 3 GPUs (2 chunks and the cerebellum).
# With fewer, every contender runs on the CPUs instead, and the script says so.
# Set-up: the repository's .venv when there is one; otherwise a new .venv that
# sees the system's packages (a GPU machine's CUDA build of torch) and
# `pip install -e .` into it.
set -euo pipefail

started=$(date +%s)
cd "$(dirname "$0")/.."
out=${1:-runs/gpu-check}
phase() { printf '\n== %s (at %d s)\n' "$1" $(( $(date +%s) - started )); }

phase "GPUs"
gpus=0
if command -v nvidia-smi > /dev/null; then
    nvidia-smi
    gpus=$(nvidia-smi -L | grep -c '^GPU' || true)
else
    echo "nvidia-smi not found: no NVIDIA GPU here"
fi
echo "GPUs: ${gpus}; CPUs: $(nproc); load average: $(cut -d' ' -f1-3 /proc/loadavg)"

phase "environment"
if [[ ! -x .venv/bin/ccdni ]]; then
    python3 -m venv --system-site-packages .venv
    .venv/bin/pip install --quiet -e .
fi
.venv/bin/python - << 'EOF'
import platform

import ray
import torch

print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"CUDA build {torch.version.cuda}, CUDA available {torch.cuda.is_available()}, "
      f"devices {torch.cuda.device_count()}, Ray {ray.__version__}")
for index in range(torch.cuda.device_count()):
    print(f"  cuda:{index} {torch.cuda.get_device_name(index)}")
EOF

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
devices=--gpus
if (( gpus < 3 )); then
    devices=--no-gpus
    echo "fewer than 3 GPUs: every contender runs on the CPUs"
fi

phase "bench (${devices#--})"
# SIGINT lets the bench shut its actors down; KILL 30 s later if it does not.
timeout --signal=INT --kill-after=30 420 .venv/bin/ccdni bench "$devices" \
    --steps 30 --repeats 2 --warmup 3 --eval-every 10 --out "$out"

phase "what the numbers say"
sed -n '/^### What the numbers say/,/^### Figures/p' "$out/bench.md" | sed '$d'
phase "done: ${out}/bench.json"
