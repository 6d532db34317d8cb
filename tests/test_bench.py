"""ccdni bench: the quick run end to end, the PyTorch baseline's math, the summaries."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

from orchestrator import bench
from orchestrator.baselines.torch_pipeline import (
    TorchPipeline,
    pack_targets,
    pad_rows,
    unpack_targets,
)
from orchestrator.batches import BatchStream
from orchestrator.config import ConfigError, TrainConfig
from orchestrator.tasks.registry import load_task
from orchestrator.trainer import Trainer
from tests.helpers import thread_policies

# Contenders that do the same arithmetic (truncated BPTT, exact feedback between
# chunks, one update per batch) and so must learn the same, step for step.
EXACT = ("locked", "pipelined", "torch-gpipe", "torch-1f1b")


@pytest.mark.usefixtures("ray_cluster")
def test_quick_bench_runs_every_schedule_and_writes_a_valid_bench_json(
    tmp_path, caplog
):
    from orchestrator.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--out", str(out)]) == 0

    result = json.loads((out / "bench.json").read_text())
    jsonschema.validate(result, bench.BENCH_SCHEMA)
    records = {**result["schedules"], **result["baselines"]}
    assert sorted(records) == sorted(bench.ALL_SCHEDULES)
    quick = bench.QUICK
    for name, record in records.items():
        assert len(record["runs"]) == quick["repeats"], name
        assert all(r["steps"] == quick["steps"] for r in record["runs"]), name
        assert record["examples"] == quick["steps"] * quick["batch_size"]
        assert set(record["actors"]) >= {"chunk-0", "chunk-1"}
    # A run still above the target after its measured steps chased it, up to
    # --target-steps; locked sets the target and never chases.
    target = result["target_loss"] * (1 + 1e-5)
    measured_end = quick["steps"] // quick["eval_every"]
    for name, record in records.items():
        assert record["time_to_target"]["max_steps"] == 4 * quick["steps"]
        for run in record["runs"]:
            curve = run["curve"]
            assert curve[-1]["step"] == quick["steps"] + run["chase_steps"]
            above = curve[measured_end]["validation_loss"] > target
            assert (run["chase_steps"] > 0) == (above and name != "locked"), name
    # What receiving cost each chunk's server: locked's chunks both receive
    # (activity up, feedback down), decoupled's first chunk nothing (its
    # feedback is predicted), and the PyTorch stages do not say.
    receive = {name: r["receive_seconds_per_step"] for name, r in records.items()}
    assert receive["locked"]["chunk-0"] > 0 and receive["locked"]["chunk-1"] > 0
    assert receive["decoupled"]["chunk-0"] == 0 < receive["decoupled"]["chunk-1"]
    assert receive["torch-gpipe"] is None and receive["torch-1f1b"] is None
    assert records["decoupled"]["uses_cerebellum"]
    assert "cerebellum" in records["decoupled"]["actors"]
    assert not records["locked"]["uses_cerebellum"]
    assert records["locked"]["speedup"] == pytest.approx(1.0)
    # Waiting contenders were stopped, here on CPUs in a cluster of this machine.
    for placement in result["placement"].values():
        assert placement["parked"] == (not placement["gpus"] and not placement["fresh"])
    assert "was not started by this process" not in caplog.text  # all were ours

    # Every contender starts from the same weights and sees the same batches;
    # those doing the same arithmetic stay together after training.
    curves = {name: r["runs"][0]["curve"] for name, r in records.items()}
    initial = {name: c[0]["validation_loss"] for name, c in curves.items()}
    assert max(initial.values()) - min(initial.values()) < 1e-6
    for name in EXACT:
        for got, want in zip(curves[name][1:], curves["locked"][1:]):
            assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-4)
            assert got["validation_loss"] == pytest.approx(
                want["validation_loss"], abs=1e-4
            )

    # Locked runs its chunks one after another, so its measured step is at
    # least their summed compute, and the ceiling against it at least the
    # compute-only one.
    (unequal,) = [n for n in bench.findings(result) if "chunks are unequal" in n]
    compute_only, against_step = (float(x) for x in re.findall(r"(\d+\.\d+)×", unequal))
    assert against_step >= compute_only > 1

    for figure in result["figures"]:
        assert (out / figure).stat().st_size > 0
    assert {f"timeline-{n}.png" for n in bench.ALL_SCHEDULES} <= set(result["figures"])
    table = (out / "bench.md").read_text()
    assert all(f"| {name} |" in table for name in bench.ALL_SCHEDULES)


def test_the_machine_record_tells_hosts_of_one_model_name_apart(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
        "model\t\t: 167\nmodel name\t: Intel(R) Xeon(R) Processor\n"
        "stepping\t: 1\n\nprocessor\t: 1\nmodel\t\t: 143\n"
    )
    cpu = bench._cpu_identity(cpuinfo)
    assert cpu["model name"] == "Intel(R) Xeon(R) Processor"
    assert bench._cpu_id(cpu) == "family 6 model 167 stepping 1"  # processor 0's
    assert bench._cpu_identity(tmp_path / "missing") == {}
    assert bench._cpu_id({}) is None

    cache = tmp_path / "cache"
    for index, (level, kind, size) in enumerate(
        [(1, "Data", "48K"), (1, "Instruction", "64K"), (2, "Unified", "2048K")]
    ):
        folder = cache / f"index{index}"
        folder.mkdir(parents=True)
        (folder / "level").write_text(f"{level}\n")
        (folder / "type").write_text(f"{kind}\n")
        (folder / "size").write_text(f"{size}\n")
    caches = bench._cpu_caches(cache)
    assert caches == {"L1d": "48K", "L1i": "64K", "L2": "2048K"}
    assert bench._cpu_caches(tmp_path / "none") is None

    machine = {"cpu_id": "family 6 model 167 stepping 1", "caches": caches}
    machine["kernel"] = "6.18.44"
    assert bench._cpu_details(machine) == (
        " (family 6 model 167 stepping 1; caches of CPU 0 L1d 48K, L1i 64K, "
        "L2 2048K; kernel 6.18.44)"
    )
    assert bench._cpu_details({"cpus": 2}) == ""  # a record from before


def test_torch_gpipe_trains_like_the_locked_schedule():
    """First-step loss equal to locked's; then the same losses as it learns.

    The in-process trainer is the reference: tests/test_distributed.py shows that
    ``locked`` on Ray gives its losses to 1e-5. 200 sequences in batches of 64
    include a short last batch per epoch (padded for the micro-batches).
    """
    config = TrainConfig(
        task="patterns",
        model="crnn",
        truncation=7,
        chunks=2,
        hidden_size=16,
        batch_size=64,
        n_train=200,
        lr=1e-2,
        epochs=1,
    )
    task = load_task("patterns", n_train=200)
    trainer = Trainer(config, task)
    stream = BatchStream(task, config.batch_size, config.seed)
    steps = 20
    expected = [trainer.run_batch(stream.sequences(s)).loss for s in range(steps)]

    pipeline = TorchPipeline(config, "torch-gpipe", micro_batches=4)
    pipeline.start()
    try:
        segment = pipeline.run(0, steps)
        validation = pipeline.evaluate(task)
        pipeline.reset()
        again = pipeline.run(0, 1)
        # The stages run as a PyTorch user's would: the default policy, not
        # the batch scheduling of ccdni's actors (which made them slower).
        policies = {
            policy
            for process in pipeline.processes
            for policy in thread_policies(process.pid).values()
        }
    finally:
        pipeline.shutdown()

    got = [segment.losses[s] for s in range(steps)]
    assert got[0] == pytest.approx(expected[0], abs=1e-5)
    assert got == pytest.approx(expected, abs=1e-4)
    if hasattr(os, "SCHED_OTHER"):
        assert policies == {os.SCHED_OTHER}
    assert sum(got[-5:]) < sum(got[:5]) - 0.1  # it learns
    assert validation["loss"] == pytest.approx(
        trainer.evaluate(task.validation)["loss"], abs=1e-4
    )
    assert again.losses[0] == pytest.approx(got[0], abs=1e-6)  # reset forgets
    phases = {e["phase"] for e in segment.events}
    assert phases == {"forward", "backward", "update"}
    assert {e["chunk"] for e in segment.events} == {0, 1}


def test_targets_pack_and_pad_losslessly():
    task = load_task("patterns", n_train=50)
    data = task.train.subset(list(range(7)))
    targets, mask = unpack_targets(pack_targets(data, task.kind), task.kind)
    assert targets[data.mask].tolist() == data.targets[data.mask].tolist()
    assert mask.tolist() == data.mask.tolist()

    padded = pad_rows(data, 4)
    assert len(padded) == 8 and not padded.mask[7:].any()
    assert pad_rows(padded, 4) is padded


def test_ideal_speedups_reduce_to_the_textbook_formulas_for_equal_chunks():
    chunk = dict(forward=0.1, backward=0.2, update=0.0)
    waits = dict(predict=0.0, send=0.0, wait_input=0.0, wait_feedback=0.0)
    equal = [{**chunk, **waits} for _ in range(3)]
    ideals = bench.ideal_speedups(
        {"locked": equal, "pipelined": equal, "decoupled": equal}, 3, 4
    )
    assert ideals["locked"] == 1.0
    assert ideals["decoupled"] == pytest.approx(3.0)
    assert ideals["pipelined"] == pytest.approx(3 * 4 / (4 + 3 - 1))

    predicting = [{**c, "predict": 0.3} for c in equal]
    ideals = bench.ideal_speedups({"locked": equal, "decoupled": predicting}, 3, 1)
    assert ideals["decoupled"] == pytest.approx(0.9 / 0.6)


def test_cpu_bound_counts_every_process_and_the_cerebellums_budget():
    def record(rate, **cpu):
        return {
            "steps_per_second": rate,
            "actors": {name: {"cpu": cores} for name, cores in cpu.items()},
        }

    result = {
        "config": {"chunks": 2},
        "placement": {"2": {"gpus": False}},
        "machine": {"cpus": 2},
        "schedules": {
            # locked: 10 steps/s, 0.1 s of CPU per step.
            "locked": record(10.0, **{"chunk-0": 0.4, "chunk-1": 0.6}),
            # decoupled: 12 steps/s; 0.125 s of chunks, 0.0375 s of cerebellum
            # and 0.0042 s of driver per step.
            "decoupled": record(
                12.0,
                **{"chunk-0": 0.6, "chunk-1": 0.9, "cerebellum": 0.45},
                driver=0.05,
            ),
        },
    }
    bound = bench.cpu_bound(result)
    total = (0.6 + 0.9 + 0.45 + 0.05) / 12.0
    assert bound["decoupled_ms"] == pytest.approx(1000 * total)
    assert bound["locked_ms"] == pytest.approx(100.0)
    assert bound["cerebellum_ms"] == pytest.approx(1000 * 0.45 / 12.0)
    assert bound["steps_per_second"] == pytest.approx(2 / total)
    assert bound["speedup"] == pytest.approx(2 / total / 10.0)
    assert bound["reached"] == pytest.approx(12.0 / (2 / total))
    # 1.6x locked = 16 steps/s on 2 cores: 125 ms of CPU per step in all; the
    # chunks and driver take 129.2 ms, so nothing is left for the cerebellum.
    assert bound["target_ms"] == pytest.approx(125.0)
    assert bound["cerebellum_budget_ms"] == pytest.approx(
        125.0 - 1000 * (0.6 + 0.9 + 0.05) / 12.0
    )

    # Not on GPUs, and not when a process's CPU is unknown.
    assert bench.cpu_bound({**result, "placement": {"2": {"gpus": True}}}) is None
    unknown = dict(result["schedules"])
    unknown["decoupled"] = record(12.0, **{"chunk-0": None, "chunk-1": 0.9})
    assert bench.cpu_bound({**result, "schedules": unknown}) is None


def curve(*losses):
    return [
        {"seconds": float(i), "validation_loss": loss} for i, loss in enumerate(losses)
    ]


def test_the_default_target_is_lockeds_final_loss_and_shows_who_misses_it():
    curves = {
        "locked": [curve(2.0, 1.0, 0.5), curve(2.0, 1.0, 0.5)],
        "torch-gpipe": [curve(2.0, 1.0, 0.5 + 1e-7)],
        "decoupled": [curve(2.0, 0.9, 0.8)],
    }
    target = bench.choose_target(curves)
    assert target == 0.5
    assert bench.time_to_target(curves["locked"][0], target) == 2.0
    assert bench.time_to_target(curves["torch-gpipe"][0], target) == 2.0
    assert bench.time_to_target(curves["decoupled"][0], target) is None
    del curves["locked"]
    assert bench.choose_target(curves) == 0.8  # every run's best: all reach it


def test_threads_are_named_summed_by_name_and_sorted_by_cpu_per_step():
    before = {1: ("ray::Chunk", 10.0), 2: ("event_engine", 1.0), 3: ("ray::Chunk", 0.5)}
    after = {
        1: ("ray::Chunk", 10.8),
        2: ("event_engine", 1.1),
        3: ("ray::Chunk", 0.6),
        4: ("event_engine", 0.1),  # started in between: counts from zero
    }
    rows = bench.thread_breakdown(before, after, {1: "compute", 3: "grpc"}, steps=10)

    assert [(r["thread"], r["threads"]) for r in rows] == [
        ("compute", 1),
        ("event_engine", 2),
        ("grpc", 1),
    ]
    assert [r["ms_per_step"] for r in rows] == pytest.approx([80.0, 20.0, 10.0])

    table = bench._thread_table(
        {
            "config": {"steps": 10},
            "steps_per_second": 5.0,
            "thread_ms_per_step": {"chunk-0": rows},
        },
        shown=1,
    )
    assert "| chunk-0 | compute | 80.0 |" in table
    assert "| chunk-0 | 3 other threads | 30.0 |" in table


def test_thread_names_are_pythons_with_labels_over_them():
    import threading

    from protos.process import thread_names

    me = threading.get_native_id()
    assert thread_names()[me] == threading.current_thread().name
    assert thread_names({me: "compute"})[me] == "compute"


def test_time_to_target_is_a_median_that_counts_a_miss_as_slowest():
    assert bench.censored_median([3.0, None, 1.0, 2.0, 5.0]) == 3.0
    assert bench.censored_median([1.0, None, None, 2.0]) is None  # half missed
    assert bench.censored_median([None]) is None
    assert bench.censored_median([]) is None

    ttt = {"seconds": 3.0, "reached": 4, "runs": [1.0, None, 3.0, 2.0, 5.0]}
    ttt.update(steps=[80, None, 90, 90, 100], max_steps=240)
    assert bench._time_to_target_cell(ttt) == (
        "3.0 (steps 80–100; 1/5 not reached in 240 steps)"
    )
    ttt.update(seconds=None, reached=2, runs=[1.0, None, None, None, 2.0])
    assert bench._time_to_target_cell(ttt) == "not reached in 240 steps (2/5)"
    ttt.update(seconds=2.0, reached=5, runs=[2.0] * 5, steps=[60] * 5)
    assert bench._time_to_target_cell(ttt) == "2.0 (step 60)"


def fake_run(chunks: int, seconds: float, steps: int = 4) -> bench.Run:
    """A run whose chunks each computed ``seconds / chunks`` per step."""
    events = []
    for step in range(steps):
        for k in range(chunks):
            start = step * seconds + k * seconds / chunks
            events.append(
                dict(
                    chunk=k,
                    phase="forward",
                    batch=step,
                    window=0,
                    micro=0,
                    start=start,
                    end=start + seconds / chunks,
                )
            )
    segment = bench.Segment(
        seconds * steps, seconds * steps, dict.fromkeys(range(steps), 1.0), events
    )
    return bench.Run(
        segments=[segment], actor_names=[f"chunk-{k}" for k in range(chunks)]
    )


def test_sweep_summary_and_plot(tmp_path):
    config = bench.BenchConfig(schedules=("locked", "decoupled"), sweep_chunks=(1, 2))
    points = {
        1: {"locked": [fake_run(1, 1.0)], "decoupled": [fake_run(1, 1.0)]},
        2: {"locked": [fake_run(2, 1.0)], "decoupled": [fake_run(2, 0.5)]},
    }
    sweep = bench.summarise_sweep(config, points)
    two = sweep["points"][1]["schedules"]
    assert two["decoupled"]["speedup"] == pytest.approx(2.0)
    assert two["decoupled"]["ideal_speedup"] == pytest.approx(2.0)
    result = {
        "sweep": sweep,
        "config": config.to_dict(),
        "machine": {"cpus": 2, "gpus": []},
    }
    assert bench.plot_sweep(result, tmp_path / "sweep.png").stat().st_size > 0


def test_render_rewords_the_report_from_bench_json_and_measures_nothing(
    tmp_path, monkeypatch, capsys
):
    from orchestrator.cli import main

    def measure(*args, **kwargs):
        raise AssertionError("--render must not measure")

    monkeypatch.setattr(bench, "run_bench", measure)
    published = Path(__file__).parents[1] / "docs" / "figures" / "bench"
    out = tmp_path / "bench"
    out.mkdir()
    (out / "bench.json").write_text((published / "bench.json").read_text())
    doc = tmp_path / "BENCH.md"
    doc.write_text(f"intro\n{bench.DOC_BEGIN}\nstale words\n{bench.DOC_END}\nend\n")

    assert main(["bench", "--render", "--out", str(out), "--doc", str(doc)]) == 0

    result = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").read_text() == bench.render_markdown(result) + "\n"
    text = doc.read_text()
    assert "stale words" not in text and text.startswith("intro\n")
    assert bench.findings(result)[0] in text
    assert "| decoupled |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--render", "--out", str(tmp_path / "nothing")])
    assert exit_.value.code == 2
    assert "--render reads" in capsys.readouterr().err


def test_splice_doc_rewrites_only_between_the_markers(tmp_path):
    doc = tmp_path / "BENCH.md"
    doc.write_text(f"intro\n{bench.DOC_BEGIN}\nold\n{bench.DOC_END}\noutro\n")
    bench.splice_doc(doc, "new table")
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n")
    assert "new table" in text and "old" not in text

    doc.write_text("no markers")
    with pytest.raises(ConfigError, match="--doc"):
        bench.splice_doc(doc, "x")


def test_a_failed_profile_probe_is_recorded_not_raised():
    import subprocess

    def failing(config, task):
        raise subprocess.CalledProcessError(1, ["probe"], stderr=b"no server")

    failed = bench._probe(failing, bench.BenchConfig(), None)
    assert "no server" in failed["error"]
    assert bench._probed({"predict_latency": failed}, "predict_latency") is None


def test_core_scaling_times_one_copy_alone_and_copies_side_by_side():
    config = bench.BenchConfig(**bench.QUICK)
    task = load_task(config.task, seed=0, n_train=config.n_train)
    scaling = bench.measure_core_scaling(config, task, seconds=0.3)
    assert scaling["config"]["copies"] == 2
    assert scaling["config"]["width"] == config.hidden_size
    assert scaling["alone_ms"] > 0 and len(scaling["side_by_side_ms"]) == 2
    alone, side = scaling["alone_ms"], scaling["side_by_side_ms"]
    assert scaling["work_rate"] == pytest.approx(sum(alone / v for v in side))


@pytest.mark.usefixtures("ray_cluster")
def test_critical_pace_runs_decoupled_with_a_cerebellum_that_answers_nothing():
    config = bench.BenchConfig(**{**bench.QUICK, "steps": 4, "eval_every": 2})
    task = load_task(config.task, seed=0, n_train=config.n_train)
    pace = bench.measure_critical_pace(config, task)

    assert pace["config"]["steps"] == 4 and pace["steps_per_second"] > 0
    # The lesion held from the warm-up on, through the reset before the run.
    assert pace["predictions"]["answered"] == 0
    windows = -(-task.seq_len // config.truncation)
    assert pace["predictions"]["lesioned"] >= 4 * windows
    assert set(pace["busy"]) == {"chunk-0", "chunk-1"}
    assert set(pace["cpu_ms_per_step"]) >= {"chunk-0", "chunk-1", "cerebellum"}
    # Left without feedback, the chunk below the cut has no backward to do.
    phases = pace["phase_ms_per_step"]
    assert phases["chunk-1"]["backward"] > phases["chunk-0"]["backward"]
    # Every actor's threads, read from /proc and named by the actors.
    threads = {
        actor: {row["thread"]: row["ms_per_step"] for row in rows}
        for actor, rows in pace["thread_ms_per_step"].items()
    }
    assert set(threads) == {"chunk-0", "chunk-1", "cerebellum"}
    assert threads["chunk-1"]["compute"] > 0 and threads["chunk-0"]["compute"] > 0
    assert "cerebellum-learner" in threads["cerebellum"]


@pytest.mark.usefixtures("ray_cluster")
def test_free_cerebellum_pace_keeps_every_chunks_work_and_answers_only_zeros():
    config = bench.BenchConfig(**{**bench.QUICK, "steps": 4, "eval_every": 2})
    task = load_task(config.task, seed=0, n_train=config.n_train)
    free = bench.measure_free_cerebellum_pace(config, task)

    assert free["config"] == {"answer_zeros": True, "steps": 4}
    # Zeros from the warm-up on, through the reset (a restore) before the run.
    assert free["predictions"]["answered"] == 0
    windows = -(-task.seq_len // config.truncation)
    assert free["predictions"]["zeros"] >= 4 * windows
    assert free["predictions"]["lesioned"] == 0
    # Answered, the chunk below the cut does its backward pass as in the runs.
    assert free["phase_ms_per_step"]["chunk-0"]["backward"] > 0
    assert set(free["cpu_ms_per_step"]) >= {"chunk-0", "chunk-1", "cerebellum"}


def _paced(cerebellum_cpu: float, chunk0_cpu: float) -> dict:
    """A result whose decoupled run and pace probe say what the test needs."""
    rate = 10.0  # decoupled's steps/s: a process at 0.1 cores spends 10 ms a step
    return {
        "machine": {"cpus": 2},
        "config": {"chunks": 2},
        "placement": {"2": {"gpus": False}},
        "critical_pace": {
            "steps_per_second": 20.0,  # one step of chunk-1 alone: 50 ms
            "busy": {"chunk-0": 0.2, "chunk-1": 0.9},
        },
        "decoupled": {
            "steps_per_second": rate,
            "other_load_cores": 0.0,
            "actors": {
                "chunk-0": {"cpu": chunk0_cpu * rate / 1000},
                "chunk-1": {"cpu": 0.5},
                "cerebellum": {"cpu": cerebellum_cpu * rate / 1000},
                "driver": {"cpu": 0.0},
            },
        },
    }


def test_the_pace_note_says_whether_the_rest_fits_beside_the_slowest_chunk():
    locked = {"steps_per_second": 10.0}

    def note(cerebellum_ms: float, chunk0_ms: float) -> str:
        result = _paced(cerebellum_ms, chunk0_ms)
        return bench._pace_note(result, result["decoupled"], locked)

    # 50 ms of room on the second core in each case.
    assert "2.00× locked" in note(10, 30) and "with chunk-1 computing 90 %" in note(
        10, 30
    )
    assert "40 ms against the 50 ms" in note(10, 30)
    assert "it fits" in note(10, 30)
    too_much = note(20, 40)
    assert "60 ms against the 50 ms" in too_much
    assert "does not fit" in too_much and "without the cerebellum's share" in too_much
    neither = note(20, 60)
    assert "does not fit" in neither and "without the cerebellum" not in neither
    assert bench._pace_note({}, {}, locked) is None


def parse(*argv: str) -> bench.BenchConfig:
    parser = argparse.ArgumentParser()
    bench.add_bench_parser(parser.add_subparsers(dest="command"))
    return bench.bench_from_args(parser.parse_args(["bench", *argv]))


def test_flags_override_quick_and_quick_overrides_the_defaults():
    assert parse().hidden_size == 256 and parse().steps == 60
    quick = parse("--quick")
    assert quick.hidden_size == bench.QUICK["hidden_size"]
    assert parse("--quick", "--hidden", "48").hidden_size == 48
    assert parse("--schedules", "locked, decoupled").schedules == (
        "locked",
        "decoupled",
    )
    assert parse("--sweep-chunks", "1,2,4").sweep_chunks == (1, 2, 4)
    assert parse().metrics and not parse("--quick", "--no-metrics").metrics
    assert parse().train_config().granule_width == 128
    assert parse("--granule-width", "512").train_config().granule_width == 512
    assert parse().train_config().context_zones == "output"
    assert not parse("--no-output-context").train_config().time_context
    assert parse().cerebellum_nice == 10
    assert parse("--cerebellum-nice", "0").cerebellum_nice == 0
    assert parse().batch_scheduling
    assert not parse("--no-batch-scheduling").batch_scheduling
    assert parse().max_target_steps == 4 * parse().steps
    assert parse("--target-steps", "100").max_target_steps == 100
    assert parse("--steps", "30").max_target_steps == 120
    # A default target needs locked to set it; a given one does not.
    assert parse("--schedules", "decoupled,pipelined").max_target_steps == 60
    assert (
        parse("--schedules", "decoupled", "--target-loss", "1").max_target_steps == 240
    )
    assert parse().cerebellum_precision == "auto"
    assert parse("--cerebellum-precision", "float32").cerebellum_precision == (
        "float32"
    )


@pytest.mark.parametrize(
    "changes, flag",
    [
        (dict(schedules=("locked", "fast")), "--schedules"),
        (dict(chunks=5, micro_batches=4), "--micro-batches"),
        (dict(steps=0), "--steps"),
        (dict(model="gru"), "--model"),
        (dict(micro_batches=128), "--micro-batches"),
        (dict(cerebellum_nice=20), "--cerebellum-nice"),
        (dict(steps=60, target_steps=30), "--target-steps"),
    ],
)
def test_bad_settings_name_their_flag(changes, flag):
    with pytest.raises(ConfigError, match=flag):
        bench.BenchConfig(**changes)


class ScriptedContender:
    """A contender whose validation loss falls by ``rate`` per batch trained and
    whose every batch takes ``seconds``: the bench's bookkeeping, no training."""

    kind = "ccdni"

    def __init__(self, name: str, rate: float, seconds: float, turns: list) -> None:
        self.name, self.rate, self.seconds, self.turns = name, rate, seconds, turns
        self.trained = 0

    def launch(self) -> None:
        pass

    def reset(self) -> None:
        self.trained = 0

    def train(self, start, stop):
        assert start == self.trained, "batches in order, none skipped"
        self.turns.append((self.name, start, stop))
        self.trained = stop
        losses = dict.fromkeys(range(start, stop), 1.0)
        return self.seconds * (stop - start), losses, []

    def evaluate(self):
        loss = 2.0 - self.rate * self.trained
        return {"loss": loss, "metric": 0.5, "metric_name": "accuracy"}

    def pids(self):
        return {}

    def peak_rss(self):
        return {}

    def shutdown(self) -> None:
        pass


