"""Tests of the tensor codec: bit-exact round trips, validation, parts and frames.

Round trips compare raw bytes, so NaN payloads, signed zeros and subnormals must
survive unchanged. The loopback tests run a real gRPC server on 127.0.0.1:0 with
the message limits set on both ends.
"""

from __future__ import annotations

import struct
import warnings
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import ccdni_pb2 as pb
from protos import ccdni_pb2_grpc as pb_grpc
from protos import codec
from protos.bench import SinkCortex, start_server
from protos.codec import (
    MAX_MESSAGE_BYTES,
    SUPPORTED_DTYPES,
    CodecError,
    FrameAssembler,
    TensorAssembler,
    all_finite,
    assemble_frames,
    check_finite,
    decode,
    decode_frames,
    encode,
    grpc_options,
    split_frames,
    split_tensor,
)

MIB = 1024 * 1024
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (2, 3, 4, 5)]


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's memory, byte for byte (host order)."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return flat.numpy().tobytes()


def random_tensor(shape, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bits of ``dtype``: floats include NaN payloads, infinities, -0.0."""
    generator = torch.Generator().manual_seed(seed)
    count = int(np.prod(shape, dtype=np.int64))
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    bits = torch.randint(0, 256, (count * dtype.itemsize,), generator=generator)
    return bits.to(torch.uint8).view(dtype).reshape(shape)


def assert_identical(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert raw_bytes(got) == raw_bytes(want)


def wire(message):
    """Serialize and parse, as a gRPC hop would."""
    return type(message).FromString(message.SerializeToString())


# --- encode / decode ------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", list(SUPPORTED_DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_is_bit_identical(dtype_name, shape):
    tensor = random_tensor(shape, SUPPORTED_DTYPES[dtype_name])

    message = wire(encode(tensor))

    assert message.dtype == dtype_name
    assert list(message.shape) == list(shape)
    assert_identical(decode(message), tensor)


def test_floats_keep_nan_payloads_signed_zero_and_subnormals():
    bits = [0x7FC00001, 0xFFA12345, 0x80000000, 0x00000001, 0x7F800000, 0xFF800000]
    tensor = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)

    got = decode(wire(encode(tensor)))

    assert got.view(torch.int32).tolist() == tensor.view(torch.int32).tolist()


def test_wire_bytes_are_little_endian():
    assert encode(torch.tensor([1.0, -2.0])).data == struct.pack("<2f", 1.0, -2.0)
    assert encode(torch.tensor([1.0], dtype=torch.bfloat16)).data == b"\x80\x3f"
    assert encode(torch.tensor([1.0], dtype=torch.float16)).data == b"\x00\x3c"
    assert encode(torch.tensor([258, -1])).data == struct.pack("<2q", 258, -1)
    assert encode(torch.tensor([True, False])).data == b"\x01\x00"


def test_big_endian_host_swaps_bytes_both_ways(monkeypatch):
    tensor = random_tensor((3, 4), torch.float32)
    bf16 = random_tensor((5,), torch.bfloat16)
    monkeypatch.setattr(codec, "_HOST_IS_LITTLE_ENDIAN", False)

    message = encode(tensor)
    parts = list(split_tensor(bf16, 3))
    assembler = TensorAssembler()
    for part in parts:
        assembler.add(part)

    swapped = tensor.numpy().byteswap().tobytes()
    assert message.data == swapped
    assert_identical(decode(message), tensor)
    assert_identical(assembler.tensor(), bf16)


def test_encode_accepts_views_and_grad_tensors():
    base = random_tensor((4, 6), torch.float32)
    leaf = base.clone().requires_grad_(True)
    for tensor in (base.t(), base[:, ::2], base[:1].expand(3, 6), leaf):
        assert_identical(decode(encode(tensor)), tensor.detach().contiguous())


def test_encode_fills_given_message():
    frame = pb.ActivityFrame()
    encode(torch.ones(2, 3), out=frame.activity.outputs)
    encode(torch.zeros(2), out=frame.activity.state.add())
    encode(torch.arange(3), out=frame.activity.outputs)  # overwrites, no leftovers

    assert list(frame.activity.outputs.shape) == [3]
    assert frame.activity.outputs.dtype == "int64"
    assert torch.equal(decode(frame.activity.state[0]), torch.zeros(2))


def test_decoded_tensor_is_writable_and_owns_its_memory():
    message = encode(torch.arange(6, dtype=torch.float32))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = decode(message)
    tensor += 1

    assert torch.equal(decode(message), torch.arange(6, dtype=torch.float32))


def test_64_mib_round_trip():
    tensor = random_tensor((16, 1024, 1024), torch.float32, seed=3)

    got = decode(wire(encode(tensor)))

    assert torch.equal(got.view(torch.int32), tensor.view(torch.int32))


# --- validation -----------------------------------------------------------------


def test_unknown_dtype_names_field_and_lists_supported():
    message = pb.Tensor(dtype="float8", shape=[2], data=b"xx")

    with pytest.raises(CodecError) as err:
        decode(message, field="activity.outputs")

    text = str(err.value)
    assert "activity.outputs.dtype" in text and "'float8'" in text
    assert all(name in text for name in SUPPORTED_DTYPES)


def test_byte_count_mismatch_quotes_both_numbers():
    message = pb.Tensor(dtype="float32", shape=[2, 3], data=b"\x00" * 10)

    with pytest.raises(CodecError, match=r"activity\.state\[1\]\.data.*10.*24"):
        decode(message, field="activity.state[1]")


def test_negative_dimension_is_rejected():
    message = pb.Tensor(dtype="float32", shape=[2, -3], data=b"")

    with pytest.raises(CodecError, match=r"feedback\.tensors\[0\]\.shape.*-3.*axis 1"):
        decode(message, field="feedback.tensors[0]")


def test_placeholder_cannot_be_decoded():
    message = pb.Tensor(dtype="float32", shape=[4], parts=2)

    with pytest.raises(CodecError, match="activity.outputs.*2 parts.*FrameAssembler"):
        decode(message, field="activity.outputs")


def test_unsupported_tensors_are_refused_on_encode():
    with pytest.raises(CodecError, match="complex64.*expected one of"):
        encode(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(CodecError, match="layout"):
        encode(torch.eye(2).to_sparse())
    with pytest.raises(CodecError, match="list"):
        encode([1.0, 2.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_names_field(dtype, bad):
    tensor = torch.tensor([0.0, 1.0, bad, 2.0], dtype=dtype)

    with pytest.raises(CodecError, match=r"feedback\.tensors\[0\]: 1 of 4.*index 2"):
        check_finite(tensor, "feedback.tensors[0]")


def test_check_finite_passes_finite_and_integer_tensors():
    check_finite(torch.randn(3, 3), "x")
    check_finite(torch.tensor([2**62]), "x")
    check_finite(torch.tensor([True]), "x")


def test_check_finite_passes_finite_values_whose_sum_overflows():
    huge = torch.full((64, 64), 60000.0, dtype=torch.float16)  # sums past 65504
    assert not torch.isfinite(huge.sum())
    check_finite(huge, "x")
    check_finite(torch.tensor([3e38, 3e38, -1.0]), "x")


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.floats(width=32, allow_nan=True, allow_infinity=True),
            st.sampled_from([3.4e38, -3.4e38, float("inf"), float("-inf")]),
        ),
        max_size=40,
    ),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_all_finite_agrees_with_an_elementwise_test(values, dtype):
    tensor = torch.tensor(values, dtype=torch.float32).to(dtype)
    assert all_finite(tensor) == bool(torch.isfinite(tensor).all())


def test_grpc_options_set_both_limits():
    assert dict(grpc_options(1234)) == {
        "grpc.max_send_message_length": 1234,
        "grpc.max_receive_message_length": 1234,
    }
    assert dict(grpc_options())["grpc.max_send_message_length"] == MAX_MESSAGE_BYTES
    for bad in (0, -1, 2**31, 1.5):
        with pytest.raises(ValueError, match="max_bytes"):
            grpc_options(bad)


# --- split_tensor / TensorAssembler ---------------------------------------------


@pytest.mark.parametrize("max_bytes", [1, 7, 24, 96, 10_000])
def test_split_tensor_round_trip(max_bytes):
    tensor = random_tensor((4, 6), torch.float32)

    parts = [wire(part) for part in split_tensor(tensor, max_bytes, field="x")]
    assembler = TensorAssembler("x")
    done = [assembler.add(part) for part in parts]

    assert len(parts) == -(-96 // max_bytes)
    assert all(len(part.data) <= max_bytes for part in parts)
    assert done == [False] * (len(parts) - 1) + [True]
    assert_identical(assembler.tensor(), tensor)
    assert_identical(decode(assembler.message()), tensor)


def test_split_empty_tensor_is_one_empty_part():
    tensor = torch.zeros(3, 0)

    parts = list(split_tensor(tensor, 8))
    assembler = TensorAssembler()
    assembler.add(parts[0])

    assert len(parts) == 1 and parts[0].data == b""
    assert_identical(assembler.tensor(), tensor)


def _parts(count: int = 4):
    return list(split_tensor(random_tensor((count, 2), torch.int32), 8, field="x"))


def test_assembler_rejects_out_of_order_parts():
    parts = _parts()
    assembler = TensorAssembler("x")
    assembler.add(parts[0])

    with pytest.raises(CodecError, match=r"x\.part: got index 2; expected 1 of 4"):
        assembler.add(parts[2])


def test_assembler_rejects_first_part_not_zero():
    with pytest.raises(CodecError, match="first part has index 1; expected 0"):
        TensorAssembler("x").add(_parts()[1])


def test_assembler_reports_missing_parts():
    parts = _parts()
    assembler = TensorAssembler("x")
    assembler.add(parts[0])
    assembler.add(parts[1])

    with pytest.raises(CodecError, match=r"got parts 0\.\.1 of 4; parts 2\.\.3"):
        assembler.tensor()
    with pytest.raises(CodecError, match="no parts arrived"):
        TensorAssembler("x").tensor()


def test_assembler_rejects_part_after_completion():
    parts = _parts(1)
    assembler = TensorAssembler("x")
    assembler.add(parts[0])

    with pytest.raises(CodecError, match="after all 1 parts"):
        assembler.add(parts[0])


@pytest.mark.parametrize(
    ("name", "value"),
    [("dtype", "uint8"), ("shape", [8, 1]), ("total_bytes", 40), ("field", "y")],
)
def test_assembler_rejects_inconsistent_part(name, value):
    parts = _parts()
    assembler = TensorAssembler("x")
    assembler.add(parts[0])
    bad = parts[1]
    if name == "shape":
        del bad.shape[:]
        bad.shape.extend(value)
    else:
        setattr(bad, name, value)

    with pytest.raises(CodecError, match=rf"x\.{name}: part 1 has .*as in part 0"):
        assembler.add(bad)


def test_assembler_checks_byte_totals():
    parts = _parts()
    wrong_total = pb.TensorPart()
    wrong_total.CopyFrom(parts[0])
    wrong_total.total_bytes = 31
    with pytest.raises(CodecError, match="total_bytes: is 31.*needs 32"):
        TensorAssembler("x").add(wrong_total)

    assembler = TensorAssembler("x")
    assembler.add(parts[0])
    long_part = parts[1]
    long_part.data += b"\x00" * 20
    with pytest.raises(CodecError, match="hold 36 bytes, more than total_bytes=32"):
        assembler.add(long_part)

    parts = _parts()
    assembler = TensorAssembler("x")
    for part in parts[:3]:
        assembler.add(part)
    short_part = parts[3]
    short_part.data = b"\x00"
    with pytest.raises(CodecError, match="all 4 parts hold 25 bytes"):
        assembler.add(short_part)


def test_split_rejects_bad_sizes():
    with pytest.raises(ValueError, match="max_bytes=0"):
        split_tensor(torch.zeros(2), 0)  # raises eagerly, not at the first part
    with pytest.raises(ValueError, match="must exceed 131072"):
        split_frames(pb.ActivityFrame(), max_bytes=1000)


# --- split_frames / FrameAssembler ------------------------------------------------


def _activity(outputs_shape=(4, 8, 1000), seed=0) -> pb.ActivityFrame:
    frame = pb.ActivityFrame()
    frame.activity.key.run = "test"
    frame.activity.key.window = 3
    encode(
        random_tensor(outputs_shape, torch.float32, seed), out=frame.activity.outputs
    )
    for index in range(2):
        state = random_tensor((1, 4, 8), torch.bfloat16, seed + index)
        encode(state, out=frame.activity.state.add())
    return frame


LIMIT = 160 * 1024  # small message limit so that splitting costs little


def test_frame_that_fits_passes_unchanged():
    frame = _activity()

    assert [f is frame for f in split_frames(frame)] == [True]


def test_split_frames_round_trip_preencoded():
    frame = _activity((4, 8, 5000))  # 640 KB of outputs
    before = frame.SerializeToString()

    frames = [wire(f) for f in split_frames(frame, max_bytes=LIMIT, part_bytes=MIB)]
    sizes = [f.ByteSize() for f in frames]
    announced = frames[0].activity.outputs.parts
    whole = list(assemble_frames(frames))

    assert frame.SerializeToString() == before  # the input is not modified
    assert max(sizes) <= LIMIT
    assert announced == len(frames) - 1 == 7  # 640 KB in parts of LIMIT - 64 KiB
    assert [f.part.part for f in frames[1:]] == list(range(announced))
    assert whole == [frame]


def test_split_frames_encodes_given_tensors():
    outputs = random_tensor((4, 8, 5000), torch.float16)
    h = random_tensor((1, 4, 8), torch.float32, seed=1)
    c = random_tensor((1, 4, 8), torch.float32, seed=2)
    header = pb.ActivityFrame()
    header.activity.key.batch = 9
    tensors = {
        "activity.outputs": outputs,
        "activity.state[0]": h,
        "activity.state[1]": c,
    }

    frames = list(split_frames(header, tensors, max_bytes=LIMIT, part_bytes=50_000))
    sizes = [f.ByteSize() for f in frames]
    (whole,) = assemble_frames(wire(f) for f in frames)

    assert not header.activity.state  # the input is not modified
    assert max(sizes) <= LIMIT
    assert whole.activity.key.batch == 9
    assert_identical(decode(whole.activity.outputs), outputs)
    assert_identical(decode(whole.activity.state[0]), h)
    assert_identical(decode(whole.activity.state[1]), c)


def test_split_frames_with_tensors_that_fit_is_one_frame():
    header = pb.FeedbackFrame()
    header.feedback.kind = pb.Feedback.OBSERVED
    grad = random_tensor((2, 3), torch.float32)

    frames = list(split_frames(header, {"feedback.tensors[0]": grad}))

    assert len(frames) == 1
    assert frames[0].feedback.kind == pb.Feedback.OBSERVED
    assert_identical(decode(frames[0].feedback.tensors[0]), grad)


def test_split_frames_splits_several_tensors_in_field_order():
    frame = pb.LearnRequest(zone="chunk0.output")
    encode(random_tensor((100_000,), torch.uint8, 1), out=frame.observed)
    encode(random_tensor((100_000,), torch.uint8, 2), out=frame.activity)

    frames = list(split_frames(frame, max_bytes=LIMIT, part_bytes=40_000))
    fields = [f.part.field for f in frames[1:]]
    (whole,) = assemble_frames(frames)

    assert fields == ["observed"] * 3 + ["activity"] * 3
    assert whole == frame


def test_decode_frames_decodes_inline_and_split_tensors():
    first = _activity((4, 8, 5000), seed=1)  # split
    second = _activity((2, 2, 2), seed=2)  # inline
    stream = [
        *split_frames(first, max_bytes=LIMIT),
        *split_frames(second, max_bytes=LIMIT),
    ]

    results = list(decode_frames(wire(f) for f in stream))

    assert len(results) == 2
    for (frame, tensors), sent in zip(results, (first, second), strict=True):
        assert list(tensors) == [
            "activity.outputs",
            "activity.state[0]",
            "activity.state[1]",
        ]
        assert frame.activity.key == sent.activity.key
        for path, index in (("activity.state[0]", 0), ("activity.state[1]", 1)):
            assert_identical(tensors[path], decode(sent.activity.state[index]))
        assert_identical(tensors["activity.outputs"], decode(sent.activity.outputs))
    assert results[0][0].activity.outputs.parts == 7  # left as a placeholder


def test_decode_frames_names_the_bad_path():
    frame = _activity()
    frame.activity.state[1].data = b"\x00"

    with pytest.raises(CodecError, match=r"activity\.state\[1\]\.data: holds 1"):
        list(decode_frames([frame]))


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("activity.nope", "has no message field 'nope'"),
        ("activity.state", r"expected state\[0\]"),
        ("activity.state[1]", r"holds 0 entries; expected state\[0\] next"),
        ("activity.outputs[0]", "not repeated"),
        ("activity.key", "of type ActivityKey; expected a Tensor"),
    ],
)
def test_split_frames_rejects_bad_paths(path, message):
    with pytest.raises(ValueError, match=message):
        split_frames(pb.ActivityFrame(), {path: torch.zeros(1)})  # raises eagerly


def test_frame_assembler_rejects_part_without_placeholder():
    frames = list(split_frames(_activity((4, 8, 5000)), max_bytes=LIMIT))

    with pytest.raises(CodecError, match="no placeholder waiting"):
        FrameAssembler("activity").feed(frames[1])


def test_frame_assembler_rejects_new_frame_before_parts():
    frames = list(split_frames(_activity((4, 8, 5000)), max_bytes=LIMIT))
    assembler = FrameAssembler("activity")
    assembler.feed(frames[0])
    assembler.feed(frames[1])

    with pytest.raises(CodecError, match="activity.outputs still waits for parts"):
        assembler.feed(frames[0])


def test_frame_assembler_detects_truncated_stream():
    frames = list(split_frames(_activity((4, 8, 5000)), max_bytes=LIMIT))

    with pytest.raises(
        CodecError, match=r"ended while activity\.outputs.*\(1 of 7 missing\)"
    ):
        list(assemble_frames(frames[:-1], stream="activity"))


def test_frame_assembler_rejects_wrong_part_field_and_dtype():
    frames = list(split_frames(_activity((4, 8, 5000)), max_bytes=LIMIT))
    frames[1].part.field = "activity.context"
    with pytest.raises(CodecError, match="is 'activity.context'; expected 'activity"):
        list(assemble_frames(frames))

    frames = list(split_frames(_activity((4, 8, 5000)), max_bytes=LIMIT))
    for frame in frames[1:]:
        frame.part.dtype = "int32"
    with pytest.raises(CodecError, match="activity.outputs.dtype: part 0 has 'int32'"):
        list(assemble_frames(frames))


def test_frame_assembler_rejects_mixed_continuation_and_stuffed_placeholder():
    frame = pb.LearnRequest(zone="z")
    frame.observed.dtype = "uint8"
    frame.observed.shape.append(4)
    frame.observed.parts = 1
    assembler = FrameAssembler("learn")
    assembler.feed(frame)
    mixed = pb.LearnRequest(zone="z")
    mixed.part.field = "observed"
    with pytest.raises(CodecError, match=r"sets \['zone', 'part'\]; expected only"):
        assembler.feed(mixed)

    frame.observed.data = b"abcd"
    with pytest.raises(CodecError, match="observed.data: a placeholder for 1 parts"):
        FrameAssembler("learn").feed(frame)


# --- real loopback gRPC ---------------------------------------------------------


class EchoCerebellum(pb_grpc.CerebellumServicer):
    """Predicts each query's activity back, so replies carry tensors too."""

    def Predict(self, request, context):  # noqa: N802 (gRPC name)
        reply = pb.PredictReply(step=7)
        for index, query in enumerate(request.queries):
            field = f"queries[{index}].activity"
            try:
                activity = decode(query.activity, field=field)
            except CodecError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            encode(activity, out=reply.predictions.add())
            reply.available.append(query.zone != "lesioned")
        return reply


@pytest.fixture(scope="module")
def cortex():
    """A SinkCortex on 127.0.0.1:0 and a stub, both with the default limits."""
    servicer = SinkCortex(keep=True)
    server, port = start_server(servicer)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options())
    yield servicer, pb_grpc.CortexStub(channel)
    channel.close()
    server.stop(grace=None)


