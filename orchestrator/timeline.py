"""The per-actor timeline of a distributed run, drawn from ``timeline.json``.

Each row is a chunk; each bar one span of work (forward, backward, predict,
update) or of waiting (for input, for feedback). Under ``locked`` the rows take
turns; under ``decoupled`` they run side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PHASE_COLOURS = {
    "forward": "tab:blue",
    "backward": "tab:red",
    "predict": "tab:purple",
    "update": "tab:green",
    "send": "tab:gray",
    "wait_input": "#dddddd",
    "wait_feedback": "#bbbbbb",
}


def busy_fraction(events: list[dict], chunk: int, wall: float) -> float:
    """Share of ``wall`` seconds that ``chunk`` spent computing."""
    busy = sum(
        e["end"] - e["start"]
        for e in events
        if e["chunk"] == chunk and e["phase"] in ("forward", "backward", "update")
    )
    return busy / wall if wall > 0 else 0.0


def plot_timeline(
    run_dir: Path, seconds: float | None = 1.5, path: Path | None = None
) -> Path:
    """Draw the first ``seconds`` after warm-up (all of it when ``None``)."""
    data = json.loads((run_dir / "timeline.json").read_text())
    events = data["events"]
    chunks = sorted({e["chunk"] for e in events})
    # Skip the first step: it includes start-up costs that hide the pattern.
    later = [e["start"] for e in events if e["batch"] >= 1]
    begin = min(later) if later else 0.0
    end = begin + seconds if seconds is not None else max(e["end"] for e in events)

    fig, ax = plt.subplots(figsize=(10, 0.8 + 0.7 * len(chunks)))
    for event in events:
        if event["end"] < begin or event["start"] > end:
            continue
        ax.barh(
            event["chunk"],
            event["end"] - event["start"],
            left=event["start"] - begin,
            color=PHASE_COLOURS.get(event["phase"], "black"),
            height=0.6,
        )
    ax.set_yticks(chunks, [f"chunk {c}" for c in chunks])
    ax.invert_yaxis()
    ax.set_xlim(0, end - begin)
    ax.set_xlabel("seconds")
    ax.set_title(f"schedule {data.get('schedule', '?')}: per-actor timeline")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in PHASE_COLOURS.values()]
    ax.legend(
        handles,
        list(PHASE_COLOURS),
        ncol=7,
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.35 if len(chunks) < 3 else -0.2),
    )
    fig.tight_layout()
    path = path or run_dir / "timeline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
