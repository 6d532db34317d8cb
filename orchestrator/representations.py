"""Cortico-cerebellar representations over learning, on a fixed probe set.

At each evaluation of a ccRNN run, the probe sequences (the first
:data:`PROBE_SIZE` validation sequences) are run through the current cortex, and
at every window end but the last we record, for each chunk's state microzone:

- the **cortical activity** ``(h, c)`` it is shown;
- the **true feedback**: the exact gradient of the probe loss still to come with
  respect to that activity, by full BPTT through the whole sequence
  (:func:`exact_future_feedback`), in the trainer's per-example units (the
  gradient of the batch-mean loss times the number of sequences);
- the **predicted feedback** of the microzone (unscaled, the same units);
- the **granule activity** of the microzone's last granule layer.

From these, per microzone:

- ``feedback_correlation``: Pearson correlation between predicted and true
  feedback over every probe sequence, window end and state unit pooled
  (:func:`pearson`); also their cosine similarity and norm ratio;
- ``granule_correlation``: the granule layer's population correlation: for each
  window end, the Pearson correlation across probe sequences of every pair of
  granule cells that are active for at least one of them, averaged over pairs,
  then over window ends (:func:`population_correlation`); silent cells have no
  correlation and are left out, and ``granule_active`` says what fraction is
  active;
- ``cortical_correlation``: the same measure of the cortical state units, for
  comparison.

``python -m orchestrator.representations --task line --seeds 5 --out DIR`` trains
and records (``DIR/seed<S>/representations.jsonl`` next to the usual run files,
and the raw probe arrays of the first and last evaluation in ``probe.npz``);
``--plot-only`` redraws ``representations.png`` and ``representations.md`` from
them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cortex_service.network import CorticalChunk, flatten_state, window_bounds
from cortex_service.runtime import state_zone
from orchestrator.config import ConfigError
from orchestrator.sweep import finished_run
from orchestrator.tasks.base import SequenceData, TaskKind, sequence_loss

logger = logging.getLogger(__name__)

PROBE_SIZE = 200


# Measures -----------------------------------------------------------------------------


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors' entries; NaN if either is constant."""
    x = a.detach().double().flatten()
    y = b.detach().double().flatten()
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    x = x - x.mean()
    y = y - y.mean()
    denominator = float(x.norm() * y.norm())
    if denominator == 0.0:
        return float("nan")
    return float((x @ y) / denominator)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors' entries; NaN if either is zero."""
    x = a.detach().double().flatten()
    y = b.detach().double().flatten()
    denominator = float(x.norm() * y.norm())
    return float((x @ y) / denominator) if denominator else float("nan")


