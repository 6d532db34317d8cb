"""Tensor codec: torch tensors to and from the ``ccdni.v1.Tensor`` wire message.

A tensor travels as its dtype name, its shape and one ``bytes`` field holding the
elements row-major and little-endian. Encoding a contiguous CPU tensor copies its
memory once into a Python ``bytes``, which protobuf copies into its message.
Decoding reads the field (protobuf copies it out as ``bytes``) and copies it once
more into a buffer the returned tensor owns, so that the tensor is writable and
outlives the message. Those are the fewest copies the protobuf Python API allows.

A frame (one stream element) larger than the gRPC message limit is split::

    whole frame                       frames on the wire
    ┌──────────────────────────┐      ┌──────────────────────────────────────┐
    │ key, state (small)       │      │ key, state, outputs=placeholder(n=3) │
    │ outputs (150 MiB)        │ ───▶ │ part 0/3 of "activity.outputs"       │
    └──────────────────────────┘      │ part 1/3 of "activity.outputs"       │
                                      │ part 2/3 of "activity.outputs"       │
                                      └──────────────────────────────────────┘

``split_frames`` does this on the sending side; ``decode_frames`` (or, to get
the frames back with their bytes inline, ``FrameAssembler`` and
``assemble_frames``) undoes it on the receiving side; ``split_tensor`` and
``TensorAssembler`` are the same operation for one tensor. Every decode-side
check raises ``CodecError`` naming the field and the value it expected.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import TypeVar

import numpy as np
import torch
from google.protobuf.message import Message

from protos import ccdni_pb2 as pb

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Default gRPC send and receive limit for every ccdni channel and server."""

DEFAULT_PART_BYTES = 4 * 1024 * 1024
"""Payload of one TensorPart made by ``split_frames`` unless told otherwise."""

ENVELOPE_BYTES = 64 * 1024
"""Room kept free in every frame for keys, names, shapes and protobuf framing."""

SUPPORTED_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "float32": torch.float32,
        "float64": torch.float64,
        "int64": torch.int64,
        "int32": torch.int32,
        "int16": torch.int16,
        "int8": torch.int8,
        "uint8": torch.uint8,
        "bool": torch.bool,
    }
)
"""Wire dtype names and the torch dtypes they stand for."""

_WIRE_NAMES = {dtype: name for name, dtype in SUPPORTED_DTYPES.items()}
_TENSOR = pb.Tensor.DESCRIPTOR.full_name
_TENSOR_PART = pb.TensorPart.DESCRIPTOR.full_name

# The wire is little-endian. A module constant rather than an inline check so the
# tests can exercise the byte-swapping path on a little-endian machine.
_HOST_IS_LITTLE_ENDIAN = sys.byteorder == "little"

FrameT = TypeVar("FrameT", bound=Message)


class CodecError(ValueError):
    """A tensor message or frame stream that cannot be decoded as it stands."""


