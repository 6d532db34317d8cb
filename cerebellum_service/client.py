"""The remote cerebellum: a ``FeedbackPredictor`` that talks to a cerebellum server.

``RemoteCerebellum`` has the interface of ``LocalCerebellum``, so a cortex uses
either without knowing which::

    predict(queries) ──PredictStream (one long-lived stream)───────▶ server
                     └─(stream down, or a reply late) Predict (unary,
                        deadline, retries)──────────────────────────▶ server
    observe(obs) ──▶ outbox (bounded) ──▶ sender thread ──Learn stream──▶ server
    update() ──▶ {}   (the server learns on its own, beside prediction)

``predict_async``, which a chunk uses, sends on one long-lived PredictStream:
a third less CPU per window-sized call than a unary Predict
(scripts/grpc_patterns.py). A request the server refuses there
raises as a unary call would; any other the stream does not answer (it broke,
or a reply came later than the deadline) is made again as a unary Predict,
whose retries, errors and degraded mode are those described here; ``predict``
always calls unary.

``observe`` only encodes and queues; a background thread feeds the queue into a
long-lived Learn stream, which it ends after ``stream_lifetime_s`` (every call
has a deadline) or on ``flush``, and reopens after a failure with exponential
backoff. Observations already written to a stream that then fails are lost and
counted (``observations_lost``): observed feedback is a teaching signal, and a
few missing examples cost the cerebellum less than a stalled cortex would.

Degraded mode: while the server is unreachable, ``predict`` returns ``None`` for
every query (the cortex goes on without predicted feedback), counts
``degraded_calls`` and logs one warning per outage; observations that do not fit
in the full outbox are dropped and counted. Both recover on their own when the
server is back.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from typing import Any

import grpc
import msgpack
import torch

from cerebellum_service.learning import (
    FeedbackPredictor,
    Observation,
    PendingPrediction,
    Query,
)
from cerebellum_service.servicer import key_message
from protos import ccdni_pb2 as pb
from protos import ccdni_pb2_grpc as pb_grpc
from protos.codec import MAX_MESSAGE_BYTES, decode, encode, split_frames
from protos.service import (
    RETRYABLE_CODES,
    ClientSecurity,
    Counters,
    call,
    open_channel,
    wait_ready,
)

logger = logging.getLogger(__name__)

CLIENT_COUNTERS = (
    "predict_calls",
    "predict_streams",
    "predict_stream_fallbacks",
    "degraded_calls",
    "outages",
    "observations_queued",
    "observations_sent",
    "observations_dropped",
    "observations_lost",
    "learn_streams",
    "learn_stream_failures",
    "accepted",
    "cache_misses",
    "rejected",
    "updates_unconfirmed",
)


class _Flush:
    """A marker in the outbox: end the current stream and report its outcome."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False

    def resolve(self, ok: bool) -> None:
        self.ok = ok
        self.done.set()


_UPDATE = pb.LearnRequest(update=True)
"""The outbox item that asks the server for an update (``update_on_call``)."""


class _Stream:
    """One Learn call: which observations and flush markers it carried."""

    def __init__(self) -> None:
        self.alive = True
        self.sent = 0
        self.flushes: list[_Flush] = []


