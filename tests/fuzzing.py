"""Hypothesis strategies for malformed wire messages, shared by the fuzz tests.

Everything here is service-agnostic: tensors that are wrong for a slot of a
given dtype and shape, broken part sequences for any frame type with a
``TensorPart part`` field, random messages of any protobuf type, and raw bytes
sent to any method. Each malformed strategy also says *how* the value is wrong,
so a test can expect the matching status code or counter.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from protos import ccdni_pb2 as pb
from protos.codec import SUPPORTED_DTYPES

FLOAT_DTYPES = ("float32", "float64", "bfloat16", "float16")

TENSOR_FLAWS = (
    "byte_count",
    "unknown_dtype",
    "negative_dim",
    "huge_dim",
    "wrong_rank",
    "wrong_shape",
    "not_finite",
    "random_bytes",
    "placeholder",
)
"""How ``malformed_tensors`` can make a tensor wrong for its slot.

All but ``wrong_shape`` and ``not_finite`` are undecodable whatever the slot;
those two are well-formed tensors that do not fit (a service may count them
rather than fail the call).
"""

PART_FLAWS = (
    "orphan_part",
    "wrong_field",
    "out_of_order",
    "repeated_part",
    "dtype_mismatch",
    "shape_mismatch",
    "total_mismatch",
    "overrun",
    "truncated",
    "header_mid_parts",
    "crowded_continuation",
)
"""How ``broken_part_streams`` can break a split frame."""

_STRANGE_DTYPES = ("float8", "complex64", "FLOAT32", "", "torch.float32", "f4", "int4")


def nbytes(dtype: str, shape: Sequence[int]) -> int:
    return math.prod(shape) * SUPPORTED_DTYPES[dtype].itemsize


def tensor_message(
    dtype: str, shape: Sequence[int], data: bytes = b"", parts: int = 0
) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=list(shape), data=data, parts=parts)


_FINITE = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def finite_tensors(draw, shape: Sequence[int], dtype: str = "float32") -> pb.Tensor:
    """A well-formed float32/float64 tensor of ``shape`` with finite values."""
    count = math.prod(shape)
    values = draw(st.lists(_FINITE, min_size=count, max_size=count))
    code = {"float32": "f", "float64": "d"}[dtype]
    return tensor_message(dtype, shape, struct.pack(f"<{count}{code}", *values))


@st.composite
def malformed_tensors(
    draw,
    shape: Sequence[int],
    dtype: str = "float32",
    flaws: Sequence[str] = TENSOR_FLAWS,
) -> tuple[str, pb.Tensor]:
    """A Tensor message that is wrong for a slot expecting ``dtype`` and ``shape``.

    Returns (flaw, message), the flaw one of ``flaws``.
    """
    flaw = draw(st.sampled_from(list(flaws)))
    shape = list(shape)
    size = nbytes(dtype, shape)

    if flaw == "byte_count":
        length = draw(st.integers(0, 2 * size + 8).filter(lambda n: n != size))
        return flaw, tensor_message(dtype, shape, _bytes(draw, length))
    if flaw == "unknown_dtype":
        name = draw(
            st.sampled_from(_STRANGE_DTYPES)
            | st.text(max_size=12).filter(lambda s: s not in SUPPORTED_DTYPES)
        )
        return flaw, tensor_message(name, shape, _bytes(draw, size))
    if flaw == "negative_dim":
        axis = draw(st.integers(0, len(shape) - 1))
        shape[axis] = draw(st.integers(-(2**62), -1))
        return flaw, tensor_message(dtype, shape, _bytes(draw, size))
    if flaw == "huge_dim":
        axis = draw(st.integers(0, len(shape) - 1))
        shape[axis] = draw(st.integers(2**31, 2**62))
        return flaw, tensor_message(dtype, shape, _bytes(draw, size))
    if flaw == "wrong_rank":
        rank = draw(st.sampled_from([r for r in range(5) if r != len(shape)]))
        other = [1] * rank
        if rank:
            other[0] = math.prod(shape)
        return flaw, tensor_message(dtype, other, _bytes(draw, size))
    if flaw == "wrong_shape":
        axis = draw(st.integers(0, len(shape) - 1))
        shape[axis] = draw(st.integers(1, 64).filter(lambda n: n != shape[axis]))
        return flaw, tensor_message(dtype, shape, bytes(nbytes(dtype, shape)))
    if flaw == "not_finite":
        return flaw, _not_finite(draw, dtype, shape)
    if flaw == "random_bytes":
        other_dtype = draw(st.sampled_from(list(SUPPORTED_DTYPES)))
        other_shape = draw(st.lists(st.integers(0, 9), max_size=4))
        data = draw(st.binary(max_size=256))
        if len(data) == nbytes(other_dtype, other_shape):
            data += b"\0"  # keep it undecodable
        return flaw, tensor_message(other_dtype, other_shape, data)
    if flaw == "placeholder":
        parts = draw(st.integers(1, 2**31 - 1))
        return flaw, tensor_message(dtype, shape, parts=parts)
    raise ValueError(f"flaw={flaw!r}: expected one of {TENSOR_FLAWS}")


def _bytes(draw, length: int) -> bytes:
    """``length`` bytes, random at the start (cheap for large lengths)."""
    head = draw(st.binary(min_size=min(length, 32), max_size=min(length, 32)))
    return head + bytes(length - len(head))


def _not_finite(draw, dtype: str, shape: Sequence[int]) -> pb.Tensor:
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype={dtype!r}: not_finite supports float32 and float64")
    count = math.prod(shape)
    code = {"float32": "f", "float64": "d"}[dtype]
    values = [0.5] * count
    bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    values[draw(st.integers(0, count - 1))] = bad
    return tensor_message(dtype, shape, struct.pack(f"<{count}{code}", *values))


@st.composite
def broken_part_streams(
    draw,
    frame_type: type[Message],
    header: Callable[[int], Message],
    field: str,
    shape: Sequence[int],
    dtype: str = "float32",
    flaws: Sequence[str] = PART_FLAWS,
) -> tuple[str, list[Message]]:
    """Frames of one stream whose split tensor cannot be reassembled.

    Args:
        frame_type: the stream's frame message (LearnRequest, ActivityFrame, ...).
        header: makes the whole frame whose ``field`` is a placeholder announcing
            the given number of parts.
        field: the placeholder's path in the frame (``TensorPart.field``).
        shape, dtype: the split tensor's layout.

    Returns:
        (flaw, frames).
    """
    flaw = draw(st.sampled_from(list(flaws)))
    parts = draw(st.integers(2, 4))
    total = nbytes(dtype, shape)
    chunk = math.ceil(total / parts)
    slices = [bytes(total)[i * chunk : (i + 1) * chunk] for i in range(parts)]

    def part(index: int, **fields) -> Message:
        values = dict(
            field=field,
            part=index,
            parts=parts,
            total_bytes=total,
            dtype=dtype,
            shape=list(shape),
            data=slices[index] if index < parts else b"\0",
        )
        values.update(fields)
        frame = frame_type()
        frame.part.CopyFrom(pb.TensorPart(**values))
        return frame

    good = [header(parts)] + [part(i) for i in range(parts)]
    cut = draw(st.integers(1, parts))  # a position among the parts
    if flaw == "orphan_part":
        return flaw, good[1:]
    if flaw == "wrong_field":
        return flaw, good[:cut] + [part(cut - 1, field=field + "x")]
    if flaw == "out_of_order":
        order = list(range(parts))
        order[0], order[-1] = order[-1], order[0]
        return flaw, [good[0]] + [part(i) for i in order]
    if flaw == "repeated_part":
        return flaw, good[: cut + 1] + [part(cut - 1)] + good[cut + 1 :]
    if flaw == "dtype_mismatch":
        other = "float64" if dtype != "float64" else "float32"
        return flaw, good[:cut] + [part(cut - 1, dtype=other)]
    if flaw == "shape_mismatch":
        return flaw, good[:cut] + [part(cut - 1, shape=[*shape, 1][::-1])]
    if flaw == "total_mismatch":
        return flaw, good[:cut] + [part(cut - 1, total_bytes=total + 1)]
    if flaw == "overrun":
        return flaw, good[:-1] + [part(parts - 1, data=slices[-1] + b"\0")]
    if flaw == "truncated":
        return flaw, good[:cut]
    if flaw == "header_mid_parts":
        return flaw, good[:cut] + [header(parts)]
    if flaw == "crowded_continuation":
        others = [
            f
            for f in frame_type.DESCRIPTOR.fields
            if f.name != "part" and f.containing_oneof is None
        ]
        if not others:  # part sits in a oneof: a continuation cannot be crowded
            return "truncated", good[:cut]
        crowded = part(cut - 1)
        _set_any(crowded, others[0])
        return flaw, good[:cut] + [crowded] + good[cut + 1 :]
    raise ValueError(f"flaw={flaw!r}: expected one of {PART_FLAWS}")


def _set_any(message: Message, field: FieldDescriptor) -> None:
    """Give ``field`` of ``message`` some non-default value."""
    container = getattr(message, field.name)
    if field.message_type is not None:
        if field.is_repeated:
            container.add()
        else:
            container.SetInParent()
        return
    if field.type == FieldDescriptor.TYPE_STRING:
        value = "x"
    elif field.type == FieldDescriptor.TYPE_BYTES:
        value = b"x"
    elif field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        value = True
    else:
        value = 1
    if field.is_repeated:
        container.append(value)
    else:
        setattr(message, field.name, value)


_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


def random_messages(
    message_type: type[Message],
    *,
    max_depth: int = 2,
    strings: st.SearchStrategy[str] | None = None,
    max_repeated: int = 2,
) -> st.SearchStrategy[Message]:
    """Messages of ``message_type`` with random values in random fields.

    Args:
        message_type: any generated protobuf class.
        max_depth: nesting below which message fields stay unset.
        strings: strategy for string fields (default: short text).
        max_repeated: most entries of a repeated field.
    """
    strings = strings if strings is not None else st.text(max_size=8)

    def scalar(field: FieldDescriptor) -> st.SearchStrategy:
        if field.cpp_type in _INT_RANGES:
            low, high = _INT_RANGES[field.cpp_type]
            return st.integers(low, high) | st.integers(-3, 3)
        if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
            values = [v.number for v in field.enum_type.values]
            return st.sampled_from(values) | st.integers(-5, 5)
        if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
            return st.booleans()
        if field.cpp_type in (
            FieldDescriptor.CPPTYPE_FLOAT,
            FieldDescriptor.CPPTYPE_DOUBLE,
        ):
            return st.floats(width=32 if field.cpp_type == field.CPPTYPE_FLOAT else 64)
        if field.type == FieldDescriptor.TYPE_BYTES:
            return st.binary(max_size=32)
        return strings

    @st.composite
    def build(draw, descriptor, depth: int) -> Message:
        message = message_type_of(descriptor)()
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            if field.message_type is not None:
                if field.message_type.GetOptions().map_entry:
                    key, value = field.message_type.fields
                    entries = draw(
                        st.dictionaries(
                            scalar(key), scalar(value), max_size=max_repeated
                        )
                    )
                    getattr(message, field.name).update(entries)
                    continue
                if depth >= max_depth:
                    continue
                count = draw(st.integers(0, max_repeated)) if field.is_repeated else 1
                for _ in range(count):
                    child = draw(build(field.message_type, depth + 1))
                    if field.is_repeated:
                        getattr(message, field.name).add().CopyFrom(child)
                    else:
                        getattr(message, field.name).CopyFrom(child)
                continue
            if field.is_repeated:
                values = draw(st.lists(scalar(field), max_size=max_repeated))
                getattr(message, field.name).extend(values)
            else:
                setattr(message, field.name, draw(scalar(field)))
        return message

    return build(message_type.DESCRIPTOR, 0)


def message_type_of(descriptor) -> type[Message]:
    """The generated class of a message descriptor."""
    return message_factory.GetMessageClass(descriptor)


def raw_method(
    channel: grpc.Channel,
    service: str,
    method: str,
    client_streaming: bool,
    server_streaming: bool = False,
) -> Callable:
    """A callable sending raw bytes to ``/ccdni.v1.<service>/<method>``.

    The request is not serialised (bytes go as they are) and the reply is kept
    as bytes, so the server's own parsing is what gets fuzzed. For a method
    that streams its replies the callable reads them all (a list), so that the
    call's status is known when it returns.
    """
    path = f"/{pb.DESCRIPTOR.package}.{service}/{method}"
    if server_streaming:
        calls = (channel.stream_stream if client_streaming else channel.unary_stream)(
            path
        )
        return lambda request, timeout=None: list(calls(request, timeout=timeout))
    if client_streaming:
        return channel.stream_unary(path)
    return channel.unary_unary(path)
