"""``ccdni train``, ``report`` and ``compare`` end to end on tiny runs."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import build_parser, config_from_args, main
from orchestrator.config import ConfigError


def test_train_writes_the_summary_and_curve_contract(tmp_path):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--task",
            "line",
            "--model",
            "ccrnn",
            "--epochs",
            "3",
            "--n-train",
            "100",
            "--seed",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0

    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "task",
        "model",
        "schedule",
        "chunks",
        "truncation",
        "seed",
        "steps",
        "wall_seconds",
        "train_loss",
        "validation_loss",
        "validation_metric",
        "ataxia",
    ):
        assert key in summary, key
    assert summary["task"] == "line"
    assert summary["truncation"] == 1
    assert summary["seed"] == 2
    assert summary["steps"] == 3 * 2  # 100 sequences in batches of 50, 3 epochs
    assert set(summary["ataxia"]) == {"dysmetria", "overshoot", "tremor"}

    curve = [json.loads(x) for x in (out / "curve.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in curve] == [1, 2, 3]
    assert [r["step"] for r in curve] == [2, 4, 6]
    for record in curve:
        assert {"step", "epoch", "wall_seconds", "validation_loss", "metric"} <= set(
            record
        )

    written = main(["report", str(out)])
    assert written == 0
    assert (out / "curve.png").stat().st_size > 1000
    assert (out / "trajectories.png").stat().st_size > 1000


def test_compare_writes_table_and_redraws_without_training(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--task",
        "line",
        "--models",
        "ccrnn,crnn",
        "--seeds",
        "2",
        "--epochs",
        "2",
        "--n-train",
        "50",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    table = (out / "comparison.md").read_text()
    assert "| ccrnn |" in table and "| crnn |" in table
    assert "±" in table
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 4

    (out / "comparison.md").unlink()
    assert main([*args, "--plot-only"]) == 0
    assert (out / "comparison.md").read_text() == table
    assert (out / "comparison.png").exists()


def test_task_defaults_apply_and_flags_override():
    parser = build_parser()
    args = parser.parse_args(["train", "--task", "line", "--out", "x"])
    config = config_from_args(args, model=args.model, seed=args.seed)
    assert (config.hidden_size, config.granule_width, config.truncation) == (50, 400, 1)
    assert config.batch_size == 50 and config.lr == 1e-3

    args = parser.parse_args(
        [
            "train",
            "--task",
            "line",
            "--truncation",
            "full",
            "--hidden",
            "7",
            "--out",
            "x",
        ]
    )
    config = config_from_args(args, model=args.model, seed=args.seed)
    assert config.truncation is None and config.hidden_size == 7


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--epochs", "0"], "--epochs"),
        (["--lesion", "olive@99"], "--lesion"),
        (["--lesion", "brain@1"], "--lesion"),
        (["--feedback-scale", "-1"], "--feedback-scale"),
        (["--model", "crnn", "--lesion", "cerebellum@1"], "--lesion"),
        (["--distributed", "--cerebellum-nice", "25"], "--cerebellum-nice"),
        (["--distributed", "--cerebellum-precision", "half"], "--cerebellum-precision"),
    ],
)
def test_bad_config_names_the_flag(tmp_path, capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["train", "--task", "line", "--epochs", "3", *argv, "--out", str(tmp_path)]
        )
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_cerebellum_precision_reaches_the_distributed_config():
    from orchestrator.cli import distributed_from_args
    from orchestrator.cluster import DistributedConfig

    parser = build_parser()
    parse = lambda *argv: distributed_from_args(  # noqa: E731
        parser.parse_args(["train", "--task", "line", "--out", "x", *argv])
    )
    assert parse().cerebellum_precision == "auto"
    assert parse("--cerebellum-precision", "float32").cerebellum_precision == (
        "float32"
    )
    with pytest.raises(ConfigError, match="--cerebellum-precision"):
        DistributedConfig(cerebellum_precision="half")


@pytest.mark.parametrize("command", ["train", "compare"])
def test_the_distributed_flags_default_to_what_distributed_config_does(command):
    """The flags repeat the dataclass's defaults: they must not drift apart."""
    from orchestrator.cli import distributed_from_args
    from orchestrator.cluster import DistributedConfig

    args = build_parser().parse_args([command, "--out", "x"])
    assert distributed_from_args(args) == DistributedConfig()


def test_report_on_a_directory_without_a_run_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path)])
    assert "curve.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_experiments_on_ray_refuse_resume_and_say_what_to_do(tmp_path, capsys, command):
    axis = ["--lesions", "intact"] if command == "sweep" else []
    with pytest.raises(SystemExit) as exit_info:
        main(
            [command, "--task", "line", "--models", "ccrnn", "--seeds", "1", *axis]
            + ["--distributed", "--resume", str(tmp_path), "--out", str(tmp_path)]
        )
    assert exit_info.value.code == 2
    assert "without --resume" in capsys.readouterr().err
    assert not list(tmp_path.rglob("summary.json"))  # nothing trained