class _Outbox:
    """A bounded FIFO of encoded observations (lists of frames) and markers.

    Unlike ``queue.Queue`` it lets a stream stop taking items the moment its
    call has ended, so no item is taken by a stream that can no longer send it.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque = deque()
        self._observations = 0
        self._changed = threading.Condition()
        self._closed = False

    def put(self, item: Any, *, marker: bool = False) -> bool:
        """Append; return False (item not taken) when full or closed."""
        with self._changed:
            if self._closed:
                return False
            if not marker:
                if self._observations >= self.capacity:
                    return False
                self._observations += 1
            self._items.append(item)
            self._changed.notify_all()
            return True

    def take(self, stream: _Stream | None, timeout: float | None) -> Any | None:
        """The next item, or ``None`` on timeout, close, or the stream's end."""

        def ready() -> bool:
            ended = stream is not None and not stream.alive
            return bool(self._items) or self._closed or ended

        with self._changed:
            self._changed.wait_for(ready, timeout)
            if self._closed or (stream is not None and not stream.alive):
                return None
            if not self._items:
                return None
            item = self._items.popleft()
            if isinstance(item, list):  # observations; markers are not counted
                self._observations -= 1
            return item

    def end(self, stream: _Stream) -> None:
        with self._changed:
            stream.alive = False
            self._changed.notify_all()

    def close(self) -> list:
        """Refuse further takes; return what was still queued."""
        with self._changed:
            self._closed = True
            left, self._items = list(self._items), deque()
            self._observations = 0
            self._changed.notify_all()
            return left

    def __len__(self) -> int:
        with self._changed:
            return self._observations


class _StreamEnded(Exception):
    """The PredictStream ended with requests still unanswered."""


class _Refused(Exception):
    """The server refused this request, which ended the stream (its status)."""

    def __init__(self, error: grpc.RpcError) -> None:
        super().__init__(error.details())
        self.error = error


_REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
"""Codes with which the server ends a PredictStream at the request it refuses:
the oldest unanswered one, since replies come in order."""


class _PredictStream:
    """One PredictStream call: requests go out in order, replies are matched to
    them in the same order by a reader thread."""

    def __init__(self, stub: pb_grpc.CerebellumStub) -> None:
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[futures.Future] = deque()
        self._lock = threading.Lock()
        self.alive = True
        self._call = stub.PredictStream(self._requests())
        self._reader = threading.Thread(
            target=self._read, name="cerebellum-predict-reader", daemon=True
        )
        self._reader.start()

    def _requests(self):
        while (request := self._outbox.get()) is not None:
            yield request

    def send(self, request: pb.PredictRequest) -> futures.Future | None:
        """The reply to come, or None when the stream can take no more."""
        future: futures.Future = futures.Future()
        with self._lock:
            if not self.alive:
                return None
            self._waiting.append(future)
            self._outbox.put(request)
        return future

    def _read(self) -> None:
        error: grpc.RpcError | None = None  # None: it ended without a status
        try:
            for reply in self._call:
                with self._lock:
                    future = self._waiting.popleft() if self._waiting else None
                if future is None:  # a reply to nothing asked: the stream is off
                    break
                future.set_result(reply)
        except grpc.RpcError as failure:
            error = failure
        self._end(error)

    def _end(self, error: grpc.RpcError | None) -> None:
        with self._lock:
            self.alive = False
            waiting, self._waiting = list(self._waiting), deque()
        self._outbox.put(None)
        refused = error is not None and error.code() in _REFUSALS
        for index, future in enumerate(waiting):
            if refused and index == 0:
                future.set_exception(_Refused(error))
            else:  # sent behind the refused one, or the stream broke
                future.set_exception(_StreamEnded("the PredictStream ended"))

    def close(self) -> None:
        """End the stream; requests still waiting fail (and go unary)."""
        with self._lock:
            self.alive = False
        self._outbox.put(None)
        self._call.cancel()
        self._reader.join(timeout=5)