@pytest.fixture()
def small_cortex():
    """A SinkCortex whose server and channel both allow only LIMIT bytes."""
    servicer = SinkCortex(keep=True)
    server, port = start_server(servicer, max_bytes=LIMIT, workers=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(LIMIT))
    yield servicer, pb_grpc.CortexStub(channel)
    channel.close()
    server.stop(grace=None)


def test_loopback_activity_of_every_dtype(cortex):
    servicer, stub = cortex
    servicer.received.clear()
    sent = {}
    frames = []
    for batch, dtype in enumerate(SUPPORTED_DTYPES.values()):
        outputs = random_tensor((2, 3, 5), dtype, batch)
        state = [random_tensor((1, 2, 5), dtype, 100 + batch) for _ in range(2)]
        frame = pb.ActivityFrame()
        frame.activity.key.batch = batch
        encode(outputs, out=frame.activity.outputs)
        for tensor in state:
            encode(tensor, out=frame.activity.state.add())
        sent[batch] = [outputs, *state]
        frames.append(frame)

    ack = stub.PushActivity(iter(frames))

    assert ack.accepted == len(SUPPORTED_DTYPES)
    for key, tensors in servicer.received:
        outputs, h, c = sent[key.batch]
        assert_identical(tensors["activity.outputs"], outputs)
        assert_identical(tensors["activity.state[0]"], h)
        assert_identical(tensors["activity.state[1]"], c)


