"""``ccdni sweep``: one task under models and seeds, along one axis of the config.

The axes are the truncation ``T`` (``--truncations 1,2,5,full``), the granule-layer
width (``--granule-widths``), the mossy-fibre fan-in (``--fan-ins 4,16,all``) and
lesions (``--lesions intact,cerebellum@40,olive@40``). Each run is an ordinary run
directory, ``OUT/<axis>-<value>/<model>/seed<S>/``; ``OUT/sweep.json`` lists them,
and the table (``sweep.md``, ``sweep.json``) and the figure (``sweep.png``: one panel
per value, and final loss against the value) are drawn from those files alone, so
``--plot-only`` redraws without training. A run whose ``summary.json`` already holds
the same configuration is not trained again, so an interrupted sweep continues.

A lesion needs a cerebellum, so models without one (``crnn``, ``bptt``) run only
at ``intact``, as the reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import MODELS, ConfigError, Lesion, TrainConfig

logger = logging.getLogger(__name__)

INTACT = "intact"


@dataclass(frozen=True)
class Axis:
    """One thing a sweep varies: its flag, how a value is read, what it sets."""

    name: str
    flag: str
    parse: Callable[[str], Any]
    apply: Callable[[TrainConfig, Any], dict[str, Any]]
    label: str


def _steps_or_full(text: str) -> int | str:
    if text == "full":
        return text
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _int_or_all(text: str) -> int | str:
    if text == "all":
        return text
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _lesion(text: str) -> str:
    if text != INTACT:
        Lesion.parse(text)
    return text


AXES: dict[str, Axis] = {
    axis.name: axis
    for axis in (
        Axis(
            "truncation",
            "--truncations",
            _steps_or_full,
            lambda c, v: {"truncation": None if v == "full" else v},
            "T",
        ),
        Axis(
            "granule_width",
            "--granule-widths",
            _positive,
            lambda c, v: {"granule_width": v},
            "granule cells",
        ),
        Axis(
            "inputs_per_granule",
            "--fan-ins",
            _int_or_all,
            lambda c, v: {"inputs_per_granule": None if v == "all" else v},
            "inputs per granule cell",
        ),
        Axis(
            "lesion",
            "--lesions",
            _lesion,
            lambda c, v: {"lesions": () if v == INTACT else (Lesion.parse(v),)},
            "lesion",
        ),
    )
}


def parse_values(axis: Axis, text: str) -> list[Any]:
    """``"1,2,full"`` to ``[1, 2, "full"]``, naming the flag on a bad value."""
    values = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            values.append(axis.parse(item))
        except ValueError as error:
            raise ConfigError(f"{axis.flag} {text!r}: bad value {item!r}") from error
    if not values:
        raise ConfigError(f"{axis.flag} {text!r}: give at least one value")
    return values


def value_dir(axis: Axis, value: Any) -> str:
    return f"{axis.name}-{str(value).replace('@', '_at_')}"


def applies(axis: Axis, value: Any, model: str) -> bool:
    """Whether ``model`` runs at ``value`` (lesions need a cerebellum)."""
    return not (axis.name == "lesion" and value != INTACT and model != "ccrnn")


# Running ------------------------------------------------------------------------------


def run_sweep(
    base: TrainConfig,
    axis: Axis,
    values: list[Any],
    models: list[str],
    seeds: int,
    out: Path,
    progress: bool = True,
    dist=None,
) -> list[dict[str, Any]]:
    """Train every (value, model, seed) not already done; write ``sweep.json``.

    ``dist`` (a ``DistributedConfig``) runs each on Ray instead of in this process.
    """
    from orchestrator.cluster import fit_run
    from orchestrator.tasks.registry import load_task

    out.mkdir(parents=True, exist_ok=True)
    plan = [
        (value, model, seed)
        for seed in range(seeds)
        for value in values
        for model in models
        if applies(axis, value, model)
    ]
    runs: list[dict[str, Any]] = []
    tasks: dict[int, Any] = {}
    for number, (value, model, seed) in enumerate(plan, 1):
        config = base.replace(model=model, seed=seed, **axis.apply(base, value))
        run_dir = out / value_dir(axis, value) / model / f"seed{seed}"
        record = {
            "value": value,
            "model": model,
            "seed": seed,
            "dir": str(run_dir.relative_to(out)),
        }
        if not finished_run(run_dir, config, dist):
            if seed not in tasks:
                tasks = {
                    seed: load_task(
                        base.task,
                        seed=seed,
                        data_dir=base.data_dir,
                        n_train=base.n_train,
                    )
                }
            logger.info(
                "run %d/%d: %s=%s %s seed %d",
                number,
                len(plan),
                axis.name,
                value,
                model,
                seed,
            )
            fit_run(config, tasks[seed], run_dir, dist, progress=progress)
        runs.append(record)
        _write_index(out, axis, values, models, seeds, runs)
    return runs


def finished_run(run_dir: Path, config: TrainConfig, dist=None) -> bool:
    """Whether ``run_dir`` already holds a finished run of ``config``, in this
    process or (with ``dist``) on Ray with the same schedule, steps and
    cerebellum learning.

    A setting the stored run does not record (one added to TrainConfig since)
    counts as equal when ``config`` leaves it at its default.
    """
    path = run_dir / "summary.json"
    if not path.exists():
        return False
    summary = json.loads(path.read_text())
    if summary.get("schedule", "in-process") != (
        "in-process" if dist is None else dist.schedule
    ):
        return False
    if dist is not None and (
        summary.get("cerebellum_learning", "background") != dist.cerebellum_learning
        # Runs stored before the setting existed computed in float32.
        or summary.get("cerebellum_precision_asked", "float32")
        != dist.cerebellum_precision
        or (dist.steps is not None and summary.get("steps") != dist.steps)
    ):
        return False
    stored = summary.get("config") or {}
    wanted = config.to_dict()
    defaults = TrainConfig(task=config.task).to_dict()
    return all(
        stored[k] == v if k in stored else v == defaults[k] for k, v in wanted.items()
    )


def _write_index(out, axis, values, models, seeds, runs) -> None:
    index = {
        "axis": axis.name,
        "values": values,
        "models": models,
        "seeds": seeds,
        "runs": runs,
    }
    (out / "sweep.json").write_text(json.dumps(index, indent=2) + "\n")


# Reading and drawing ------------------------------------------------------------------


def load_sweep(out: Path) -> dict[str, Any]:
    """``sweep.json`` with each run's summary and curve attached."""
    path = out / "sweep.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: run `ccdni sweep` without --plot-only"
        )
    index = json.loads(path.read_text())
    for run in index["runs"]:
        run_dir = out / run["dir"]
        run["summary"] = json.loads((run_dir / "summary.json").read_text())
        run["curve"] = [
            json.loads(line)
            for line in (run_dir / "curve.jsonl").read_text().splitlines()
            if line.strip()
        ]
    return index


