"""Tests of the representation measures on inputs whose answers are known."""

from __future__ import annotations

import json
import math

import pytest
import torch

from orchestrator import representations as rep
from orchestrator.config import ConfigError, TrainConfig
from orchestrator.trainer import Trainer
from tests.helpers import random_task, true_future_feedback


def test_pearson_of_affine_copies_and_a_hand_computed_pair():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rep.pearson(x, 3 * x + 1) == pytest.approx(1.0)
    assert rep.pearson(x, -0.5 * x + 7) == pytest.approx(-1.0)
    # centred: (-1.5, -.5, .5, 1.5) and (-1, -1, 1, 1): 4 / (sqrt(5) * 2)
    y = torch.tensor([0.0, 0.0, 2.0, 2.0])
    assert rep.pearson(x, y) == pytest.approx(4 / (math.sqrt(5) * 2))
    assert math.isnan(rep.pearson(x, torch.zeros(4)))
    with pytest.raises(ValueError, match="shapes differ"):
        rep.pearson(x, torch.zeros(3))


def test_cosine_is_not_centred():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert rep.cosine(a, b) == pytest.approx(1 / 2)
    assert rep.cosine(a, a + 10) != pytest.approx(1.0)
    assert math.isnan(rep.cosine(a, torch.zeros(2, 2)))


def test_population_correlation_of_copies_and_opposites():
    a = torch.randn(50, generator=torch.Generator().manual_seed(0))
    # cells a, a, -a: pair correlations 1, -1, -1
    activity = torch.stack([a, a, -a], dim=1)
    assert rep.population_correlation(activity) == pytest.approx(-1 / 3)
    # a silent cell is left out; scaled copies correlate perfectly
    activity = torch.stack([a, 2 * a + 1, torch.zeros(50)], dim=1)
    assert rep.population_correlation(activity) == pytest.approx(1.0)
    assert math.isnan(rep.population_correlation(torch.stack([a, a * 0], 1)))


def test_population_correlation_of_independent_cells_is_near_zero():
    activity = torch.randn(4000, 30, generator=torch.Generator().manual_seed(1))
    assert abs(rep.population_correlation(activity)) < 0.01
    # a shared component of equal variance gives every pair correlation 1/2
    shared = torch.randn(4000, 1, generator=torch.Generator().manual_seed(2))
    assert rep.population_correlation(activity + shared) == pytest.approx(0.5, abs=0.03)


def test_active_fraction_counts_cells_that_ever_fire():
    activity = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    assert rep.active_fraction(activity) == 0.5


@pytest.mark.parametrize("chunks, truncation", [(1, 2), (2, 3)])
def test_exact_future_feedback_matches_full_bptt(chunks, truncation):
    config = TrainConfig(
        model="ccrnn", truncation=truncation, chunks=chunks, hidden_size=6, epochs=1
    )
    task = random_task(seq_len=8, inputs=3, outputs=2, n=5)
    trainer = Trainer(config, task)
    batch = task.validation
    expected = true_future_feedback(trainer.chunks, batch, task.kind, truncation)
    states, feedback = rep.exact_future_feedback(
        trainer.chunks, batch, task.kind, truncation
    )
    windows = len(range(0, 8, truncation))
    assert [len(f) for f in feedback] == [windows - 1] * chunks
    for (window, chunk), grad in expected.items():
        assert torch.allclose(feedback[chunk][window], grad * len(batch), atol=1e-6)
    # no parameter gradients are left behind
    assert all(p.grad is None for c in trainer.chunks for p in c.parameters())
    assert states[0][0].shape == (5, 2 * 6)


def test_a_new_cerebellum_predicts_nothing_then_learns_to_correlate():
    config = TrainConfig(
        model="ccrnn", truncation=1, hidden_size=8, granule_width=64, epochs=1
    )
    task = random_task(seq_len=6, inputs=3, outputs=2, n=40)
    trainer = Trainer(config, task)
    probe = rep.probe_split(task.validation, 20)
    probed = rep.probe_network(trainer, probe)
    arrays = probed["state_0"]
    assert arrays["activity"].shape == (5, 20, 16)
    assert arrays["granule"].shape == (5, 20, 64)
    assert torch.equal(arrays["predicted"], torch.zeros_like(arrays["true"]))
    before = rep.measure(probed)["state_0"]
    assert before["feedback_correlation"] is None  # zero prediction: undefined
    assert before["feedback_norm_ratio"] == 0.0

    for _ in range(30):
        trainer.train_epoch()
    after = rep.measure(rep.probe_network(trainer, probe))["state_0"]
    # Random targets are hard to predict; what matters is that it is no longer
    # zero and points the right way (a random predictor scores about 0).
    assert after["feedback_correlation"] > 0.05
    assert 0.0 < after["granule_active"] <= 1.0


