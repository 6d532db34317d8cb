"""A cerebellar lesion in a distributed run: stop the cerebellum actor mid-run.

In a distributed run the chunks ask a cerebellum actor for predicted feedback
over gRPC; when it is gone they run in degraded mode, with no predictions, which
is what ``--lesion cerebellum@E`` does in one process. This module runs both and
compares them step by step:

1. a distributed run (``--schedule locked``; one chunk by default) whose
   cerebellum actor is killed, without restart, between steps ``--kill-step``
   - 1 and ``--kill-step``; its cerebellum learns ``on_update`` (once per
   batch, as in one process), so that before the kill the run is the
   in-process trainer's, step for step;
2. the in-process trainer, lesioned (no predictor) from the step where the
   distributed chunk's first degraded window fell (read back from the chunk's
   count of degraded steps, not assumed);
3. the in-process trainer, intact, for reference.
``python -m orchestrator.lesions --task line --n-train 200 --steps 80
--kill-step 40 --out DIR`` writes ``DIR/distributed-lesion.json`` (the three loss
series and where they differ) and ``--plot-only`` redraws
``DIR/distributed-lesion.png`` from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.config import TrainConfig

logger = logging.getLogger(__name__)


def in_process_losses(
    config: TrainConfig, task, steps: int, lesion_step: int | None
) -> list[float]:
    """Per-step training losses of the in-process trainer, lesioned at a step.

    The loop is :meth:`Trainer.train_epoch`'s, one batch at a time, with the
    predictor removed before batch ``lesion_step`` (what ``cerebellum@E`` does at
    the start of epoch ``E``, here at any step).
    """
    from orchestrator.trainer import Trainer

    trainer = Trainer(config, task)
    for chunk in trainer.chunks:
        chunk.train()
    losses = []
    for step in range(steps):
        if lesion_step is not None and step == lesion_step:
            trainer.predictor = None
        losses.append(trainer.run_batch(trainer.batches.sequences(step)).loss)
        trainer.steps += 1
    return losses


def distributed_killed(
    config: TrainConfig, task, steps: int, kill_step: int, out: Path
) -> dict[str, Any]:
    """A locked distributed run whose cerebellum actor is killed at ``kill_step``.

    The cerebellum learns ``on_update`` (once per batch, when the chunk's
    optimiser steps, as in one process) and the kill falls between two runs of
    the actors, after step ``kill_step - 1`` and before step ``kill_step``, so the
    distributed run can be compared with the in-process one step for step.
    """
    import ray

    from orchestrator.cluster import Cluster, DistributedConfig

    dist = DistributedConfig(
        schedule="locked",
        steps=steps,
        checkpoint_every=0,
        cerebellum_learning="on_update",
        # The in-process cerebellum it is compared with computes in float32.
        cerebellum_precision="float32",
    )
    cluster = Cluster(config, dist, task, out)
    cluster.start()
    try:
        cluster.save_checkpoint(0)
        cluster.run(0, kill_step)
        before = ray.get(cluster.chunks[0].progress.remote())["degraded_windows"]
        ray.kill(cluster.cerebellum, no_restart=True)
        # ray.kill only asks: the next step must not get a prediction any more.
        _wait_until_dead(cluster.cerebellum, cluster.cerebellum_address)
        logger.info("killed the cerebellum actor after step %d", kill_step - 1)
        cluster.run(kill_step, steps)
        progress = ray.get(cluster.chunks[0].progress.remote())
        losses = [cluster.record.losses[s] for s in sorted(cluster.record.losses)]
    finally:
        cluster.shutdown()
    return {
        "losses": losses,
        "killed_at_step": kill_step,
        "degraded_windows_before_kill": before,
        "degraded_windows": progress["degraded_windows"],
        "degraded_steps": progress["degraded_steps"],
        "first_degraded_step": steps - progress["degraded_steps"],
    }


def _wait_until_dead(actor, address: str, timeout: float = 60.0) -> None:
    """Return once ``actor`` is dead to Ray and nothing listens on its gRPC
    ``address`` any more: Ray marks a killed actor dead before its process has
    exited, and until then the process still answers Predict."""
    import socket

    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    deadline = time.monotonic() + timeout
    host, port = address.rsplit(":", 1)
    while time.monotonic() < deadline:
        try:
            ray.get(actor.pid.remote(), timeout=1.0)
        except RayActorError:
            try:
                socket.create_connection((host, int(port)), timeout=1.0).close()
            except OSError:
                return  # refused: the server's process is gone
        except GetTimeoutError:
            continue
        time.sleep(0.05)  # still answering: ask again shortly
    raise TimeoutError(f"the killed actor still answered after {timeout:.0f} s")


def compare_lesions(config: TrainConfig, steps: int, kill_step: int, out: Path) -> dict:
    """Run the three and write ``out/distributed-lesion.json``."""
    from orchestrator.tasks.registry import load_task

    out.mkdir(parents=True, exist_ok=True)
    task = load_task(
        config.task, seed=config.seed, data_dir=config.data_dir, n_train=config.n_train
    )
    distributed = distributed_killed(
        config, task, steps, kill_step, out / "distributed"
    )
    lesion_step = distributed["first_degraded_step"]
    lesioned = in_process_losses(config, task, steps, lesion_step)
    intact = in_process_losses(config, task, steps, None)
    record = {
        "config": config.to_dict(),
        "steps": steps,
        "kill_step": kill_step,
        "batches_per_epoch": -(-len(task.train) // config.batch_size),
        "distributed": distributed.pop("losses"),
        **distributed,
        "in_process_lesioned": lesioned,
        "in_process_intact": intact,
    }
    record["differences"] = differences(record)
    (out / "distributed-lesion.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def differences(record: dict[str, Any]) -> dict[str, float | None]:
    """Largest per-step |loss difference| before and after the lesion step."""
    cut = record["first_degraded_step"]
    dist = record["distributed"]

    def largest(other: list[float], lo: int, hi: int) -> float | None:
        pairs = list(zip(dist[lo:hi], other[lo:hi]))
        return max((abs(a - b) for a, b in pairs), default=None)

    n = len(dist)
    return {
        "before_vs_lesioned": largest(record["in_process_lesioned"], 0, cut),
        "before_vs_intact": largest(record["in_process_intact"], 0, cut),
        "after_vs_lesioned": largest(record["in_process_lesioned"], cut, n),
        "after_vs_intact": largest(record["in_process_intact"], cut, n),
    }


def plot_distributed_lesion(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads((out / "distributed-lesion.json").read_text())
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.3))
    steps = range(len(record["distributed"]))
    left.plot(
        steps, record["in_process_intact"], color="tab:blue", label="in-process, intact"
    )
    left.plot(
        steps,
        record["in_process_lesioned"],
        color="tab:red",
        label="in-process, lesioned",
    )
    left.plot(
        steps,
        record["distributed"],
        "k:",
        marker=".",
        markersize=3,
        label="distributed, cerebellum killed",
    )
    for ax in (left, right):
        ax.axvline(record["first_degraded_step"], color="grey", lw=0.8, ls="--")
    left.set(xlabel="step (batch)", ylabel="training loss", yscale="log")
    left.legend(fontsize=7)
    gap_lesioned = [
        abs(a - b) for a, b in zip(record["distributed"], record["in_process_lesioned"])
    ]
    gap_intact = [
        abs(a - b) for a, b in zip(record["distributed"], record["in_process_intact"])
    ]
    right.plot(
        steps,
        [max(g, 1e-9) for g in gap_lesioned],
        color="tab:red",
        label="|distributed − in-process lesioned|",
    )
    right.plot(
        steps,
        [max(g, 1e-9) for g in gap_intact],
        color="tab:blue",
        label="|distributed − in-process intact|",
    )
    right.set(xlabel="step (batch)", ylabel="loss difference", yscale="log")
    right.legend(fontsize=7)
    fig.tight_layout()
    path = out / "distributed-lesion.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orchestrator.lesions``: see the module docstring."""
    from orchestrator.cli import add_training_options, config_from_args

    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.lesions",
        description="A killed cerebellum actor against the in-process lesion.",
    )
    add_training_options(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=80, help="batches to train")
    parser.add_argument("--kill-step", type=int, default=40)
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    if not args.plot_only:
        if not 0 < args.kill_step < args.steps:
            parser.error(f"--kill-step must lie in 1..{args.steps - 1}")
        config = config_from_args(args, model="ccrnn", seed=args.seed)
        compare_lesions(config, args.steps, args.kill_step, out)
    plot_distributed_lesion(out)
    record = json.loads((out / "distributed-lesion.json").read_text())
    summary = {k: record[k] for k in ("killed_at_step", "first_degraded_step")}
    summary.update(record["differences"])
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