def grouped(index: dict[str, Any]) -> dict[tuple[Any, str], list[dict[str, Any]]]:
    """Runs by (value, model), in the order of the sweep's values and models."""
    groups: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for value in index["values"]:
        for model in index["models"]:
            runs = [
                r for r in index["runs"] if r["value"] == value and r["model"] == model
            ]
            if runs:
                groups[(value, model)] = runs
    return groups


def final_measures(
    summary: dict[str, Any], curve: list[dict[str, Any]] | None = None
) -> dict[str, float]:
    """The numbers a sweep's table reports for one run.

    With the run's ``curve``, also the validation loss averaged over every
    evaluation: how fast it learned, not only where it ended.
    """
    measures = {"validation_loss": summary["validation_loss"]}
    if curve:
        measures["mean_validation_loss"] = statistics.fmean(
            r["validation_loss"] for r in curve
        )
    if summary["metric_name"] not in summary.get("ataxia", {}):
        measures["metric"] = summary["validation_metric"]
    for name, value in summary.get("ataxia", {}).items():
        measures[name] = value
    return measures


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4g} ± {std:.2g}"


def write_sweep(out: Path) -> str:
    """Write ``sweep.md``, ``sweep-table.json`` and ``sweep.png``; return the table."""
    index = load_sweep(out)
    groups = grouped(index)
    first = index["runs"][0]["summary"]
    metric_name = first["metric_name"]
    names = list(final_measures(first, index["runs"][0]["curve"]))
    labels = {
        "validation_loss": "final val. loss",
        "mean_validation_loss": "mean val. loss",
    }
    header = [
        metric_name if n == "metric" else labels.get(n, n.replace("_", " "))
        for n in names
    ]
    seeds = sorted({r["seed"] for r in index["runs"]})
    lines = [
        f"task `{first['task']}`, {first['seq_len']} steps, sweep over "
        f"{index['axis']}, {len(seeds)} seeds (mean ± standard deviation)",
        "",
        f"| {index['axis']} | model | runs | " + " | ".join(header) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    table: dict[str, Any] = {}
    for (value, model), runs in groups.items():
        measures = [final_measures(r["summary"], r["curve"]) for r in runs]
        cells = [mean_std([m[n] for m in measures]) for n in names]
        lines.append(f"| {value} | {model} | {len(runs)} | " + " | ".join(cells) + " |")
        table.setdefault(str(value), {})[model] = {
            n: [m[n] for m in measures] for n in names
        }
    text = "\n".join(lines)
    (out / "sweep.md").write_text(text + "\n")
    (out / "sweep-table.json").write_text(json.dumps(table, indent=2) + "\n")
    plot_sweep(index, out / "sweep.png")
    return text


def curve_stats(runs: list[dict[str, Any]], key: str, log: bool = False):
    """Epochs and the mean and deviation of ``key`` over the runs' curves.

    With ``log``, the geometric mean and the geometric deviation (a factor), for
    plotting on a log axis.
    """
    import numpy as np

    length = min(len(r["curve"]) for r in runs)
    epochs = [r["epoch"] for r in runs[0]["curve"][:length]]
    values = np.array(
        [
            [np.nan if x.get(key) is None else x[key] for x in r["curve"][:length]]
            for r in runs
        ],
        dtype=float,
    )
    if log:
        logs = np.log(np.maximum(values, 1e-12))
        return (
            np.array(epochs),
            np.exp(np.nanmean(logs, 0)),
            np.exp(np.nanstd(logs, 0)),
        )
    return np.array(epochs), np.nanmean(values, 0), np.nanstd(values, 0)


def plot_sweep(index: dict[str, Any], path: Path, key: str = "validation_loss") -> Path:
    """One panel per value (curves by model) and a last panel of final values.

    Curves are geometric means over seeds, bands ×/÷ one geometric deviation.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from orchestrator.report import MODEL_COLOURS

    axis = AXES[index["axis"]]
    groups = grouped(index)
    values = index["values"]
    columns = min(5, len(values) + 1)
    rows = -(-(len(values) + 1) // columns)
    fig, panels = plt.subplots(
        rows, columns, figsize=(3.2 * columns, 2.7 * rows), squeeze=False
    )
    flat = panels.flatten()
    seq_len = index["runs"][0]["summary"]["seq_len"]
    for ax, value in zip(flat, values):
        for model in index["models"]:
            runs = groups.get((value, model))
            if not runs:
                continue
            epochs, centre, spread = curve_stats(runs, key, log=True)
            colour = MODEL_COLOURS.get(model)
            ax.plot(epochs, centre, color=colour, label=model)
            ax.fill_between(
                epochs, centre / spread, centre * spread, color=colour, alpha=0.2
            )
        title = f"{axis.label} = {value}"
        if axis.name == "truncation":
            t = seq_len if value == "full" else min(int(value), seq_len)
            title += f" ({t / seq_len:.2f} of the sequence)"
        ax.set_title(title, fontsize=9)
        ax.set_yscale("log")
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel(key.replace("_", " "), fontsize=8)
        ax.tick_params(labelsize=7)
    flat[0].legend(fontsize=7)

    summary_ax = flat[len(values)]
    positions = np.arange(len(values))
    for model in index["models"]:
        xs, means, stds = [], [], []
        for x, value in zip(positions, values):
            runs = groups.get((value, model))
            if runs:
                finals = [r["summary"][key] for r in runs]
                xs.append(x)
                means.append(np.mean(finals))
                stds.append(np.std(finals))
        if xs:
            summary_ax.errorbar(
                xs,
                means,
                yerr=stds,
                marker="o",
                capsize=3,
                label=model,
                color=MODEL_COLOURS.get(model),
            )
    summary_ax.set_xticks(positions, [str(v) for v in values], fontsize=7)
    summary_ax.set_yscale("log")
    summary_ax.set_xlabel(axis.label, fontsize=8)
    summary_ax.set_title(f"final {key.replace('_', ' ')}", fontsize=9)
    summary_ax.legend(fontsize=7)
    for ax in flat[len(values) + 1 :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# Command line -------------------------------------------------------------------------


def add_sweep_parser(commands) -> argparse.ArgumentParser:
    """Register ``ccdni sweep`` on the ``commands`` sub-parsers."""
    from orchestrator.cli import add_distributed_options, add_training_options

    parser = commands.add_parser(
        "sweep", help="learning along one axis: truncation, granule layer or lesion"
    )
    add_training_options(parser)
    add_distributed_options(parser)
    values = parser.add_argument_group("sweep axis (give exactly one)")
    for axis in AXES.values():
        values.add_argument(
            axis.flag,
            dest=f"sweep_{axis.name}",
            metavar="LIST",
            help=f"comma-separated {axis.label} values",
        )
    parser.add_argument("--models", default="ccrnn,crnn")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", required=True, help="sweep directory")
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw from stored runs, no training"
    )
    return parser


def run_sweep_command(args: argparse.Namespace) -> int:
    """``ccdni sweep``: train what is missing, then write the table and figure."""
    from orchestrator.cli import config_from_args, experiment_distributed

    out = Path(args.out)
    if not args.plot_only:
        given = [a for a in AXES.values() if getattr(args, f"sweep_{a.name}")]
        if len(given) != 1:
            flags = ", ".join(a.flag for a in AXES.values())
            raise ConfigError(f"ccdni sweep needs exactly one of {flags}")
        axis = given[0]
        values = parse_values(axis, getattr(args, f"sweep_{axis.name}"))
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in models if m not in MODELS]
        if unknown or not models:
            raise ConfigError(
                f"--models {args.models!r}: unknown {unknown}; choose from {MODELS}"
            )
        if args.seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {args.seeds}")
        base = config_from_args(args)
        for value in values:  # check every configuration before training any
            for model in models:
                if applies(axis, value, model):
                    base.replace(model=model, **axis.apply(base, value))
        dist = experiment_distributed(args)
        run_sweep(
            base, axis, values, models, args.seeds, out, not args.no_progress, dist
        )
    sys.stdout.write(write_sweep(out) + "\n")
    return 0