def test_loopback_64_mib_tensor_in_parts(cortex):
    servicer, stub = cortex
    servicer.received.clear()
    outputs = random_tensor((16, 64, 16384), torch.float32, seed=5)  # 64 MiB
    header = pb.ActivityFrame()
    header.activity.key.window = 11

    frames = split_frames(header, {"activity.outputs": outputs})
    ack = stub.PushActivity(frames)

    assert ack.accepted == 1
    ((key, tensors),) = servicer.received
    assert key.window == 11
    got = tensors["activity.outputs"]
    assert torch.equal(got.view(torch.int32), outputs.view(torch.int32))
    servicer.received.clear()


def test_loopback_feedback(cortex):
    servicer, stub = cortex
    servicer.received.clear()
    grads = [random_tensor((1, 2, 4), torch.float32, s) for s in range(2)]
    frame = pb.FeedbackFrame()
    frame.feedback.kind = pb.Feedback.OBSERVED
    frame.feedback.target = pb.Feedback.STATE
    for grad in grads:
        encode(grad, out=frame.feedback.tensors.add())

    ack = stub.PushFeedback(iter([frame]))

    assert ack.accepted == 1
    ((_, tensors),) = servicer.received
    assert_identical(tensors["feedback.tensors[0]"], grads[0])
    assert_identical(tensors["feedback.tensors[1]"], grads[1])


