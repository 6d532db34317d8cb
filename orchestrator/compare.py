"""``ccdni compare``: the same task under several models and seeds.

Each run goes to ``OUT/<model>/seed<S>/`` as an ordinary run directory;
``OUT/runs.json`` lists them, and the table and plot are drawn from those files
alone, so ``--plot-only`` redraws without training.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from orchestrator.config import TrainConfig

SUMMARY_COLUMNS = (
    ("validation_loss", "val. loss"),
    ("validation_metric", "metric"),
    ("dysmetria", "dysmetria"),
    ("overshoot", "overshoot"),
    ("tremor", "tremor"),
    ("seconds_per_epoch", "s/epoch"),
)


def run_comparison(
    base: TrainConfig,
    models: list[str],
    seeds: int,
    out: Path,
    progress: bool = True,
    dist=None,
) -> None:
    """Train every model for every seed; record the run directories.

    ``dist`` (a ``DistributedConfig``) runs each on Ray instead of in this process.
    """
    from orchestrator.cluster import fit_run
    from orchestrator.tasks.registry import load_task

    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in range(seeds):
        task = load_task(
            base.task, seed=seed, data_dir=base.data_dir, n_train=base.n_train
        )
        for model in models:
            config = base.replace(model=model, seed=seed)
            run_dir = out / model / f"seed{seed}"
            fit_run(config, task, run_dir, dist, progress=progress)
            runs.append(
                {"model": model, "seed": seed, "dir": str(run_dir.relative_to(out))}
            )
            (out / "runs.json").write_text(json.dumps(runs, indent=2))


def _flat_summary(summary: dict[str, Any]) -> dict[str, Any]:
    flat = dict(summary)
    flat.update(summary.get("ataxia", {}))
    return flat


def load_runs(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Summaries and curves by model, from ``OUT/runs.json``."""
    path = out / "runs.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run `ccdni compare` without --plot-only"
        )
    by_model: dict[str, list[dict[str, Any]]] = {}
    for run in json.loads(path.read_text()):
        run_dir = out / run["dir"]
        summary = _flat_summary(json.loads((run_dir / "summary.json").read_text()))
        curve = [
            json.loads(x) for x in (run_dir / "curve.jsonl").read_text().splitlines()
        ]
        by_model.setdefault(run["model"], []).append(
            {"summary": summary, "curve": curve}
        )
    return by_model


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4g} ± {std:.2g}"


def write_comparison(out: Path) -> str:
    """Write ``comparison.md``, ``comparison.json`` and ``comparison.png``."""
    by_model = load_runs(out)
    first = next(iter(by_model.values()))[0]["summary"]
    columns = [(k, name) for k, name in SUMMARY_COLUMNS if k in first]
    if first.get("metric_name") in first:
        # Drawing tasks report dysmetria as their metric: one column is enough.
        columns = [(k, name) for k, name in columns if k != "validation_metric"]
    metric_name = first.get("metric_name", "metric")
    header = [name if k != "validation_metric" else metric_name for k, name in columns]

    seeds = len(next(iter(by_model.values())))
    lines = [
        f"task `{first['task']}`, truncation {first['truncation']} "
        f"of {first['seq_len']} "
        f"steps, {seeds} seeds",
        "",
        "| model | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(columns),
    ]
    record: dict[str, Any] = {}
    for model, runs in by_model.items():
        cells = []
        record[model] = {}
        for key, _ in columns:
            values = [r["summary"][key] for r in runs]
            record[model][key] = values
            cells.append(mean_std(values))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "comparison.md").write_text(table + "\n")
    (out / "comparison.json").write_text(json.dumps(record, indent=2))
    plot_comparison(by_model, out / "comparison.png", metric_name)
    return table


def plot_comparison(by_model: dict, path: Path, metric_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from orchestrator.report import MODEL_COLOURS

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for model, runs in by_model.items():
        epochs = [r["epoch"] for r in runs[0]["curve"]]
        for ax, key in ((left, "validation_loss"), (right, "metric")):
            values = np.array([[r[key] for r in run["curve"]] for run in runs])
            mean, std = values.mean(0), values.std(0)
            colour = MODEL_COLOURS.get(model)
            ax.plot(epochs, mean, label=model, color=colour)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2, color=colour)
    left.set(xlabel="epoch", ylabel="validation loss", yscale="log")
    right.set(xlabel="epoch", ylabel=f"validation {metric_name}")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
