"""Tests of the lesion switches, the distributed-lesion comparison and the figures."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator import figures, lesions
from orchestrator.cli import main
from orchestrator.config import Lesion, for_task
from orchestrator.tasks.registry import load_task
from orchestrator.trainer import Trainer


@pytest.fixture(scope="module")
def task():
    return load_task("line", seed=0, n_train=100)


def small(**changes):
    values = dict(model="ccrnn", hidden_size=8, granule_width=16, epochs=3)
    values.update(changes)
    return for_task("line", **values)


class Counting:
    """Counts a cerebellum's predict, observe and update calls."""

    def __init__(self, cerebellum) -> None:
        self.calls = {"predict": 0, "observe": 0, "update": 0}
        for name in self.calls:
            real = getattr(cerebellum, name)
            setattr(cerebellum, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def wrapped(*args, **kwargs):
            self.calls[name] += 1
            return real(*args, **kwargs)

        return wrapped


def zone_parameters(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.cerebellum.zones.parameters()]


def cortex_parameters(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for c in trainer.chunks for p in c.parameters()]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_after_a_cerebellar_lesion_no_prediction_is_asked_for(task):
    trainer = Trainer(small(lesions=(Lesion("cerebellum", 1),)), task)
    counts = Counting(trainer.cerebellum)
    trainer.train_epoch()
    assert counts.calls["predict"] == 2 * 9  # 2 batches, 9 window ends each
    assert counts.calls["update"] > 0
    zones, cortex = zone_parameters(trainer), cortex_parameters(trainer)
    snapshot = dict(counts.calls)

    trainer.train_epoch()
    trainer.train_epoch()
    assert trainer.predictor is None
    assert counts.calls == snapshot  # no predict, observe or update at all
    assert same(zone_parameters(trainer), zones)
    assert not same(cortex_parameters(trainer), cortex)  # the cortex still learns


def test_after_an_olive_lesion_predictions_go_on_but_zones_stop_learning(task):
    trainer = Trainer(small(lesions=(Lesion("olive", 1),)), task)
    counts = Counting(trainer.cerebellum)
    trainer.train_epoch()
    zones = zone_parameters(trainer)
    assert not same(zones, zone_parameters(Trainer(small(), task)))  # it learned
    predicted = counts.calls["predict"]

    trainer.train_epoch()
    assert trainer.cerebellum.frozen
    assert counts.calls["predict"] == predicted + 2 * 9
    assert same(zone_parameters(trainer), zones)
    assert trainer.cerebellum.update() == {}  # nothing to learn from
    # The frozen zones still predict something (not the zero of a new cerebellum).
    zone = trainer.cerebellum.zone("state_0")
    assert zone(torch.randn(4, zone.in_features)).abs().sum() > 0


def test_lesions_change_nothing_before_their_epoch(task):
    losses = []
    for lesion in ((), (Lesion("cerebellum", 1),), (Lesion("olive", 1),)):
        trainer = Trainer(small(lesions=lesion), task)
        losses.append([trainer.train_epoch() for _ in range(3)])
    assert losses[0][0] == losses[1][0] == losses[2][0]
    # Without predictions the first update of epoch 1 already differs ...
    assert losses[0][1] != losses[1][1]
    # ... while frozen zones first predict differently from intact ones after
    # the intact cerebellum's next update, which shows in the cortex one update on.
    assert losses[0][2] != losses[2][2]


def test_a_lesioned_ccrnn_follows_the_crnn_rule(task):
    lesioned = Trainer(small(lesions=(Lesion("cerebellum", 1),)), task)
    lesioned.train_epoch()
    lesioned.apply_lesions(1)
    crnn = Trainer(small(model="crnn"), task)
    for mine, theirs in zip(lesioned.chunks, crnn.chunks):
        theirs.load_state_dict(mine.state_dict())
    batch = lesioned.batches.sequences(5)
    a = lesioned.run_batch(batch, step=False).loss
    b = crnn.run_batch(batch, step=False).loss
    assert a == pytest.approx(b, abs=1e-7)
    for mine, theirs in zip(lesioned.chunks, crnn.chunks):
        for p, q in zip(mine.parameters(), theirs.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-7)


def test_a_lesion_at_any_step_matches_the_epoch_lesion(task):
    config = small()
    per_step = lesions.in_process_losses(config, task, steps=4, lesion_step=2)
    trainer = Trainer(small(lesions=(Lesion("cerebellum", 1),)), task)
    epochs = [trainer.train_epoch(), trainer.train_epoch()]
    assert epochs[0] == pytest.approx(sum(per_step[:2]) / 2, abs=1e-9)
    assert epochs[1] == pytest.approx(sum(per_step[2:]) / 2, abs=1e-9)


def test_differences_split_at_the_first_degraded_step():
    record = {
        "first_degraded_step": 2,
        "distributed": [1.0, 2.0, 3.0, 4.0],
        "in_process_lesioned": [1.0, 2.5, 3.0, 4.25],
        "in_process_intact": [1.0, 2.5, 5.0, 1.0],
    }
    assert lesions.differences(record) == {
        "before_vs_lesioned": 0.5,
        "before_vs_intact": 0.5,
        "after_vs_lesioned": 0.25,
        "after_vs_intact": 3.0,
    }


def test_lesion_figures_and_table_from_a_stored_sweep(tmp_path):
    runs = tmp_path / "runs"
    code = main(
        ["sweep", "--task", "line", "--epochs", "3", "--n-train", "50", "--hidden",
         "4", "--granule-width", "8", "--no-progress", "--seeds", "2", "--lesions",
         "intact,cerebellum@1,olive@1", "--out", str(runs / "lesions-line")]
    )  # fmt: skip
    assert code == 0
    tables = figures.draw_all(runs, tmp_path / "figures")
    for name in ("lesions.png", "ataxia.png", "trajectories.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000
    rows = tables["lesions-line"].splitlines()
    assert rows[0].startswith("`line`, 2 seeds; lesions at epoch 1")
    assert [r.split(" | ")[0] for r in rows[4:]] == [
        "| ccrnn",
        "| crnn",
        "| cerebellum@1",
        "| olive@1",
    ]
    assert (runs / "tables" / "lesions-line.md").read_text().strip() == tables[
        "lesions-line"
    ]
    # Every run's trajectories hold each of the seven cues.
    index = json.loads((runs / "lesions-line" / "sweep.json").read_text())
    drawn = json.loads(
        (
            runs / "lesions-line" / index["runs"][0]["dir"] / "trajectories.json"
        ).read_text()
    )
    assert sorted(drawn) == [str(k) for k in range(7)]


def test_distributed_lesion_schedule_combines_lesions_as_the_trainer_does():
    from orchestrator.cluster import lesion_at, lesion_steps
    from orchestrator.config import Lesion

    steps = lesion_steps(
        [Lesion("olive", 2), Lesion("cerebellum", 4), Lesion("olive", 6)], 10
    )
    assert steps == {20: "olive", 40: "cerebellum", 60: "olive"}
    assert [lesion_at(steps, s) for s in (0, 19, 20, 39, 40, 60, 99)] == [
        None,
        None,
        "olive",
        "olive",
        "cerebellum",
        "cerebellum",  # a later olive lesion does not bring predictions back
        "cerebellum",
    ]
    both = lesion_steps([Lesion("cerebellum", 3), Lesion("olive", 3)], 5)
    assert both == {15: "cerebellum"}  # no predictions is the stronger lesion


def test_a_resumed_run_keeps_only_its_past_evaluations(tmp_path):
    import json

    from orchestrator.cluster import _curve_until

    lines = [json.dumps({"step": s, "validation_loss": 1.0 / s}) for s in (8, 16, 24)]
    (tmp_path / "curve.jsonl").write_text("\n".join(lines) + "\n")
    assert _curve_until(tmp_path, 16) == lines[:2]
    assert _curve_until(tmp_path / "elsewhere", 16) == []
