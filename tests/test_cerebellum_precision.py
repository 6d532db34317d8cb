"""The cerebellum in bfloat16: arithmetic under autocast with float32 weights,
the same learning, and how ``auto`` resolves. (The chunks' bfloat16 traffic to
it, and their learning with it: tests/test_schedules.py.)"""

from __future__ import annotations

import pytest
import torch

import cerebellum_service.config as config_module
from cerebellum_service.config import (
    CerebellumConfig,
    ConfigError,
    resolve_precision,
)
from cerebellum_service.learning import (
    ActivityKey,
    LocalCerebellum,
    Observation,
    Query,
)
from tests.service_helpers import ZONE, zone_config


def regression_cerebellum(compute_dtype: torch.dtype) -> LocalCerebellum:
    raw = {**zone_config(in_features=24, out_features=12, granule_width=64)}
    config = CerebellumConfig.from_dict(
        {**raw, "compute_dtype": str(compute_dtype).removeprefix("torch.")}
    )
    return config.build()


def learn_a_linear_map(cerebellum: LocalCerebellum, updates: int) -> float:
    """Relative error of predictions of ``x @ W`` after ``updates`` batches."""
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(24, 12, generator=generator) / 24**0.5
    for batch in range(updates):
        x = torch.randn(64, 24, generator=generator)
        key = ActivityKey(batch, 0)
        cerebellum.predict([Query(ZONE, key, x)])
        cerebellum.observe([Observation(ZONE, key, x @ weights)])
        cerebellum.update()
    return cerebellum.stats[ZONE].last_relative_error


def test_bfloat16_arithmetic_learns_as_float32_does():
    errors = {
        dtype: learn_a_linear_map(regression_cerebellum(dtype), 300)
        for dtype in (torch.float32, torch.bfloat16)
    }

    assert errors[torch.float32] < 0.05  # 1 for a cerebellum that learns nothing
    assert errors[torch.bfloat16] < 0.05
    assert errors[torch.bfloat16] == pytest.approx(errors[torch.float32], abs=0.005)


def test_bfloat16_keeps_float32_weights_and_answers_in_the_askers_dtype():
    cerebellum = regression_cerebellum(torch.bfloat16)
    learn_a_linear_map(cerebellum, 20)
    zone = cerebellum.zones[ZONE]
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(2))

    (answer,) = cerebellum.predict([Query(ZONE, ActivityKey(99, 0), x)])
    (half,) = cerebellum.predict([Query(ZONE, ActivityKey(99, 1), x.bfloat16())])
    with torch.no_grad():
        exact = zone(x)

    assert all(p.dtype == torch.float32 for p in zone.parameters())
    state = cerebellum.optimizer.state[zone.purkinje.weight]
    assert state["exp_avg"].dtype == torch.float32
    assert answer.dtype == torch.float32 and half.dtype == torch.bfloat16
    # Computed in bfloat16: near the float32 product, but not equal to it.
    assert not torch.equal(answer, exact)
    torch.testing.assert_close(answer, exact, rtol=0.05, atol=0.02)
    assert cerebellum.storage_dtype(ZONE) == torch.bfloat16
    assert regression_cerebellum(torch.float32).storage_dtype(ZONE) == torch.float32


def test_compute_dtype_is_checked_and_kept_in_the_config():
    raw = {**zone_config(), "compute_dtype": "bfloat16"}
    config = CerebellumConfig.from_dict(raw)

    assert config.build().compute_dtype == torch.bfloat16
    assert CerebellumConfig.from_dict(config.to_dict()) == config
    assert CerebellumConfig.from_dict(zone_config()).compute_dtype == "float32"
    for bad in ("float16", 16, None):
        with pytest.raises(ConfigError) as caught:
            CerebellumConfig.from_dict({**zone_config(), "compute_dtype": bad})
        assert caught.value.key == "compute_dtype"
    with pytest.raises(ValueError, match="compute_dtype"):
        LocalCerebellum(config.build().zones, compute_dtype=torch.float16)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch, native):
    monkeypatch.setattr(config_module, "native_cpu_bfloat16", lambda: native)

    assert resolve_precision("auto") == ("bfloat16" if native else "float32")
    assert resolve_precision("float32") == "float32"
    assert resolve_precision("bfloat16") == "bfloat16"
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("half")


def test_a_restored_actor_keeps_its_own_precision_and_takes_the_weights(tmp_path):
    from cerebellum_service.actor import CerebellumActor

    def actor(precision: str) -> CerebellumActor:
        return CerebellumActor(
            {
                **zone_config(),
                "token": "precision-test-token",
                "precision": precision,
                "metrics": False,
                "batch_scheduling": False,
                "host": "127.0.0.1",
            }
        )

    saved, restored = actor("bfloat16"), actor("float32")
    try:
        original = saved.servicer.cerebellum
        with torch.no_grad():
            for parameter in original.zones.parameters():
                parameter.add_(0.25)
        saved.save_checkpoint(str(tmp_path), 3)
        restored.restore(str(tmp_path), 3)

        assert saved.precision() == "bfloat16"
        assert restored.precision() == "float32"  # this actor's, not the file's
        assert restored.servicer.cerebellum.compute_dtype == torch.float32
        for a, b in zip(
            original.zones.parameters(),
            restored.servicer.cerebellum.zones.parameters(),
            strict=True,
        ):
            assert torch.equal(a, b)
    finally:
        saved.shutdown()
        restored.shutdown()
