"""The schedules' arithmetic, with every chunk as a thread of this process."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from cortex_service.runtime import ChunkSpec, Mailbox
from orchestrator.batches import BatchStream
from orchestrator.config import TrainConfig
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


def test_decoupled_learns_and_its_cerebellum_predicts_observed_feedback():
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
    )
    run = run_threaded(config, task, "decoupled", 100)
    losses = run.losses
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    stats = run.cerebellum.stats["output_0"]
    assert stats.updates >= 90
    # Predicted and observed feedback of chunk 0's output point the same way.
    late = list(stats.cosine_history)[-40:]
    assert sum(late) / len(late) > 0.05


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
