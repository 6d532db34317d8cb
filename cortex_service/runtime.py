"""One chunk's step under each schedule.

The runtime owns the loop of one chunk: take input, run the window forward, send
activity up, get feedback (observed from the chunk above, or predicted by the
cerebellum), run the backward pass, send observed feedback down and to the
cerebellum, update. Which of these it waits for is the schedule::

    locked      fwd(w) ─send─▶ ······ wait fb(w) ─▶ bwd(w) ─▶ fwd(w+1) …
    pipelined   fwd(w,m0) fwd(w,m1) … ──▶ wait fb(w,mM) bwd … bwd(w,m0) ─▶ …
    decoupled   fwd(w) ─send─▶ predict(w) ─▶ bwd(w) ─▶ fwd(w+1) …   (never waits
                                                       for the chunk above)

Neighbours and the cerebellum are interfaces: in tests they are objects in the
same process (:class:`LocalNeighbour`, ``LocalCerebellum``), in a run gRPC
clients. Inbound messages land in :class:`Mailbox` objects keyed by
``(batch, window, micro_batch)``; a full mailbox stalls the sender, which bounds
the work in flight between two chunks.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from cerebellum_service.learning import (
    ActivityKey,
    FeedbackPredictor,
    Observation,
    PendingPrediction,
    Query,
)
from cortex_service.learning import ChunkLearner, WindowPass
from cortex_service.loss import sequence_loss
from cortex_service.network import flatten_state, unflatten_state, window_bounds

logger = logging.getLogger(__name__)

SCHEDULES: tuple[str, ...] = ("locked", "pipelined", "decoupled")
MailKey = tuple[int, int, int]  # (batch, window, micro_batch)


class Abandoned(RuntimeError):
    """The sender of a message waiting for mailbox room has given up on it."""


ABANDON_CHECK_S = 0.25
"""How often a deposit waiting for room asks whether its sender gave up."""


class Aborted(RuntimeError):
    """The run was stopped (by the driver, or because a peer failed)."""


def state_zone(chunk: int) -> str:
    """Microzone predicting the future feedback of a chunk's state at window ends."""
    return f"state_{chunk}"


def output_zone(chunk: int) -> str:
    """Microzone predicting the feedback of a chunk's outputs (from the chunk above)."""
    return f"output_{chunk}"


def input_zone(chunk: int) -> str:
    """Microzone predicting a chunk's input from the network input (forward unlock)."""
    return f"input_{chunk}"


class Mailbox:
    """A bounded, keyed inbox: senders block while it is full, readers wait by key.

    Args:
        capacity: messages held at most; a sender beyond it waits (back-pressure).
        name: for messages and metrics.
    """

    def __init__(self, capacity: int, name: str = "mailbox") -> None:
        if capacity < 1:
            raise ValueError(f"mailbox capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.name = name
        self._items: dict[MailKey, object] = {}
        self._condition = threading.Condition()
        self._aborted = False
        self.stalls = 0  # puts that had to wait for room

    def __len__(self) -> int:
        with self._condition:
            return len(self._items)

    def put(
        self,
        key: MailKey,
        value: object,
        timeout: float | None = None,
        abandoned: Callable[[], bool] | None = None,
    ) -> None:
        """Deposit ``value`` under ``key``; wait while the mailbox is full.

        ``abandoned``, asked every ``ABANDON_CHECK_S`` of waiting, says the
        sender has given up on the message (its call was cancelled): then
        ``Abandoned`` is raised and nothing is deposited.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            if key in self._items:
                raise KeyError(f"{self.name}: a message for {key} is already waiting")
            stalled = len(self._items) >= self.capacity
            if stalled:
                self.stalls += 1
            while len(self._items) >= self.capacity and not self._aborted:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{self.name} full for {timeout} s")
                if abandoned is not None:
                    if abandoned():
                        raise Abandoned(f"{self.name}: the sender gave up on {key}")
                    remaining = min(remaining or ABANDON_CHECK_S, ABANDON_CHECK_S)
                self._condition.wait(remaining)
            if self._aborted:
                raise Aborted(f"{self.name} aborted")
            if stalled and abandoned is not None and abandoned():
                # Room came after the sender gave up (and before we looked).
                raise Abandoned(f"{self.name}: the sender gave up on {key}")
            self._items[key] = value
            self._condition.notify_all()

    def take(self, key: MailKey, timeout: float | None = None) -> object:
        """Remove and return the message for ``key``, waiting until it arrives."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while key not in self._items and not self._aborted:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"{self.name}: nothing for {key} after {timeout} s"
                    )
                self._condition.wait(remaining)
            if self._aborted:
                raise Aborted(f"{self.name} aborted")
            value = self._items.pop(key)
            self._condition.notify_all()
            return value

    def abort(self) -> None:
        """Wake every waiter with :class:`Aborted`; the mailbox stays unusable."""
        with self._condition:
            self._aborted = True
            self._condition.notify_all()

    def reset(self) -> None:
        """Drop everything and accept messages again (after a restore)."""
        with self._condition:
            self._items.clear()
            self._aborted = False
            self._condition.notify_all()