def test_a_run_above_the_target_chases_it_without_counting_towards_throughput():
    config = bench.BenchConfig(steps=4, eval_every=2, target_steps=10)
    task = load_task("patterns", n_train=200)
    slow = ScriptedContender("decoupled", rate=0.1, seconds=0.1, turns=[])

    run = bench.run_once(slow, config, task, config.steps, True, chase=1.25)
    assert run.steps == 4 and run.seconds == pytest.approx(0.4)
    assert run.measured_curve[-1]["step"] == 4
    assert run.chase_steps == 4 and run.chase_seconds == pytest.approx(0.4)
    assert [p["step"] for p in run.curve] == [0, 2, 4, 6, 8]  # stops once there
    assert bench.steps_to_target(run.curve, 1.25) == 8
    assert bench.time_to_target(run.curve, 1.25) == pytest.approx(0.8)

    run = bench.run_once(slow, config, task, config.steps, True, chase=0.5)
    assert run.curve[-1]["step"] == 10  # --target-steps caps the chase
    assert bench.time_to_target(run.curve, 0.5) is None
    for target in (None, 1.9):  # no target, or reached within the measured steps
        run = bench.run_once(slow, config, task, config.steps, True, chase=target)
        assert run.chase_steps == 0 and run.curve[-1]["step"] == 4


