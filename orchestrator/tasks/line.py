"""The ``line`` task: from a one-step cue, draw a straight line or stay put.

The network sees a scalar cue at the first step and nothing afterwards, and must
draw a 2-D trajectory over :data:`SEQ_LEN` steps. There are :data:`N_CUES` cues,
``(label - 3) * 0.1`` for ``label`` in ``0..6``:

- the zero cue (label :data:`STAY_LABEL`) means stay at the origin, so its target
  is all zeros;
- each of the six other cues names a point on a circle of radius :data:`RADIUS`,
  and the target walks the straight line from the origin to it, reaching the
  fraction ``(t + 1) / SEQ_LEN`` of the way at step ``t``.

The six points sit at 0, 60, ..., 300 degrees. A positive cue ``+m * 0.1`` points
at ``(m - 1) * 60`` degrees and its negative ``-m * 0.1`` at the opposite point,
so cues of opposite sign ask for opposite movements.

Loss is given at every second step, the 2nd, 4th, ... and 10th (indices 1, 3, 5,
7, 9): ending the pattern on the last step means the end point, which the ataxia
measures judge, is always trained.

The straight-line and every-k-th-step helpers here are shared with the digit
tasks.
"""

from __future__ import annotations

import logging
import math

import torch

from orchestrator.tasks.base import SequenceData, TaskData

logger = logging.getLogger(__name__)

SEQ_LEN = 10
N_CUES = 7
CUE_SCALE = 0.1
RADIUS = 10.0
# Label of the zero cue: labels are sorted by cue value, so zero is in the middle.
STAY_LABEL = 3
# Loss every second step, ending on the last one.
LOSS_EVERY = 2
# 1000 training sequences, of which 20% are held out for validation.
N_TRAIN_POOL = 1000
VALIDATION_FRACTION = 0.2
N_TEST = 200


def cue_values() -> torch.Tensor:
    """The cue of each label: ``(7,)`` float32, ``-0.3, -0.2, ..., 0.3``."""
    steps = torch.arange(N_CUES, dtype=torch.float64) - STAY_LABEL
    return (steps * CUE_SCALE).to(torch.float32)


def end_points() -> torch.Tensor:
    """Where each label's line ends: ``(7, 2)`` float32.

    The stay label ends at the origin; the others on the radius-10 circle, a
    cue and its negative at opposite points (see the module docstring).
    """
    points = torch.zeros(N_CUES, 2, dtype=torch.float64)
    for label in range(N_CUES):
        m = label - STAY_LABEL
        if m == 0:
            continue
        # +m at (m - 1) * 60 degrees, -m half a turn further on.
        sixths = (abs(m) - 1) + (3 if m < 0 else 0)
        angle = 2.0 * math.pi * sixths / 6.0
        points[label, 0] = RADIUS * math.cos(angle)
        points[label, 1] = RADIUS * math.sin(angle)
    return points.to(torch.float32)


def straight_lines(ends: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Straight trajectories from the origin to ``ends`` over ``seq_len`` steps.

    Step ``t`` is at the fraction ``(t + 1) / seq_len`` of the way, so the last
    step lands exactly on the end point and the first has already moved.

    Args:
        ends: ``(N, 2)`` end points.
        seq_len: number of steps, at least 1.

    Returns:
        ``(N, seq_len, 2)`` float32.
    """
    if ends.dim() != 2 or ends.shape[1] != 2:
        raise ValueError(f"ends must have shape (N, 2), got {tuple(ends.shape)}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")

    # (S,) fraction of the way at each step
    fractions = torch.arange(1, seq_len + 1, dtype=torch.float64) / seq_len
    lines = fractions[None, :, None] * ends.to(torch.float64)[:, None, :]
    return lines.to(torch.float32)


def every_kth_step_mask(n: int, seq_len: int, every: int) -> torch.Tensor:
    """A ``(n, seq_len)`` bool mask, True at steps ``every - 1, 2 * every - 1, ...``.

    Counting from one, these are the ``every``-th, ``2 * every``-th, ... steps;
    when ``every`` divides ``seq_len`` the last step is included.
    """
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")

    steps = torch.arange(seq_len)
    row = (steps + 1) % every == 0
    return row.unsqueeze(0).expand(n, seq_len).clone()


def line_sequences(labels: torch.Tensor) -> SequenceData:
    """The ``line`` sequences for the cue ``labels`` (``(N,)`` int64 in ``0..6``)."""
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (N,), got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= N_CUES):
        raise ValueError(
            f"line labels must lie in 0..{N_CUES - 1}, got values from "
            f"{int(labels.min())} to {int(labels.max())}"
        )

    n = labels.shape[0]
    # (N, S, 1): the cue at step 0, silence afterwards
    inputs = torch.zeros(n, SEQ_LEN, 1)
    inputs[:, 0, 0] = cue_values()[labels]
    # (N, S, 2)
    targets = straight_lines(end_points()[labels], SEQ_LEN)
    mask = every_kth_step_mask(n, SEQ_LEN, LOSS_EVERY)
    return SequenceData(inputs, targets, mask, labels.to(torch.int64))


def make_line_task(*, seed: int = 0, n_train: int | None = None) -> TaskData:
    """The ``line`` task: 800 training, 200 validation and 200 test sequences.

    Cues are drawn uniformly from the seven labels by a generator seeded with
    ``seed``; the same seed always gives the same splits.

    Args:
        seed: seed of the cue draws.
        n_train: keep at most this many training sequences (validation and test
            are unchanged).

    Raises:
        ValueError: ``n_train`` is not a positive integer.
    """
    if n_train is not None and n_train < 1:
        raise ValueError(f"n_train must be a positive integer or None, got {n_train}")

    n_validation = round(N_TRAIN_POOL * VALIDATION_FRACTION)
    n_fit = N_TRAIN_POOL - n_validation
    generator = torch.Generator().manual_seed(seed)
    # The draws are independent, so consecutive slices are random splits.
    labels = torch.randint(0, N_CUES, (N_TRAIN_POOL + N_TEST,), generator=generator)
    train_labels = labels[:n_fit]
    if n_train is not None:
        train_labels = train_labels[:n_train]

    task = TaskData(
        name="line",
        kind="regression",
        input_size=1,
        output_size=2,
        seq_len=SEQ_LEN,
        train=line_sequences(train_labels),
        validation=line_sequences(labels[n_fit:N_TRAIN_POOL]),
        test=line_sequences(labels[N_TRAIN_POOL:]),
        drawing=True,
    )
    logger.debug(
        "line task, seed %d: %d train, %d validation, %d test sequences",
        seed,
        len(task.train),
        len(task.validation),
        len(task.test),
    )
    return task