class Neighbour(Protocol):
    """Where a chunk sends activity (to the chunk above) or feedback (below)."""

    def send_activity(self, key: ActivityKey, outputs: torch.Tensor) -> None: ...

    def send_feedback(self, key: ActivityKey, feedback: torch.Tensor) -> None: ...


class LocalNeighbour:
    """A neighbour in the same process: messages go straight into its mailboxes."""

    def __init__(self, activity_in: Mailbox, feedback_in: Mailbox) -> None:
        self.activity_in = activity_in
        self.feedback_in = feedback_in

    def send_activity(self, key: ActivityKey, outputs: torch.Tensor) -> None:
        self.activity_in.put(mail_key(key), outputs.detach().clone())

    def send_feedback(self, key: ActivityKey, feedback: torch.Tensor) -> None:
        self.feedback_in.put(mail_key(key), feedback.detach().clone())


def mail_key(key: ActivityKey) -> MailKey:
    return (key.batch, key.window, key.micro_batch)


@dataclass
class Timeline:
    """Spans of work per phase, in seconds since the run started (for plots).

    Keeps the newest ``MAX_EVENTS`` spans; ``on_span`` (the actor's metrics) sees
    every one.
    """

    MAX_EVENTS = 200_000

    origin: float = field(default_factory=time.perf_counter)
    events: deque = field(default_factory=lambda: deque(maxlen=Timeline.MAX_EVENTS))
    on_span: Callable[[str, float], None] | None = None

    @contextmanager
    def span(
        self, phase: str, batch: int, window: int, micro: int = 0
    ) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            self.events.append(
                (phase, batch, window, micro, start - self.origin, end - self.origin)
            )
            if self.on_span is not None:
                self.on_span(phase, end - start)

    def totals(self) -> dict[str, float]:
        result: dict[str, float] = {}
        for phase, *_, start, end in self.events:
            result[phase] = result.get(phase, 0.0) + end - start
        return result


@dataclass(frozen=True)
class ChunkSpec:
    """Where a chunk sits and how it waits.

    Attributes:
        index: this chunk's position, 0 at the input.
        chunks: K, the number of chunks.
        schedule: locked, pipelined or decoupled.
        micro_batches: M for pipelined (1 otherwise).
        forward_unlock: chunks above the first run on predicted input.
        temporal: use state microzones at window ends (the ccRNN model).
        feedback_scale: scale of predicted feedback.
        output_feedback_scale: scale of the feedback predicted for the chunk's
            outputs (decoupled), ``None`` for ``feedback_scale``.
        time_context: the microzones' context also holds each row's time step,
            one-hot (``--time-context``).
        context_zones: which microzones get the context (label and time step):
            ``all``, ``state`` or ``output``.
        look_ahead: under decoupled with one update per sequence, take a
            window's predictions after the next window's forward pass (the
            same arithmetic, the Predict round trip hidden behind compute).
        run: the run's id, carried in every key.
        wait_timeout: seconds to wait for a neighbour before giving up.
    """

    index: int
    chunks: int
    schedule: str = "locked"
    micro_batches: int = 1
    forward_unlock: bool = False
    temporal: bool = True
    feedback_scale: float = 0.1
    output_feedback_scale: float | None = None
    time_context: bool = False
    context_zones: str = "all"
    look_ahead: bool = True
    run: str = ""
    wait_timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}"
            )
        if not 0 <= self.index < self.chunks:
            raise ValueError(f"chunk index {self.index} outside 0..{self.chunks - 1}")
        if self.micro_batches < 1:
            raise ValueError(
                f"--micro-batches must be at least 1, got {self.micro_batches}"
            )
        if self.micro_batches > 1 and self.schedule != "pipelined":
            raise ValueError(
                f"--micro-batches {self.micro_batches} needs --schedule pipelined"
            )
        if self.forward_unlock and self.schedule != "decoupled":
            raise ValueError("--forward-unlock needs --schedule decoupled")

    @property
    def output_scale(self) -> float:
        """The scale of feedback predicted for the outputs (spatial cut)."""
        if self.output_feedback_scale is None:
            return self.feedback_scale
        return self.output_feedback_scale

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.chunks - 1