RATES = {"locked": 0.2, "decoupled": 0.1}
"""How fast each scripted contender's validation loss falls per batch."""


def run_scripted(monkeypatch, config, fresh=False, seconds=None):
    """``run_interleaved`` over scripted contenders (:data:`RATES`; each batch
    takes ``seconds[name]``, 0.1 s by default). Returns the task, the runs, the
    ``(name, start, stop)`` of every train call, and the names built, in order."""
    task = load_task("patterns", n_train=1000)
    turns: list = []
    built: list = []

    def scripted(bench_config, *_):
        built.extend(bench_config.schedules)
        return [
            ScriptedContender(n, RATES[n], (seconds or {}).get(n, 0.1), turns)
            for n in bench_config.schedules
        ]

    monkeypatch.setattr(bench, "build_contenders", scripted)
    placement = bench.Placement(gpus=False, fresh=fresh, cpus_per_actor=0.5)
    runs = bench.run_interleaved(config, task, None, placement)
    return task, runs, turns, built


def test_locked_goes_first_and_sets_the_target_the_others_chase(monkeypatch):
    config = bench.BenchConfig(
        schedules=("decoupled", "locked"), steps=4, eval_every=2, repeats=2, warmup=0
    )
    task, runs, turns, _ = run_scripted(
        monkeypatch, config, seconds={"locked": 0.2, "decoupled": 0.1}
    )
    assert [t[0] for t in turns if t[1] == 0] == ["locked", "decoupled"] * 2
    assert list(runs) == ["decoupled", "locked"]  # reported in the given order

    summary = bench.summarise(config, task, runs)
    assert summary["target_loss"] == pytest.approx(1.2)  # locked after 4 batches
    decoupled = summary["schedules"]["decoupled"]
    locked = summary["schedules"]["locked"]
    # Throughput and the loss after a fixed number of examples: measured steps.
    assert decoupled["speedup"] == pytest.approx(2.0)
    assert decoupled["validation_loss"] == pytest.approx(1.6)
    assert decoupled["examples"] == locked["examples"] == 4 * config.batch_size
    # Time to target: decoupled needs 8 batches of 0.1 s, locked 4 of 0.2 s.
    assert decoupled["time_to_target"]["steps"] == [8, 8]
    assert decoupled["time_to_target"]["speedup"] == pytest.approx(1.0)
    assert locked["time_to_target"]["steps"] == [4, 4]
    assert all(r["chase_steps"] == 0 for r in locked["runs"])


