"""Distributed training on a real local Ray cluster: equivalence, unlocking, faults."""

from __future__ import annotations

import json
import os
import threading

import pytest

from orchestrator.batches import BatchStream
from orchestrator.cluster import Cluster, DistributedConfig, train_distributed
from orchestrator.config import ConfigError, TrainConfig
from orchestrator.tasks.registry import load_task
from orchestrator.trainer import Trainer
from protos import checkpoint as ckpt
from tests.helpers import thread_niceness, thread_policies, wait_until

pytestmark = pytest.mark.usefixtures("ray_cluster")


def small_config(**changes) -> TrainConfig:
    values = dict(
        task="patterns",
        model="crnn",
        truncation=7,
        chunks=2,
        hidden_size=16,
        batch_size=25,
        granule_width=64,
        n_train=200,
        epochs=1,
    )
    values.update(changes)
    return TrainConfig(**values)


def task_for(config: TrainConfig):
    return load_task(config.task, seed=config.seed, n_train=config.n_train)


@pytest.mark.parametrize("chunks", [2, 3])
def test_locked_on_ray_matches_the_in_process_trainer(tmp_path, chunks):
    config = small_config(chunks=chunks)
    task = task_for(config)
    steps = 20
    trainer = Trainer(config, task)
    stream = BatchStream(task, config.batch_size, config.seed)
    expected = [trainer.run_batch(stream.sequences(s)).loss for s in range(steps)]

    summary = train_distributed(
        config,
        DistributedConfig(schedule="locked", steps=steps, checkpoint_every=0),
        task,
        tmp_path / "run",
        progress=False,
    )

    got = summary["train_losses"]
    assert len(got) == steps
    for a, b in zip(got, expected):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == steps


def test_ccrnn_on_ray_learning_on_update_matches_the_in_process_trainer(tmp_path):
    # One chunk, so one cerebellum update per batch, as in one process.
    config = small_config(model="ccrnn", chunks=1)
    task = task_for(config)
    steps = 12
    trainer = Trainer(config, task)
    stream = BatchStream(task, config.batch_size, config.seed)
    expected = [trainer.run_batch(stream.sequences(s)).loss for s in range(steps)]

    def distributed(learning: str) -> list[float]:
        summary = train_distributed(
            config,
            DistributedConfig(
                schedule="locked",
                steps=steps,
                checkpoint_every=0,
                cerebellum_learning=learning,
                cerebellum_precision="float32",  # as the in-process cerebellum
            ),
            task,
            tmp_path / learning,
            progress=False,
        )
        return summary["train_losses"]

    def largest_gap(got: list[float]) -> float:
        assert len(got) == steps
        return max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(got, expected))

    assert largest_gap(distributed("on_update")) <= 1e-5
    # The server learning as feedback arrives is a different rule: the control
    # that shows the comparison can tell them apart.
    assert largest_gap(distributed("background")) > 1e-5


def busy_intervals(events, chunk):
    spans = sorted(
        (e["start"], e["end"])
        for e in events
        if e["chunk"] == chunk and e["phase"] in ("forward", "backward", "predict")
    )
    merged = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def overlap(a, b) -> float:
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def backward_ends(events, chunk):
    return {
        (e["batch"], e["window"]): e["end"]
        for e in events
        if e["chunk"] == chunk and e["phase"] == "backward"
    }


def test_decoupled_chunks_overlap_and_locked_ones_alternate(tmp_path):
    # Wide enough that compute, not RPC latency, sets the pace (as in real runs).
    config = small_config(model="ccrnn", hidden_size=256, batch_size=50, n_train=400)
    task = task_for(config)
    timelines = {}
    for schedule in ("decoupled", "locked"):
        out = tmp_path / schedule
        train_distributed(
            config,
            DistributedConfig(schedule=schedule, steps=16, checkpoint_every=0),
            task,
            out,
            progress=False,
        )
        timelines[schedule] = json.loads((out / "timeline.json").read_text())["events"]

    decoupled = timelines["decoupled"]
    first, second = backward_ends(decoupled, 0), backward_ends(decoupled, 1)
    assert first.keys() == second.keys() and len(first) == 16 * 4
    # Chunk 0 runs its backward pass on predicted feedback as soon as its forward
    # pass is done, while chunk 1 still has the forward pass of that window to do.
    # (A window can come out the other way round when the machine is loaded.)
    earlier = sum(first[k] < second[k] for k in first)
    assert earlier >= 0.9 * len(first)
    busy0, busy1 = busy_intervals(decoupled, 0), busy_intervals(decoupled, 1)
    shared = overlap(busy0, busy1)
    smaller = min(sum(e - s for s, e in busy0), sum(e - s for s, e in busy1))
    assert shared > 0.5 * smaller

    locked = timelines["locked"]
    first, second = backward_ends(locked, 0), backward_ends(locked, 1)
    # Under locked, chunk 0 can only finish its backward after chunk 1's.
    assert all(first[k] > second[k] for k in first)

    # ccdni report draws the per-actor timeline.
    from orchestrator import report

    written = report.report(tmp_path / "decoupled")
    assert any(p.name == "timeline.png" for p in written)


