"""Fuzzing every method of the cortex service on one server.

Malformed or random messages go to PushActivity, PushFeedback, StreamActivity,
StreamFeedback, Configure, Stats, Checkpoint and Restore (several hundred in
all). None may crash the server or
escape as UNKNOWN; every malformed one gets a specific non-OK status and leaves
the mailboxes as they were; at the end a correct activity still goes through and
comes out of the mailbox bit-identical.
"""

from __future__ import annotations

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cerebellum_service.learning import ActivityKey
from cortex_service.runtime import Mailbox
from cortex_service.servicer import CortexServicer, add_to_server, key_to_proto
from protos import ccdni_pb2 as pb
from protos import ccdni_pb2_grpc as pb_grpc
from protos.codec import encode
from protos.service import (
    ClientSecurity,
    ServerSecurity,
    open_channel,
    start_server,
    wait_ready,
)
from tests.fuzzing import (
    TENSOR_FLAWS,
    broken_part_streams,
    malformed_tensors,
    random_messages,
    raw_method,
)

TOKEN = "cortex-fuzz-token-0123456789"
LIMIT = 1 << 20
INPUT, HIDDEN, ROWS, STEPS = 6, 5, 2, 3
Code = grpc.StatusCode
# Other batch sizes and window lengths are valid; a wrong width is tested apart.
FLAWS = [f for f in TENSOR_FLAWS if f != "wrong_shape"]
REFUSALS = {
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED,
}


def fuzz_settings(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
        ],
    )


@pytest.fixture(scope="module")
def fuzzed():
    servicer = CortexServicer(
        1,
        INPUT,
        HIDDEN,
        Mailbox(4, "activity_in"),
        Mailbox(4, "feedback_in"),
        put_timeout=1.0,
    )
    server = start_server(
        lambda s: add_to_server(servicer, s),
        security=ServerSecurity(token=TOKEN),
        service_names=["ccdni.v1.Cortex"],
        max_message_bytes=LIMIT,
    )
    channel = open_channel(server.address, ClientSecurity(token=TOKEN), LIMIT)
    wait_ready(channel, timeout=60)
    stub = pb_grpc.CortexStub(channel)
    stub.channel = channel
    yield servicer, stub
    channel.close()
    server.stop(grace=1)


def outcome(fn, request):
    try:
        return Code.OK, fn(request, timeout=10)
    except grpc.RpcError as error:
        return error.code(), error


def activity_frame(tensor: pb.Tensor, window: int = 0) -> pb.ActivityFrame:
    frame = pb.ActivityFrame()
    key_to_proto(ActivityKey(0, window, 0), frame.activity.key)
    frame.activity.outputs.CopyFrom(tensor)
    return frame


def feedback_frame(tensor: pb.Tensor, window: int = 0) -> pb.FeedbackFrame:
    frame = pb.FeedbackFrame()
    key_to_proto(ActivityKey(0, window, 1), frame.feedback.key)
    frame.feedback.kind = pb.Feedback.OBSERVED
    frame.feedback.target = pb.Feedback.OUTPUT
    frame.feedback.tensors.add().CopyFrom(tensor)
    return frame


def depths(servicer) -> tuple[int, int]:
    return len(servicer.activity_in), len(servicer.feedback_in)


@fuzz_settings(150)
@given(bad=malformed_tensors([ROWS, STEPS, INPUT], flaws=FLAWS))
def test_push_activity_malformed_tensor(fuzzed, bad):
    servicer, stub = fuzzed
    flaw, tensor = bad
    before = depths(servicer)
    code, error = outcome(stub.PushActivity, iter([activity_frame(tensor)]))
    assert code == Code.INVALID_ARGUMENT, (flaw, code)
    assert "activity" in error.details()
    assert depths(servicer) == before


@fuzz_settings(100)
@given(bad=malformed_tensors([ROWS, STEPS, HIDDEN], flaws=FLAWS))
def test_push_feedback_malformed_tensor(fuzzed, bad):
    servicer, stub = fuzzed
    flaw, tensor = bad
    before = depths(servicer)
    code, error = outcome(stub.PushFeedback, iter([feedback_frame(tensor)]))
    assert code == Code.INVALID_ARGUMENT, (flaw, code)
    assert "feedback" in error.details()
    assert depths(servicer) == before


@fuzz_settings(60)
@given(
    bad=st.one_of(
        malformed_tensors([ROWS, STEPS, INPUT], flaws=FLAWS).map(
            lambda b: ("activity", *b)
        ),
        malformed_tensors([ROWS, STEPS, HIDDEN], flaws=FLAWS).map(
            lambda b: ("feedback", *b)
        ),
    )
)
def test_long_lived_streams_malformed_tensor(fuzzed, bad):
    servicer, stub = fuzzed
    stream, flaw, tensor = bad
    before = depths(servicer)
    if stream == "feedback":
        method, frame = stub.StreamFeedback, feedback_frame(tensor)
    else:
        method, frame = stub.StreamActivity, activity_frame(tensor)
    code, error = outcome(
        lambda r, timeout: list(method(r, timeout=timeout)), iter([frame])
    )
    assert code == Code.INVALID_ARGUMENT, (flaw, code)
    assert stream in error.details()
    assert depths(servicer) == before


