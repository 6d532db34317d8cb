"""The cerebellar learning rule and the predictor interface the cortex talks to.

The cortex asks a :class:`FeedbackPredictor` for predicted feedback on its activity
and later hands it the observed feedback for the same activity, matched by an
:class:`ActivityKey`. The cerebellum keeps the activity it predicted on in a bounded
cache; when the observed feedback arrives, the pair becomes a regression example
(mean squared error), the inferior olive's teaching signal. Learning is applied in
batches by :meth:`FeedbackPredictor.update`, so a window costs one small forward
pass of each microzone and a sequence one batched backward pass.

Two implementations share this interface: :class:`LocalCerebellum` (an object in
the same process) and the gRPC client in ``cerebellum_service.client``.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from cerebellum_service.network import Microzone

logger = logging.getLogger(__name__)

HISTORY = 10_000  # updates of history kept per microzone
RUNNING_RATE = 0.02  # weight of one update in the running prediction error


@dataclass(frozen=True, order=True)
class ActivityKey:
    """Which activity a prediction or an observation belongs to."""

    batch: int
    window: int
    chunk: int = 0
    micro_batch: int = 0
    run: str = ""


@dataclass(frozen=True)
class Query:
    """A request for predicted feedback on ``activity`` from microzone ``zone``."""

    zone: str
    key: ActivityKey
    activity: torch.Tensor  # (N, in_features)
    context: torch.Tensor | None = None  # (N, context_size)


@dataclass(frozen=True)
class Observation:
    """The observed feedback for the activity of an earlier :class:`Query`.

    ``activity`` (and ``context``), when given, is the activity to pair the
    feedback with instead of the cached copy, for a zone that was never asked
    about ``key``.
    """

    zone: str
    key: ActivityKey
    feedback: torch.Tensor  # (N, out_features)
    activity: torch.Tensor | None = None  # (N, in_features)
    context: torch.Tensor | None = None  # (N, context_size)


@dataclass
class ZoneStats:
    """Running counters of one microzone."""

    predictions: int = 0
    observations: int = 0
    cache_misses: int = 0
    updates: int = 0
    last_loss: float = float("nan")
    last_cosine: float = float("nan")
    # Running mean squared error over running mean squared target: 1 for a
    # cerebellum that predicts nothing, whatever the scale of the feedback.
    last_relative_error: float = float("nan")
    running_error: float = 0.0
    running_power: float = 0.0
    loss_history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    relative_error_history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    cosine_history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))


class PendingPrediction:
    """Predicted feedback that has been asked for; :meth:`result` waits for it."""

    def __init__(self, predictions: list[torch.Tensor | None]) -> None:
        self._predictions = predictions

    def result(self) -> list[torch.Tensor | None]:
        return self._predictions


class FeedbackPredictor(ABC):
    """What the cortex needs from a cerebellum, local or remote."""

    @abstractmethod
    def predict(self, queries: Sequence[Query]) -> list[torch.Tensor | None]:
        """Predicted feedback per query (unscaled), ``None`` where none is available."""

    def predict_async(self, queries: Sequence[Query]) -> PendingPrediction:
        """Ask now, take the answer later (``result()``) as :meth:`predict` gives it.

        A remote cerebellum answers while the cortex computes something else;
        this default, for a cerebellum in the same process, computes at once.
        """
        return PendingPrediction(self.predict(queries))

    @abstractmethod
    def observe(self, observations: Sequence[Observation]) -> None:
        """Hand over observed feedback; it becomes the teaching signal."""

    @abstractmethod
    def update(self) -> Mapping[str, float]:
        """Apply the learning accumulated since the last update; per-zone loss."""


class LocalCerebellum(FeedbackPredictor):
    """Microzones in this process, with their optimiser and activity cache.

    Args:
        zones: microzones by name (``state_0``, ``output_0`` …).
        lr: Adam learning rate of the cerebellum.
        cache_size: activity entries kept for observations still to come; the
            oldest are dropped first and a later observation for one is a miss.
        compute_dtype: the dtype of the microzones' arithmetic. ``bfloat16``
            runs their matrix products in bfloat16 and keeps the activity
            and feedback it holds in bfloat16, while weights, gradients and the
            optimiser state keep the zones' own dtype; predictions come back in
            the dtype of the activity they answer.

    Thread-safe: a server may call :meth:`predict` while another thread learns.
    """

    def __init__(
        self,
        zones: Mapping[str, Microzone],
        lr: float = 1e-3,
        cache_size: int = 4096,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not zones:
            raise ValueError("a cerebellum needs at least one microzone")
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(
                f"compute_dtype must be torch.float32 or torch.bfloat16, got "
                f"{compute_dtype}"
            )
        self.zones = nn.ModuleDict(dict(zones))
        self.compute_dtype = compute_dtype
        # fused, as the chunks' (cortex_service.learning): half the time of an
        # update of a small zone, which the server makes once per window.
        self.optimizer = torch.optim.Adam(self.zones.parameters(), lr=lr, fused=True)
        self.cache_size = cache_size
        self.frozen = False  # inferior-olive lesion: predictions go on, learning stops
        self.stats: dict[str, ZoneStats] = {name: ZoneStats() for name in zones}
        self.evictions = 0
        self._cache: OrderedDict[tuple[str, ActivityKey], tuple] = OrderedDict()
        self._pending: list[tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor]]
        self._pending = []
        # _lock guards the cache, the pending examples, the stats and every write
        # to the parameters; predictions hold it for their whole forward pass.
        # _update_lock serialises updates (and state loads) so that an update's
        # forward and backward pass can run without _lock: they only read the
        # parameters, and only optimizer.step, under _lock, writes them.
        self._lock = threading.Lock()
        # Staleness of observed feedback, in windows, for whoever measures it
        # (the actor's metrics): newest predicted key per zone, windows per batch.
        self.staleness_observer: Callable[[str, float], None] | None = None
        self._latest: dict[str, ActivityKey] = {}
        self._windows_per_batch = 1
        self._update_lock = threading.Lock()

    def zone(self, name: str) -> Microzone:
        if name not in self.zones:
            raise KeyError(f"unknown microzone {name!r}; known: {sorted(self.zones)}")
        return self.zones[name]

    def storage_dtype(self, zone: str) -> torch.dtype:
        """The dtype activity and feedback for ``zone`` are best handed over in
        (and are kept in): bfloat16 where the arithmetic is, else the zone's."""
        if self.compute_dtype == torch.bfloat16:
            return torch.bfloat16
        return self.zone(zone).purkinje.weight.dtype

    def _arithmetic(self) -> torch.dtype | None:
        """The dtype of the zones' products: bfloat16, or None for their own."""
        return torch.bfloat16 if self.compute_dtype == torch.bfloat16 else None

    def predict(self, queries: Sequence[Query]) -> list[torch.Tensor | None]:
        predictions: list[torch.Tensor | None] = []
        with self._lock:
            for query in queries:
                zone = self.zone(query.zone)
                trace = zone.infer(query.activity, query.context, self._arithmetic())
                predictions.append(trace.prediction.to(query.activity.dtype))
                self._remember(query)
                self.stats[query.zone].predictions += 1
        return predictions

    def observe(self, observations: Sequence[Observation]) -> None:
        with self._lock:
            for observation in observations:
                self._observe_one(observation)

    def observe_one(self, observation: Observation) -> str:
        """Take one observation and say what became of it.

        Returns:
            ``"accepted"``: paired with an activity and queued for the next
            update; ``"frozen"``: paired, but learning is frozen (olive lesion);
            ``"cache_miss"``: no activity was cached for its key (never
            predicted, already observed, or evicted).

        Raises:
            KeyError: unknown zone. ValueError: the feedback (or the given
            activity) does not fit the zone or the cached activity. Nothing is
            changed when it raises.
        """
        with self._lock:
            return self._observe_one(observation)

    def _observe_one(self, observation: Observation) -> str:
        zone = self.zone(observation.zone)  # unknown zones raise, naming the known
        stats = self.stats[observation.zone]
        cache_key = (observation.zone, observation.key)
        if observation.activity is not None:
            entry = (observation.activity.detach(), _detached(observation.context))
        else:
            entry = self._cache.get(cache_key)
            if entry is None:
                stats.cache_misses += 1
                return "cache_miss"
        _check_pair(zone, observation, *entry)

        self._cache.pop(cache_key, None)
        stats.observations += 1
        self._record_staleness(observation.zone, observation.key)
        if self.frozen:
            return "frozen"
        activity, context = entry
        self._pending.append(
            (observation.zone, activity, context, observation.feedback.detach())
        )
        return "accepted"

    def update(self) -> dict[str, float]:
        """One Adam step on every zone with pending observations (batched).

        Predictions may run while it computes: the forward and backward pass read
        the parameters without holding the lock; only the optimiser step, which
        writes them, excludes predictions.
        """
        with self._update_lock:
            with self._lock:
                pending, self._pending = self._pending, []
                frozen = self.frozen
            if not pending or frozen:
                return {}

            grouped: dict[str, list] = defaultdict(list)
            for zone, activity, context, target in pending:
                grouped[zone].append((activity, context, target))

            # Each zone's gradient depends on its own examples only: computed
            # zone by zone, it is what one backward pass of the sum of the zones'
            # losses gives. The forward pass runs again, with the weights of now:
            # learning from the trace each prediction left instead, as decoupled
            # neural interfaces do, saved 1.3 ms of CPU per bench step but took
            # more steps to reach the same loss (docs/BENCHMARKS.md).
            self.optimizer.zero_grad(set_to_none=True)
            records = []
            for zone, examples in grouped.items():
                activity = _rows([a for a, _, _ in examples])
                context = (
                    _rows([c for _, c, _ in examples])
                    if examples[0][1] is not None
                    else None
                )
                target = _rows([t for _, _, t in examples])
                microzone = self.zones[zone]
                trace = microzone.infer(activity, context, self._arithmetic())
                loss = microzone.mse_backward(trace, target)
                records.append((zone, trace.prediction, target, loss))

            losses: dict[str, float] = {}
            with self._lock:
                self.optimizer.step()
                for zone, prediction, target, value in records:
                    self._record(zone, prediction, target, value)
                    losses[zone] = value
            return losses

    def _record_staleness(self, zone: str, key: ActivityKey) -> None:
        """Windows between the newest prediction of ``zone`` and ``key``'s."""
        latest = self._latest.get(zone)
        if latest is None or self.staleness_observer is None:
            return
        windows = self._windows_per_batch
        staleness = (latest.batch - key.batch) * windows + latest.window - key.window
        self.staleness_observer(zone, float(max(0, staleness)))

    def _remember(self, query: Query) -> None:
        latest = self._latest.get(query.zone)
        if latest is None or (query.key.batch, query.key.window) > (
            latest.batch,
            latest.window,
        ):
            self._latest[query.zone] = query.key
        self._windows_per_batch = max(self._windows_per_batch, query.key.window + 1)
        activity = query.activity.detach()
        context = None if query.context is None else query.context.detach()
        self._cache[(query.zone, query.key)] = (activity, context)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
            self.evictions += 1

    def _record(
        self, zone: str, prediction: torch.Tensor, target: torch.Tensor, loss: float
    ) -> None:
        stats = self.stats[zone]
        stats.updates += 1
        stats.last_loss = loss
        # Three dot products give the cosine and the power: a fifth of the cost of
        # F.cosine_similarity plus a separate pow().mean() on a window's rows.
        flat_prediction = prediction.reshape(-1).to(torch.float32)
        flat_target = target.reshape(-1).to(torch.float32)
        cross = float(torch.dot(flat_prediction, flat_target))
        target_sq = float(torch.dot(flat_target, flat_target))
        prediction_sq = float(torch.dot(flat_prediction, flat_prediction))
        stats.last_cosine = cross / max(math.sqrt(prediction_sq * target_sq), 1e-8)
        stats.loss_history.append(loss)
        stats.cosine_history.append(stats.last_cosine)
        # Running means over updates: single updates see one window each, and
        # windows differ in how much feedback reaches them by orders of magnitude.
        rate = RUNNING_RATE if stats.updates > 1 else 1.0
        power = target_sq / max(1, flat_target.numel())
        stats.running_error += rate * (loss - stats.running_error)
        stats.running_power += rate * (power - stats.running_power)
        if stats.running_power > 0:
            stats.last_relative_error = stats.running_error / stats.running_power
        stats.relative_error_history.append(stats.last_relative_error)

    def state_dict(self) -> dict:
        """Weights, optimiser state and lesion flag: a copy, consistent even while
        another thread updates, so it can be saved at leisure."""
        with self._lock:
            return copy.deepcopy(
                {
                    "zones": self.zones.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "frozen": self.frozen,
                }
            )

    def load_state_dict(self, state: Mapping) -> None:
        with self._update_lock, self._lock:
            self.zones.load_state_dict(state["zones"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.frozen = bool(state.get("frozen", False))
            self._cache.clear()
            self._pending.clear()


def _rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts stacked by rows; a single part as it is (no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def _check_pair(
    zone: Microzone,
    observation: Observation,
    activity: torch.Tensor,
    context: torch.Tensor | None,
) -> None:
    """Raise ValueError unless feedback, activity and context fit together."""
    if activity.dim() != 2 or activity.shape[1] != zone.in_features:
        raise ValueError(
            f"observation for {observation.zone!r}: activity has shape "
            f"{list(activity.shape)}; expected [N, {zone.in_features}]"
        )
    rows = activity.shape[0]
    feedback = observation.feedback
    if list(feedback.shape) != [rows, zone.out_features]:
        raise ValueError(
            f"observation for {observation.zone!r}: feedback has shape "
            f"{list(feedback.shape)}; expected [{rows}, {zone.out_features}] to "
            "match the activity it answers"
        )
    got = None if context is None else list(context.shape)
    expected = [rows, zone.context_size] if zone.context_size else None
    if got != expected:
        raise ValueError(
            f"observation for {observation.zone!r}: context has shape {got}; "
            f"expected {expected}"
        )
