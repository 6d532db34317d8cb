"""The schedules' arithmetic, with every chunk as a thread of this process."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cerebellum_service.learning import LocalCerebellum
from cortex_service.runtime import ChunkSpec, Mailbox
from orchestrator import threaded
from orchestrator.batches import BatchStream
from orchestrator.config import OUTPUT_CONTEXT, TrainConfig
from orchestrator.tasks.registry import load_task
from orchestrator.threaded import run_threaded
from orchestrator.trainer import Trainer
from tests.helpers import random_task


def in_process_losses(config: TrainConfig, task, steps: int) -> list[float]:
    trainer = Trainer(config, task)
    stream = BatchStream(task, config.batch_size, config.seed)
    return [trainer.run_batch(stream.sequences(s)).loss for s in range(steps)]


@pytest.mark.parametrize("transport", ["local", "grpc"])
@pytest.mark.parametrize("chunks", [2, 3])
@pytest.mark.parametrize("model,truncation", [("crnn", 3), ("bptt", None)])
def test_locked_matches_the_in_process_trainer_step_by_step(
    chunks, model, truncation, transport
):
    task = random_task(seq_len=9, n=40)
    config = TrainConfig(
        task="random",
        model=model,
        truncation=truncation,
        chunks=chunks,
        hidden_size=6,
        batch_size=10,
    )
    steps = 20
    expected = in_process_losses(config, task, steps)
    run = run_threaded(config, task, "locked", steps, transport=transport)
    assert len(run.losses) == steps
    for got, want in zip(run.losses, expected):
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want))
    # Losses change, so the comparison above compares training, not constants.
    assert len({round(x, 6) for x in expected}) > steps // 2


def capture_gradients(run_fn) -> list[list[torch.Tensor]]:
    """Patch ChunkLearner.step to record each chunk's gradients before updating."""
    from cortex_service import learning

    recorded: list[list[torch.Tensor]] = []
    original = learning.ChunkLearner.step

    def step(self):
        recorded.append([p.grad.clone() for p in self.chunk.parameters()])
        return original(self)

    learning.ChunkLearner.step = step
    try:
        run_fn()
    finally:
        learning.ChunkLearner.step = original
    return recorded


def test_pipelined_gradient_per_batch_equals_locked():
    task = random_task(seq_len=8, n=24)
    config = TrainConfig(
        task="random",
        model="crnn",
        truncation=4,
        chunks=2,
        hidden_size=5,
        batch_size=12,
    )
    locked = capture_gradients(lambda: run_threaded(config, task, "locked", 1))
    piped = capture_gradients(
        lambda: run_threaded(config, task, "pipelined", 1, micro_batches=4)
    )
    assert len(locked) == len(piped) == 2
    by_chunk = lambda grads: sorted(grads, key=lambda g: g[0].shape)  # noqa: E731
    for a, b in zip(by_chunk(locked), by_chunk(piped)):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-7)


class RecordingCerebellum(LocalCerebellum):
    """A local cerebellum that notes the dtypes it is handed."""

    seen: set[tuple[str, torch.dtype]] = set()

    def predict(self, queries):
        for q in queries:
            self.seen.add(("activity", q.activity.dtype))
            if q.context is not None:
                self.seen.add(("context", q.context.dtype))
        return super().predict(queries)

    def observe(self, observations):
        self.seen.update(("feedback", o.feedback.dtype) for o in observations)
        super().observe(observations)


@pytest.mark.parametrize(
    "asked,precision", [(None, torch.float32), (torch.bfloat16, torch.bfloat16)]
)
def test_decoupled_learns_and_its_cerebellum_predicts_observed_feedback(
    monkeypatch, asked, precision
):
    # By default everything is float32; asked for bfloat16, the cerebellum
    # computes in it and the chunks send it that.
    monkeypatch.setattr(RecordingCerebellum, "seen", set())
    monkeypatch.setattr(threaded, "LocalCerebellum", RecordingCerebellum)
    task = load_task("patterns", seed=0, n_train=300)
    config = TrainConfig(
        task="patterns",
        model="ccrnn",
        truncation=7,
        chunks=2,
        hidden_size=32,
        batch_size=50,
        granule_width=128,
        lr=3e-3,
        # Without these the output zone predicts about the mean feedback and its
        # cosine hovers near zero, above or below depending on how the two chunk
        # threads happen to batch its updates.
        **OUTPUT_CONTEXT,
    )
    # 150 steps, not 100: with other work on the cores the two chunk threads
    # batch the cerebellum's updates differently, and after 100 steps a run
    # now and then had not yet left its early plateau (CI, 1 run in 4).
    run = run_threaded(config, task, "decoupled", 150, cerebellum_dtype=asked)
    assert run.cerebellum.compute_dtype == precision
    assert RecordingCerebellum.seen == {
        ("activity", precision),
        ("context", precision),
        ("feedback", precision),
    }
    losses = run.losses
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:10]) / 10
    stats = run.cerebellum.stats["output_0"]
    assert stats.updates >= 135
    # Predicted and observed feedback of chunk 0's output point the same way.
    late = list(stats.cosine_history)[-40:]
    assert sum(late) / len(late) > 0.15