def population_correlation(activity: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean pairwise Pearson correlation of the units (columns) of ``activity``.

    Args:
        activity: ``(examples, units)``.

    Units whose activity does not vary across examples (silent ReLU cells) are
    left out; NaN when fewer than two units vary.
    """
    if activity.dim() != 2:
        raise ValueError(
            f"activity must be (examples, units), got {tuple(activity.shape)}"
        )
    x = activity.detach().double()
    x = x - x.mean(0)
    norms = x.norm(dim=0)
    live = norms > eps
    if int(live.sum()) < 2:
        return float("nan")
    x = x[:, live] / norms[live]
    corr = x.T @ x  # (U, U) Pearson correlations
    n = corr.shape[0]
    off_diagonal = corr.sum() - corr.diagonal().sum()
    return float(off_diagonal / (n * (n - 1)))


def active_fraction(activity: torch.Tensor) -> float:
    """Fraction of units (columns) that are non-zero for at least one example."""
    return float((activity.detach() != 0).any(0).double().mean())


# Probing the network ------------------------------------------------------------------


def exact_future_feedback(
    chunks: Sequence[CorticalChunk],
    probe: SequenceData,
    kind: TaskKind,
    truncation: int,
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Cortical states at window ends and the exact feedback of the future there.

    The whole sequence is unrolled in one graph (full BPTT); the state at the end
    of window ``w`` is a leaf-like node whose gradient is the feedback of every
    loss after it. Parameters' gradients are not touched.

    Returns:
        ``states[c][w]`` and ``feedback[c][w]``: ``(N, state_size)`` for chunk
        ``c`` at the end of window ``w``, for every window but the last; the
        feedback is in per-example units (gradient of the mean loss times N).
    """
    size = len(probe)
    bounds = list(window_bounds(probe.inputs.shape[1], truncation))
    normaliser = probe.mask.sum()
    states = [chunk.initial_state(size) for chunk in chunks]
    ends: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in chunks]
    total = torch.zeros(())
    for window, (start, stop) in enumerate(bounds):
        hidden = probe.inputs[:, start:stop]
        for index, chunk in enumerate(chunks):
            if window > 0:
                # A fresh node for the state entering this window: its gradient is
                # the future feedback of the previous window's end.
                h, c = (s.clone().requires_grad_(True) for s in states[index])
                ends[index].append((h, c))
                states[index] = (h, c)
            hidden, states[index] = chunk(hidden, states[index])
        outputs = chunks[-1].read_out(hidden)
        total = total + sequence_loss(
            outputs,
            probe.targets[:, start:stop],
            probe.mask[:, start:stop],
            kind,
            normaliser,
        )

    leaves = [s for chunk_ends in ends for pair in chunk_ends for s in pair]
    grads = torch.autograd.grad(total, leaves, allow_unused=True) if leaves else []
    grads = [torch.zeros_like(s) if g is None else g for s, g in zip(leaves, grads)]
    activity: list[list[torch.Tensor]] = []
    feedback: list[list[torch.Tensor]] = []
    position = 0
    for chunk_ends in ends:
        activity.append(
            [flatten_state((h.detach(), c.detach())) for h, c in chunk_ends]
        )
        chunk_feedback = []
        for _ in chunk_ends:
            gh, gc = grads[position], grads[position + 1]
            position += 2
            chunk_feedback.append(flatten_state((gh, gc)) * size)
        feedback.append(chunk_feedback)
    return activity, feedback


def probe_network(trainer, probe: SequenceData) -> dict[str, dict[str, torch.Tensor]]:
    """Activity, true and predicted feedback and granule activity of each zone.

    Returns, per state microzone, tensors of shape ``(windows, N, width)``.
    The cortex runs in evaluation mode (no dropout) and is left in it.
    """
    if trainer.cerebellum is None:
        raise ValueError("probing needs a cerebellum: use --model ccrnn")
    for chunk in trainer.chunks:
        chunk.eval()
    activity, feedback = exact_future_feedback(
        trainer.chunks, probe, trainer.task.kind, trainer.truncation
    )
    context = trainer.context_for(probe)
    result = {}
    for index in range(len(trainer.chunks)):
        if not activity[index]:
            continue
        name = state_zone(index)
        zone = trainer.cerebellum.zone(name)
        with torch.no_grad():
            granule = [zone.granule_activity(a, context) for a in activity[index]]
            predicted = [zone.purkinje(g) for g in granule]
        result[name] = {
            "activity": torch.stack(activity[index]),
            "true": torch.stack(feedback[index]),
            "predicted": torch.stack(predicted),
            "granule": torch.stack(granule),
        }
    return result


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def measure(probed: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, Any]]:
    """The measures of the module docstring, per microzone (None where undefined)."""
    result = {}
    for name, arrays in probed.items():
        true, predicted = arrays["true"], arrays["predicted"]
        norm_true = float(true.double().norm())
        result[name] = {
            "feedback_correlation": _finite(pearson(predicted, true)),
            "feedback_cosine": _finite(cosine(predicted, true)),
            "feedback_norm_ratio": (
                float(predicted.double().norm()) / norm_true if norm_true else None
            ),
            "granule_correlation": _finite(
                _mean_over_windows(population_correlation, arrays["granule"])
            ),
            "granule_active": statistics.fmean(
                active_fraction(g) for g in arrays["granule"]
            ),
            "cortical_correlation": _finite(
                _mean_over_windows(population_correlation, arrays["activity"])
            ),
        }
    return result