@dataclass
class Batch:
    """What a chunk needs of one batch; chunks not at the ends ignore parts of it."""

    inputs: torch.Tensor  # (B, S, I)
    targets: torch.Tensor  # (B, S, O) or (B, S)
    mask: torch.Tensor  # (B, S)
    context: torch.Tensor | None = None  # (B, C)


@dataclass
class _Asked:
    """Queries sent to the cerebellum, and the answer to come (None: no cerebellum)."""

    queries: list[Query]
    pending: PendingPrediction | None


@dataclass
class _Window:
    """One micro-batch's pass over one window, from its forward to its backward."""

    key: ActivityKey
    wp: WindowPass
    part: slice  # the micro-batch's rows of the batch
    start: int
    stop: int
    final: bool  # the sequence's last window
    asked: _Asked | None = None  # set once its queries are sent


@dataclass
class StepResult:
    step: int
    loss: float | None  # last chunk only
    degraded_windows: int


class ChunkRuntime:
    """Runs one chunk through batches under its schedule.

    Args:
        spec: position and schedule.
        learner: the chunk and its optimiser.
        kind: regression or classification (the last chunk's loss).
        seq_len: steps per sequence.
        truncation: window length T.
        update: ``sequence`` or ``window``.
        activity_in: mailbox for activity from the chunk below.
        feedback_in: mailbox for observed feedback from the chunk above.
        below: the chunk below (observed feedback goes there), or None.
        above: the chunk above (activity goes there), or None.
        cerebellum: predicted feedback, or None (cRNN; or degraded).
        cerebellum_dtype: the dtype activity and feedback travel to the
            cerebellum in (None: the chunk's own); predictions come back into
            the chunk's dtype. A cerebellum that computes in bfloat16 is sent
            bfloat16, half the bytes.
    """

    def __init__(
        self,
        spec: ChunkSpec,
        learner: ChunkLearner,
        kind: str,
        seq_len: int,
        truncation: int,
        update: str,
        activity_in: Mailbox,
        feedback_in: Mailbox,
        below: Neighbour | None = None,
        above: Neighbour | None = None,
        cerebellum: FeedbackPredictor | None = None,
        device: torch.device | str = "cpu",
        cerebellum_dtype: torch.dtype | None = None,
    ) -> None:
        self.spec = spec
        self.cerebellum_dtype = cerebellum_dtype
        self.device = torch.device(device)
        self.learner = learner
        self.kind = kind
        self.seq_len = seq_len
        self.truncation = truncation
        self.update = update
        self.activity_in = activity_in
        self.feedback_in = feedback_in
        self.below = below
        self.above = above
        self.cerebellum = cerebellum
        self.timeline = Timeline()
        self.degraded_windows = 0
        self._warned_degraded = False

    # Helpers -----------------------------------------------------------------------

    def _key(self, step: int, window: int, micro: int, chunk: int | None = None):
        chunk = self.spec.index if chunk is None else chunk
        return ActivityKey(step, window, chunk, micro, self.spec.run)

    def _wait(self, mailbox: Mailbox, key: ActivityKey, phase: str) -> torch.Tensor:
        with self.timeline.span(phase, key.batch, key.window, key.micro_batch):
            value = mailbox.take(mail_key(key), timeout=self.spec.wait_timeout)
        return value.to(self.device, non_blocking=True)

    def _predict(self, queries: list[Query]) -> list[torch.Tensor | None]:
        return self._take(self._ask(queries))

    def _ask(self, queries: list[Query]) -> _Asked:
        """Send the queries now; :meth:`_take` waits for the answers."""
        if self.cerebellum is None or not queries:
            return _Asked(queries, None)
        sent = queries
        if self.device.type != "cpu":
            sent = [_query_on_host(q) for q in sent]
        if self.cerebellum_dtype is not None:
            sent = [_query_as(q, self.cerebellum_dtype) for q in sent]
        key = queries[0].key
        with self.timeline.span("send", key.batch, key.window, key.micro_batch):
            pending = self.cerebellum.predict_async(sent)
        return _Asked(queries, pending)

    def _take(self, asked: _Asked) -> list[torch.Tensor | None]:
        if asked.pending is None:
            return [None] * len(asked.queries)
        key = asked.queries[0].key
        with self.timeline.span("predict", key.batch, key.window, key.micro_batch):
            predictions = asked.pending.result()
        predictions = [
            None
            if p is None
            else p.to(self.device, query.activity.dtype, non_blocking=True)
            for p, query in zip(predictions, asked.queries, strict=True)
        ]
        if any(p is None for p in predictions):
            self.degraded_windows += 1
            if not self._warned_degraded:
                logger.warning(
                    "chunk %d: cerebellum gave no prediction (degraded mode: "
                    "truncated backprop until it answers again)",
                    self.spec.index,
                )
                self._warned_degraded = True
        elif self._warned_degraded:
            logger.info("chunk %d: cerebellum predictions resumed", self.spec.index)
            self._warned_degraded = False
        return predictions

    def _observe(self, observations: list[Observation]) -> None:
        if self.cerebellum is not None and observations:
            if self.device.type != "cpu":
                observations = [_observation_on_host(o) for o in observations]
            if self.cerebellum_dtype is not None:
                observations = [
                    _observation_as(o, self.cerebellum_dtype) for o in observations
                ]
            self.cerebellum.observe(observations)

    def _micro_rows(self, size: int) -> list[slice]:
        count = min(self.spec.micro_batches, size)
        bounds = [round(i * size / count) for i in range(count + 1)]
        return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    # One batch ---------------------------------------------------------------------

    def run_batch(self, step: int, batch: Batch) -> StepResult:
        """Every window of one batch; updates as the configuration says."""
        batch = batch_to(batch, self.device)
        size = batch.inputs.shape[0]
        unit = float(size)  # feedback per example, as in the in-process trainer
        normaliser = batch.mask.sum().clamp_min(1)
        rows = self._micro_rows(size)
        chunk = self.learner.chunk
        states = [chunk.initial_state(r.stop - r.start, self.device) for r in rows]
        bounds = list(window_bounds(self.seq_len, self.truncation))
        degraded_before = self.degraded_windows
        total_loss = 0.0

        # Decoupled with one update per sequence: a window's predictions are asked
        # for at the end of its forward pass and taken after the next window's
        # forward pass, so the Predict round trip overlaps compute. The backward
        # passes keep their order and the weights do not change in between, so
        # the arithmetic is that of taking the answer at once. (A chunk with
        # nothing to ask keeps its backward right after its forward.)
        asks = self.cerebellum is not None and (
            self.spec.temporal or not self.spec.last
        )
        look_ahead = (
            self.spec.look_ahead
            and self.spec.schedule == "decoupled"
            and self.update == "sequence"
            and asks
        )
        pending: _Window | None = None  # decoupled: its backward is still to come

        for window, (start, stop) in enumerate(bounds):
            final = window == len(bounds) - 1
            passes = []
            for micro, part in enumerate(rows):
                key = self._key(step, window, micro)
                inputs = self._input(key, batch, part, start, stop)
                with self.timeline.span("forward", step, window, micro):
                    wp = self.learner.forward(
                        inputs, states[micro], not self.spec.first
                    )
                states[micro] = tuple(s.detach() for s in wp.state_end)
                self._send_up(key, wp, batch.inputs[part, start:stop])
                done = _Window(key, wp, part, start, stop, final)
                if self.spec.schedule != "decoupled":
                    passes.append(done)
                    continue
                done.asked = self._ask(self._queries(done, batch))
                if pending is not None:
                    total_loss += self._backward(pending, batch, unit, normaliser)
                pending = done
                if not look_ahead:
                    total_loss += self._backward(pending, batch, unit, normaliser)
                    pending = None
            # Locked and pipelined: backward once the chunk above has answered,
            # micro-batches in reverse order on every chunk.
            for done in reversed(passes):
                done.asked = self._ask(self._queries(done, batch))
                total_loss += self._backward(done, batch, unit, normaliser)
            if self.update == "window":
                self._step(step, window)
        if pending is not None:
            total_loss += self._backward(pending, batch, unit, normaliser)
        if self.update == "sequence":
            self._step(step, len(bounds) - 1)
        loss = total_loss if self.spec.last else None
        return StepResult(step, loss, self.degraded_windows - degraded_before)

    def _send_up(
        self, key: ActivityKey, wp: WindowPass, network_input: torch.Tensor
    ) -> None:
        if self.spec.last:
            return
        hidden = to_host(wp.hidden.detach())
        if self.spec.forward_unlock:
            # The chunk above runs on predicted input; the real activity teaches
            # its input microzone (a regression onto activity, not feedback). The
            # network input it is predicted from goes along, so the pair does not
            # depend on the chunk above having asked first.
            above_key = self._key(key.batch, key.window, key.micro_batch, key.chunk + 1)
            rows = hidden.reshape(-1, hidden.shape[-1])
            source = to_host(network_input).reshape(rows.shape[0], -1)
            self._observe(
                [
                    Observation(
                        input_zone(key.chunk + 1), above_key, rows, activity=source
                    )
                ]
            )
        elif self.above is not None:
            with self.timeline.span("send", key.batch, key.window, key.micro_batch):
                self.above.send_activity(key, hidden)

    def _input(
        self, key: ActivityKey, batch: Batch, part: slice, start: int, stop: int
    ) -> torch.Tensor:
        if self.spec.first:
            return batch.inputs[part, start:stop]
        if not self.spec.forward_unlock:
            return self._wait(self.activity_in, key, "wait_input")
        # Forward unlock: the input microzone stands in for the chunk below.
        network_input = batch.inputs[part, start:stop]
        b, t, i = network_input.shape
        (predicted,) = self._predict(
            [Query(input_zone(self.spec.index), key, network_input.reshape(b * t, i))]
        )
        if predicted is None:
            return self._wait(self.activity_in, key, "wait_input")
        return predicted.reshape(b, t, -1)

    def _queries(self, done: _Window, batch: Batch) -> list[Query]:
        """What this window asks the cerebellum: its end state, and (decoupled)
        its outputs."""
        key, wp, part, start, stop = done.key, done.wp, done.part, done.start, done.stop
        spec = self.spec
        queries = []
        state_context = spec.context_zones != "output"
        output_context = spec.context_zones != "state"
        if spec.temporal and not done.final:
            context = (
                None
                if batch.context is None or not state_context
                else batch.context[part]
            )
            if spec.time_context and state_context:
                context = at_window_end(context, wp.hidden.shape[0], stop, self.seq_len)
            queries.append(
                Query(
                    state_zone(spec.index),
                    key,
                    flatten_state(wp.state_end).detach(),
                    context,
                )
            )
        if spec.schedule == "decoupled" and not spec.last:
            hidden_rows = wp.hidden.detach().reshape(-1, wp.hidden.shape[-1])
            steps = wp.hidden.shape[1]
            row_context = (
                None
                if batch.context is None or not output_context
                else batch.context[part].repeat_interleave(steps, dim=0)
            )
            if spec.time_context and output_context:
                size = wp.hidden.shape[0]
                times = torch.arange(start, stop).repeat(size)  # rows are (b, t)
                row_context = with_time(row_context, times, self.seq_len)
            queries.append(
                Query(output_zone(spec.index), key, hidden_rows, row_context)
            )
        return queries

    def _backward(
        self, done: _Window, batch: Batch, unit: float, normaliser: torch.Tensor
    ) -> float:
        key, wp, part, start, stop = done.key, done.wp, done.part, done.start, done.stop
        final = done.final
        spec = self.spec
        chunk = self.learner.chunk
        scale = spec.feedback_scale / unit
        decoupled_output = spec.schedule == "decoupled" and not spec.last
        predictions = self._take(done.asked)

        state_feedback = None
        if spec.temporal and not final and predictions[0] is not None:
            state_feedback = unflatten_state(
                predictions[0] * scale, chunk.num_layers, chunk.hidden_size
            )
        output_feedback = None
        if decoupled_output:
            if predictions[-1] is not None:
                output_scale = spec.output_scale / unit
                output_feedback = (predictions[-1] * output_scale).reshape(
                    wp.hidden.shape
                )
        elif not spec.last:
            output_feedback = self._wait(self.feedback_in, key, "wait_feedback")

        loss = None
        if spec.last:
            loss = sequence_loss(
                wp.outputs,
                batch.targets[part, start:stop],
                batch.mask[part, start:stop],
                self.kind,
                normaliser,
            )
        with self.timeline.span("backward", key.batch, key.window, key.micro_batch):
            input_grad, start_feedback = self.learner.backward(
                wp,
                loss=loss,
                output_feedback=output_feedback,
                state_feedback=state_feedback,
            )

        observations = []
        if spec.temporal and key.window > 0:
            previous = self._key(key.batch, key.window - 1, key.micro_batch)
            observations.append(
                Observation(state_zone(spec.index), previous, start_feedback * unit)
            )
        if not spec.first:
            below_key = self._key(
                key.batch, key.window, key.micro_batch, spec.index - 1
            )
            if spec.schedule == "decoupled":
                # The chunk below never waits for this: it teaches its output zone.
                rows = input_grad.reshape(-1, input_grad.shape[-1]) * unit
                observations.append(
                    Observation(output_zone(spec.index - 1), below_key, rows)
                )
            elif self.below is not None:
                with self.timeline.span("send", key.batch, key.window, key.micro_batch):
                    self.below.send_feedback(below_key, to_host(input_grad))
        self._observe(observations)
        return 0.0 if loss is None else float(loss.detach())

    def _step(self, step: int, window: int) -> None:
        with self.timeline.span("update", step, window):
            self.learner.step()
            if self.cerebellum is not None:
                self.cerebellum.update()