def test_decoupled_chunk_zero_never_waits_for_feedback():
    task = random_task(seq_len=8, n=20)
    config = TrainConfig(
        task="random",
        model="crnn",
        truncation=2,
        chunks=2,
        hidden_size=4,
        batch_size=10,
    )
    run = run_threaded(config, task, "decoupled", 4)
    phases = {event[0] for event in run.runtimes[0].timeline.events}
    assert "wait_feedback" not in phases
    assert "predict" in phases
    locked = run_threaded(config, task, "locked", 2)
    assert "wait_feedback" in {e[0] for e in locked.runtimes[0].timeline.events}


def test_forward_unlock_runs_chunks_on_predicted_input():
    task = random_task(seq_len=8, n=20)
    config = TrainConfig(
        task="random",
        model="crnn",
        truncation=2,
        chunks=2,
        hidden_size=4,
        batch_size=10,
    )
    run = run_threaded(config, task, "decoupled", 3, forward_unlock=True)
    phases = {event[0] for event in run.runtimes[1].timeline.events}
    assert "wait_input" not in phases
    assert run.cerebellum.stats["input_1"].observations > 0


def test_mailbox_full_stalls_the_sender_until_read():
    box = Mailbox(2, "test")
    box.put((0, 0, 0), "a")
    box.put((0, 1, 0), "b")
    done = threading.Event()

    def sender():
        box.put((0, 2, 0), "c")
        done.set()

    thread = threading.Thread(target=sender)
    thread.start()
    deadline = time.monotonic() + 10
    while box.stalls == 0 and time.monotonic() < deadline:
        time.sleep(0.001)  # polling a counter, not timing the sender
    assert box.stalls == 1
    assert not done.is_set()  # blocked: the mailbox holds two windows
    assert box.take((0, 0, 0)) == "a"
    assert done.wait(10)
    thread.join()
    assert len(box) == 2


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(schedule="sideways"), "--schedule"),
        (dict(micro_batches=0), "--micro-batches"),
        (dict(micro_batches=2, schedule="locked"), "--schedule pipelined"),
        (dict(forward_unlock=True), "--schedule decoupled"),
    ],
)
def test_bad_schedule_settings_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        ChunkSpec(index=0, chunks=2, **kwargs)


def frozen_random_cerebellum(config: TrainConfig, task, schedule: str):
    """A cerebellum that predicts something (random Purkinje weights) and never
    learns, so its predictions do not depend on when observations arrive."""
    from cerebellum_service.learning import LocalCerebellum
    from cortex_service.network import build_chunks
    from orchestrator.zones import build_microzones, context_size, zone_specs

    chunks = build_chunks(
        task.input_size, config.hidden_size, task.output_size, config.chunks
    )
    n_labels = int(task.train.labels.max()) + 1
    specs = zone_specs(
        config, chunks, schedule, False, context_size(config, n_labels, task.seq_len)
    )
    zones = build_microzones(specs)
    torch.manual_seed(7)
    for zone in zones.values():
        torch.nn.init.normal_(zone.purkinje.weight, std=0.3)
    cerebellum = LocalCerebellum(zones)
    cerebellum.frozen = True
    return cerebellum


