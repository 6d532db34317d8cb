"""The cortex service: one chunk's inbound wires, and the client for its neighbours.

A chunk receives activity from the chunk below and observed feedback from the
chunk above, each on a long-lived stream that acks every message
(``StreamActivity``, ``StreamFeedback``; ``PushActivity`` and ``PushFeedback``
take a batch of messages and ack them once). Each whole message is checked (key,
shape, width, dtype, finite values) before it touches any state, then deposited
in the chunk's bounded :class:`~cortex_service.runtime.Mailbox`; a full mailbox
holds the message's ack back, which stalls the sender: that is the bound on work
in flight between two chunks. Which messages the chunk then waits for is the
schedule's business (``cortex_service.runtime``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import grpc
import msgpack
import torch

from cerebellum_service.learning import ActivityKey
from cortex_service.runtime import Abandoned, Aborted, Mailbox, MailKey, mail_key
from protos import ccdni_pb2 as pb
from protos import ccdni_pb2_grpc as pb_grpc
from protos import codec
from protos.service import (
    ClientSecurity,
    Counters,
    RequestError,
    add_servicer,
    call,
    open_channel,
    reject,
    reject_error,
)

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Cortex"]
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
REJECTION_REASONS = (
    "shape",
    "dtype",
    "not_finite",
    "key",
    "out_of_order",
    "duplicate",
    "frame",
    "kind",
    "codec",
    "full",
    "aborted",
    "config",
    "path",
    "io",
    "corrupt",
    "no_state",
    "unparsable",
    "abandoned",
)

CheckpointFn = Callable[[str], tuple[str, int, int]]
RestoreFn = Callable[[str], int]


def key_to_proto(key: ActivityKey, out: pb.ActivityKey) -> pb.ActivityKey:
    out.run = key.run
    out.batch = key.batch
    out.window = key.window
    out.chunk = key.chunk
    out.micro_batch = key.micro_batch
    return out


def key_from_proto(msg: pb.ActivityKey) -> ActivityKey:
    return ActivityKey(msg.batch, msg.window, msg.chunk, msg.micro_batch, msg.run)


class _Order:
    """Refuses keys that repeat or go back in (batch, window) order."""

    def __init__(self) -> None:
        self.last: tuple[int, int] | None = None
        self.seen: set[MailKey] = set()
        self.lock = threading.Lock()

    def check(self, key: MailKey, what: str) -> None:
        with self.lock:
            if key[:2] < (self.last or (-1, -1)):
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{what}.key: (batch, window) {key[:2]} is out of order; expected "
                    f"{self.last} or later",
                    "out_of_order",
                )
            if key in self.seen:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{what}.key: {key} was already received",
                    "duplicate",
                )

    def accept(self, key: MailKey) -> None:
        with self.lock:
            if self.last is None or key[:2] > self.last:
                # Keys of windows before the new one can no longer come.
                self.seen = {k for k in self.seen if k[:2] >= key[:2]}
                self.last = key[:2]
            self.seen.add(key)

    def reset(self) -> None:
        with self.lock:
            self.last = None
            self.seen.clear()


def _check_tensor(
    tensor: torch.Tensor, field: str, width: int, dims: int = 3
) -> torch.Tensor:
    if tensor.dtype not in FLOAT_DTYPES:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field}: dtype {tensor.dtype} is not a floating type; expected one of "
            f"{', '.join(str(d) for d in FLOAT_DTYPES)}",
            "dtype",
        )
    if tensor.dim() != dims or tensor.shape[-1] != width or tensor.numel() == 0:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field}: shape {list(tensor.shape)}; expected (batch, steps, {width}) "
            "with batch and steps at least 1",
            "shape",
        )
    try:
        codec.check_finite(tensor, field)
    except codec.CodecError as error:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, str(error), "not_finite"
        ) from None
    return tensor.float()


class CortexServicer(pb_grpc.CortexServicer):
    """The inbound side of one cortical chunk.

    Args:
        index: the chunk's position (activity comes from ``index - 1``, feedback
            is about this chunk's own outputs).
        input_size: width of the activity it accepts.
        hidden_size: width of the feedback it accepts.
        activity_in: where accepted activity goes.
        feedback_in: where accepted observed feedback goes.
        put_timeout: seconds a call may wait for room in a full mailbox before it
            is answered RESOURCE_EXHAUSTED.
        checkpoint, restore: the chunk's own checkpoint functions (the actor's).
    """

    def __init__(
        self,
        index: int,
        input_size: int,
        hidden_size: int,
        activity_in: Mailbox,
        feedback_in: Mailbox,
        put_timeout: float = 120.0,
        checkpoint: CheckpointFn | None = None,
        restore: RestoreFn | None = None,
    ) -> None:
        self.index = index
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.activity_in = activity_in
        self.feedback_in = feedback_in
        self.put_timeout = put_timeout
        self.checkpoint_fn = checkpoint
        self.restore_fn = restore
        self.counters = Counters(
            [
                "activity.accepted",
                "feedback.accepted",
                "bytes.received",
                "receive.cpu_seconds",
            ]
        )
        self._activity_order = _Order()
        self._feedback_order = _Order()

    def reset(self) -> None:
        """Forget the order of keys seen (after a restore, keys start again)."""
        self._activity_order.reset()
        self._feedback_order.reset()

    # Streams ---------------------------------------------------------------------

    def PushActivity(self, request_iterator, context):  # noqa: N802 (gRPC name)
        return self._push(request_iterator, context, "activity")

    def PushFeedback(self, request_iterator, context):  # noqa: N802
        return self._push(request_iterator, context, "feedback")

    def StreamActivity(self, request_iterator, context):  # noqa: N802
        return self._acked(request_iterator, context, "activity")

    def StreamFeedback(self, request_iterator, context):  # noqa: N802
        return self._acked(request_iterator, context, "feedback")

    def _push(self, request_iterator, context, stream: str):
        """Deposit every whole message of a client stream; one Ack at its end.

        The CPU this handler's thread spends on it (decoding, checking,
        depositing; not gRPC's own transport threads) adds up in the
        ``receive.cpu_seconds`` counter: what receiving costs this process.
        """
        received = self._receive(request_iterator, context, stream)
        return pb.Ack(accepted=sum(1 for _ in received))

    def _acked(self, request_iterator, context, stream: str):
        """Deposit every whole message of a long-lived stream, acking each."""
        for accepted, _ in enumerate(
            self._receive(request_iterator, context, stream), start=1
        ):
            yield pb.Ack(accepted=accepted)

    def _receive(self, request_iterator, context, stream: str):
        """Check each whole message of ``stream`` (``activity`` or ``feedback``),
        deposit it in that stream's mailbox, yield its key after each.

        A refused message aborts the call with its status. The handler's own CPU
        is counted message by message, so a long-lived stream's shows in Stats
        while it is open.
        """
        check, mailbox, order = {
            "activity": (self._check_activity, self.activity_in, self._activity_order),
            "feedback": (self._check_feedback, self.feedback_in, self._feedback_order),
        }[stream]
        began = time.thread_time()
        try:
            for frame, tensors in codec.decode_frames(request_iterator, stream):
                key, tensor = check(frame, tensors)
                self._deposit(mailbox, order, key, tensor, context)
                self.counters.add(f"{stream}.accepted")
                self.counters.add("bytes.received", tensor.numel() * 4)
                now = time.thread_time()
                self.counters.add("receive.cpu_seconds", now - began)
                began = now
                yield key
        except RequestError as error:
            reject_error(context, error, self.counters)
        except codec.CodecError as error:
            reject(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                str(error),
                self.counters,
                "codec",
            )
        finally:
            self.counters.add("receive.cpu_seconds", time.thread_time() - began)

    def _check_activity(self, frame: pb.ActivityFrame, tensors: dict):
        if frame.WhichOneof("body") != "activity":
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "activity frame: expected a whole activity message, got a lone part",
                "frame",
            )
        activity = frame.activity
        if not activity.HasField("key") or activity.key.chunk != self.index - 1:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"activity.key.chunk: {activity.key.chunk}; this chunk ({self.index}) "
                f"accepts activity from chunk {self.index - 1} only",
                "key",
            )
        _check_key(activity.key, "activity")
        if "activity.outputs" not in tensors:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "activity.outputs: missing; expected (batch, steps, "
                f"{self.input_size})",
                "shape",
            )
        outputs = _check_tensor(
            tensors["activity.outputs"], "activity.outputs", self.input_size
        )
        return key_from_proto(activity.key), outputs

    def _check_feedback(self, frame: pb.FeedbackFrame, tensors: dict):
        if frame.WhichOneof("body") != "feedback":
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "feedback frame: expected a whole feedback message, got a lone part",
                "frame",
            )
        feedback = frame.feedback
        if (
            feedback.target != pb.Feedback.OUTPUT
            or feedback.kind != pb.Feedback.OBSERVED
        ):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"feedback.kind/target: {feedback.kind}/{feedback.target}; a chunk "
                "accepts OBSERVED feedback of its OUTPUT only",
                "kind",
            )
        if not feedback.HasField("key") or feedback.key.chunk != self.index:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"feedback.key.chunk: {feedback.key.chunk}; expected {self.index} "
                "(feedback about this chunk's outputs)",
                "key",
            )
        _check_key(feedback.key, "feedback")
        if len(feedback.tensors) != 1:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"feedback.tensors: {len(feedback.tensors)} tensors; expected 1 "
                f"(d_outputs, (batch, steps, {self.hidden_size}))",
                "shape",
            )
        grad = _check_tensor(
            tensors["feedback.tensors[0]"], "feedback.tensors[0]", self.hidden_size
        )
        return key_from_proto(feedback.key), grad

    def _deposit(self, mailbox: Mailbox, order: _Order, key, tensor, context) -> None:
        mkey = mail_key(key)
        order.check(mkey, mailbox.name)
        try:
            # A sender that gave up (its deadline, or it went away) must not
            # find the message delivered after all.
            mailbox.put(
                mkey,
                tensor,
                timeout=self.put_timeout,
                abandoned=lambda: not context.is_active(),
            )
        except TimeoutError:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{mailbox.name} stayed full for {self.put_timeout} s; the chunk is "
                "not reading (stalled or stopped)",
                "full",
            ) from None
        except Aborted:
            raise RequestError(
                grpc.StatusCode.UNAVAILABLE,
                f"{mailbox.name}: the run was stopped",
                "aborted",
            ) from None
        except Abandoned as error:
            raise RequestError(
                grpc.StatusCode.CANCELLED, str(error), "abandoned"
            ) from None
        except KeyError as error:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, str(error), "duplicate"
            ) from None
        order.accept(mkey)

    # Control ---------------------------------------------------------------------

    def Configure(self, request, context):  # noqa: N802
        try:
            settings = msgpack.unpackb(request.config) if request.config else {}
        except (ValueError, msgpack.ExtraData, msgpack.FormatError) as error:
            reject(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"config: not msgpack ({error})",
                self.counters,
                "config",
            )
        if not isinstance(settings, dict):
            reject(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"config: a msgpack map expected, got {type(settings).__name__}",
                self.counters,
                "config",
            )
        unknown = sorted(set(settings) - {"put_timeout"})
        if unknown:
            reject(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"config: unknown keys {unknown}; settable: ['put_timeout']",
                self.counters,
                "config",
            )
        if "put_timeout" in settings:
            value = settings["put_timeout"]
            if not isinstance(value, (int, float)) or not value > 0:
                reject(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"config.put_timeout: {value!r}; expected a positive number",
                    self.counters,
                    "config",
                )
            self.put_timeout = float(value)
        effective = {
            "chunk": self.index,
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "capacity": self.activity_in.capacity,
            "put_timeout": self.put_timeout,
        }
        return pb.ConfigureReply(config=msgpack.packb(effective))

    def Stats(self, request, context):  # noqa: N802
        counters = self.counters.snapshot()
        counters["activity_in.depth"] = len(self.activity_in)
        counters["feedback_in.depth"] = len(self.feedback_in)
        counters["activity_in.stalls"] = self.activity_in.stalls
        counters["feedback_in.stalls"] = self.feedback_in.stalls
        names = set(request.names)
        if names:
            counters = {k: v for k, v in counters.items() if k in names}
        return pb.StatsReply(counters=counters)

    def Checkpoint(self, request, context):  # noqa: N802
        if self.checkpoint_fn is None:
            reject(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "checkpoint: this server hosts no chunk state to save",
                self.counters,
                "no_state",
            )
        if not request.path:
            reject(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "checkpoint.path: empty; expected a file path",
                self.counters,
                "path",
            )
        try:
            path, step, size = self.checkpoint_fn(request.path)
        except OSError as error:
            reject(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"checkpoint.path {request.path!r}: {error}",
                self.counters,
                "io",
            )
        return pb.CheckpointReply(path=path, step=step, size_bytes=size)

    def Restore(self, request, context):  # noqa: N802
        if self.restore_fn is None:
            reject(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "restore: this server hosts no chunk state",
                self.counters,
                "no_state",
            )
        try:
            step = self.restore_fn(request.path)
        except FileNotFoundError:
            reject(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"restore.path {request.path!r}: no such checkpoint",
                self.counters,
                "path",
            )
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            reject(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"restore.path {request.path!r}: not a valid chunk checkpoint "
                f"({error})",
                self.counters,
                "corrupt",
            )
        self.reset()
        return pb.RestoreReply(path=request.path, step=step)


def add_to_server(servicer: CortexServicer, server: grpc.Server) -> None:
    """Register ``servicer`` on ``server``; requests are parsed by the servicer.

    A request that does not parse is answered INVALID_ARGUMENT and counted as
    ``rejected.unparsable`` (see ``protos.service.add_servicer``).
    """
    add_servicer(server, SERVICE, servicer, servicer.counters)


def _check_key(key: pb.ActivityKey, what: str) -> None:
    for name in ("batch", "window", "micro_batch"):
        if getattr(key, name) < 0:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what}.key.{name}: {getattr(key, name)}; expected a non-negative id",
                "key",
            )


class StreamFailed(grpc.RpcError):
    """A send on a neighbour's stream that no status of the server explains: it
    was not acked within its deadline, or the stream ended before acking it."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _AckedStream:
    """One StreamActivity or StreamFeedback call: whole messages go out in
    order; a reader thread counts the server's acks and times each message."""

    def __init__(
        self,
        method: grpc.StreamStreamMultiCallable,
        name: str,
        timer: Callable[[float], None] | None,
    ) -> None:
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._acked = threading.Condition()
        self._sent_at: deque[float] = deque()
        self._timer = timer
        self.sent = 0
        self.accepted = 0
        self.ended = False
        self.error: grpc.RpcError | None = None  # None once ended: ended OK
        self._call = method(iter(self._outbox.get, None))
        self._reader = threading.Thread(target=self._read, name=name, daemon=True)
        self._reader.start()

    def send(self, frames: Sequence) -> None:
        with self._acked:
            self._sent_at.append(time.perf_counter())
            self.sent += 1
        for frame in frames:
            self._outbox.put(frame)

    def wait(self, count: int, deadline_s: float) -> None:
        """Until the first ``count`` messages are acked; raise why not."""
        with self._acked:
            if self.accepted >= count:
                return
            waited = time.perf_counter() - self._sent_at[0]
            self._acked.wait_for(
                lambda: self.accepted >= count or self.ended,
                timeout=max(0.0, deadline_s - waited),
            )
            if self.accepted >= count:
                return
            if self.error is not None:
                raise self.error
            ended = self.ended
        if ended:
            raise StreamFailed(
                grpc.StatusCode.UNAVAILABLE,
                f"the stream ended after {self.accepted} of {count} messages were "
                "acked",
            )
        self.cancel()
        raise StreamFailed(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"message {count} was not acked within {deadline_s} s (the receiving "
            "chunk is stalled or its mailbox stayed full)",
        )

    def _read(self) -> None:
        error: grpc.RpcError | None = None
        try:
            for ack in self._call:
                with self._acked:
                    now = time.perf_counter()
                    timed = []
                    while self.accepted < ack.accepted and self._sent_at:
                        timed.append(now - self._sent_at.popleft())
                        self.accepted += 1
                    self._acked.notify_all()
                if self._timer is not None:
                    for seconds in timed:
                        self._timer(seconds)
        except grpc.RpcError as failure:
            error = failure
        except Exception as failure:  # noqa: BLE001 (a sender must not wait on)
            logger.exception("a stream's ack reader failed")
            error = StreamFailed(
                grpc.StatusCode.UNKNOWN, f"the stream's ack reader failed: {failure}"
            )
        finally:
            with self._acked:
                self.ended = True
                self.error = error
                self._acked.notify_all()

    def close(self) -> None:
        """End the stream from this side; what is acked stays accepted."""
        self._outbox.put(None)
        self._reader.join(timeout=5)
        if self._reader.is_alive():
            self.cancel()

    def cancel(self) -> None:
        self._outbox.put(None)
        self._call.cancel()

    def join(self, timeout: float) -> bool:
        """Wait for the reader to end; whether it has."""
        self._reader.join(timeout)
        return not self._reader.is_alive()