class RemoteCerebellum(FeedbackPredictor):
    """A cerebellum server seen as a ``FeedbackPredictor``.

    Args:
        address: ``host:port`` of the server.
        security: token and TLS settings (``protos.service.ClientSecurity``).
        max_message_bytes: message limit, the same as the server's.
        deadline_s: deadline of each Predict attempt.
        retries: retries of a Predict that failed with UNAVAILABLE or
            DEADLINE_EXCEEDED while the server was reachable (none during an
            outage, so a degraded call costs one attempt).
        backoff_s: first retry delay, doubled per retry and per failed stream.
        max_backoff_s: longest retry delay.
        control_deadline_s: deadline of Configure, Stats, Checkpoint, Restore.
        queue_size: observations the outbox holds before dropping new ones.
        stream_lifetime_s: a Learn stream ends (and its counts arrive) after
            this long; the next observation opens a new one.
        channel: an already opened channel to use instead of opening one.
        update_on_call: make :meth:`update` ask the server for an update and
            wait until it is applied (for a server whose learning is
            ``on_update``).
        stream_predictions: ask on a long-lived PredictStream (unary Predict
            where it cannot answer); ``False``: every request unary.
        timer: called with ``("PredictStream", seconds)`` for each request
            answered on the stream, from its sending to its reply, as the
            actor's gRPC interceptor records a unary call (latency metrics).
    """

    def __init__(
        self,
        address: str,
        security: ClientSecurity | None = None,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        deadline_s: float = 2.0,
        retries: int = 2,
        backoff_s: float = 0.05,
        max_backoff_s: float = 1.0,
        control_deadline_s: float = 30.0,
        queue_size: int = 1024,
        stream_lifetime_s: float = 30.0,
        channel: grpc.Channel | None = None,
        update_on_call: bool = False,
        stream_predictions: bool = True,
        timer: Callable[[str, float], None] | None = None,
    ) -> None:
        if queue_size < 1 or stream_lifetime_s <= 0 or deadline_s <= 0:
            raise ValueError(
                f"queue_size={queue_size!r} must be >= 1, and "
                f"stream_lifetime_s={stream_lifetime_s!r} and "
                f"deadline_s={deadline_s!r} positive"
            )
        self.address = address
        self.max_message_bytes = max_message_bytes
        self.deadline_s = deadline_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.control_deadline_s = control_deadline_s
        self.stream_lifetime_s = stream_lifetime_s
        self.update_on_call = update_on_call
        self.stream_predictions = stream_predictions
        self.timer = timer
        self.counters = Counters(CLIENT_COUNTERS)
        self._channel = channel or open_channel(address, security, max_message_bytes)
        self._stub = pb_grpc.CerebellumStub(self._channel)
        self._outbox = _Outbox(queue_size)
        self._state_lock = threading.Lock()
        self._down = False
        self._degraded_in_outage = 0
        self._warned_full = False
        self._closed = threading.Event()
        self._predict_stream: _PredictStream | None = None
        self._stream_lock = threading.Lock()
        self._sender = threading.Thread(
            target=self._send_loop, name="cerebellum-learn-sender", daemon=True
        )
        self._sender.start()

    # FeedbackPredictor -------------------------------------------------------------

    def predict(self, queries: Sequence[Query]) -> list[torch.Tensor | None]:
        """Predicted feedback per query; all ``None`` while the server is away.

        Raises:
            KeyError: a query names a zone the server does not have.
            ValueError: the server refused a query (INVALID_ARGUMENT), or the
                request is above the message limit.
            RuntimeError: any other refusal (e.g. not configured).
        """
        if not queries:
            return []
        request = _predict_request(queries)
        self.counters.add("predict_calls")
        retries = 0 if self._down else self.retries
        return self._call_predict(request, len(queries), retries)

    def predict_async(self, queries: Sequence[Query]) -> PendingPrediction:
        """Send the Predict now; ``result()`` waits for the reply.

        The call is in flight while the caller computes. A first attempt that
        fails with UNAVAILABLE or DEADLINE_EXCEEDED while the server was
        reachable is retried in ``result()`` as :meth:`predict` retries; the
        errors are those of :meth:`predict`, raised by ``result()``.
        """
        if not queries:
            return PendingPrediction([])
        request = _predict_request(queries)
        self.counters.add("predict_calls")
        down = self._down
        if not down and self.stream_predictions and not self._closed.is_set():
            stream = self._stream()
            reply = stream.send(request)
            if reply is not None:
                return _StreamedReply(self, stream, reply, request, len(queries))
        future = self._stub.Predict.future(request, timeout=self.deadline_s)
        return _PendingReply(self, future, request, len(queries), retry=not down)

    def _stream(self) -> _PredictStream:
        """The PredictStream in use, opened anew where the last one ended."""
        with self._stream_lock:
            if self._predict_stream is None or not self._predict_stream.alive:
                self._predict_stream = _PredictStream(self._stub)
                self.counters.add("predict_streams")
            return self._predict_stream

    def _drop_stream(self, stream: _PredictStream) -> None:
        with self._stream_lock:
            if self._predict_stream is stream:
                self._predict_stream = None
        stream.close()

    def _call_predict(
        self, request: pb.PredictRequest, count: int, retries: int
    ) -> list[torch.Tensor | None]:
        """Predict with ``retries``; the predictions, or degraded mode."""
        try:
            reply = call(
                self._stub.Predict,
                request,
                deadline_s=self.deadline_s,
                retries=retries,
                backoff_s=self.backoff_s,
                max_backoff_s=self.max_backoff_s,
            )
        except grpc.RpcError as error:
            return self._failed(error, count)
        return self._predictions(reply, count)

    def _failed(self, error: grpc.RpcError, count: int) -> list[None]:
        """Degraded mode for a Predict that could not reach the server."""
        if error.code() not in RETRYABLE_CODES:
            raise _exception(error, "Predict") from error
        self._mark_down(f"Predict: {error.code().name}: {error.details()}")
        self.counters.add("degraded_calls")
        with self._state_lock:
            self._degraded_in_outage += 1
        return [None] * count

    def _predictions(
        self, reply: pb.PredictReply, count: int
    ) -> list[torch.Tensor | None]:
        self._mark_up()
        if len(reply.predictions) != count or len(reply.available) != count:
            raise RuntimeError(
                f"Predict: reply holds {len(reply.predictions)} predictions and "
                f"{len(reply.available)} flags for {count} queries"
            )
        return [
            decode(msg, field=f"predictions[{index}]") if available else None
            for index, (msg, available) in enumerate(
                zip(reply.predictions, reply.available, strict=True)
            )
        ]

    def observe(self, observations: Sequence[Observation]) -> None:
        """Queue observed feedback for the Learn stream; never waits on the network.

        Raises:
            CodecError: a tensor cannot be encoded (unsupported dtype).
        """
        for observation in observations:
            frame = pb.LearnRequest(
                zone=observation.zone, key=key_message(observation.key)
            )
            tensors = {"observed": observation.feedback}
            if observation.activity is not None:
                tensors["activity"] = observation.activity
            if observation.context is not None:
                tensors["context"] = observation.context
            frames = list(
                split_frames(frame, tensors, max_bytes=self.max_message_bytes)
            )
            if self._outbox.put(frames):
                self.counters.add("observations_queued")
                continue
            self.counters.add("observations_dropped")
            with self._state_lock:
                warn, self._warned_full = not self._warned_full, True
            if warn:
                logger.warning(
                    "cerebellum at %s: outbox full (%d observations); dropping "
                    "observed feedback until the Learn stream catches up",
                    self.address,
                    self._outbox.capacity,
                )

    def update(self) -> dict[str, float]:
        """With ``update_on_call``, have the server update now and wait for it.

        The update request follows every observation queued before it on the
        Learn stream, and this returns once the server has applied it, so the
        next ``predict`` sees the new weights: the server's updates then fall
        where an in-process cerebellum's would (a server configured with
        learning ``on_update``). Otherwise nothing: the server learns in the
        background. Returns ``{}``: the losses stay on the server (``stats``).
        """
        if not self.update_on_call or self._down or self._closed.is_set():
            return {}
        self._outbox.put(_UPDATE, marker=True)
        if not self.flush(self.control_deadline_s):
            self.counters.add("updates_unconfirmed")
            logger.warning(
                "cerebellum at %s did not confirm an update within %.0f s",
                self.address,
                self.control_deadline_s,
            )
        return {}

    # Control ----------------------------------------------------------------------

    def configure(
        self,
        zones: Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]],
        lr: float = 1e-3,
        cache_size: int = 4096,
        lesion: str | None = None,
        learning: str = "background",
    ) -> dict[str, Any]:
        """Replace the server's cerebellum; return the effective settings.

        Args:
            zones: zone maps (``name``, ``in_features``, ``out_features``, ...),
                as a list or as ``{name: spec}`` (the form of
                ``orchestrator.zones.zone_specs``).
            lr: Adam learning rate.
            cache_size: activities the server keeps for feedback to come.
            lesion: ``None``, ``"cerebellum"`` or ``"olive"``.
            learning: ``"background"`` or ``"on_update"`` (see
                ``cerebellum_service.config.LEARNING``).

        Raises:
            ValueError: the server refused the settings (the message names the
                key). ConnectionError: the server is unreachable.
        """
        if isinstance(zones, Mapping):
            zones = [{"name": name, **spec} for name, spec in zones.items()]
        config = {
            "zones": [dict(zone) for zone in zones],
            "lr": lr,
            "cache_size": cache_size,
            "lesion": lesion,
            "learning": learning,
        }
        reply = self._control("Configure", pb.ConfigureRequest(config=_pack(config)))
        return msgpack.unpackb(reply.config, raw=False)

    def set_lesion(self, lesion: str | None) -> dict[str, Any]:
        """Lesion the server's cerebellum (or undo it) without touching weights."""
        request = pb.ConfigureRequest(config=_pack({"lesion": lesion}))
        reply = self._control("Configure", request)
        return msgpack.unpackb(reply.config, raw=False)

    def stats(self, names: Sequence[str] = ()) -> dict[str, float]:
        """The server's counters (all, or those named)."""
        reply = self._control("Stats", pb.StatsRequest(names=list(names)))
        return dict(reply.counters)

    def checkpoint(self, path: str) -> dict[str, Any]:
        """Have the server write a checkpoint at ``path`` (on its file system)."""
        reply = self._control("Checkpoint", pb.CheckpointRequest(path=str(path)))
        return {"path": reply.path, "step": reply.step, "size_bytes": reply.size_bytes}

    def restore(self, path: str) -> dict[str, Any]:
        """Have the server load the checkpoint at ``path``."""
        reply = self._control("Restore", pb.RestoreRequest(path=str(path)))
        return {"path": reply.path, "step": reply.step}

    def wait_ready(self, timeout: float = 5.0) -> None:
        """Block until the channel has connected (TimeoutError otherwise)."""
        wait_ready(self._channel, timeout)

    def flush(self, timeout: float = 10.0) -> bool:
        """Send everything queued and wait for the server's reply.

        When it returns True, the server has taken every observation queued
        before the call (learning on them may still be running).
        """
        marker = _Flush()
        if not self._outbox.put(marker, marker=True):
            return False  # closed: nothing will be sent any more
        return marker.done.wait(timeout) and marker.ok

    @property
    def degraded(self) -> bool:
        """Whether the server is currently considered unreachable."""
        return self._down

    def close(self, flush_timeout: float = 2.0) -> None:
        """Send what is queued (if the server is reachable), then stop."""
        if self._closed.is_set():
            return
        if not self._down:
            self.flush(flush_timeout)
        self._closed.set()
        with self._stream_lock:
            stream, self._predict_stream = self._predict_stream, None
        if stream is not None:
            stream.close()
        left = self._outbox.close()
        dropped = sum(1 for item in left if isinstance(item, list))
        for item in left:
            if isinstance(item, _Flush):
                item.resolve(False)
        if dropped:
            self.counters.add("observations_dropped", dropped)
            logger.warning(
                "cerebellum at %s: closed with %d observations unsent",
                self.address,
                dropped,
            )
        self._sender.join(timeout=self.deadline_s + self.stream_lifetime_s)
        self._channel.close()

    def __enter__(self) -> RemoteCerebellum:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Internals --------------------------------------------------------------------

    def _control(self, method: str, request: Any) -> Any:
        try:
            return call(
                getattr(self._stub, method),
                request,
                deadline_s=self.control_deadline_s,
                retries=self.retries,
                backoff_s=self.backoff_s,
                max_backoff_s=self.max_backoff_s,
            )
        except grpc.RpcError as error:
            if error.code() in RETRYABLE_CODES:
                raise ConnectionError(
                    f"{method}: cerebellum at {self.address} unreachable "
                    f"({error.code().name}: {error.details()})"
                ) from error
            raise _exception(error, method) from error

    def _mark_down(self, reason: str) -> None:
        with self._state_lock:
            if self._down:
                return
            self._down = True
            self._degraded_in_outage = 0
        self.counters.add("outages")
        logger.warning(
            "cerebellum at %s unreachable (%s); going on without predicted "
            "feedback until it is back",
            self.address,
            reason,
        )

    def _mark_up(self) -> None:
        with self._state_lock:
            if not self._down:
                return
            self._down = False
            degraded = self._degraded_in_outage
        logger.info(
            "cerebellum at %s reachable again after %d degraded predict calls",
            self.address,
            degraded,
        )

    def _send_loop(self) -> None:
        while True:
            first = self._outbox.take(None, timeout=None)
            if first is None:
                return
            stream = _Stream()
            ok = self._run_stream(first, stream)
            for marker in stream.flushes:
                marker.resolve(ok)
            if not ok and not self._reconnect():
                return

    def _reconnect(self) -> bool:
        """Wait, backing off, until the channel connects; False once closed.

        The next stream opens only on a connected channel, so an outage does not
        cost an observation per attempt.
        """
        backoff = self.backoff_s
        while not self._closed.is_set():
            try:
                wait_ready(self._channel, timeout=backoff)
            except TimeoutError:
                backoff = min(self.max_backoff_s, backoff * 2)
                continue
            return True
        return False

    def _run_stream(self, first: Any, stream: _Stream) -> bool:
        """Send one Learn stream starting with ``first``; return whether it ended OK."""
        if isinstance(first, _Flush):
            stream.flushes.append(first)
            return True
        self.counters.add("learn_streams")
        try:
            reply = self._stub.Learn(
                self._frames(first, stream),
                timeout=self.stream_lifetime_s + self.deadline_s,
            )
        except grpc.RpcError as error:
            self._outbox.end(stream)
            self.counters.add("learn_stream_failures")
            self.counters.add("observations_lost", stream.sent)
            if error.code() in RETRYABLE_CODES:
                self._mark_down(f"Learn: {error.code().name}: {error.details()}")
            else:
                logger.warning(
                    "cerebellum at %s refused a Learn stream (%s: %s); %d "
                    "observations in it are lost",
                    self.address,
                    error.code().name,
                    error.details(),
                    stream.sent,
                )
            return False
        self._outbox.end(stream)
        self._mark_up()
        with self._state_lock:
            self._warned_full = False
        self.counters.add("observations_sent", stream.sent)
        self.counters.add("accepted", reply.accepted)
        self.counters.add("cache_misses", reply.cache_misses)
        self.counters.add("rejected", reply.rejected)
        return True

    def _frames(self, first: list, stream: _Stream):
        """The frames of one stream: ends at a flush marker, close or lifetime."""
        ends = time.monotonic() + self.stream_lifetime_s
        item = first
        while item is not None:
            if isinstance(item, _Flush):
                stream.flushes.append(item)
                return
            if item is _UPDATE:
                yield item
                item = self._outbox.take(stream, timeout=ends - time.monotonic())
                continue
            # Counted before the frames go: a stream that fails from here on
            # may or may not have delivered them, and they count as lost.
            stream.sent += 1
            yield from item
            remaining = ends - time.monotonic()
            if remaining <= 0:
                return
            item = self._outbox.take(stream, timeout=remaining)


