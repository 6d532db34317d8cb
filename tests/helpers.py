"""Small fakes shared by the tests: synthetic tasks and an oracle cerebellum."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

import torch

from cerebellum_service.learning import FeedbackPredictor, Observation, Query
from cortex_service.network import CorticalChunk, flatten_state, window_bounds
from orchestrator.tasks.base import SequenceData, TaskData, TaskKind, sequence_loss


def random_split(
    n: int, seq_len: int, inputs: int, outputs: int, kind: TaskKind, seed: int
) -> SequenceData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, seq_len, inputs, generator=g)
    if kind == "regression":
        y = torch.randn(n, seq_len, outputs, generator=g)
    else:
        y = torch.randint(0, outputs, (n, seq_len), generator=g)
    mask = torch.rand(n, seq_len, generator=g) < 0.6
    mask[:, -1] = True
    labels = torch.randint(0, 3, (n,), generator=g)
    return SequenceData(x, y, mask, labels)


def random_task(
    seq_len: int = 9,
    inputs: int = 3,
    outputs: int = 2,
    kind: TaskKind = "regression",
    n: int = 8,
    seed: int = 0,
) -> TaskData:
    """A task of random sequences, for checks that need no meaning."""
    return TaskData(
        name="random",
        kind=kind,
        input_size=inputs,
        output_size=outputs,
        seq_len=seq_len,
        train=random_split(n, seq_len, inputs, outputs, kind, seed),
        validation=random_split(n, seq_len, inputs, outputs, kind, seed + 1),
        test=random_split(n, seq_len, inputs, outputs, kind, seed + 2),
    )


def true_future_feedback(
    chunks: list[CorticalChunk], batch: SequenceData, kind: TaskKind, truncation: int
) -> dict[tuple[int, int], torch.Tensor]:
    """Exact ``dL_future / d state_end`` for every (window, chunk), by full BPTT.

    The whole sequence is unrolled in one graph; the state entering each window
    passes through a node whose gradient is the feedback of everything after it.
    """
    size = len(batch)
    states = [chunk.initial_state(size) for chunk in chunks]
    normaliser = batch.mask.sum()
    bounds = list(window_bounds(batch.inputs.shape[1], truncation))
    boundary: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    total = 0.0
    for window, (start, stop) in enumerate(bounds):
        inputs = batch.inputs[:, start:stop]
        for index, chunk in enumerate(chunks):
            if window > 0:
                h, c = (s.clone() for s in states[index])
                h.retain_grad()
                c.retain_grad()
                boundary[(window - 1, index)] = (h, c)
                states[index] = (h, c)
            inputs, states[index] = chunk(inputs, states[index])
        outputs = chunks[-1].read_out(inputs)
        total = total + sequence_loss(
            outputs,
            batch.targets[:, start:stop],
            batch.mask[:, start:stop],
            kind,
            normaliser,
        )
    total.backward()
    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    return {key: flatten_state((h.grad, c.grad)) for key, (h, c) in boundary.items()}


class OracleCerebellum(FeedbackPredictor):
    """Predicts the exact future feedback; records what it is taught."""

    def __init__(
        self, feedback: dict[tuple[int, int], torch.Tensor], unit: float = 1.0
    ) -> None:
        # unit: the trainer's feedback unit (the batch size): predictions and
        # observations are per-example feedback, the gradient times the unit.
        self.feedback = feedback
        self.unit = unit
        self.observations: list[Observation] = []

    def predict(self, queries: Sequence[Query]) -> list[torch.Tensor | None]:
        return [self.feedback[(q.key.window, q.key.chunk)] * self.unit for q in queries]

    def observe(self, observations: Sequence[Observation]) -> None:
        self.observations.extend(observations)

    def update(self) -> dict[str, float]:
        return {}


def wait_until(
    predicate: Callable[[], object],
    timeout: float = 60.0,
    what: str = "condition",
    poll_s: float = 0.05,
):
    """Poll ``predicate`` until it returns something true; return that value.

    For waiting on another process's state (an actor, a server), not for timing.

    Raises:
        AssertionError: nothing true within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll_s)


def thread_policies(pid: int | str = "self") -> dict[int, int]:
    """Scheduling policy of every thread of a process (``os.SCHED_*``)."""
    return _per_thread(pid, lambda tid: os.sched_getscheduler(tid))


def thread_niceness(pid: int | str = "self") -> dict[int, int]:
    """Niceness of every thread of a process, from /proc (field 19 of stat)."""

    def niceness(tid: int) -> int:
        with open(f"/proc/{pid}/task/{tid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[16])

    return _per_thread(pid, niceness)


def _per_thread(pid: int | str, read: Callable[[int], int]) -> dict[int, int]:
    """``read(tid)`` for every thread of a process, skipping any that ends
    while it is read."""
    values = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            values[int(tid)] = read(int(tid))
        except (ProcessLookupError, FileNotFoundError):
            continue  # a thread that ended meanwhile
    return values