def test_loopback_rejects_malformed_with_field_name(cortex):
    _, stub = cortex
    frame = pb.ActivityFrame()
    frame.activity.outputs.dtype = "float32"
    frame.activity.outputs.shape.extend([2, 2])
    frame.activity.outputs.data = b"\x00" * 12

    with pytest.raises(grpc.RpcError) as err:
        stub.PushActivity(iter([frame]))

    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "activity.outputs.data: holds 12 bytes" in err.value.details()


def test_loopback_limit_enforced_and_parts_get_through(small_cortex):
    servicer, stub = small_cortex
    frame = _activity((4, 8, 5000))  # 640 KB, four times the limit

    with pytest.raises(grpc.RpcError) as err:
        stub.PushActivity(iter([frame]))
    ack = stub.PushActivity(split_frames(frame, max_bytes=LIMIT, part_bytes=64 * 1024))

    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ack.accepted == 1
    ((_, tensors),) = servicer.received
    assert_identical(tensors["activity.outputs"], decode(frame.activity.outputs))


def test_loopback_predict_reply_carries_tensors():
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), options=grpc_options()
    )
    pb_grpc.add_CerebellumServicer_to_server(EchoCerebellum(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options())
    # 8 MiB each way: above gRPC's default 4 MiB receive limit, so this passes
    # only if both ends applied grpc_options.
    activity = random_tensor((4, 512, 1024), torch.float32, 9)
    try:
        request = pb.PredictRequest()
        for zone, tensor in (("chunk0.output", activity), ("lesioned", activity[:1])):
            query = request.queries.add(zone=zone)
            encode(tensor, out=query.activity)

        reply = pb_grpc.CerebellumStub(channel).Predict(request)
    finally:
        channel.close()
        server.stop(grace=None)

    assert list(reply.available) == [True, False]
    assert reply.step == 7
    assert_identical(decode(reply.predictions[0]), activity)
    assert_identical(decode(reply.predictions[1]), activity[:1])


# --- properties -------------------------------------------------------------------


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype_name=st.sampled_from(sorted(SUPPORTED_DTYPES)),
    shape=st.lists(st.integers(0, 6), max_size=4).map(tuple),
    seed=st.integers(0, 2**31 - 1),
    max_bytes=st.integers(1, 64),
)
def test_property_round_trips(dtype_name, shape, seed, max_bytes):
    tensor = random_tensor(shape, SUPPORTED_DTYPES[dtype_name], seed)

    assembler = TensorAssembler()
    for part in split_tensor(tensor, max_bytes):
        assembler.add(wire(part))

    assert_identical(decode(wire(encode(tensor))), tensor)
    assert_identical(assembler.tensor(), tensor)
