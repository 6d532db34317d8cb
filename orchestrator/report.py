"""Plots of stored run directories; nothing here trains.

``ccdni report DIR`` draws what ``DIR`` holds: the learning curve of a run
(``curve.jsonl``), its drawn trajectories against their targets
(``trajectories.json``), or the comparison of many runs (``runs.json``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)

MODEL_COLOURS = {"ccrnn": "tab:blue", "crnn": "tab:orange", "bptt": "tab:green"}


def read_curve(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "curve.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: is {run_dir} a ccdni run directory?"
        )
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curve(run_dir: Path) -> Path:
    """Training and validation loss (and the task metric) over epochs."""
    curve = read_curve(run_dir)
    epochs = [r["epoch"] for r in curve]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(epochs, [r["train_loss"] for r in curve], label="train")
    left.plot(epochs, [r["validation_loss"] for r in curve], label="validation")
    left.set(xlabel="epoch", ylabel="loss", yscale="log", title="learning curve")
    left.legend()
    metric_name = curve[-1].get("metric_name", "metric")
    right.plot(epochs, [r["metric"] for r in curve], color="tab:purple")
    right.set(xlabel="epoch", ylabel=metric_name, title=f"validation {metric_name}")
    fig.tight_layout()
    path = run_dir / "curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_trajectories(run_dir: Path, title: str | None = None) -> Path:
    """Drawn trajectories (solid) against their targets (dashed), one per cue."""
    trajectories = json.loads((run_dir / "trajectories.json").read_text())
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    colours = plt.get_cmap("tab10")
    for index, (label, pair) in enumerate(
        sorted(trajectories.items(), key=lambda x: int(x[0]))
    ):
        colour = colours(index % 10)
        for drawn, target in zip(pair["drawn"], pair["target"]):
            tx, ty = zip(*target)
            dx, dy = zip(*drawn)
            ax.plot(tx, ty, "--", color=colour, alpha=0.6)
            ax.plot(dx, dy, "-", color=colour, marker=".", markersize=3, label=label)
    ax.set_aspect("equal")
    ax.set(title=title or "drawn (solid) vs target (dashed)")
    ax.legend(fontsize=6, loc="upper right", ncol=2, title="cue")
    fig.tight_layout()
    path = run_dir / "trajectories.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(run_dir: Path) -> list[Path]:
    """Draw every plot that ``run_dir``'s contents allow; return the files."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a directory")
    if (run_dir / "runs.json").exists():
        from orchestrator import compare

        compare.write_comparison(run_dir)
        return sorted(run_dir.glob("comparison*"))
    written = [plot_curve(run_dir)]
    if (run_dir / "trajectories.json").exists():
        written.append(plot_trajectories(run_dir))
    if (run_dir / "timeline.json").exists():
        from orchestrator import timeline

        written.append(timeline.plot_timeline(run_dir))
    return written