@fuzz_settings(40)
@given(width=st.integers(1, 64).filter(lambda w: w != INPUT), rows=st.integers(1, 4))
def test_push_activity_wrong_width(fuzzed, width, rows):
    servicer, stub = fuzzed
    before = depths(servicer)
    tensor = encode(torch.zeros(rows, STEPS, width))
    code, error = outcome(stub.PushActivity, iter([activity_frame(tensor)]))
    assert code == Code.INVALID_ARGUMENT
    assert f"(batch, steps, {INPUT})" in error.details()
    assert depths(servicer) == before


def activity_header(parts: int) -> pb.ActivityFrame:
    return activity_frame(
        pb.Tensor(dtype="float32", shape=[ROWS, STEPS, INPUT], parts=parts)
    )


@fuzz_settings(60)
@given(
    bad=broken_part_streams(
        pb.ActivityFrame, activity_header, "activity.outputs", [ROWS, STEPS, INPUT]
    )
)
def test_push_activity_broken_part_streams(fuzzed, bad):
    servicer, stub = fuzzed
    flaw, frames = bad
    before = depths(servicer)
    code, _ = outcome(stub.PushActivity, iter(frames))
    assert code == Code.INVALID_ARGUMENT, (flaw, code)
    # A part repeated after the last one follows a whole, valid message: that
    # message was taken (a stream may carry many), the stray part was refused.
    grown = depths(servicer)[0] - before[0]
    assert grown == 0 or (flaw == "repeated_part" and grown == 1), (flaw, grown)
    if grown:
        servicer.activity_in.reset()
        servicer.reset()


@fuzz_settings(80)
@given(frames=st.lists(random_messages(pb.ActivityFrame), min_size=1, max_size=3))
def test_push_activity_random_frames(fuzzed, frames):
    servicer, stub = fuzzed
    before = depths(servicer)
    code, _ = outcome(stub.PushActivity, iter(frames))
    # A random frame is never a valid activity of this chunk's width.
    assert code in REFUSALS, code
    assert depths(servicer) == before


@fuzz_settings(60)
@given(frames=st.lists(random_messages(pb.FeedbackFrame), min_size=1, max_size=3))
def test_push_feedback_random_frames(fuzzed, frames):
    servicer, stub = fuzzed
    before = depths(servicer)
    code, _ = outcome(stub.PushFeedback, iter(frames))
    assert code in REFUSALS, code
    assert depths(servicer) == before


@fuzz_settings(40)
@given(data=st.binary(min_size=1, max_size=64))
def test_push_activity_raw_bytes(fuzzed, data):
    servicer, stub = fuzzed
    send = raw_method(stub.channel, "Cortex", "PushActivity", client_streaming=True)
    code, _ = outcome(send, iter([data]))
    assert code in REFUSALS | {Code.OK}, code


@fuzz_settings(60)
@given(
    configure=random_messages(pb.ConfigureRequest),
    stats=random_messages(pb.StatsRequest),
    checkpoint=random_messages(pb.CheckpointRequest),
    restore=random_messages(pb.RestoreRequest),
)
def test_control_methods_random_messages(fuzzed, configure, stats, checkpoint, restore):
    _, stub = fuzzed
    code, _ = outcome(stub.Configure, configure)
    assert code == Code.OK or code in REFUSALS
    code, reply = outcome(stub.Stats, stats)
    assert code == Code.OK  # unknown names just select nothing
    # This server hosts no chunk state: checkpoints are a precondition failure.
    for method, request in ((stub.Checkpoint, checkpoint), (stub.Restore, restore)):
        code, _ = outcome(method, request)
        assert code in REFUSALS, code


def test_a_correct_activity_still_goes_through_after_the_fuzzing(fuzzed):
    servicer, stub = fuzzed
    rejected = sum(
        v for k, v in servicer.counters.snapshot().items() if k.startswith("rejected.")
    )
    assert rejected >= 400  # the fuzzing above really reached the servicer
    outputs = torch.randn(ROWS, STEPS, INPUT)
    window = 10**6  # after every key the fuzzing may have used
    reply = stub.PushActivity(
        iter([activity_frame(encode(outputs), window)]), timeout=10
    )
    assert reply.accepted == 1
    taken = servicer.activity_in.take((0, window, 0), timeout=10)
    assert torch.equal(taken, outputs)