def with_time(
    context: torch.Tensor | None, steps: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """``context`` (rows × C, or None) with a one-hot of each row's time step
    appended: what ``--time-context`` gives a microzone."""
    codes = F.one_hot(steps.cpu(), seq_len).float()
    if context is None:
        return codes
    return torch.cat([context, codes.to(context.device, context.dtype)], dim=1)


def at_window_end(
    context: torch.Tensor | None, rows: int, stop: int, seq_len: int
) -> torch.Tensor:
    """:func:`with_time` for the state at the end of a window ending at ``stop``."""
    ends = torch.full((rows,), stop - 1, dtype=torch.long)
    return with_time(context, ends, seq_len)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy for the wire; from a GPU through pinned memory."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host


def batch_to(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return Batch(
        move(batch.inputs), move(batch.targets), move(batch.mask), move(batch.context)
    )


def _query_on_host(query: Query) -> Query:
    context = None if query.context is None else to_host(query.context)
    return Query(query.zone, query.key, to_host(query.activity), context)


def _observation_on_host(observation: Observation) -> Observation:
    return dataclasses.replace(observation, feedback=to_host(observation.feedback))


def _as(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``tensor`` in ``dtype`` if it holds real numbers (others stay as they are)."""
    if tensor is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def _query_as(query: Query, dtype: torch.dtype) -> Query:
    return Query(
        query.zone, query.key, _as(query.activity, dtype), _as(query.context, dtype)
    )


def _observation_as(observation: Observation, dtype: torch.dtype) -> Observation:
    return dataclasses.replace(
        observation,
        feedback=_as(observation.feedback, dtype),
        activity=_as(observation.activity, dtype),
        context=_as(observation.context, dtype),
    )
