"""The last chunk's loss over a window, normalised so windows add up to the sequence."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

TaskKind = Literal["regression", "classification"]


def sequence_loss(
    outputs: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    kind: TaskKind,
    normaliser: torch.Tensor | float,
) -> torch.Tensor:
    """Summed loss over the masked steps of ``outputs``, divided by ``normaliser``.

    Dividing every window by the same normaliser (the number of masked steps in the
    whole batch) makes the window losses of a sequence add up to its mean loss, which
    is what makes truncated training with true future feedback equal full BPTT.

    Args:
        outputs: ``(B, T, O)`` read-out over a window.
        targets: ``(B, T, O)`` or ``(B, T)`` matching ``kind``.
        mask: ``(B, T)`` bool.
        kind: regression (squared error averaged over output dimensions) or
            classification (cross-entropy).
        normaliser: number of masked steps in the batch.
    """
    if not bool(mask.any()):
        return outputs.sum() * 0.0
    if kind == "regression":
        per_step = ((outputs - targets) ** 2).mean(-1)
    else:
        per_step = F.cross_entropy(
            outputs.reshape(-1, outputs.shape[-1]),
            targets.reshape(-1).clamp_min(0),
            reduction="none",
        ).reshape(mask.shape)
    return (per_step * mask).sum() / normaliser