def grpc_options(max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel or server options that set both message-size limits.

    Pass the same value on both ends: ``grpc.insecure_channel(addr,
    options=grpc_options())`` and ``grpc.server(pool, options=grpc_options())``.

    Args:
        max_bytes: largest message, in bytes, either end may send or receive.

    Raises:
        ValueError: ``max_bytes`` is not a positive int32.
    """
    if not isinstance(max_bytes, int) or not 0 < max_bytes < 2**31:
        raise ValueError(
            f"max_bytes={max_bytes!r} must be an int in [1, 2**31 - 1] "
            f"(gRPC stores it as int32); the default is {MAX_MESSAGE_BYTES}"
        )

    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


def encode(tensor: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode a tensor as a ``Tensor`` message.

    Args:
        tensor: any dense tensor of a dtype in ``SUPPORTED_DTYPES``, on any device;
            it is detached, moved to the CPU and made contiguous as needed.
        out: a message to fill instead of a new one, typically a field of the
            frame being built (``encode(h, out=activity.state.add())``), which
            saves the copy that assigning a finished message would make.

    Returns:
        ``out``, or a new message.

    Raises:
        CodecError: the dtype or layout is not supported.
    """
    name = _wire_name(tensor, "tensor")
    flat = _flat_bytes(tensor)
    msg = pb.Tensor() if out is None else out

    msg.dtype = name
    del msg.shape[:]
    msg.shape.extend(tensor.shape)
    msg.data = flat.tobytes()
    msg.parts = 0
    return msg


def decode(msg: pb.Tensor, *, field: str = "tensor") -> torch.Tensor:
    """Decode a ``Tensor`` message into a CPU tensor that owns its memory.

    Args:
        msg: the message; a placeholder (``parts > 0``) must be reassembled first.
        field: the message's name in its frame, quoted in errors
            (e.g. ``"activity.outputs"``).

    Raises:
        CodecError: a placeholder, an unknown dtype, a negative dimension, or a
            byte count that does not match dtype and shape.
    """
    if msg.parts:
        raise CodecError(
            f"{field}: is a placeholder whose bytes follow in {msg.parts} parts; "
            "pass the stream through FrameAssembler or assemble_frames before "
            "decoding"
        )
    dtype, shape, expected = _layout(msg.dtype, msg.shape, field)
    data = msg.data
    if len(data) != expected:
        raise CodecError(
            f"{field}.data: holds {len(data)} bytes but dtype {msg.dtype} with shape "
            f"{list(shape)} needs {expected} bytes"
        )

    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    # bytes are immutable and torch.frombuffer would alias them read-only; the
    # bytearray is the one copy decoding needs, and the tensor keeps it alive.
    buffer = bytearray(data)
    _to_host_order(buffer, dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def check_finite(tensor: torch.Tensor, field: str) -> None:
    """Raise if a floating-point tensor holds NaN or infinite values.

    Integer and bool tensors always pass.

    Args:
        tensor: the tensor to check.
        field: its name, quoted in the error (e.g. ``"feedback.tensors[0]"``).

    Raises:
        CodecError: naming the field, the number of bad values and the first one.
    """
    if not all_finite(tensor):
        finite = torch.isfinite(tensor)
        bad = ~finite.reshape(-1)
        first = int(bad.nonzero()[0, 0])
        value = tensor.reshape(-1)[first].item()
        raise CodecError(
            f"{field}: {int(bad.sum())} of {tensor.numel()} values are NaN or "
            f"infinite (first at flat index {first}: {value}); expected all "
            "finite, so look at the process that produced it (diverging learning "
            "rate, missing clipping)"
        )


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no value of ``tensor`` is NaN or infinite (integers: always).

    A sum is finite only if every term is (NaN and infinities propagate, and
    opposite infinities give NaN), and a sum is some 40 times cheaper than an
    elementwise test; only a sum that overflows, or a tensor that really holds
    a bad value, pays for the elementwise test.
    """
    if not tensor.is_floating_point():
        return True
    if math.isfinite(float(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def split_tensor(
    tensor: torch.Tensor, max_bytes: int, *, field: str = ""
) -> Iterator[pb.TensorPart]:
    """Yield a tensor's bytes as ``TensorPart`` messages of at most ``max_bytes``.

    Each part slices the tensor's own memory, so the bytes are copied once per
    part and never as a whole. An empty tensor yields one empty part. Arguments
    are checked when this is called; parts are made lazily.

    Args:
        tensor: as for ``encode``.
        max_bytes: largest ``data`` payload of one part.
        field: path of the placeholder the parts fill (see ``TensorPart.field``).

    Raises:
        ValueError: ``max_bytes`` is not positive.
        CodecError: the dtype or layout is not supported.
    """
    if not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes!r} must be a positive int")
    name = _wire_name(tensor, field or "tensor")
    flat = _flat_bytes(tensor)
    parts = max(1, math.ceil(flat.nbytes / max_bytes))

    return (
        pb.TensorPart(
            field=field,
            part=index,
            parts=parts,
            total_bytes=flat.nbytes,
            dtype=name,
            shape=tensor.shape,
            data=flat[index * max_bytes : (index + 1) * max_bytes].tobytes(),
        )
        for index in range(parts)
    )


class TensorAssembler:
    """Reassemble one tensor from its ``TensorPart`` messages, in order.

    Usage::

        assembler = TensorAssembler("activity.outputs")
        for part in parts:
            assembler.add(part)
        tensor = assembler.tensor()
    """

    def __init__(self, field: str = "tensor") -> None:
        """Args: field: the tensor's name, quoted in errors."""
        self.field = field
        self._first: pb.TensorPart | None = None
        self._dtype: torch.dtype | None = None
        self._chunks: list[bytes] = []
        self._received = 0

    @property
    def complete(self) -> bool:
        """Whether every part has arrived."""
        return self._first is not None and len(self._chunks) == self._first.parts

    @property
    def expected_parts(self) -> int | None:
        """The part count announced by part 0; ``None`` before it arrives."""
        return None if self._first is None else self._first.parts

    @property
    def missing_parts(self) -> int | None:
        """Parts still to come; ``None`` before part 0 arrives."""
        return None if self._first is None else self._first.parts - len(self._chunks)

    def add(self, part: pb.TensorPart) -> bool:
        """Take the next part; return whether the tensor is now complete.

        Raises:
            CodecError: the part is out of order, belongs to another tensor,
                disagrees with the first part, or overruns the byte total.
        """
        if self.complete:
            raise CodecError(
                f"{self.field}.part: got part {part.part} after all "
                f"{self._first.parts} parts arrived; expected a new tensor"
            )
        if self._first is None:
            self._start(part)
        else:
            self._check_consistent(part)

        data = part.data
        self._received += len(data)
        total = self._first.total_bytes
        if self._received > total:
            raise CodecError(
                f"{self.field}.part: parts 0..{part.part} hold {self._received} bytes, "
                f"more than total_bytes={total}"
            )
        self._chunks.append(data)
        if self.complete and self._received != total:
            raise CodecError(
                f"{self.field}.part: all {part.parts} parts hold {self._received} "
                f"bytes but total_bytes={total}"
            )

        return self.complete

    def tensor(self) -> torch.Tensor:
        """The reassembled tensor (owning its memory), once complete.

        Raises:
            CodecError: parts are still missing.
        """
        self._require_complete()
        shape = tuple(self._first.shape)
        if self._received == 0:
            return torch.empty(shape, dtype=self._dtype)

        flat = torch.empty(self._received, dtype=torch.uint8)
        view = flat.numpy()
        offset = 0
        for chunk in self._chunks:
            view[offset : offset + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            offset += len(chunk)
        _to_host_order(view, self._dtype)
        return flat.view(self._dtype).reshape(shape)

    def payload(self) -> bytes:
        """The reassembled wire bytes (little-endian), once complete.

        Raises:
            CodecError: parts are still missing.
        """
        self._require_complete()
        return b"".join(self._chunks)

    def message(self) -> pb.Tensor:
        """The reassembled tensor as one ``Tensor`` message, once complete.

        Raises:
            CodecError: parts are still missing.
        """
        data = self.payload()
        return pb.Tensor(dtype=self._first.dtype, shape=self._first.shape, data=data)

    def _start(self, part: pb.TensorPart) -> None:
        if part.part != 0:
            raise CodecError(
                f"{self.field}.part: first part has index {part.part}; expected 0 "
                "(parts must arrive in order)"
            )
        if part.parts < 1:
            raise CodecError(
                f"{self.field}.parts: is {part.parts}; expected at least 1"
            )
        dtype, _, expected = _layout(part.dtype, part.shape, self.field)
        if part.total_bytes != expected:
            raise CodecError(
                f"{self.field}.total_bytes: is {part.total_bytes} but dtype "
                f"{part.dtype} with shape {list(part.shape)} needs {expected} bytes"
            )
        # Keep the header fields, not part 0's payload, which is in _chunks.
        self._first = pb.TensorPart(
            field=part.field,
            parts=part.parts,
            total_bytes=part.total_bytes,
            dtype=part.dtype,
            shape=part.shape,
        )
        self._dtype = dtype

    def _check_consistent(self, part: pb.TensorPart) -> None:
        first = self._first
        expected_index = len(self._chunks)
        if part.part != expected_index:
            raise CodecError(
                f"{self.field}.part: got index {part.part}; expected {expected_index} "
                f"of {first.parts} (parts must arrive in order, none missing)"
            )
        for name in ("field", "parts", "total_bytes", "dtype", "shape"):
            got, want = getattr(part, name), getattr(first, name)
            if got != want:
                raise CodecError(
                    f"{self.field}.{name}: part {part.part} has {_show(got)}; "
                    f"expected {_show(want)} as in part 0"
                )

    def _require_complete(self) -> None:
        if self.complete:
            return
        if self._first is None:
            raise CodecError(f"{self.field}: no parts arrived; expected at least 1")
        raise CodecError(
            f"{self.field}: got parts 0..{len(self._chunks) - 1} of "
            f"{self._first.parts}; parts {len(self._chunks)}..{self._first.parts - 1} "
            "are missing"
        )


def split_frames(
    frame: FrameT,
    tensors: Mapping[str, torch.Tensor] | None = None,
    *,
    max_bytes: int = MAX_MESSAGE_BYTES,
    part_bytes: int = DEFAULT_PART_BYTES,
) -> Iterator[FrameT]:
    """Yield a frame as one or more frames that each fit in ``max_bytes``.

    Everything is checked, and the header built, before this returns, so a bad
    path or tensor raises here, in the caller's thread, and not later inside the
    gRPC thread that consumes the request iterator. The parts are then sliced
    lazily, one per ``next``.

    A frame that fits is yielded as it is. Otherwise its largest tensors become
    placeholders in a header frame, which is followed by one frame per part of
    each placeholder, placeholders in field order. Works for any frame type with a
    ``TensorPart part`` field: ActivityFrame, FeedbackFrame, LearnRequest.

    Tensors can already be in ``frame`` (made by ``encode``) or be given in
    ``tensors`` to be encoded on the way. The second route is cheaper for a
    tensor that must be split: its parts are sliced straight from its memory
    instead of from one big ``bytes``. ``frame`` itself is never modified.

    Args:
        frame: the frame; with ``tensors``, the frame without those tensors.
        tensors: torch tensors by path in the frame, e.g.
            ``{"activity.outputs": y, "activity.state[0]": h,
            "activity.state[1]": c}``; entries of a repeated field in index
            order, starting at the field's current length.
        max_bytes: the message limit the channel was opened with.
        part_bytes: payload of one part, capped at ``max_bytes - ENVELOPE_BYTES``.

    Raises:
        ValueError: ``max_bytes`` leaves no room for a part, or a path does not
            name a Tensor field of the frame.
        CodecError: a tensor has an unsupported or malformed dtype or shape.
    """
    if max_bytes <= 2 * ENVELOPE_BYTES:
        raise ValueError(
            f"max_bytes={max_bytes} must exceed {2 * ENVELOPE_BYTES} "
            "(twice ENVELOPE_BYTES) to leave room for a part"
        )
    if part_bytes <= 0:
        raise ValueError(f"part_bytes={part_bytes!r} must be positive")
    tensors = dict(tensors or {})

    # Sizes from dtype and shape, so no payload is touched to measure it.
    sizes = {
        path: _layout(msg.dtype, msg.shape, path)[2]
        for path, msg in _tensor_fields(frame)
    }
    for path, tensor in tensors.items():
        _wire_name(tensor, path)
        sizes[path] = tensor.numel() * tensor.element_size()
    inline = sum(sizes.values())
    if not tensors and inline + ENVELOPE_BYTES <= max_bytes:
        return iter((frame,))

    # Move the largest tensors out until the header fits.
    moved = set()
    for path, size in sorted(sizes.items(), key=lambda item: -item[1]):
        if inline + ENVELOPE_BYTES <= max_bytes:
            break
        moved.add(path)
        inline -= size
    part_bytes = min(part_bytes, max_bytes - ENVELOPE_BYTES)

    header = type(frame)()
    header.CopyFrom(frame)
    sources: dict[str, np.ndarray | memoryview] = {}
    for path, tensor in tensors.items():
        out = _resolve(header, path)
        if path in moved:
            out.Clear()
            out.dtype = _WIRE_NAMES[tensor.dtype]
            out.shape.extend(tensor.shape)
            sources[path] = _flat_bytes(tensor)
        else:
            encode(tensor, out=out)
    originals = dict(_tensor_fields(frame))
    # Parts follow in field order, which is the order FrameAssembler expects.
    plans = []
    for path, placeholder in _tensor_fields(header):
        if path not in moved:
            continue
        if path not in sources:
            sources[path] = memoryview(originals[path].data)
            placeholder.ClearField("data")
        placeholder.parts = max(1, math.ceil(sizes[path] / part_bytes))
        plans.append((path, placeholder))
    logger.debug(
        "split %s into a header and %d part(s) of %s",
        frame.DESCRIPTOR.name,
        sum(placeholder.parts for _, placeholder in plans),
        ", ".join(path for path, _ in plans),
    )

    return _emit_frames(header, plans, sources, part_bytes)


def _emit_frames(
    header: FrameT,
    plans: list[tuple[str, pb.Tensor]],
    sources: Mapping[str, np.ndarray | memoryview],
    part_bytes: int,
) -> Iterator[FrameT]:
    """Yield the header, then each placeholder's parts as continuation frames."""
    yield header
    for path, placeholder in plans:
        flat = sources[path]
        total = len(flat)
        for index in range(placeholder.parts):
            continuation = type(header)()
            part = continuation.part
            part.field = path
            part.part = index
            part.parts = placeholder.parts
            part.total_bytes = total
            part.dtype = placeholder.dtype
            part.shape.extend(placeholder.shape)
            part.data = flat[index * part_bytes : (index + 1) * part_bytes].tobytes()
            yield continuation


class FrameAssembler:
    """Turn the frames of one stream back into whole frames.

    Feed every frame in arrival order; ``feed`` returns a whole frame when one is
    complete, else ``None``. The whole frame is the header frame that was fed,
    its placeholders filled in place. Works for any frame type with a
    ``TensorPart part`` field. Call ``close`` at the end of the stream to detect a
    truncated one. ``decode_frames`` is the cheaper route when the receiver
    wants torch tensors anyway.
    """

    def __init__(self, stream: str = "stream") -> None:
        """Args: stream: a name for the stream, quoted in errors."""
        self.stream = stream
        self._header: Message | None = None
        # Placeholders of the header, in field order: (path, message, assembler).
        self._pending: list[tuple[str, pb.Tensor, TensorAssembler]] = []
        self._done: list[tuple[str, pb.Tensor, TensorAssembler]] = []

    def feed(self, frame: FrameT) -> FrameT | None:
        """Take the next frame; return a whole frame when one is complete.

        Raises:
            CodecError: a part arrives with no placeholder waiting for it, or for
                a different field, or disagrees with its placeholder; a new frame
                arrives while parts are still missing.
        """
        whole = self.advance(frame)
        if whole is None:
            return None

        header, assembled = whole
        for _, placeholder, assembler in assembled:
            placeholder.data = assembler.payload()
            placeholder.parts = 0
        return header

    def advance(
        self, frame: FrameT
    ) -> tuple[FrameT, list[tuple[str, pb.Tensor, TensorAssembler]]] | None:
        """Like ``feed``, but leave the placeholders unfilled.

        Returns:
            ``None`` until a frame is whole; then the header frame and, for each
            of its placeholders in field order, ``(path, placeholder, assembler)``
            with a complete assembler.

        Raises:
            CodecError: as ``feed``.
        """
        if frame.HasField("part"):
            return self._advance_part(frame)

        if self._pending:
            path, _, assembler = self._pending[0]
            raise CodecError(
                f"{self.stream}: a new {frame.DESCRIPTOR.name} arrived while "
                f"{path} still waits for parts ({self._missing(assembler)} missing); "
                "expected its TensorPart frames first"
            )
        pending = []
        for path, msg in _tensor_fields(frame):
            if not msg.parts:
                continue
            if msg.data:
                raise CodecError(
                    f"{path}.data: a placeholder for {msg.parts} parts holds "
                    f"{len(msg.data)} bytes; expected none (its bytes follow as parts)"
                )
            pending.append((path, msg, TensorAssembler(path)))
        if not pending:
            return frame, []
        self._header, self._pending, self._done = frame, pending, []
        return None

    def close(self) -> None:
        """Declare the end of the stream.

        Raises:
            CodecError: a frame is still missing parts.
        """
        if self._pending:
            path, _, assembler = self._pending[0]
            raise CodecError(
                f"{self.stream}: ended while {path} still waits for parts "
                f"({self._missing(assembler)} missing)"
            )

    def _advance_part(self, frame: Message):
        set_fields = [fd.name for fd, _ in frame.ListFields()]
        if set_fields != ["part"]:
            raise CodecError(
                f"{self.stream}: a continuation frame sets {set_fields}; expected "
                "only 'part'"
            )
        part = frame.part
        if not self._pending:
            raise CodecError(
                f"{self.stream}.part: part {part.part} of {part.field!r} arrived with "
                "no placeholder waiting; expected a whole frame first"
            )
        path, placeholder, assembler = self._pending[0]
        if part.field != path:
            raise CodecError(
                f"{self.stream}.part.field: is {part.field!r}; expected {path!r}, "
                "the next placeholder in field order"
            )
        for name in ("parts", "dtype", "shape"):
            got, want = getattr(part, name), getattr(placeholder, name)
            if got != want:
                raise CodecError(
                    f"{path}.{name}: part {part.part} has {_show(got)}; expected "
                    f"{_show(want)} as announced by the placeholder"
                )

        if not assembler.add(part):
            return None
        self._done.append(self._pending.pop(0))
        if self._pending:
            return None
        whole = (self._header, self._done)
        self._header, self._done = None, []
        return whole

    @staticmethod
    def _missing(assembler: TensorAssembler) -> str:
        if assembler.expected_parts is None:
            return "all"
        return f"{assembler.missing_parts} of {assembler.expected_parts}"


def assemble_frames(
    frames: Iterable[FrameT], stream: str = "stream"
) -> Iterator[FrameT]:
    """Yield the whole frames of a stream of (possibly split) frames.

    Typical use in a servicer: ``for frame in assemble_frames(request_iterator):``.

    Raises:
        CodecError: as ``FrameAssembler.feed``, or the stream ends mid-frame.
    """
    assembler = FrameAssembler(stream)
    for frame in frames:
        whole = assembler.feed(frame)
        if whole is not None:
            yield whole
    assembler.close()


def decode_frames(
    frames: Iterable[FrameT], stream: str = "stream"
) -> Iterator[tuple[FrameT, dict[str, torch.Tensor]]]:
    """Yield each whole frame of a stream with every tensor in it decoded.

    Typical use in a servicer::

        for frame, tensors in decode_frames(request_iterator, "activity"):
            outputs = tensors["activity.outputs"]  # (B, T, H)

    A tensor that came in parts is copied once, from the parts straight into
    the returned tensor, and its placeholder stays in the frame (``parts`` > 0,
    no data). Inline tensors are decoded as by ``decode``.

    Returns:
        Pairs of the whole frame and a dict from path (``"activity.state[1]"``)
        to tensor, in field order.

    Raises:
        CodecError: as ``FrameAssembler.feed`` and ``decode``, naming the path.
    """
    assembler = FrameAssembler(stream)
    for frame in frames:
        whole = assembler.advance(frame)
        if whole is None:
            continue
        header, assembled = whole
        split = {path: parts.tensor() for path, _, parts in assembled}
        tensors = {
            path: split[path] if path in split else decode(msg, field=path)
            for path, msg in _tensor_fields(header)
        }
        yield header, tensors
    assembler.close()


def _wire_name(tensor: torch.Tensor, field: str) -> str:
    if not isinstance(tensor, torch.Tensor):
        raise CodecError(
            f"{field}: is a {type(tensor).__name__}; expected a torch.Tensor"
        )
    if tensor.layout != torch.strided:
        raise CodecError(
            f"{field}: has layout {tensor.layout}; expected torch.strided "
            "(call .to_dense() first)"
        )
    name = _WIRE_NAMES.get(tensor.dtype)
    if name is None:
        raise CodecError(
            f"{field}: dtype {tensor.dtype} is not supported; expected one of "
            f"{', '.join(SUPPORTED_DTYPES)}"
        )
    return name


def _flat_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's elements as a 1-D little-endian uint8 array.

    On a little-endian host this is a view of the (CPU, contiguous) tensor's
    memory; a view as uint8 sidesteps bf16, which numpy has no dtype for.
    """
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    itemsize = tensor.element_size()
    if _HOST_IS_LITTLE_ENDIAN or itemsize == 1:
        return flat
    return flat.view(f"u{itemsize}").byteswap().view(np.uint8)


def _to_host_order(buffer: bytearray | np.ndarray, dtype: torch.dtype) -> None:
    """Swap little-endian wire bytes to host order in place (big-endian hosts)."""
    itemsize = dtype.itemsize
    if _HOST_IS_LITTLE_ENDIAN or itemsize == 1:
        return
    np.frombuffer(buffer, dtype=f"u{itemsize}").byteswap(inplace=True)


def _layout(
    dtype_name: str, shape: Iterable[int], field: str
) -> tuple[torch.dtype, tuple[int, ...], int]:
    """Validate a wire dtype and shape; return dtype, shape and byte count."""
    dtype = SUPPORTED_DTYPES.get(dtype_name)
    if dtype is None:
        raise CodecError(
            f"{field}.dtype: is {dtype_name!r}; expected one of "
            f"{', '.join(SUPPORTED_DTYPES)}"
        )
    shape = tuple(shape)
    for axis, size in enumerate(shape):
        if size < 0:
            raise CodecError(
                f"{field}.shape: {list(shape)} has {size} at axis {axis}; expected "
                "every dimension >= 0"
            )

    return dtype, shape, math.prod(shape) * dtype.itemsize


def _tensor_fields(msg: Message, prefix: str = "") -> Iterator[tuple[str, pb.Tensor]]:
    """Yield (path, message) for every set Tensor inside ``msg``, in field order."""
    for fd, value in msg.ListFields():
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        name = prefix + fd.name
        kind = fd.message_type.full_name
        if kind == _TENSOR_PART:
            continue
        items = (
            [(f"{name}[{i}]", item) for i, item in enumerate(value)]
            if fd.is_repeated
            else [(name, value)]
        )
        for path, item in items:
            if kind == _TENSOR:
                yield path, item
            else:
                yield from _tensor_fields(item, path + ".")


def _resolve(frame: Message, path: str) -> pb.Tensor:
    """The Tensor field of ``frame`` that ``path`` names, created as needed."""
    node = frame
    for segment in path.split("."):
        name, _, index = segment.partition("[")
        fd = node.DESCRIPTOR.fields_by_name.get(name)
        if fd is None or fd.message_type is None:
            fields = ", ".join(
                f.name for f in node.DESCRIPTOR.fields if f.message_type is not None
            )
            raise ValueError(
                f"tensors: path {path!r}: {node.DESCRIPTOR.name} has no message "
                f"field {name!r}; expected one of {fields}"
            )
        if not fd.is_repeated:
            if index:
                raise ValueError(
                    f"tensors: path {path!r}: {name} is not repeated; drop the index"
                )
            node = getattr(node, name)
            continue
        container = getattr(node, name)
        if not index.endswith("]") or not index[:-1].isdigit():
            raise ValueError(
                f"tensors: path {path!r}: {name} is repeated; expected "
                f"{name}[{len(container)}]"
            )
        if int(index[:-1]) != len(container):
            raise ValueError(
                f"tensors: path {path!r}: {name} holds {len(container)} entries; "
                f"expected {name}[{len(container)}] next (give entries in order)"
            )
        node = container.add()

    if node.DESCRIPTOR is not pb.Tensor.DESCRIPTOR:
        raise ValueError(
            f"tensors: path {path!r} names a field of type {node.DESCRIPTOR.name}; "
            "expected a Tensor field"
        )
    return node


def _show(value: object) -> str:
    """Render a protobuf scalar or repeated field for an error message."""
    if isinstance(value, str):
        return repr(value)
    try:
        return str(list(value))
    except TypeError:
        return str(value)
