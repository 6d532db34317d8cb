"""Tests of ``ccdni sweep``: axes, run directories, resuming and --plot-only."""

from __future__ import annotations

import json

import pytest

from orchestrator import sweep
from orchestrator.cli import main
from orchestrator.config import ConfigError, TrainConfig, for_task
from orchestrator.trainer import Trainer

SMALL = [
    "--task",
    "line",
    "--epochs",
    "2",
    "--n-train",
    "50",
    "--hidden",
    "4",
    "--granule-width",
    "8",
    "--no-progress",
]


def test_parse_values_of_each_axis():
    assert sweep.parse_values(sweep.AXES["truncation"], "1, 2,full") == [1, 2, "full"]
    assert sweep.parse_values(sweep.AXES["inputs_per_granule"], "4,all") == [4, "all"]
    assert sweep.parse_values(sweep.AXES["lesion"], "intact,olive@3") == [
        "intact",
        "olive@3",
    ]
    for axis, text in (
        ("truncation", "0"),
        ("truncation", "two"),
        ("granule_width", "-5"),
        ("lesion", "spleen@2"),
        ("truncation", ","),
    ):
        with pytest.raises(ConfigError, match=sweep.AXES[axis].flag):
            sweep.parse_values(sweep.AXES[axis], text)


def test_axes_set_the_configuration():
    base = for_task("line", epochs=5)
    assert sweep.AXES["truncation"].apply(base, "full") == {"truncation": None}
    assert sweep.AXES["inputs_per_granule"].apply(base, "all") == {
        "inputs_per_granule": None
    }
    lesion = sweep.AXES["lesion"].apply(base, "cerebellum@2")["lesions"][0]
    assert (lesion.kind, lesion.epoch) == ("cerebellum", 2)
    assert sweep.applies(sweep.AXES["lesion"], "olive@2", "crnn") is False
    assert sweep.applies(sweep.AXES["lesion"], "intact", "crnn") is True
    assert sweep.applies(sweep.AXES["truncation"], 3, "crnn") is True


def test_truncation_sweep_writes_runs_table_and_figure(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", *SMALL, "--truncations", "2,full", "--seeds", "2",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    index = json.loads((out / "sweep.json").read_text())
    assert index["axis"] == "truncation" and index["values"] == [2, "full"]
    assert len(index["runs"]) == 2 * 2 * 2
    for run in index["runs"]:
        summary = json.loads((out / run["dir"] / "summary.json").read_text())
        assert summary["truncation"] == (10 if run["value"] == "full" else 2)
        assert summary["model"] == run["model"] and summary["seed"] == run["seed"]
        assert summary["epochs"] == 2
    table = (out / "sweep.md").read_text()
    assert "| 2 | ccrnn | 2 |" in table and "| full | crnn | 2 |" in table
    assert (out / "sweep.png").stat().st_size > 1000
    assert "dysmetria" in capsys.readouterr().out


def test_done_runs_are_not_trained_again_and_plot_only_never_trains(
    tmp_path, monkeypatch
):
    out = tmp_path / "sweep"
    args = ["sweep", *SMALL, "--fan-ins", "2,all", "--models", "ccrnn", "--seeds", "1"]
    assert main([*args, "--out", str(out)]) == 0
    before = (out / "sweep.md").read_text()

    calls = []
    real_fit = Trainer.fit

    def counting_fit(self, *a, **k):
        calls.append(self.config.inputs_per_granule)
        return real_fit(self, *a, **k)

    monkeypatch.setattr(Trainer, "fit", counting_fit)
    assert main([*args, "--out", str(out)]) == 0
    assert calls == []  # same configuration: both runs reused
    assert main(["sweep", "--plot-only", "--out", str(out)]) == 0
    assert calls == []
    assert (out / "sweep.md").read_text() == before

    # A setting that stored runs predate, left at its default, still matches.
    summary_path = out / "inputs_per_granule-2" / "ccrnn" / "seed0" / "summary.json"
    summary = json.loads(summary_path.read_text())
    del summary["config"]["feedback_scale"]
    summary_path.write_text(json.dumps(summary))
    assert main([*args, "--out", str(out)]) == 0
    assert calls == []

    # A new value trains only its own run; fan-in 2 is reused.
    assert main([*args, "--fan-ins", "2,3", "--out", str(out)]) == 0
    assert calls == [3]


def test_lesion_sweep_runs_the_reference_models_only_intact(tmp_path):
    out = tmp_path / "lesions"
    code = main(["sweep", *SMALL, "--lesions", "intact,olive@1", "--seeds", "1",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [(r["value"], r["model"]) for r in runs] == [
        ("intact", "ccrnn"),
        ("intact", "crnn"),
        ("olive@1", "ccrnn"),
    ]
    summary = json.loads((out / runs[2]["dir"] / "summary.json").read_text())
    assert summary["config"]["lesions"] == ["olive@1"]


def test_sweep_needs_exactly_one_axis(tmp_path, capsys):
    for extra in ([], ["--truncations", "1", "--granule-widths", "4"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["sweep", *SMALL, *extra, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
        assert "exactly one of --truncations" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", *SMALL, "--lesions", "olive@5", "--out", str(tmp_path)])
    assert "--lesion olive@5 is at or after the last epoch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "--plot-only", "--out", str(tmp_path / "none")])
    assert "sweep.json not found" in capsys.readouterr().err


def test_a_stored_ray_run_is_reused_only_for_the_precision_it_was_asked(tmp_path):
    from orchestrator.cluster import DistributedConfig
    from orchestrator.sweep import finished_run

    config = TrainConfig(task="line", model="ccrnn")
    summary = {"schedule": "decoupled", "steps": None, "config": config.to_dict()}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    asked = lambda precision: DistributedConfig(cerebellum_precision=precision)  # noqa: E731

    # Stored before the setting existed: the cerebellum computed in float32.
    assert finished_run(tmp_path, config, asked("float32"))
    assert not finished_run(tmp_path, config, asked("auto"))
    summary["cerebellum_precision_asked"] = "auto"
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert finished_run(tmp_path, config, asked("auto"))
    assert not finished_run(tmp_path, config, asked("bfloat16"))