def run_in_background(cluster: Cluster, start: int, stop: int):
    result = {}

    def work():
        try:
            result["record"] = cluster.run(start, stop)
        except BaseException as error:  # surfaced by the test below
            result["error"] = error

    thread = threading.Thread(target=work)
    thread.start()
    return thread, result


def progress(actor) -> int:
    import ray

    try:
        return ray.get(actor.progress.remote(), timeout=5)["step"]
    except Exception:  # a restarting actor: no progress to report yet
        return -1


def test_killed_chunk_is_restarted_restored_and_the_run_finishes(tmp_path):
    import ray

    config = small_config()
    task = task_for(config)
    cluster = Cluster(
        config,
        DistributedConfig(schedule="decoupled", checkpoint_every=5),
        task,
        tmp_path,
    )
    cluster.start()
    try:
        cluster.save_checkpoint(0)
        thread, result = run_in_background(cluster, 0, 30)
        wait_until(lambda: progress(cluster.chunks[1]) >= 12, what="step 12")
        ray.kill(cluster.chunks[1], no_restart=False)
        thread.join(timeout=120)
        assert not thread.is_alive()
        assert "error" not in result, result.get("error")
        record = result["record"]
        assert record.restarts == 1
        assert 0 <= record.repeated_steps <= 5 + 2
        assert sorted(record.losses)[-1] == 29
        assert ray.get(cluster.chunks[1].progress.remote())["step"] == 30
    finally:
        cluster.shutdown()


def test_killed_cerebellum_degrades_the_chunks_then_they_rejoin(tmp_path):
    import ray

    config = small_config(model="ccrnn")
    task = task_for(config)
    cluster = Cluster(
        config,
        DistributedConfig(schedule="decoupled", checkpoint_every=5),
        task,
        tmp_path,
    )
    cluster.start()
    try:
        cluster.save_checkpoint(0)
        thread, result = run_in_background(cluster, 0, 400)
        wait_until(lambda: progress(cluster.chunks[0]) >= 5, what="step 5")
        before = progress(cluster.chunks[0])
        ray.kill(cluster.cerebellum, no_restart=False)
        # Two steps finished in degraded mode: the first may have begun before the
        # kill, the second ran whole while the cerebellum was down or restarting.
        wait_until(
            lambda: ray.get(cluster.chunks[0].progress.remote())["degraded_steps"] >= 2,
            what="two steps in degraded mode",
        )
        during = progress(cluster.chunks[0])
        wait_until(
            lambda: cluster.record.cerebellum_restarts == 1,
            timeout=90,
            what="the cerebellum's restart",
        )
        served = ray.get(cluster.cerebellum.stats.remote())["predictions"]
        wait_until(
            lambda: ray.get(cluster.cerebellum.stats.remote())["predictions"] > served,
            what="predictions after the restart",
        )
        cluster.stop()
        thread.join(timeout=60)
        assert not thread.is_alive()
        assert during > before  # training went on while the cerebellum was down
    finally:
        cluster.shutdown()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux")