@pytest.mark.parametrize("model", ["crnn", "ccrnn"])
def test_decoupled_look_ahead_keeps_the_arithmetic_and_overlaps_predict(model):
    task = random_task(seq_len=8, n=24)
    config = TrainConfig(
        task="random",
        model=model,
        truncation=2,
        chunks=2,
        hidden_size=5,
        batch_size=12,
        granule_width=16,
    )
    runs, grads = {}, {}
    for look_ahead in (True, False):
        cerebellum = frozen_random_cerebellum(config, task, "decoupled")

        def train(look_ahead=look_ahead, cerebellum=cerebellum):
            runs[look_ahead] = run_threaded(
                config,
                task,
                "decoupled",
                3,
                cerebellum=cerebellum,
                look_ahead=look_ahead,
            )

        grads[look_ahead] = capture_gradients(train)
    by_chunk = lambda grads: sorted(grads, key=lambda g: g[0].shape)  # noqa: E731
    assert len(grads[True]) == len(grads[False]) == 2 * 3
    for a, b in zip(by_chunk(grads[False]), by_chunk(grads[True])):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-8)
    # Chunk 0's predictions made a difference (they are not all zero) ...
    assert any(g.abs().sum() > 0 for g in grads[True][0])

    # ... and with look-ahead it takes a window's predictions only after the next
    # window's forward pass; without, right after its own.
    def order(run):
        events = run.runtimes[0].timeline.events
        return [(phase, window) for phase, batch, window, *_ in events if batch == 0]

    ahead, inline = order(runs[True]), order(runs[False])
    assert ahead.index(("forward", 1)) < ahead.index(("predict", 0))
    assert inline.index(("predict", 0)) < inline.index(("forward", 1))


def tiny_ccrnn(**changes) -> TrainConfig:
    return TrainConfig(
        task="random",
        model="ccrnn",
        truncation=2,
        chunks=2,
        hidden_size=4,
        batch_size=10,
        granule_width=8,
        **changes,
    )


def recording(cerebellum) -> list:
    """The queries ``cerebellum`` is asked from now on, as a list that grows."""
    asked = []
    original = cerebellum.predict

    def predict(queries):
        asked.extend(queries)
        return original(queries)

    cerebellum.predict = predict
    return asked


def test_time_context_gives_microzones_the_step_they_predict_for():
    from orchestrator.zones import context_size

    task = random_task(seq_len=6, n=20)
    config = tiny_ccrnn(time_context=True)
    n_labels = int(task.train.labels.max()) + 1
    assert context_size(config, n_labels, 6) == 6
    labelled = TrainConfig(**{**config.__dict__, "context": True})
    assert context_size(labelled, n_labels, 6) == n_labels + 6

    cerebellum = frozen_random_cerebellum(config, task, "decoupled")
    asked = recording(cerebellum)
    run_threaded(config, task, "decoupled", 1, cerebellum=cerebellum)
    for query in asked:
        codes = query.context
        assert codes.shape == (query.activity.shape[0], 6)
        assert torch.equal(codes.sum(dim=1), torch.ones(codes.shape[0]))
        steps = codes.argmax(dim=1)
        start = 2 * query.key.window
        if query.zone.startswith("state"):
            # The state at a window's end: its last step.
            assert torch.equal(steps, torch.full_like(steps, start + 1))
        else:
            # Chunk 0's outputs, rows (example, step): every step of the window.
            assert torch.equal(steps, torch.arange(start, start + 2).repeat(10))
    assert {q.zone for q in asked} == {"state_0", "state_1", "output_0"}

    # The in-process trainer gives its state zones the same codes.
    from orchestrator.trainer import Trainer

    trainer = Trainer(config, task)
    seen = recording(trainer.predictor)
    trainer.run_batch(BatchStream(task, 10, 0).sequences(0))
    assert [int(q.context[0].argmax()) for q in seen[::2]] == [1, 3]


def test_context_zones_choose_which_microzones_see_the_context():
    from orchestrator.config import ConfigError

    task = random_task(seq_len=6, n=20)
    config = tiny_ccrnn(time_context=True, context_zones="output")
    cerebellum = frozen_random_cerebellum(config, task, "decoupled")
    assert cerebellum.zones["state_0"].context_size == 0
    assert cerebellum.zones["output_0"].context_size == 6
    asked = recording(cerebellum)
    run_threaded(config, task, "decoupled", 1, cerebellum=cerebellum)
    contexts = {q.zone: q.context for q in asked}
    assert contexts["state_0"] is None and contexts["state_1"] is None
    assert contexts["output_0"].shape[1] == 6

    trainer = Trainer(config, task)
    assert all(z.context_size == 0 for z in trainer.predictor.zones.values())
    with pytest.raises(ConfigError, match="--context-zones"):
        TrainConfig(context_zones="granule")
