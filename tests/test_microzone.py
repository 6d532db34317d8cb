"""The microzone's hand-written passes against autograd, and the updates they make."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cerebellum_service.learning import ActivityKey, LocalCerebellum, Observation, Query
from cerebellum_service.network import Microzone

SHAPES = {
    "dense": dict(granule_width=48),
    "sparse": dict(granule_width=48, inputs_per_granule=5),
    "two granule layers": dict(granule_width=32, granule_layers=2),
    "context": dict(granule_width=48, context_size=3),
}


def zone_and_data(shape: str, seed: int = 0):
    """A microzone with a non-zero Purkinje layer, and activity, context, target."""
    torch.manual_seed(seed)
    zone = Microzone(12, 7, seed=seed, **SHAPES[shape])
    torch.nn.init.normal_(zone.purkinje.weight, std=0.3)
    torch.nn.init.normal_(zone.purkinje.bias, std=0.1)
    rows = 40
    activity = torch.randn(rows, 12)
    context = torch.randn(rows, zone.context_size) if zone.context_size else None
    return zone, activity, context, torch.randn(rows, 7)


def autograd_gradients(zone, activity, context, target, dtype):
    zone.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        prediction = zone(activity, context)
    loss = F.mse_loss(prediction.to(target.dtype), target)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in zone.named_parameters()}
    zone.zero_grad(set_to_none=True)
    return prediction.detach(), float(loss.detach()), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_mse_backward_equals_autograd_in_the_zones_dtype(shape, dtype):
    zone, activity, context, target = zone_and_data(shape)
    zone.to(dtype)
    activity, target = activity.to(dtype), target.to(dtype)
    context = None if context is None else context.to(dtype)
    prediction, loss, expected = autograd_gradients(
        zone, activity, context, target, dtype
    )
    tight = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {}

    trace = zone.infer(activity, context)
    got_loss = zone.mse_backward(trace, target)

    torch.testing.assert_close(trace.prediction, prediction, **tight)
    assert got_loss == pytest.approx(loss, rel=1e-6 if tight else 1e-12)
    for name, p in zone.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype, name
        torch.testing.assert_close(p.grad, expected[name], **tight)
    if shape == "sparse":
        # No gradient reaches a connection that does not exist.
        absent = zone.granule[0].connectivity == 0
        assert absent.any() and torch.all(zone.granule[0].weight.grad[absent] == 0)


@pytest.mark.parametrize("shape", SHAPES)
def test_mse_backward_in_bfloat16_matches_autocast(shape):
    zone, activity, context, target = zone_and_data(shape, seed=1)
    prediction, loss, expected = autograd_gradients(
        zone, activity, context, target, torch.bfloat16
    )

    trace = zone.infer(
        activity.bfloat16(),
        None if context is None else context.bfloat16(),
        torch.bfloat16,
    )
    got_loss = zone.mse_backward(trace, target.bfloat16())

    assert trace.prediction.dtype == torch.bfloat16
    torch.testing.assert_close(trace.prediction, prediction, rtol=0.02, atol=0.02)
    assert got_loss == pytest.approx(loss, rel=0.02)
    for name, p in zone.named_parameters():
        assert p.grad.dtype == torch.float32, name  # the weights' own dtype
        scale = expected[name].abs().max()
        torch.testing.assert_close(
            p.grad / scale, expected[name] / scale, rtol=0, atol=0.03
        )


def learning_cerebellum() -> tuple[LocalCerebellum, Microzone]:
    zone, *_ = zone_and_data("dense", seed=2)
    return LocalCerebellum({"z": zone}, lr=0.05), zone


def test_an_update_learns_from_a_forward_pass_with_the_weights_of_now():
    cerebellum, zone = learning_cerebellum()
    generator = torch.Generator().manual_seed(3)
    first, other = (torch.randn(16, 12, generator=generator) for _ in range(2))
    feedback = torch.randn(16, 7, generator=generator)
    (made,) = cerebellum.predict([Query("z", ActivityKey(0, 0), first)])

    # Another example's update moves the weights before the feedback arrives.
    cerebellum.predict([Query("z", ActivityKey(0, 1), other)])
    cerebellum.observe([Observation("z", ActivityKey(0, 1), feedback)])
    cerebellum.update()
    now = zone.infer(first).prediction
    cerebellum.observe([Observation("z", ActivityKey(0, 0), feedback)])
    losses = cerebellum.update()

    assert not torch.allclose(now, made)
    assert losses["z"] == pytest.approx(float(F.mse_loss(now, feedback)), rel=1e-6)
    assert losses["z"] != pytest.approx(float(F.mse_loss(made, feedback)), rel=1e-3)


def test_feedback_with_its_own_activity_learns_from_a_prediction_made_now():
    cerebellum, zone = learning_cerebellum()
    generator = torch.Generator().manual_seed(4)
    activity = torch.randn(16, 12, generator=generator)
    feedback = torch.randn(16, 7, generator=generator)
    expected_loss = float(F.mse_loss(zone(activity).detach(), feedback))
    before = zone.purkinje.weight.detach().clone()

    cerebellum.observe([Observation("z", ActivityKey(5, 0), feedback, activity)])
    losses = cerebellum.update()

    assert losses["z"] == pytest.approx(expected_loss, rel=1e-6)
    assert not torch.equal(zone.purkinje.weight, before)


def test_float32_feedback_to_a_bfloat16_cerebellum_is_not_rounded_first():
    zone, activity, _, target = zone_and_data("dense", seed=6)
    trace = zone.infer(activity.bfloat16(), None, torch.bfloat16)
    exact = float(F.mse_loss(trace.prediction.float(), target))

    assert zone.mse_backward(trace, target) == pytest.approx(exact, rel=1e-6)


def test_an_update_with_no_rows_in_one_zone_still_teaches_the_others():
    first, _, _, _ = zone_and_data("dense", seed=7)
    second, activity, _, feedback = zone_and_data("dense", seed=8)
    cerebellum = LocalCerebellum({"empty": first, "z": second})
    before = second.purkinje.weight.detach().clone()

    cerebellum.observe(
        [
            Observation("empty", ActivityKey(0, 0), feedback[:0], activity[:0]),
            Observation("z", ActivityKey(0, 0), feedback, activity),
        ]
    )
    losses = cerebellum.update()

    assert losses["empty"] != losses["empty"]  # NaN: no rows, no error
    assert losses["z"] > 0 and not torch.equal(second.purkinje.weight, before)
    assert torch.all(first.purkinje.weight.grad == 0)