def _mean_over_windows(fn, stacked: torch.Tensor) -> float:
    values = [fn(x) for x in stacked]
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else float("nan")


# Running ------------------------------------------------------------------------------


def probe_split(split: SequenceData, size: int = PROBE_SIZE) -> SequenceData:
    return split.subset(torch.arange(min(size, len(split))))


def save_probe(
    path: Path, stages: dict[str, dict[str, dict[str, torch.Tensor]]]
) -> None:
    """The probed arrays of some stages (``first``, ``last``) as float16, compressed."""
    arrays = {
        f"{stage}/{zone}/{key}": value.numpy().astype(np.float16)
        for stage, probed in stages.items()
        for zone, by_key in probed.items()
        for key, value in by_key.items()
    }
    # Written aside and renamed: a seed counts as done once probe.npz exists.
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as handle:
        np.savez_compressed(handle, **arrays)
    partial.replace(path)


def run_representations(config, seeds: int, out: Path, progress: bool = True) -> None:
    """Train a ccRNN per seed, measuring the probe set before and at each evaluation.

    Seeds whose run directory is complete are kept, so a larger ``seeds`` adds to
    a stored experiment and an interrupted one continues. A complete seed of
    another configuration is refused (ConfigError), not mixed in or overwritten.
    """
    if config.model != "ccrnn":
        raise ValueError(f"representations need --model ccrnn, got {config.model}")
    for seed in range(seeds):
        run_dir = out / f"seed{seed}"
        seeded = config.replace(seed=seed)
        if (run_dir / "probe.npz").exists():  # written last: this seed is done
            if not finished_run(run_dir, seeded):
                raise ConfigError(
                    f"--out {out}: {run_dir} holds seed {seed} of another "
                    "configuration (its summary.json says so); pass another "
                    f"--out, or remove {run_dir} to train it again"
                )
            logger.info("representations, seed %d: already in %s", seed, run_dir)
            continue
        record_seed(seeded, run_dir, progress)


def record_seed(config, run_dir: Path, progress: bool = True) -> None:
    """One run: train, measuring at epoch 0 and at every evaluation."""
    from orchestrator.tasks.registry import load_task
    from orchestrator.trainer import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    task = load_task(
        config.task, seed=config.seed, data_dir=config.data_dir, n_train=config.n_train
    )
    trainer = Trainer(config, task)
    probe = probe_split(task.validation)
    stages: dict[str, dict] = {}
    with (run_dir / "representations.jsonl").open("w") as records:

        def record(epoch: int) -> None:
            probed = probe_network(trainer, probe)
            stages.setdefault("first", probed)
            stages["last"] = probed
            records.write(json.dumps({"epoch": epoch, "zones": measure(probed)}) + "\n")
            records.flush()

        record(0)
        trainer.fit(run_dir, progress=progress, on_eval=lambda r: record(r["epoch"]))
    save_probe(run_dir / "probe.npz", stages)
    logger.info("representations, seed %d: wrote %s", config.seed, run_dir)


# Reading and drawing ------------------------------------------------------------------


def load_records(out: Path) -> dict[int, list[dict[str, Any]]]:
    """``representations.jsonl`` of every seed under ``out``, by seed."""
    records = {}
    for path in sorted(out.glob("seed*/representations.jsonl")):
        seed = int(path.parent.name.removeprefix("seed"))
        records[seed] = [json.loads(x) for x in path.read_text().splitlines() if x]
    if not records:
        raise FileNotFoundError(
            f"no {out}/seed*/representations.jsonl: run without --plot-only first"
        )
    return records


MEASURES = (
    ("feedback_correlation", "corr(predicted, true feedback)"),
    ("feedback_cosine", "cosine(predicted, true feedback)"),
    ("granule_correlation", "granule population correlation"),
    ("cortical_correlation", "cortical population correlation"),
    ("granule_active", "active granule fraction"),
)