class GrpcNeighbour:
    """A neighbouring chunk behind gRPC (the ``Neighbour`` of the runtime).

    Activity and feedback each travel on one long-lived stream
    (``StreamActivity``, ``StreamFeedback``) that acks every message once it is
    in the neighbour's mailbox. A send returns once the previous one has been
    acked, so at most one message is in flight from here and a full mailbox
    there stalls this chunk. A long-lived stream costs about half the CPU per
    message of a short call per message (``scripts/grpc_patterns.py``), which
    also starts two threads each time.

    A send that fails (the neighbour refused the message, went away, or did not
    ack it within ``deadline_s``) raises ``grpc.RpcError`` at the next send or
    :meth:`flush`; the message is lost (a receiver waiting for mailbox room
    drops it once the call is cancelled) and the stream dropped, and the send
    after opens a new one. A stream that ended with every message acked (the
    neighbour restarted between two sends) is replaced without an error:
    nothing was lost. After :meth:`abort` every send raises ``CANCELLED``.

    Args:
        address: ``host:port`` of the neighbour's cortex service.
        security: token and TLS settings.
        deadline_s: how long a message may wait for its ack (the wait for
            mailbox room included).
        max_message_bytes: both ends' message limit.
        interceptors: client interceptors (the actor's latency metrics).
        timer: called with ``(method, seconds)`` for each message, from its
            sending to its ack, as the interceptors time a call.
    """

    def __init__(
        self,
        address: str,
        security: ClientSecurity | None = None,
        deadline_s: float = 120.0,
        max_message_bytes: int = codec.MAX_MESSAGE_BYTES,
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (),
        timer: Callable[[str, float], None] | None = None,
    ) -> None:
        self.address = address
        self.deadline_s = deadline_s
        self.max_message_bytes = max_message_bytes
        self.timer = timer
        self.channel = open_channel(address, security, max_message_bytes)
        if interceptors:
            self.channel = grpc.intercept_channel(self.channel, *interceptors)
        self.stub = pb_grpc.CortexStub(self.channel)
        self._streams: dict[str, _AckedStream] = {}
        self._aborted = False
        self.streams_opened = 0
        self.bytes_sent = 0

    def send_activity(self, key: ActivityKey, outputs: torch.Tensor) -> None:
        frame = pb.ActivityFrame()
        key_to_proto(key, frame.activity.key)
        frames = codec.split_frames(
            frame, {"activity.outputs": outputs}, max_bytes=self.max_message_bytes
        )
        self._send("StreamActivity", frames, outputs)

    def send_feedback(self, key: ActivityKey, feedback: torch.Tensor) -> None:
        frame = pb.FeedbackFrame()
        key_to_proto(key, frame.feedback.key)
        frame.feedback.kind = pb.Feedback.OBSERVED
        frame.feedback.target = pb.Feedback.OUTPUT
        frames = codec.split_frames(
            frame, {"feedback.tensors[0]": feedback}, max_bytes=self.max_message_bytes
        )
        self._send("StreamFeedback", frames, feedback)

    def _send(self, method: str, frames, tensor: torch.Tensor) -> None:
        frames = list(frames)  # encode before waiting: it overlaps the ack
        stream = self._streams.get(method)
        if stream is not None:
            self._settle(method, stream, stream.sent)
            if stream.ended:  # after its last ack: nothing lost, a new one
                self._drop(method, stream)
                stream = None
        if self._aborted:
            raise StreamFailed(
                grpc.StatusCode.CANCELLED, f"the neighbour at {self.address} was closed"
            )
        stream = stream or self._open(method)
        stream.send(frames)
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def _open(self, method: str) -> _AckedStream:
        timer = None
        if self.timer is not None:
            record = self.timer

            def timer(seconds: float) -> None:
                record(method, seconds)

        stream = _AckedStream(getattr(self.stub, method), f"{method}-acks", timer)
        self._streams[method] = stream
        self.streams_opened += 1
        return stream

    def _settle(self, method: str, stream: _AckedStream, count: int) -> None:
        """Wait for ``count`` acks on ``stream``; drop it and raise on failure."""
        try:
            stream.wait(count, self.deadline_s)
        except grpc.RpcError:
            self._drop(method, stream)
            raise

    def _drop(self, method: str, stream: _AckedStream) -> None:
        # abort() may have emptied the streams from another thread meanwhile.
        if self._streams.get(method) is stream:
            del self._streams[method]
        stream.cancel()

    def flush(self) -> None:
        """Wait until every message sent has been acked; raise the first error."""
        for method, stream in list(self._streams.items()):
            self._settle(method, stream, stream.sent)

    def stats(self) -> dict[str, float]:
        reply = call(self.stub.Stats, pb.StatsRequest())
        return dict(reply.counters)

    def abort(self) -> None:
        """Drop the streams without waiting for acks, and close the channel.

        Safe from another thread while a send waits: that send raises."""
        self._aborted = True
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            stream.cancel()
        self.channel.close()

    def close(self) -> None:
        """Wait for the acks of what was sent, end the streams, close the channel."""
        try:
            self.flush()
            for stream in self._streams.values():
                stream.close()
            self._streams = {}
        finally:
            self.abort()