def test_the_free_cerebellum_note_sets_its_pace_beside_the_measured_one():
    locked = {"steps_per_second": 10.0}
    result = _paced(cerebellum_cpu=14, chunk0_cpu=30)
    decoupled = {**result["decoupled"], "speedup": 1.0}
    assert bench._free_cerebellum_note(result, decoupled, locked) is None
    result["free_cerebellum_pace"] = {
        "steps_per_second": 17.0,
        "cpu_ms_per_step": {"cerebellum": 4.0},
    }
    note = bench._free_cerebellum_note(result, decoupled, locked)
    assert "17.00 steps/s, 1.70× locked, against 1.00×" in note
    assert "its CPU 4 ms per step against 14 ms" in note
    assert "the cost of the cerebellum's arithmetic" in note
    # As fast with the cerebellum at work as without it: no cost is claimed.
    decoupled["speedup"] = 1.69
    note = bench._free_cerebellum_note(result, decoupled, locked)
    assert "against 1.69× with the cerebellum at work" in note
    assert "costs decoupled no speed that shows" in note


def test_a_given_target_keeps_the_turn_order_and_every_contender_chases_it(
    monkeypatch,
):
    config = bench.BenchConfig(
        schedules=("decoupled", "locked"),
        steps=4,
        eval_every=2,
        repeats=1,
        warmup=0,
        target_loss=1.0,
    )
    _, runs, turns, _ = run_scripted(monkeypatch, config)

    assert [t[0] for t in turns if t[1] == 0] == ["decoupled", "locked"]
    # Loss 2 - rate * batches: locked reaches 1.0 at 5 batches, decoupled at 10.
    assert bench.steps_to_target(runs["locked"][0].curve, 1.0) == 6
    assert bench.steps_to_target(runs["decoupled"][0].curve, 1.0) == 10
    assert runs["decoupled"][0].steps == runs["locked"][0].steps == 4