def test_measure_of_known_predictions():
    g = torch.Generator().manual_seed(3)
    true = torch.randn(4, 30, 10, generator=g)
    granule = torch.relu(torch.randn(4, 30, 50, generator=g))
    granule[..., :10] = 0.0  # ten silent cells
    probed = {
        "state_0": {
            "activity": torch.randn(4, 30, 10, generator=g),
            "true": true,
            "predicted": 0.5 * true,
            "granule": granule,
        }
    }
    zone = rep.measure(probed)["state_0"]
    assert zone["feedback_correlation"] == pytest.approx(1.0)
    assert zone["feedback_cosine"] == pytest.approx(1.0)
    assert zone["feedback_norm_ratio"] == pytest.approx(0.5)
    assert zone["granule_active"] == pytest.approx(0.8)
    assert abs(zone["granule_correlation"]) < 0.1
    probed["state_0"]["predicted"] = -true
    assert rep.measure(probed)["state_0"]["feedback_correlation"] == pytest.approx(-1)


def test_crnn_has_nothing_to_probe():
    task = random_task()
    trainer = Trainer(TrainConfig(model="crnn", hidden_size=4, epochs=1), task)
    with pytest.raises(ValueError, match="ccrnn"):
        rep.probe_network(trainer, task.validation)


def test_records_and_plot_only_round_trip(tmp_path):
    # Two fake seeds of records, and their curves, as a run would leave them.
    for seed in range(2):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        lines = []
        for epoch in range(4):
            zone = {key: 0.1 * epoch + seed for key, _ in rep.MEASURES}
            zone["feedback_correlation"] = None if epoch == 0 else 0.2 * epoch
            lines.append(json.dumps({"epoch": epoch, "zones": {"state_0": zone}}))
        (run / "representations.jsonl").write_text("\n".join(lines) + "\n")
        curve = [{"epoch": e, "validation_loss": 1.0 / (e + 1)} for e in range(1, 4)]
        (run / "curve.jsonl").write_text("\n".join(json.dumps(r) for r in curve))
    table = rep.write_representations(tmp_path)
    assert (tmp_path / "representations.png").exists()
    row = next(x for x in table.splitlines() if x.startswith("| corr(predicted"))
    assert row.split(" | ")[1] == "–"  # epoch 0 has no prediction
    assert "0.600 ± 0.00" in row  # epoch 3 of both seeds
    granule = next(x for x in table.splitlines() if x.startswith("| granule pop"))
    assert "0.800 ± 0.71" in granule  # 0.3 and 1.3: mean 0.8, sd 0.707


def _finished_seed(run_dir, config: TrainConfig) -> None:
    run_dir.mkdir()
    summary = {"schedule": "in-process", "config": config.to_dict()}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "probe.npz").write_bytes(b"done")


def test_recorded_seeds_are_kept_and_missing_ones_run(tmp_path, monkeypatch):
    config = TrainConfig(task="line", model="ccrnn")
    _finished_seed(tmp_path / "seed0", config.replace(seed=0))
    (tmp_path / "seed1").mkdir()  # interrupted: records but no probe file
    ran = []
    monkeypatch.setattr(
        rep, "record_seed", lambda config, run_dir, progress: ran.append(config.seed)
    )
    rep.run_representations(config, 3, tmp_path)
    assert ran == [1, 2]


def test_a_recorded_seed_of_another_configuration_is_refused(tmp_path, monkeypatch):
    config = TrainConfig(task="line", model="ccrnn")
    _finished_seed(tmp_path / "seed0", config.replace(seed=0))
    ran = []
    monkeypatch.setattr(
        rep, "record_seed", lambda config, run_dir, progress: ran.append(config.seed)
    )
    longer = config.replace(epochs=config.epochs + 1)
    with pytest.raises(ConfigError, match="--out.*seed0.*another configuration"):
        rep.run_representations(longer, 2, tmp_path)
    assert ran == []  # nothing trained, nothing overwritten
    assert (tmp_path / "seed0" / "probe.npz").read_bytes() == b"done"
