"""``ccdni demo``: the README's main job.

A distributed, decoupled run of two cortical chunks and a cerebellum on the local
Ray cluster (started by itself), on the sequential-digits task, followed by a
shorter ``locked`` run of the same chunks on the same cluster, so the run ends
with the measured speed-up that decoupling bought.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from orchestrator.cluster import DistributedConfig, train_distributed
from orchestrator.config import OUTPUT_CONTEXT, for_task
from orchestrator.tasks.registry import load_task

logger = logging.getLogger(__name__)


def add_demo_parser(commands) -> None:
    demo = commands.add_parser(
        "demo",
        help="the README's main job: a decoupled run, then its speed-up over locked",
    )
    demo.add_argument("--out", default="runs/demo", help="where the runs go")
    demo.add_argument(
        "--steps", type=int, default=300, help="decoupled training steps (default 300)"
    )
    demo.add_argument(
        "--locked-steps",
        type=int,
        default=80,
        help="steps of the locked run that measures the baseline speed (default 80)",
    )
    demo.add_argument("--ray-address", help="join this Ray cluster instead")
    demo.add_argument("--no-progress", action="store_true")


def run_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    # The benchmark's default network: 2 chunks of one LSTM layer of 256 units,
    # digits read row by row, windows of 7 steps, batch 64; its cerebellum: an
    # output microzone of 128 granule cells given the label and the time step.
    config = for_task(
        "patterns",
        model="crnn",
        chunks=2,
        hidden_size=256,
        batch_size=64,
        truncation=7,
        granule_width=128,
        # Evaluated once, at the end: stopping the actors to evaluate each epoch
        # would drain decoupled's pipeline there and mix that into its speed.
        eval_every=10**6,
        **OUTPUT_CONTEXT,
    )
    task = load_task(config.task, seed=config.seed)
    summaries = {}
    for schedule, steps in (("decoupled", args.steps), ("locked", args.locked_steps)):
        dist = DistributedConfig(
            schedule=schedule,
            steps=steps,
            ray_address=args.ray_address,
            checkpoint_every=100,
        )
        summaries[schedule] = train_distributed(
            config, dist, task, out / schedule, progress=not args.no_progress
        )

    decoupled, locked = summaries["decoupled"], summaries["locked"]
    speedup = decoupled["steps_per_second"] / locked["steps_per_second"]
    result = {
        "decoupled_steps_per_second": decoupled["steps_per_second"],
        "locked_steps_per_second": locked["steps_per_second"],
        "speedup": speedup,
        "decoupled_validation_accuracy": decoupled["validation_metric"],
        "decoupled_steps": decoupled["steps"],
    }
    (out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(
        "\n| schedule | steps/s | steps | validation accuracy |\n|---|---|---|---|\n"
        f"| decoupled | {decoupled['steps_per_second']:.2f} | {decoupled['steps']} | "
        f"{decoupled['validation_metric']:.3f} |\n"
        f"| locked | {locked['steps_per_second']:.2f} | {locked['steps']} | "
        f"{locked['validation_metric']:.3f} |\n\n"
        f"decoupled ran {speedup:.2f}x the steps per second of locked on the same "
        f"2 chunks (the limit is 2x). Runs, timelines and checkpoints: {out}/\n"
        f"Timeline plots: ccdni report {out}/decoupled ; ccdni report {out}/locked\n"
    )
    return 0
