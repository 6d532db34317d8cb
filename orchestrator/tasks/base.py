"""What every task hands the trainers: sequences, targets and where loss is given.

A task is data plus a loss. The trainers never look inside a task beyond this
module, so a new task only has to return a :class:`TaskData`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cortex_service.loss import TaskKind, sequence_loss


@dataclass(frozen=True)
class SequenceData:
    """One split of a task.

    Attributes:
        inputs: ``(N, S, I)`` float32 network input per step.
        targets: ``(N, S, O)`` float32 for regression, ``(N, S)`` int64 class index
            for classification (any value where ``mask`` is False).
        mask: ``(N, S)`` bool, True where the loss is given at that step.
        labels: ``(N,)`` int64, the cue or class of each sequence (for reports and
            per-cue measures).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n, s = self.inputs.shape[:2]
        if self.mask.shape != (n, s):
            raise ValueError(
                f"mask has shape {tuple(self.mask.shape)}, expected {(n, s)}"
            )
        if self.targets.shape[:2] != (n, s):
            raise ValueError(
                f"targets start with {tuple(self.targets.shape[:2])}, expected {(n, s)}"
            )
        if self.labels.shape != (n,):
            raise ValueError(
                f"labels have shape {tuple(self.labels.shape)}, expected {(n,)}"
            )

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def subset(self, index: torch.Tensor) -> SequenceData:
        """The sequences at ``index`` (a batch or a split)."""
        return SequenceData(
            self.inputs[index],
            self.targets[index],
            self.mask[index],
            self.labels[index],
        )


# evaluator(chunks, split) -> measures; see TaskData.evaluator.
Evaluator = Callable[[Sequence[nn.Module], SequenceData], dict[str, Any]]


@dataclass(frozen=True)
class TaskData:
    """A task's three splits and what its output means."""

    name: str
    kind: TaskKind
    input_size: int
    output_size: int
    seq_len: int
    train: SequenceData
    validation: SequenceData
    test: SequenceData
    # Drawing tasks draw 2-D trajectories; the ataxia measures apply to them.
    drawing: bool = False
    # Task-specific measures, called as evaluator(chunks, split) on the trained
    # cortical chunks; "metric" and "metric_name" in its result replace the
    # generic ones (captions: BLEU-4 of greedy decoding).
    evaluator: Evaluator | None = None


__all__ = ["Evaluator", "SequenceData", "TaskData", "TaskKind", "sequence_loss"]