def _pack(config: Mapping[str, Any]) -> bytes:
    return msgpack.packb(config, use_bin_type=True)


def _exception(error: grpc.RpcError, method: str) -> Exception:
    """The Python exception for a refused call, as LocalCerebellum would raise."""
    code, details = error.code(), error.details()
    if code == grpc.StatusCode.NOT_FOUND:
        return KeyError(f"{method}: {details}")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return ValueError(f"{method}: {code.name}: {details}")
    return RuntimeError(f"{method}: {code.name}: {details}")


def _predict_request(queries: Sequence[Query]) -> pb.PredictRequest:
    request = pb.PredictRequest()
    for query in queries:
        msg = request.queries.add(zone=query.zone, key=key_message(query.key))
        encode(query.activity, out=msg.activity)
        if query.context is not None:
            encode(query.context, out=msg.context)
    return request


class _Reply(PendingPrediction):
    """A Predict in flight: :meth:`result` waits for it once and keeps what it
    gave; where the first attempt cannot answer, :meth:`_unary` makes it again
    as :meth:`RemoteCerebellum.predict` would."""

    def __init__(
        self, client: RemoteCerebellum, request: pb.PredictRequest, count: int
    ) -> None:
        self._client = client
        self._request = request
        self._count = count
        self._outcome: list[torch.Tensor | None] | None = None

    def result(self) -> list[torch.Tensor | None]:
        if self._outcome is None:
            self._outcome = self._wait()
        return self._outcome

    def _wait(self) -> list[torch.Tensor | None]:
        raise NotImplementedError

    def _unary(self, retries: int) -> list[torch.Tensor | None]:
        return self._client._call_predict(self._request, self._count, retries)