def test_the_cerebellum_actor_runs_below_the_chunks_priority(tmp_path):
    import ray

    config = small_config(model="ccrnn")
    cluster = Cluster(
        config,
        DistributedConfig(schedule="decoupled", checkpoint_every=0, cerebellum_nice=7),
        task_for(config),
        tmp_path,
    )
    cluster.start()
    try:
        cluster.run(0, 2)  # every server and learner thread has started
        chunk_pid = ray.get(cluster.chunks[0].pid.remote())
        chunk = set(thread_niceness(chunk_pid).values())
        cerebellum = set(thread_niceness(cluster.cerebellum_pid).values())
        policies = {
            "chunk": set(thread_policies(chunk_pid).values()),
            "cerebellum": set(thread_policies(cluster.cerebellum_pid).values()),
        }
    finally:
        cluster.shutdown()
    # Under Ray's own worker niceness (15) a chunk's Python threads would start
    # lower already; either way each of the cerebellum's is 7 below its
    # counterpart's in a chunk, capped at 19.
    assert 0 in chunk
    assert cerebellum == {min(19, value + 7) for value in chunk}
    # Every thread, those of Ray and gRPC included, runs as a batch job.
    assert policies == {"chunk": {os.SCHED_BATCH}, "cerebellum": {os.SCHED_BATCH}}


def test_batch_scheduling_can_be_turned_off(tmp_path):
    config = small_config(model="ccrnn")
    dist = DistributedConfig(
        schedule="decoupled", checkpoint_every=0, batch_scheduling=False
    )
    task = task_for(config)
    cluster = Cluster(config, dist, task, tmp_path)
    assert not cluster._chunk_spec(0).batch_scheduling
    assert not cluster._cerebellum_spec()["batch_scheduling"]
    default = Cluster(config, DistributedConfig(), task, tmp_path)
    assert default._chunk_spec(0).batch_scheduling


def test_the_cerebellum_computes_in_the_precision_asked_and_is_sent_it(tmp_path):
    import ray

    config = small_config(model="ccrnn")
    task = task_for(config)
    assert (
        Cluster(config, DistributedConfig(), task, tmp_path)._cerebellum_spec()[
            "precision"
        ]
        == "auto"
    )
    cluster = Cluster(
        config,
        DistributedConfig(
            schedule="decoupled", checkpoint_every=0, cerebellum_precision="bfloat16"
        ),
        task,
        tmp_path,
    )
    cluster.start()
    try:
        cluster.run(0, 3)
        progress = ray.get([c.progress.remote() for c in cluster.chunks])
        stats = ray.get(cluster.cerebellum.stats.remote())
        precision = ray.get(cluster.cerebellum.precision.remote())
    finally:
        cluster.shutdown()

    assert precision == cluster.cerebellum_precision == "bfloat16"
    assert [p["cerebellum_dtype"] for p in progress] == ["bfloat16", "bfloat16"]
    # Every bfloat16 observation was taken and learned from.
    assert stats["zone.output_0.observations"] > 0
    assert stats["zone.output_0.updates"] > 0
    assert not any(v for k, v in stats.items() if k.startswith("rejected."))


def _finished_run(tmp_path, steps: int):
    """A decoupled run of ``steps`` steps checkpointed every 4, in ``tmp_path/run``:
    (its config, its task, its directory)."""
    config = small_config()
    task = task_for(config)
    out = tmp_path / "run"
    dist = DistributedConfig(schedule="decoupled", steps=steps, checkpoint_every=4)
    train_distributed(config, dist, task, out, progress=False)
    return config, task, out


def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path):
    config, task, out = _finished_run(tmp_path, steps=12)
    root = out / "checkpoints"
    names = ["chunk-0", "chunk-1"]
    assert ckpt.complete_steps(root, names)[:2] == [12, 8]

    newest = ckpt.step_dir(root, 12) / "chunk-1.pt"
    newest.write_bytes(newest.read_bytes()[:-10] + b"corrupted!")
    assert ckpt.latest_complete(root, names) == 8

    resumed = train_distributed(
        config,
        DistributedConfig(
            schedule="decoupled", steps=16, checkpoint_every=4, resume=str(out)
        ),
        task,
        tmp_path / "resumed",
        progress=False,
    )
    assert resumed["steps"] == 16
    assert len(resumed["train_losses"]) == 16 - 8


def test_resuming_a_finished_run_says_so_and_leaves_its_files_alone(tmp_path):
    config, task, out = _finished_run(tmp_path, steps=8)

    def outputs() -> dict[str, bytes]:
        # Not the Prometheus target list: every start writes its actors there.
        return {
            p.name: p.read_bytes()
            for p in out.iterdir()
            if p.is_file() and not p.name.startswith("prometheus")
        }

    before = outputs()
    assert json.loads(before["summary.json"])["train_losses"]
    assert {"curve.jsonl", "timeline.json", "cerebellum.jsonl"} <= set(before)

    again = DistributedConfig(
        schedule="decoupled", steps=8, checkpoint_every=4, resume=str(out)
    )
    with pytest.raises(ConfigError, match="step 8.*finished.*--steps or --epochs"):
        train_distributed(config, again, task, out, progress=False)
    assert outputs() == before