def series(records: dict[int, list[dict]], zone: str, key: str):
    """Epochs and a ``(seeds, evaluations)`` array of one measure (NaN if missing)."""
    length = min(len(r) for r in records.values())
    epochs = [e["epoch"] for e in next(iter(records.values()))[:length]]
    values = np.array(
        [
            [
                np.nan if e["zones"][zone][key] is None else e["zones"][zone][key]
                for e in r[:length]
            ]
            for r in records.values()
        ],
        dtype=float,
    )
    return np.array(epochs), values


def _cell(values: np.ndarray) -> str:
    values = values[~np.isnan(values)]
    if not len(values):
        return "–"
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{float(np.mean(values)):.3f} ± {std:.2f}"


def write_representations(out: Path) -> str:
    """Write ``representations.md`` and ``representations.png``; return the table."""
    records = load_records(out)
    zones = sorted(next(iter(records.values()))[0]["zones"])
    lines = [
        f"{len(records)} seeds, probe of {PROBE_SIZE} validation sequences; "
        "mean ± standard deviation over seeds",
        "",
    ]
    for zone in zones:
        epochs, _ = series(records, zone, MEASURES[0][0])
        picks = sorted({0, len(epochs) // 4, len(epochs) // 2, len(epochs) - 1})
        picks = [p for p in picks if 0 <= p < len(epochs)]
        lines += [
            f"microzone `{zone}`",
            "",
            "| measure | " + " | ".join(f"epoch {epochs[p]}" for p in picks) + " |",
            "|---|" + "---|" * len(picks),
        ]
        for key, label in MEASURES:
            _, values = series(records, zone, key)
            lines.append(
                f"| {label} | " + " | ".join(_cell(values[:, p]) for p in picks) + " |"
            )
        lines.append("")
    text = "\n".join(lines)
    (out / "representations.md").write_text(text + "\n")
    plot_representations(out, records, zones)
    return text


def plot_representations(out: Path, records, zones: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orchestrator.report import read_curve

    fig, panels = plt.subplots(1, 4, figsize=(14, 3.2))
    for zone in zones:
        for ax, keys in (
            (panels[0], ["feedback_correlation", "feedback_cosine"]),
            (panels[1], ["granule_correlation", "cortical_correlation"]),
            (panels[2], ["granule_active"]),
        ):
            for key in keys:
                epochs, values = series(records, zone, key)
                with warnings.catch_warnings():
                    # Epoch 0 has no prediction yet (zero Purkinje): NaN by design.
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
                label = dict(MEASURES)[key] + (f" ({zone})" if len(zones) > 1 else "")
                ax.plot(epochs, mean, label=label)
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    panels[0].set(xlabel="epoch", title="cerebellar prediction vs true feedback")
    panels[1].set(xlabel="epoch", title="population correlation")
    panels[2].set(xlabel="epoch", title="active granule cells", ylim=(0, 1.05))
    for ax in panels[:2]:
        ax.legend(fontsize=7)
    for seed in records:
        curve = read_curve(out / f"seed{seed}")
        panels[3].plot(
            [r["epoch"] for r in curve],
            [r["validation_loss"] for r in curve],
            color="tab:blue",
            alpha=0.5,
        )
    panels[3].set(
        xlabel="epoch", ylabel="validation loss", yscale="log", title="learning"
    )
    fig.tight_layout()
    path = out / "representations.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m orchestrator.representations``: see the module docstring."""
    from orchestrator.cli import add_training_options, config_from_args

    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.representations",
        description="Cortico-cerebellar representations of a ccRNN over learning.",
    )
    add_training_options(parser)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    if not args.plot_only:
        try:
            run_representations(
                config_from_args(args, model="ccrnn"),
                args.seeds,
                out,
                not args.no_progress,
            )
        except ConfigError as error:
            parser.exit(2, f"{parser.prog}: error: {error}\n")
    sys.stdout.write(write_representations(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
