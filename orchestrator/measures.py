"""Ataxia measures of drawn trajectories, and accuracy for classification.

Cerebellar patients move with three telltale errors, and the drawing tasks
measure each of them on a network's drawn trajectory ``(N, S, 2)`` against its
target ``(N, S, 2)``:

- **dysmetria**: missing the goal; the mean Euclidean distance between the drawn
  and the target end points.
- **overshoot**: going past the goal; the signed distance of the drawn end point
  beyond the target end point, along the unit vector from the origin (where
  every drawing starts) to the target end. Positive overshoots, negative falls
  short. Targets that end at the origin (the stay cue of ``line``) have no
  direction and are left out; with none left the value is NaN.
- **tremor**: shaking on the way; the mean over examples and interior steps of
  the squared norm of the drawn trajectory's second difference
  ``x[t + 1] - 2 x[t] + x[t - 1]``, minus the same mean for the target. It is the
  jerkiness in excess of the target's own (templates with corners have some), so
  a perfect copy scores 0 and a drawing smoother than its target scores below 0.

All measures are plain floats, computed in float64 without gradients.
"""

from __future__ import annotations

import torch

# A target end point closer than this to the origin has no direction.
_MIN_DIRECTION = 1e-6


def _check_trajectories(drawn: torch.Tensor, target: torch.Tensor) -> None:
    if drawn.dim() != 3 or drawn.shape[-1] != 2:
        raise ValueError(f"drawn must have shape (N, S, 2), got {tuple(drawn.shape)}")
    if target.shape != drawn.shape:
        raise ValueError(
            f"target has shape {tuple(target.shape)}, expected the drawn shape "
            f"{tuple(drawn.shape)}"
        )
    if drawn.shape[0] == 0 or drawn.shape[1] == 0:
        raise ValueError(
            f"need at least one example and one step, got shape {tuple(drawn.shape)}"
        )


def _as_float64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float64)


def dysmetria(drawn: torch.Tensor, target: torch.Tensor) -> float:
    """Mean distance between drawn and target end points (see the module doc)."""
    _check_trajectories(drawn, target)
    drawn_end = _as_float64(drawn[:, -1])
    target_end = _as_float64(target[:, -1])
    return float((drawn_end - target_end).norm(dim=-1).mean())


def overshoot(drawn: torch.Tensor, target: torch.Tensor) -> float:
    """Mean signed overshoot of the end point along the target direction.

    Examples whose target ends at the origin are excluded; NaN if all are.
    """
    _check_trajectories(drawn, target)
    drawn_end = _as_float64(drawn[:, -1])
    target_end = _as_float64(target[:, -1])

    # (N,) distance from the origin to each target end
    reach = target_end.norm(dim=-1)
    keep = reach > _MIN_DIRECTION
    if not bool(keep.any()):
        return float("nan")
    direction = target_end[keep] / reach[keep, None]
    along = ((drawn_end[keep] - target_end[keep]) * direction).sum(-1)
    return float(along.mean())


def _jerk(x: torch.Tensor) -> torch.Tensor:
    # Mean squared norm of the second difference over examples and steps.
    second = x[:, 2:] - 2.0 * x[:, 1:-1] + x[:, :-2]
    return (second**2).sum(-1).mean()


def tremor(drawn: torch.Tensor, target: torch.Tensor) -> float:
    """Excess jerkiness of the drawing over its target (see the module doc).

    Raises:
        ValueError: fewer than 3 steps, so no second difference exists.
    """
    _check_trajectories(drawn, target)
    if drawn.shape[1] < 3:
        raise ValueError(
            f"tremor needs at least 3 steps for a second difference, got "
            f"{drawn.shape[1]}"
        )
    return float(_jerk(_as_float64(drawn)) - _jerk(_as_float64(target)))


def ataxia(drawn: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """All three measures: ``{"dysmetria": ..., "overshoot": ..., "tremor": ...}``."""
    return {
        "dysmetria": dysmetria(drawn, target),
        "overshoot": overshoot(drawn, target),
        "tremor": tremor(drawn, target),
    }


def ataxia_by_label(
    drawn: torch.Tensor, target: torch.Tensor, labels: torch.Tensor
) -> dict[int, dict[str, float]]:
    """:func:`ataxia` for the examples of each label, keyed by label, ascending.

    Args:
        drawn: ``(N, S, 2)``.
        target: ``(N, S, 2)``.
        labels: ``(N,)`` integer cue or class of each example.
    """
    _check_trajectories(drawn, target)
    if labels.shape != (drawn.shape[0],):
        raise ValueError(
            f"labels have shape {tuple(labels.shape)}, expected {(drawn.shape[0],)}"
        )
    result = {}
    for label in torch.unique(labels).tolist():
        rows = labels == label
        result[int(label)] = ataxia(drawn[rows], target[rows])
    return result


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of examples whose highest logit is at their label.

    Args:
        logits: ``(N, C)`` class scores.
        labels: ``(N,)`` integer classes in ``0..C-1``.

    Raises:
        ValueError: mismatched shapes, or a label outside ``0..C-1``.
    """
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(
            f"logits must have shape (N, C) with N >= 1, got {tuple(logits.shape)}"
        )
    if labels.shape != (logits.shape[0],):
        raise ValueError(
            f"labels have shape {tuple(labels.shape)}, expected {(logits.shape[0],)}"
        )
    n_classes = logits.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(
            f"labels must lie in 0..{n_classes - 1}, got values from "
            f"{int(labels.min())} to {int(labels.max())}"
        )
    predicted = logits.detach().argmax(dim=-1)
    return float((predicted == labels.to(predicted.device)).to(torch.float64).mean())