def test_checkpoint_steps_warn_only_about_damaged_ones(tmp_path, caplog):
    state = {"weight": [1.0, 2.0]}
    for step in (4, 8, 12):
        ckpt.save_state(tmp_path, step, "chunk-0", state)
    ckpt.save_state(tmp_path, 8, "cerebellum", state)
    ckpt.save_state(tmp_path, 12, "cerebellum", state)
    damaged = ckpt.step_dir(tmp_path, 12) / "cerebellum.pt"
    damaged.write_bytes(damaged.read_bytes()[:-3])

    with caplog.at_level("WARNING", logger="protos.checkpoint"):
        assert ckpt.complete_steps(tmp_path, ["cerebellum"]) == [8]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "step-00000012" in warned[0]  # not step 4: no file


def test_killing_the_cerebellum_actor_is_the_in_process_cerebellar_lesion(tmp_path):
    from orchestrator.lesions import compare_lesions

    config = small_config(model="ccrnn", chunks=1)
    record = compare_lesions(config, steps=10, kill_step=5, out=tmp_path)

    assert record["degraded_windows_before_kill"] == 0
    assert record["first_degraded_step"] == 5  # every step from the kill on
    gaps = record["differences"]
    assert gaps["before_vs_lesioned"] <= 1e-5  # intact until then, in both
    assert gaps["after_vs_lesioned"] <= 1e-5  # then the lesioned rule, in both


def test_a_lesion_sweep_on_ray_equals_the_in_process_one(tmp_path):
    from orchestrator.cli import main
    from orchestrator.sweep import load_sweep

    common = [
        "sweep",
        "--task",
        "line",
        "--lesions",
        "intact,cerebellum@2,olive@2",
        "--models",
        "ccrnn",
        "--seeds",
        "1",
        "--epochs",
        "4",
        "--eval-every",
        "1",
        "--n-train",
        "200",
        "--hidden",
        "16",
        "--granule-width",
        "32",
        "--lr",
        "0.01",
        "--cerebellum-lr",
        "0.01",
        "--no-progress",
    ]
    assert main([*common, "--out", str(tmp_path / "here")]) == 0
    distributed = [
        "--distributed",
        "--schedule",
        "locked",
        "--cerebellum-learning",
        "on_update",
        "--cerebellum-precision",
        "float32",  # as the in-process cerebellum
        "--checkpoint-every",
        "0",
    ]
    assert main([*common, *distributed, "--out", str(tmp_path / "ray")]) == 0

    here, ray = load_sweep(tmp_path / "here"), load_sweep(tmp_path / "ray")
    # The olive lesion changes the run (the loss by about 1e-4 of itself, the
    # tremor by a sixth), so equality below, at 1e-5 and 1e-3, says that the
    # distributed lesion is the in-process one.
    final = {r["value"]: r["summary"]["validation_loss"] for r in here["runs"]}
    tremor = {r["value"]: r["summary"]["ataxia"]["tremor"] for r in here["runs"]}
    assert abs(final["olive@2"] - final["intact"]) > 3e-5 * final["intact"]
    assert abs(tremor["olive@2"] - tremor["intact"]) > 0.05 * tremor["intact"]
    for a, b in zip(here["runs"], ray["runs"], strict=True):
        assert a["value"] == b["value"]
        assert b["summary"]["schedule"] == "locked"
        assert [p["epoch"] for p in b["curve"]] == [1, 2, 3, 4]
        for p, q in zip(a["curve"], b["curve"], strict=True):
            assert q["validation_loss"] == pytest.approx(p["validation_loss"], rel=1e-5)
            assert q["tremor"] == pytest.approx(p["tremor"], rel=1e-3)
    stats = {r["value"]: r["summary"]["cerebellum"] for r in ray["runs"]}
    assert stats["olive@2"]["lesion.olive"] == 1.0
    assert stats["olive@2"]["rejected.olive_lesion"] > 0  # learning stopped
    assert stats["cerebellum@2"]["lesion.cerebellum"] == 1.0
    assert stats["cerebellum@2"]["predictions_lesioned"] > 0
