"""Tests of the ataxia measures and accuracy on trajectories with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.measures import (
    accuracy,
    ataxia,
    ataxia_by_label,
    dysmetria,
    overshoot,
    tremor,
)


def _line_to(end: tuple[float, float], steps: int = 10) -> torch.Tensor:
    # (1, S, 2): constant speed from the origin to end
    fractions = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    return (fractions[:, None] * torch.tensor(end, dtype=torch.float64))[None]


def test_dysmetria_of_a_known_offset():
    target = _line_to((6.0, 8.0))
    drawn = target.clone()
    drawn[:, -1] += torch.tensor([3.0, -4.0], dtype=torch.float64)

    assert dysmetria(drawn, target) == pytest.approx(5.0)
    # The mean over examples: one on target, one 5 away.
    both = torch.cat([target, drawn]), torch.cat([target, target])
    assert dysmetria(*both) == pytest.approx(2.5)


def test_overshoot_is_signed_and_ignores_sideways_error():
    angle = math.radians(60)
    unit = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)
    side = torch.tensor([-unit[1], unit[0]])
    target = _line_to((10 * unit[0].item(), 10 * unit[1].item()))
    past, short = target.clone(), target.clone()
    past[:, -1] += 2.0 * unit + 1.5 * side
    short[:, -1] -= 1.0 * unit

    assert overshoot(past, target) == pytest.approx(2.0)
    assert overshoot(short, target) == pytest.approx(-1.0)
    assert dysmetria(past, target) == pytest.approx(2.5)


def test_overshoot_leaves_out_targets_at_the_origin():
    target = torch.cat([_line_to((10.0, 0.0)), torch.zeros(1, 10, 2)])
    drawn = target.clone()
    drawn[0, -1, 0] += 2.0
    drawn[1, -1] = torch.tensor([7.0, 7.0])

    assert overshoot(drawn, target) == pytest.approx(2.0)
    assert math.isnan(overshoot(drawn[1:], target[1:]))


def test_tremor_is_zero_for_a_straight_line():
    target = _line_to((3.0, -4.0))

    assert tremor(target, target) == pytest.approx(0.0, abs=1e-12)
    # Straight but at constant speed along a different line: still no tremor.
    assert tremor(_line_to((-8.0, 1.0)), target) == pytest.approx(0.0, abs=1e-12)


def test_tremor_of_a_zig_zag():
    steps = torch.arange(10, dtype=torch.float64)
    # (1, S, 2): along x at unit speed, y alternating 0, 1, 0, 1, ...
    zig_zag = torch.stack([steps, steps % 2], dim=-1)[None]
    straight = torch.stack([steps, torch.zeros(10, dtype=torch.float64)], dim=-1)[None]

    # Every second difference of y is +-2, so its squared norm is 4.
    assert tremor(zig_zag, straight) == pytest.approx(4.0)
    # Only the excess over the target counts.
    assert tremor(zig_zag, zig_zag) == pytest.approx(0.0)
    assert tremor(straight, zig_zag) == pytest.approx(-4.0)


def test_ataxia_and_per_label_measures():
    target = torch.cat([_line_to((10.0, 0.0)), _line_to((0.0, 10.0))])
    drawn = target.clone()
    drawn[0, -1, 0] += 2.0
    drawn[1, -1, 1] -= 1.0
    labels = torch.tensor([4, 1])

    overall = ataxia(drawn, target)
    assert set(overall) == {"dysmetria", "overshoot", "tremor"}
    assert overall["dysmetria"] == pytest.approx(1.5)
    assert overall["overshoot"] == pytest.approx(0.5)
    per_label = ataxia_by_label(drawn, target, labels)
    assert list(per_label) == [1, 4]
    assert per_label[4]["overshoot"] == pytest.approx(2.0)
    assert per_label[1]["overshoot"] == pytest.approx(-1.0)
    assert per_label[1]["dysmetria"] == pytest.approx(1.0)


def test_measures_accept_float32_tensors_with_gradients():
    target = _line_to((10.0, 0.0)).float()
    drawn = (target + 0.5).requires_grad_()

    assert dysmetria(drawn, target) == pytest.approx(0.5 * math.sqrt(2), rel=1e-6)


def test_measures_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"expected the drawn shape \(1, 10, 2\)"):
        ataxia(_line_to((1.0, 0.0)), torch.zeros(1, 9, 2))
    with pytest.raises(ValueError, match=r"\(N, S, 2\), got \(1, 10, 3\)"):
        dysmetria(torch.zeros(1, 10, 3), torch.zeros(1, 10, 3))
    with pytest.raises(ValueError, match="at least 3 steps.*got 2"):
        tremor(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"labels have shape \(3,\)"):
        ataxia_by_label(torch.zeros(2, 5, 2), torch.zeros(2, 5, 2), torch.zeros(3))


def test_accuracy_on_known_logits():
    logits = torch.tensor(
        [[2.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 1.0, 0.0]]
    )

    assert accuracy(logits, torch.tensor([0, 1, 2, 1])) == pytest.approx(0.75)
    assert accuracy(logits, torch.tensor([0, 1, 2, 0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="0..2, got values from 0 to 3"):
        accuracy(logits, torch.tensor([0, 1, 3, 0]))