def _process_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (``T``: stopped)."""
    return bench._stat_fields(Path(f"/proc/{pid}/stat").read_text())[0]


def _waiting_child() -> subprocess.Popen:
    """A child process that waits on its standard input until killed."""
    return subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)


class Pids:
    """Just enough of a contender for park() and unpark(): its pids."""

    name = "scripted"

    def __init__(self, **pids: int) -> None:
        self._pids = pids

    def pids(self) -> dict[str, int]:
        return dict(self._pids)


def _state_becomes(pid: int, wanted: bool, seconds: float = 10.0) -> bool:
    """Whether ``pid`` is (``wanted``) or is not stopped within ``seconds``:
    SIGSTOP takes effect when the process next runs, not when it is sent."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (_process_state(pid) == "T") == wanted:
            return True
        time.sleep(0.001)  # a poll interval, not a stand-in for the state
    return False


class ProcessContender(ScriptedContender):
    """A scripted contender with a real process of its own, which records at
    every train call whether its own and every other contender's process is
    stopped."""

    def __init__(self, name: str, everyone: list, parked: bool) -> None:
        super().__init__(name, RATES[name], 0.1, [])
        self.process = _waiting_child()
        self.everyone, self.parked = everyone, parked
        self.seen: list[tuple[bool, bool]] = []  # (own stopped, others stopped)
        self.stopped_at_shutdown: bool | None = None
        everyone.append(self)

    def train(self, start, stop):
        # SIGCONT takes effect as it is sent; a stop, when the process next runs.
        own = _process_state(self.process.pid) == "T"
        others = [c.process.pid for c in self.everyone if c is not self]
        if self.parked:
            stopped = all(_state_becomes(pid, wanted=True) for pid in others)
        else:
            stopped = any(_process_state(pid) == "T" for pid in others)
        self.seen.append((own, stopped))
        return super().train(start, stop)

    def pids(self):
        return {"chunk-0": self.process.pid}

    def shutdown(self) -> None:
        if self.process.poll() is None:
            self.stopped_at_shutdown = _process_state(self.process.pid) == "T"
            self.process.kill()
            self.process.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("parked", [True, False])