class _StreamedReply(_Reply):
    """A Predict sent on the PredictStream. Refused there, it raises as a unary
    call would; where the stream broke or did not answer in time, it is made
    again as a unary call (with :meth:`RemoteCerebellum.predict`'s retries,
    errors and degraded mode)."""

    def __init__(
        self,
        client: RemoteCerebellum,
        stream: _PredictStream,
        reply: futures.Future,
        request: pb.PredictRequest,
        count: int,
    ) -> None:
        super().__init__(client, request, count)
        self._stream = stream
        self._reply = reply
        self._sent = time.perf_counter()

    def _wait(self) -> list[torch.Tensor | None]:
        client = self._client
        waited = time.perf_counter() - self._sent
        try:
            reply = self._reply.result(timeout=max(0.0, client.deadline_s - waited))
        except futures.TimeoutError:
            # Replies come in order, so a late one holds up all behind it.
            client._drop_stream(self._stream)
            reply = None
        except _Refused as refused:
            # As the unary call would raise: asking it again would only refuse
            # (and count) it twice.
            client._mark_up()
            raise _exception(refused.error, "Predict") from refused.error
        except _StreamEnded:
            reply = None
        if reply is None:
            client.counters.add("predict_stream_fallbacks")
            return self._unary(client.retries)
        if client.timer is not None:
            client.timer("PredictStream", time.perf_counter() - self._sent)
        return client._predictions(reply, self._count)


class _PendingReply(_Reply):
    """A unary Predict in flight (``RemoteCerebellum.predict_async``)."""

    def __init__(
        self,
        client: RemoteCerebellum,
        future: grpc.Future,
        request: pb.PredictRequest,
        count: int,
        retry: bool,
    ) -> None:
        super().__init__(client, request, count)
        self._future = future
        self._retry = retry

    def _wait(self) -> list[torch.Tensor | None]:
        client = self._client
        try:
            return client._predictions(self._future.result(), self._count)
        except grpc.RpcError as error:
            if self._retry and client.retries and error.code() in RETRYABLE_CODES:
                # The first attempt was the future; the rest as predict makes them.
                return self._unary(client.retries - 1)
            return client._failed(error, self._count)
