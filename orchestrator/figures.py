"""The paper's figures and tables, drawn from stored run directories only.

``python -m orchestrator.figures --runs runs/paper --figures docs/figures/paper``
redraws every figure whose runs exist under ``--runs`` and writes the tables
(Markdown) to ``--runs``/tables; nothing here trains. The directories are those
``scripts/paper_figures.sh`` creates:

- ``captions/`` (``ccdni compare --task captions``): ``captions.png``;
- ``truncation-<task>/`` (``ccdni sweep --truncations``): ``truncation-<task>.png``;
- ``lesions-<task>/`` (``ccdni sweep --lesions``): ``lesions.png``, ``ataxia.png``
  and ``trajectories.png``;
- ``representations-line/`` (``python -m orchestrator.representations``):
  ``representations.png``;
- ``granule-width-line/`` and ``fan-in-line/`` (``ccdni sweep``): ``granule.png``;
- ``distributed-lesion/`` (``python -m orchestrator.lesions``):
  ``distributed-lesion.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from orchestrator import sweep  # noqa: E402
from orchestrator.report import MODEL_COLOURS  # noqa: E402

logger = logging.getLogger(__name__)

DPI = 90
LESION_COLOURS = {"cerebellum": "tab:red", "olive": "tab:purple"}


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def _band(ax, runs, key, colour, label, style="-", log=False):
    """Mean ± sd over runs; on a log axis, geometric mean ×/÷ geometric sd."""
    epochs, mean, spread = sweep.curve_stats(runs, key, log=log)
    if log:  # a geometric deviation is a factor
        low, high = mean / spread, mean * spread
    else:
        low, high = mean - spread, mean + spread
    ax.plot(epochs, mean, style, color=colour, label=label)
    ax.fill_between(epochs, low, high, color=colour, alpha=0.15)


# Lesions, ataxia, trajectories --------------------------------------------------------


def lesion_variants(index: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The runs of a lesion sweep by variant: ccrnn, crnn, cerebellum@E, olive@E."""
    groups = sweep.grouped(index)
    variants = {}
    for (value, model), runs in groups.items():
        name = model if value == sweep.INTACT else value
        variants[name] = runs
    return variants


def _lesion_epoch(variant: str) -> int:
    return int(variant.partition("@")[2])


def plot_lesions(sweeps: dict[str, dict[str, Any]], path: Path) -> Path:
    """Per task, the two lesions side by side with intact ccRNN and cRNN."""
    fig, panels = plt.subplots(
        len(sweeps), 2, figsize=(9, 3.0 * len(sweeps)), squeeze=False
    )
    for row, (task, index) in enumerate(sweeps.items()):
        variants = lesion_variants(index)
        lesions = [v for v in variants if "@" in v]
        for col, kind in enumerate(("cerebellum", "olive")):
            ax = panels[row, col]
            for model in ("ccrnn", "crnn"):
                if model in variants:
                    _band(
                        ax,
                        variants[model],
                        "validation_loss",
                        MODEL_COLOURS[model],
                        f"{model} (intact)",
                    )
            for variant in (v for v in lesions if v.startswith(kind)):
                _band(
                    ax,
                    variants[variant],
                    "validation_loss",
                    LESION_COLOURS[kind],
                    f"ccrnn, {kind} lesion",
                    "--",
                )
                ax.axvline(_lesion_epoch(variant), color="grey", lw=0.8, ls=":")
            title = (
                "cerebellar lesion" if kind == "cerebellum" else "inferior-olive lesion"
            )
            ax.set_title(f"{task}: {title}", fontsize=9)
            ax.set(xlabel="epoch", ylabel="validation loss", yscale="log")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def lesion_table(task: str, index: dict[str, Any]) -> str:
    """Final loss, mean loss after the lesion epoch and ataxia, per variant."""
    variants = lesion_variants(index)
    epochs = [_lesion_epoch(v) for v in variants if "@" in v]
    after = min(epochs) if epochs else 0
    seeds = len(next(iter(variants.values())))
    lines = [
        f"`{task}`, {seeds} seeds; lesions at epoch {after}; mean ± sd over seeds",
        "",
        "| variant | final val. loss | mean val. loss after epoch "
        f"{after} | dysmetria | tremor |",
        "|---|---|---|---|---|",
    ]
    for name, runs in variants.items():
        final = [r["summary"]["validation_loss"] for r in runs]
        later = [
            statistics.fmean(
                x["validation_loss"] for x in r["curve"] if x["epoch"] > after
            )
            for r in runs
        ]
        dys = [r["summary"]["ataxia"]["dysmetria"] for r in runs]
        tremor = [r["summary"]["ataxia"]["tremor"] for r in runs]
        lines.append(
            f"| {name} | {mean_std(final)} | {mean_std(later)} | {mean_std(dys)} | "
            f"{mean_std(tremor, 4)} |"
        )
    return "\n".join(lines)