def test_contenders_waiting_for_their_turn_are_stopped(monkeypatch, parked):
    config = bench.BenchConfig(
        schedules=("locked", "decoupled"),
        steps=4,
        eval_every=2,
        repeats=2,
        warmup=0,
        target_steps=4,  # no chase
    )
    everyone: list = []
    monkeypatch.setattr(
        bench,
        "build_contenders",
        lambda c, *_: [ProcessContender(n, everyone, parked) for n in c.schedules],
    )
    placement = bench.Placement(
        gpus=False, fresh=False, cpus_per_actor=0.5, parked=parked
    )
    task = load_task("patterns", n_train=200)
    try:
        bench.run_interleaved(config, task, None, placement)
        assert len(everyone) == 2
        for contender in everyone:
            assert contender.seen == [(False, parked)] * 4  # 2 runs of 2 segments
            # A stopped process could not shut down: everyone runs again first.
            assert contender.stopped_at_shutdown is False
    finally:
        for contender in everyone:
            if contender.process.poll() is None:
                os.kill(contender.process.pid, signal.SIGCONT)
            contender.shutdown()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_parking_stops_only_processes_this_one_started(caplog, monkeypatch):
    monkeypatch.setattr(bench, "_NOT_OURS", set())  # warned about afresh
    # A process that is not ours: started by a shell that exits at once, so
    # that it is handed to init (or a subreaper), not to this process.
    shell = subprocess.run(
        ["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    foreign = int(shell.stdout)
    child = _waiting_child()
    contender = Pids(foreign=foreign, child=child.pid)  # the foreign pid first
    try:
        assert not bench._descends_from_us(foreign)
        assert bench._descends_from_us(child.pid)
        bench.park([contender])
        assert _state_becomes(child.pid, wanted=True)
        assert _process_state(foreign) != "T"
        assert "was not started by this process" in caplog.text
        bench.unpark([contender])
        assert _process_state(child.pid) != "T"
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait()
        os.kill(foreign, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_what_was_parked_runs_again_even_once_no_longer_a_child(monkeypatch):
    child = _waiting_child()
    contender = Pids(**{"chunk-0": child.pid})
    try:
        bench.park([contender])
        assert _state_becomes(child.pid, wanted=True)
        # Its parent gone (a raylet that died), it is no child of ours now.
        monkeypatch.setattr(bench, "_descends_from_us", lambda pid: False)
        bench.unpark([contender])
        assert _process_state(child.pid) != "T"
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    "changes, gpus, fresh, parked",
    [
        ({}, False, False, True),
        ({"park": False}, False, False, False),
        ({"ray_address": "10.0.0.1:6379"}, False, False, False),  # not all here
        ({}, True, False, False),  # GPUs: their watchdogs would stop too
        ({}, False, True, False),  # nobody waits
    ],
)
def test_only_local_cpu_contenders_are_parked(changes, gpus, fresh, parked):
    config = bench.BenchConfig(**changes)
    placement = bench.Placement(gpus=gpus, fresh=fresh, cpus_per_actor=0.5)
    assert bench.parks(config, placement) is parked


def test_the_fresh_placement_chases_the_target_as_the_shared_one_does(monkeypatch):
    config = bench.BenchConfig(
        schedules=("decoupled", "locked"), steps=4, eval_every=2, repeats=2, warmup=0
    )
    _, runs, _, started = run_scripted(monkeypatch, config, fresh=True)

    assert started == ["locked", "decoupled"] * 2
    assert [r.chase_steps for r in runs["decoupled"]] == [4, 4]
    assert [r.chase_steps for r in runs["locked"]] == [0, 0]
