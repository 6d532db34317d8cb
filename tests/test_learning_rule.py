"""The learning rule is exact: true future feedback turns truncated BPTT into BPTT."""

from __future__ import annotations

import pytest
import torch

from cortex_service.learning import ChunkLearner
from cortex_service.network import CorticalChunk, flatten_state
from orchestrator.config import TrainConfig
from orchestrator.tasks.base import sequence_loss
from orchestrator.trainer import Trainer
from tests.helpers import OracleCerebellum, random_task, true_future_feedback


@pytest.fixture(autouse=True)
def _float64():
    # Exactness is checked in double precision so that 1e-5 measures the rule,
    # not rounding.
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def grads(trainer: Trainer) -> list[torch.Tensor]:
    return [p.grad.clone() for chunk in trainer.chunks for p in chunk.parameters()]


def full_bptt_grads(trainer: Trainer, batch) -> list[torch.Tensor]:
    hidden = batch.inputs
    for chunk in trainer.chunks:
        hidden, _ = chunk(hidden, chunk.initial_state(len(batch)))
    outputs = trainer.chunks[-1].read_out(hidden)
    loss = sequence_loss(
        outputs, batch.targets, batch.mask, trainer.task.kind, batch.mask.sum()
    )
    loss.backward()
    result = grads(trainer)
    for chunk in trainer.chunks:
        chunk.zero_grad(set_to_none=True)
    return result


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(y.pow(2).sum()) for y in b)
    return (num / den) ** 0.5


@pytest.mark.parametrize("truncation", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("chunks,layers", [(1, 1), (1, 2), (2, 1)])
@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_oracle_feedback_gives_full_bptt_gradients(truncation, chunks, layers, kind):
    task = random_task(seq_len=9, kind=kind, outputs=2 if kind == "regression" else 4)
    config = TrainConfig(
        task="random",
        model="ccrnn",
        truncation=truncation,
        hidden_size=5,
        chunks=chunks,
        layers_per_chunk=layers,
        feedback_scale=1.0,
        granule_width=8,
    )
    trainer = Trainer(config, task)
    batch = task.train
    reference = full_bptt_grads(trainer, batch)

    oracle = OracleCerebellum(
        true_future_feedback(trainer.chunks, batch, task.kind, truncation), len(batch)
    )
    trainer.run_batch(batch, predictor=oracle, step=False)

    assert relative_error(grads(trainer), reference) < 1e-5


def test_truncation_without_feedback_differs_from_bptt():
    # The oracle test above could pass if feedback were irrelevant; it is not.
    task = random_task(seq_len=9)
    config = TrainConfig(task="random", model="crnn", truncation=2, hidden_size=5)
    trainer = Trainer(config, task)
    reference = full_bptt_grads(trainer, task.train)
    trainer.run_batch(task.train, step=False)
    assert relative_error(grads(trainer), reference) > 1e-3


def test_oracle_observations_are_the_true_feedback_at_window_starts():
    task = random_task(seq_len=8)
    config = TrainConfig(
        task="random", model="ccrnn", truncation=2, hidden_size=4, feedback_scale=1.0
    )
    trainer = Trainer(config, task)
    truth = true_future_feedback(trainer.chunks, task.train, task.kind, 2)
    oracle = OracleCerebellum(truth, unit=len(task.train))
    trainer.run_batch(task.train, predictor=oracle, step=False)

    # With exact feedback injected, the bootstrapped target at window w's start is
    # the exact feedback of the state that ended window w - 1.
    assert [o.key.window for o in oracle.observations] == [0, 1, 2]
    for observation in oracle.observations:
        expected = truth[(observation.key.window, observation.key.chunk)] * len(
            task.train
        )
        torch.testing.assert_close(
            observation.feedback, expected, rtol=1e-9, atol=1e-12
        )


def manual_lstm(chunk: CorticalChunk, x: torch.Tensor) -> torch.Tensor:
    """The LSTM equations step by step with the chunk's own weights."""
    lstm = chunk.lstm
    w_ih, w_hh = lstm.weight_ih_l0, lstm.weight_hh_l0
    bias = lstm.bias_ih_l0 + lstm.bias_hh_l0
    h = torch.zeros(x.shape[0], chunk.hidden_size)
    c = torch.zeros_like(h)
    outputs = []
    for t in range(x.shape[1]):
        gates = x[:, t] @ w_ih.T + h @ w_hh.T + bias
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return chunk.read_out(torch.stack(outputs, dim=1))


def test_bptt_equals_autograd_through_hand_unrolled_lstm():
    task = random_task(seq_len=7)
    config = TrainConfig(task="random", model="bptt", hidden_size=6)
    trainer = Trainer(config, task)
    batch = task.train

    outputs = manual_lstm(trainer.chunks[0], batch.inputs)
    sequence_loss(
        outputs, batch.targets, batch.mask, task.kind, batch.mask.sum()
    ).backward()
    reference = grads(trainer)
    trainer.chunks[0].zero_grad(set_to_none=True)

    result = trainer.run_batch(batch, step=False)

    assert result.windows == 1
    assert relative_error(grads(trainer), reference) < 1e-5


def test_bootstrapped_target_is_the_autograd_gradient_at_window_start():
    torch.manual_seed(3)
    chunk = CorticalChunk(3, 4, num_layers=2, output_size=2)
    learner = ChunkLearner(chunk)
    x = torch.randn(5, 3, 3)
    state = tuple(torch.randn(2, 5, 4) for _ in range(2))
    predicted = tuple(torch.randn(2, 5, 4) for _ in range(2))
    target = torch.randn(5, 3, 2)

    window = learner.forward(x, state)
    loss = ((window.outputs - target) ** 2).mean()
    _, observed = learner.backward(window, loss=loss, state_feedback=predicted)

    h0, c0 = (s.clone().requires_grad_(True) for s in state)
    hidden, (h, c) = chunk(x, (h0, c0))
    total = ((chunk.read_out(hidden) - target) ** 2).mean()
    total = total + (h * predicted[0]).sum() + (c * predicted[1]).sum()
    expected = flatten_state(torch.autograd.grad(total, (h0, c0)))
    torch.testing.assert_close(observed, expected, rtol=1e-10, atol=1e-12)


def test_input_feedback_is_the_autograd_gradient_of_the_input():
    torch.manual_seed(4)
    chunk = CorticalChunk(3, 4)
    learner = ChunkLearner(chunk)
    x = torch.randn(2, 5, 3)
    feedback = torch.randn(2, 5, 4)
    window = learner.forward(x, chunk.initial_state(2), input_feedback=True)
    input_grad, _ = learner.backward(window, output_feedback=feedback)

    leaf = x.clone().requires_grad_(True)
    hidden, _ = chunk(leaf, chunk.initial_state(2))
    (expected,) = torch.autograd.grad((hidden * feedback).sum(), leaf)
    torch.testing.assert_close(input_grad, expected)