def ataxia_table(task: str, index: dict[str, Any]) -> str:
    """Dysmetria and tremor of each variant at a quarter, half and end of training."""
    variants = lesion_variants(index)
    epochs = [x["epoch"] for x in next(iter(variants.values()))[0]["curve"]]
    picks = sorted({epochs[len(epochs) // 4], epochs[len(epochs) // 2], epochs[-1]})
    seeds = len(next(iter(variants.values())))
    head = " | ".join(f"{m} @ {e}" for m in ("dysmetria", "tremor") for e in picks)
    lines = [
        f"`{task}`, {seeds} seeds, validation set; mean ± sd over seeds",
        "",
        f"| variant | {head} |",
        "|---|" + "---|" * (2 * len(picks)),
    ]
    for name, runs in variants.items():
        cells = []
        for key in ("dysmetria", "tremor"):
            for epoch in picks:
                values = [
                    next(x[key] for x in r["curve"] if x["epoch"] == epoch)
                    for r in runs
                ]
                cells.append(mean_std(values, 2 if key == "dysmetria" else 3))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ataxia(sweeps: dict[str, dict[str, Any]], path: Path) -> Path:
    """Dysmetria and tremor over training, per task, every variant."""
    fig, panels = plt.subplots(
        len(sweeps), 2, figsize=(9, 3.0 * len(sweeps)), squeeze=False
    )
    for row, (task, index) in enumerate(sweeps.items()):
        for name, runs in lesion_variants(index).items():
            kind = name.partition("@")[0]
            colour = MODEL_COLOURS.get(name) or LESION_COLOURS.get(kind)
            style = "--" if "@" in name else "-"
            label = name if "@" not in name else f"ccrnn, {name} lesion"
            for col, key in enumerate(("dysmetria", "tremor")):
                _band(panels[row, col], runs, key, colour, label, style)
        panels[row, 0].set(xlabel="epoch", ylabel="dysmetria (end-point error)")
        panels[row, 1].set(xlabel="epoch", ylabel="tremor (excess jerk)")
        for ax in panels[row]:
            ax.set_title(task, fontsize=9)
        panels[row, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_trajectories(
    sweeps: dict[str, dict[str, Any]], path: Path, seed: int = 0
) -> Path:
    """Drawn (solid) against target (dashed) for every cue, each variant, one seed.

    Each sweep index carries ``root``, the directory its run paths start from.
    """
    order = ["ccrnn", "crnn"]
    rows = []
    for task, index in sweeps.items():
        variants = lesion_variants(index)
        names = order + [v for v in variants if "@" in v]
        rows.append((task, index, [n for n in names if n in variants], variants))
    columns = max(len(r[2]) for r in rows)
    fig, panels = plt.subplots(
        len(rows), columns, figsize=(2.6 * columns, 2.7 * len(rows)), squeeze=False
    )
    colours = plt.get_cmap("tab10")
    for row, (task, index, names, variants) in enumerate(rows):
        for col, name in enumerate(names):
            ax = panels[row, col]
            run = next(
                (r for r in variants[name] if r["seed"] == seed), variants[name][0]
            )
            run_dir = Path(index["root"]) / run["dir"]
            drawn = json.loads((run_dir / "trajectories.json").read_text())
            for k, (_cue, pair) in enumerate(
                sorted(drawn.items(), key=lambda x: int(x[0]))
            ):
                for d, t in zip(pair["drawn"], pair["target"]):
                    ax.plot(*zip(*t), "--", color=colours(k % 10), lw=0.8, alpha=0.6)
                    ax.plot(*zip(*d), "-", color=colours(k % 10), lw=1.2)
            ax.set_aspect("equal")
            ax.set_title(f"{task}: {name}", fontsize=8)
            ax.tick_params(labelsize=6)
        for col in range(len(names), columns):
            panels[row, col].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


# Captions -----------------------------------------------------------------------------


def load_compare(out: Path) -> dict[str, list[dict[str, Any]]]:
    from orchestrator.compare import load_runs

    return load_runs(out)


def captions_table(by_model: dict[str, list[dict[str, Any]]]) -> str:
    rows = [
        ("BLEU-1", "bleu1"),
        ("BLEU-2", "bleu2"),
        ("BLEU-3", "bleu3"),
        ("BLEU-4", "bleu4"),
        ("BLEU-4, scenes with unseen colour-shape pairs", "bleu4_novel"),
        ("BLEU-4, scenes of seen pairs", "bleu4_familiar"),
        ("BLEU-4, images shuffled (control)", "bleu4_shuffled"),
        ("unigram baseline BLEU-4", "unigram_bleu4"),
    ]
    models = list(by_model)
    first = by_model[models[0]][0]["summary"]
    seeds = len(by_model[models[0]])
    lines = [
        f"`captions`, truncation {first['truncation']} of {first['seq_len']} steps, "
        f"{seeds} seeds; held-out test scenes; mean ± sd over seeds",
        "",
        "| measure | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for label, key in rows:
        cells = [
            mean_std(
                [r["summary"]["task_metrics"]["test"][key] for r in by_model[m]], 1
            )
            for m in models
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, key in (("validation loss (per word)", "validation_loss"),):
        cells = [mean_std([r["summary"][key] for r in by_model[m]]) for m in models]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_captions(by_model: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.4))
    for model, runs in by_model.items():
        colour = MODEL_COLOURS.get(model)
        epochs = np.array([r["epoch"] for r in runs[0]["curve"]])
        bleu = np.array([[x["metric"] for x in r["curve"]] for r in runs])
        left.plot(epochs, bleu.mean(0), color=colour, label=model)
        left.fill_between(
            epochs,
            bleu.mean(0) - bleu.std(0),
            bleu.mean(0) + bleu.std(0),
            color=colour,
            alpha=0.2,
        )
        shuffled = np.array(
            [[x["task_metrics"]["bleu4_shuffled"] for x in r["curve"]] for r in runs]
        )
        left.plot(
            epochs,
            shuffled.mean(0),
            ":",
            color=colour,
            label=f"{model}, images shuffled",
        )

        positions = np.array(
            [
                [
                    np.nan if v is None else v
                    for v in r["summary"]["task_metrics"]["test"]["loss_by_position"]
                ]
                for r in runs
            ],
            dtype=float,
        )
        steps = np.arange(1, positions.shape[1] + 1)
        middle.errorbar(
            steps,
            np.nanmean(positions, 0),
            yerr=np.nanstd(positions, 0),
            color=colour,
            marker=".",
            capsize=2,
            label=model,
        )
    unigram = [
        r["summary"]["task_metrics"]["test"]["unigram_bleu4"]
        for runs in by_model.values()
        for r in runs
    ]
    left.axhline(
        statistics.fmean(unigram), color="grey", ls="--", label="unigram baseline"
    )
    left.set(xlabel="epoch", ylabel="validation BLEU-4", title="greedy captions")
    left.legend(fontsize=7)
    middle.set(
        xlabel="word position (step)",
        ylabel="cross-entropy (test)",
        title="loss by word position",
    )
    middle.legend(fontsize=7)

    keys = ["bleu1", "bleu2", "bleu3", "bleu4", "bleu4_familiar", "bleu4_novel"]
    names = ["B-1", "B-2", "B-3", "B-4", "B-4 seen", "B-4 unseen"]
    width = 0.8 / len(by_model)
    for k, (model, runs) in enumerate(by_model.items()):
        values = np.array(
            [[r["summary"]["task_metrics"]["test"][key] for key in keys] for r in runs]
        )
        right.bar(
            np.arange(len(keys)) + k * width,
            values.mean(0),
            width,
            yerr=values.std(0),
            color=MODEL_COLOURS.get(model),
            label=model,
            capsize=2,
        )
    right.set_xticks(
        np.arange(len(keys)) + width * (len(by_model) - 1) / 2, names, fontsize=7
    )
    right.set(ylabel="test BLEU", title="held-out scenes")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def caption_examples(by_model: dict[str, list[dict[str, Any]]], count: int = 3) -> str:
    lines = []
    for model, runs in by_model.items():
        examples = runs[0]["summary"]["task_metrics"]["test"]["examples"][:count]
        for example in examples:
            lines.append(
                f"- {model}: *{example['caption']}* — reference: "
                f"*{example['references'][0]}*"
            )
    return "\n".join(lines)


# Granule layer ------------------------------------------------------------------------


def plot_granule(indices: dict[str, dict[str, Any]], path: Path) -> Path:
    """Learning curves by granule width and by fan-in, and final loss against each."""
    fig, panels = plt.subplots(
        1, 2 * len(indices), figsize=(6.5 * len(indices), 3.2), squeeze=False
    )
    flat = panels.flatten()
    for k, (name, index) in enumerate(indices.items()):
        groups = sweep.grouped(index)
        cmap = plt.get_cmap("viridis")
        curves, finals = flat[2 * k], flat[2 * k + 1]
        values = index["values"]
        for j, value in enumerate(values):
            runs = groups.get((value, "ccrnn"))
            if not runs:
                continue
            colour = cmap(j / max(len(values) - 1, 1))
            _band(curves, runs, "validation_loss", colour, f"{value}", log=True)
            final = [r["summary"]["validation_loss"] for r in runs]
            finals.errorbar(
                [j],
                [np.mean(final)],
                yerr=[np.std(final)],
                marker="o",
                color=colour,
                capsize=3,
            )
        label = sweep.AXES[index["axis"]].label
        curves.set(
            xlabel="epoch",
            ylabel="validation loss",
            yscale="log",
            title=f"ccRNN by {label}",
        )
        curves.legend(fontsize=7, title=label, title_fontsize=7)
        finals.set_xticks(range(len(values)), [str(v) for v in values])
        finals.set(
            xlabel=label, ylabel="final validation loss", yscale="log", title=name
        )
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


# Everything ---------------------------------------------------------------------------


def draw_all(runs: Path, figures: Path) -> dict[str, str]:
    """Every figure and table whose runs exist; returns the tables by name."""
    figures.mkdir(parents=True, exist_ok=True)
    tables_dir = runs / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    tables: dict[str, str] = {}

    if (runs / "captions" / "runs.json").exists():
        by_model = load_compare(runs / "captions")
        plot_captions(by_model, figures / "captions.png")
        tables["captions"] = (
            captions_table(by_model) + "\n\n" + caption_examples(by_model)
        )

    for sweep_dir in sorted(runs.glob("truncation-*")):
        if (sweep_dir / "sweep.json").exists():
            tables[sweep_dir.name] = sweep.write_sweep(sweep_dir)
            shutil.copy(sweep_dir / "sweep.png", figures / f"{sweep_dir.name}.png")

    lesion_sweeps = {
        d.name.removeprefix("lesions-"): {**sweep.load_sweep(d), "root": str(d)}
        for d in sorted(runs.glob("lesions-*"))
        if (d / "sweep.json").exists()
    }
    if lesion_sweeps:
        order = sorted(lesion_sweeps, key=lambda t: (t != "line", t))
        lesion_sweeps = {t: lesion_sweeps[t] for t in order}
        plot_lesions(lesion_sweeps, figures / "lesions.png")
        plot_ataxia(lesion_sweeps, figures / "ataxia.png")
        plot_trajectories(lesion_sweeps, figures / "trajectories.png")
        for task, index in lesion_sweeps.items():
            tables[f"lesions-{task}"] = lesion_table(task, index)
            tables[f"ataxia-{task}"] = ataxia_table(task, index)

    granule = {
        name: sweep.load_sweep(runs / name)
        for name in ("granule-width-line", "fan-in-line")
        if (runs / name / "sweep.json").exists()
    }
    if granule:
        plot_granule(granule, figures / "granule.png")
        for name in granule:
            tables[name] = sweep.write_sweep(runs / name)

    if list((runs / "representations-line").glob("seed*/representations.jsonl")):
        from orchestrator import representations

        tables["representations"] = representations.write_representations(
            runs / "representations-line"
        )
        shutil.copy(
            runs / "representations-line" / "representations.png",
            figures / "representations.png",
        )

    if (runs / "distributed-lesion" / "distributed-lesion.json").exists():
        from orchestrator import lesions

        lesions.plot_distributed_lesion(runs / "distributed-lesion")
        shutil.copy(
            runs / "distributed-lesion" / "distributed-lesion.png",
            figures / "distributed-lesion.png",
        )
    for name, text in tables.items():
        (tables_dir / f"{name}.md").write_text(text + "\n")
    return tables


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.figures",
        description="Redraw the paper figures and tables from stored runs.",
    )
    parser.add_argument("--runs", default="runs/paper")
    parser.add_argument("--figures", default="docs/figures/paper")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    tables = draw_all(Path(args.runs), Path(args.figures))
    for name, text in tables.items():
        sys.stdout.write(f"## {name}\n\n{text}\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
