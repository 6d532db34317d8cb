"""The cortex service over real loopback gRPC: checks, auth, and a full exchange."""

from __future__ import annotations

import copy
import queue
import subprocess
import sys
import threading

import grpc
import pytest
import torch

from cerebellum_service.client import RemoteCerebellum
from cerebellum_service.config import CerebellumConfig
from cerebellum_service.learning import ActivityKey
from cerebellum_service.servicer import CerebellumServicer
from cerebellum_service.servicer import add_to_server as add_cerebellum
from cortex_service.runtime import Mailbox
from cortex_service.servicer import (
    CortexServicer,
    GrpcNeighbour,
    add_to_server,
    key_to_proto,
)
from orchestrator.batches import BatchStream
from orchestrator.config import TrainConfig
from orchestrator.threaded import run_threaded
from orchestrator.trainer import Trainer
from orchestrator.zones import zone_specs
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
from tests.helpers import random_task, wait_until

TOKEN = "cortex-test-token-0123456789"
LIMIT = 1 << 20
INPUT, HIDDEN = 6, 5


@pytest.fixture
def chunk_server():
    activity_in = Mailbox(4, "activity_in")
    feedback_in = Mailbox(4, "feedback_in")
    servicer = CortexServicer(1, INPUT, HIDDEN, activity_in, feedback_in, put_timeout=2)
    server = start_server(
        lambda s: add_to_server(servicer, s),
        security=ServerSecurity(token=TOKEN),
        service_names=["ccdni.v1.Cortex"],
        max_message_bytes=LIMIT,
    )
    channel = open_channel(server.address, ClientSecurity(token=TOKEN), LIMIT)
    wait_ready(channel, timeout=60)  # connect first: a loaded machine is slow
    yield servicer, server, pb_grpc.CortexStub(channel)
    channel.close()
    server.stop(grace=1)


def activity_frame(outputs=None, batch=0, window=0, chunk=0, **tensor_fields):
    frame = pb.ActivityFrame()
    key_to_proto(ActivityKey(batch, window, chunk), frame.activity.key)
    if outputs is not None:
        encode(outputs, out=frame.activity.outputs)
    for name, value in tensor_fields.items():
        setattr(frame.activity.outputs, name, value)
    return frame


def feedback_frame(grad, batch=0, window=0, chunk=1):
    frame = pb.FeedbackFrame()
    key_to_proto(ActivityKey(batch, window, chunk), frame.feedback.key)
    frame.feedback.kind = pb.Feedback.OBSERVED
    frame.feedback.target = pb.Feedback.OUTPUT
    encode(grad, out=frame.feedback.tensors.add())
    return frame


def good(batch=0, window=0):
    return activity_frame(torch.randn(2, 3, INPUT), batch=batch, window=window)


def bad_frames():
    nan = torch.randn(2, 3, INPUT)
    nan[0, 0, 0] = float("nan")
    inf = torch.randn(2, 3, INPUT)
    inf[1, 2, 3] = float("inf")
    short = activity_frame(torch.randn(2, 3, INPUT))
    short.activity.outputs.data = short.activity.outputs.data[:-4]
    yield "width", activity_frame(torch.randn(2, 3, INPUT + 1)), "activity.outputs"
    yield "nan", activity_frame(nan), "activity.outputs"
    yield "inf", activity_frame(inf), "activity.outputs"
    yield "bytes", short, "activity.outputs"
    yield "dtype", activity_frame(torch.randn(2, 3, INPUT), dtype="float128"), "dtype"
    yield "int", activity_frame(torch.ones(2, 3, INPUT, dtype=torch.int64)), "dtype"
    yield "rank", activity_frame(torch.randn(6, INPUT)), "activity.outputs"
    yield "chunk", activity_frame(torch.randn(2, 3, INPUT), chunk=3), "key.chunk"
    yield "missing", activity_frame(None), "activity.outputs"
    yield "negative", activity_frame(torch.randn(2, 3, INPUT), batch=-1), "key.batch"
    lone = pb.ActivityFrame()
    lone.part.field = "activity.outputs"
    lone.part.parts = 2
    yield "lone part", lone, "activity"


@pytest.mark.parametrize("name,frame,field", list(bad_frames()))
def test_bad_activity_is_refused_counted_and_changes_nothing(
    chunk_server, name, frame, field
):
    servicer, _, stub = chunk_server
    with pytest.raises(grpc.RpcError) as error:
        stub.PushActivity(iter([frame]), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()
    assert len(servicer.activity_in) == 0
    assert (
        sum(
            v
            for k, v in servicer.counters.snapshot().items()
            if k.startswith("rejected.")
        )
        == 1
    )

    # The server still answers a correct call correctly.
    reply = stub.PushActivity(iter([good()]), timeout=5)
    assert reply.accepted == 1
    assert servicer.activity_in.take((0, 0, 0), timeout=5).shape == (2, 3, INPUT)


def test_receiving_counts_the_handlers_cpu(chunk_server):
    servicer, _, stub = chunk_server
    before = servicer.counters.get("receive.cpu_seconds")
    frame = activity_frame(torch.randn(64, 7, INPUT), batch=7)
    assert stub.PushActivity(iter([frame]), timeout=5).accepted == 1
    assert servicer.counters.get("receive.cpu_seconds") > before


def test_out_of_order_and_duplicate_keys_are_refused(chunk_server):
    servicer, _, stub = chunk_server
    assert stub.PushActivity(iter([good(batch=1, window=2)]), timeout=5).accepted == 1
    for frame in (good(batch=1, window=2), good(batch=1, window=1), good(batch=0)):
        with pytest.raises(grpc.RpcError) as error:
            stub.PushActivity(iter([frame]), timeout=5)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "key" in error.value.details()
    assert len(servicer.activity_in) == 1
    assert stub.PushActivity(iter([good(batch=1, window=3)]), timeout=5).accepted == 1


def test_oversized_message_is_refused_and_the_server_goes_on(chunk_server):
    _, _, stub = chunk_server
    huge = activity_frame(torch.randn(64, 64, INPUT * 200))
    with pytest.raises(grpc.RpcError) as error:
        stub.PushActivity(iter([huge]), timeout=5)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.PushActivity(iter([good()]), timeout=5).accepted == 1


def test_large_activity_travels_in_parts_through_the_neighbour(chunk_server):
    servicer, server, _ = chunk_server
    neighbour = GrpcNeighbour(
        server.address, ClientSecurity(token=TOKEN), max_message_bytes=LIMIT
    )
    outputs = torch.randn(256, 200, INPUT)  # 1.2 MiB: above the 1 MiB limit
    neighbour.send_activity(ActivityKey(0, 0, 0), outputs)
    neighbour.flush()
    assert torch.equal(servicer.activity_in.take((0, 0, 0), timeout=5), outputs)
    neighbour.close()


def test_full_mailbox_answers_resource_exhausted_after_its_timeout(chunk_server):
    servicer, _, stub = chunk_server
    for window in range(4):
        stub.PushActivity(iter([good(window=window)]), timeout=5)
    with pytest.raises(grpc.RpcError) as error:
        stub.PushActivity(iter([good(window=4)]), timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(servicer.activity_in) == 4


def test_feedback_is_checked_like_activity(chunk_server):
    servicer, _, stub = chunk_server
    assert (
        stub.PushFeedback(
            iter([feedback_frame(torch.randn(2, 3, HIDDEN))]), timeout=5
        ).accepted
        == 1
    )
    for frame, field in (
        (feedback_frame(torch.randn(2, 3, HIDDEN + 2), window=1), "feedback.tensors"),
        (feedback_frame(torch.randn(2, 3, HIDDEN), window=1, chunk=0), "key.chunk"),
    ):
        with pytest.raises(grpc.RpcError) as error:
            stub.PushFeedback(iter([frame]), timeout=5)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in error.value.details()
    assert len(servicer.feedback_in) == 1


def test_a_stream_acks_each_message_once_it_is_in_the_mailbox(chunk_server):
    servicer, _, stub = chunk_server
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    acks = stub.StreamActivity(iter(outbox.get, None), timeout=10)
    for window in range(3):
        outbox.put(good(window=window))
        assert next(acks).accepted == window + 1
        # Acked means deposited: the chunk can take it at once.
        assert len(servicer.activity_in) == window + 1
    outbox.put(None)
    assert list(acks) == []
    assert acks.code() == grpc.StatusCode.OK
    assert servicer.counters.get("activity.accepted") == 3


def acks_until_refused(method, frames):
    """The ``accepted`` count of each ack a stream gave before it was refused,
    and the refusal (``pytest.raises``' info)."""
    accepted = []
    with pytest.raises(grpc.RpcError) as error:
        for ack in method(iter(frames), timeout=10):
            accepted.append(ack.accepted)
    return accepted, error


def test_a_refused_message_ends_the_stream_and_keeps_what_was_acked(chunk_server):
    servicer, _, stub = chunk_server
    nan = torch.randn(2, 3, INPUT)
    nan[1, 1, 1] = float("nan")
    frames = [good(window=0), activity_frame(nan, window=1), good(window=2)]
    accepted, error = acks_until_refused(stub.StreamActivity, frames)
    assert accepted == [1]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "activity.outputs" in error.value.details()
    assert len(servicer.activity_in) == 1
    assert servicer.counters.get("rejected.not_finite") == 1
    # The server goes on: a new stream is served.
    again = stub.StreamActivity(iter([good(window=1)]), timeout=10)
    assert [ack.accepted for ack in again] == [1]


def test_a_feedback_stream_is_checked_like_push_feedback(chunk_server):
    servicer, _, stub = chunk_server
    frames = [
        feedback_frame(torch.randn(2, 3, HIDDEN)),
        feedback_frame(torch.randn(2, 3, HIDDEN), window=1, chunk=0),
    ]
    accepted, error = acks_until_refused(stub.StreamFeedback, frames)
    assert accepted == [1]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "key.chunk" in error.value.details()
    assert len(servicer.feedback_in) == 1


def neighbour_of(server, **options) -> GrpcNeighbour:
    return GrpcNeighbour(
        server.address, ClientSecurity(token=TOKEN), max_message_bytes=LIMIT, **options
    )


def test_the_neighbour_keeps_one_stream_and_one_message_in_flight(chunk_server):
    servicer, server, _ = chunk_server  # a mailbox of 4; nobody takes from it
    timed = []
    neighbour = neighbour_of(
        server, deadline_s=0.5, timer=lambda method, s: timed.append(method)
    )
    for window in range(5):  # the fifth waits in the server for room
        neighbour.send_activity(ActivityKey(0, window, 0), torch.randn(2, 3, INPUT))
    assert neighbour.streams_opened == 1
    assert timed == ["StreamActivity"] * 4
    # A sixth waits for the fifth's ack, which cannot come in time (the
    # server's own wait for room is 2 s).
    with pytest.raises(grpc.RpcError) as error:
        neighbour.send_activity(ActivityKey(0, 5, 0), torch.randn(2, 3, INPUT))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "not acked within 0.5 s" in error.value.details()
    assert len(servicer.activity_in) == 4
    for window in range(4):
        servicer.activity_in.take((0, window, 0), timeout=5)
    # The next send opens a new stream.
    neighbour.send_activity(ActivityKey(0, 6, 0), torch.randn(2, 3, INPUT))
    neighbour.flush()
    assert neighbour.streams_opened == 2
    assert servicer.activity_in.take((0, 6, 0), timeout=5).shape == (2, 3, INPUT)
    neighbour.close()


def test_the_neighbour_raises_a_refusal_and_goes_on_on_a_new_stream(chunk_server):
    servicer, server, _ = chunk_server
    neighbour = neighbour_of(server)
    neighbour.send_activity(ActivityKey(0, 2, 0), torch.randn(2, 3, INPUT))
    neighbour.send_activity(ActivityKey(0, 1, 0), torch.randn(2, 3, INPUT))
    with pytest.raises(grpc.RpcError) as error:
        neighbour.flush()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "out of order" in error.value.details()
    neighbour.send_feedback(ActivityKey(0, 0, 1), torch.randn(2, 3, HIDDEN))
    neighbour.send_activity(ActivityKey(0, 3, 0), torch.randn(2, 3, INPUT))
    neighbour.close()
    assert neighbour.streams_opened == 3  # activity twice, feedback once
    assert servicer.activity_in.take((0, 2, 0), timeout=5) is not None
    assert servicer.activity_in.take((0, 3, 0), timeout=5) is not None
    assert servicer.feedback_in.take((0, 0, 0), timeout=5).shape == (2, 3, HIDDEN)


def test_an_abort_from_another_thread_fails_the_waiting_send_cleanly(chunk_server):
    servicer, server, _ = chunk_server  # a mailbox of 4; nobody takes from it
    neighbour = neighbour_of(server, deadline_s=60.0)
    for window in range(5):  # the fifth waits in the server for room
        neighbour.send_activity(ActivityKey(0, window, 0), torch.randn(2, 3, INPUT))
    # It has reached the server's full mailbox before the abort.
    wait_until(lambda: servicer.activity_in.stalls == 1, 30, "the fifth waiting")
    stream = neighbour._streams["StreamActivity"]
    outcome = []

    def send_sixth():
        try:
            neighbour.send_activity(ActivityKey(0, 5, 0), torch.randn(2, 3, INPUT))
        except Exception as error:  # noqa: BLE001 (the test inspects it)
            outcome.append(error)

    sender = threading.Thread(target=send_sixth)
    sender.start()
    neighbour.abort()  # as a shutting-down actor does while its run sends
    sender.join(timeout=30)
    assert not sender.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], grpc.RpcError), outcome
    assert outcome[0].code() == grpc.StatusCode.CANCELLED
    assert stream.join(timeout=10)  # its ack reader has ended
    # The server drops the fifth, whose sender gave up, instead of delivering it
    # once there is room.
    wait_until(lambda: servicer.counters.get("rejected.abandoned") == 1, 30, "the drop")
    for window in range(4):
        servicer.activity_in.take((0, window, 0), timeout=5)
    assert len(servicer.activity_in) == 0
    with pytest.raises(grpc.RpcError) as error:
        neighbour.send_activity(ActivityKey(0, 6, 0), torch.randn(2, 3, INPUT))
    assert error.value.code() == grpc.StatusCode.CANCELLED


def test_a_stream_that_ended_after_its_acks_is_replaced_without_an_error():
    def serve(port: int):
        boxes = Mailbox(4, "activity_in"), Mailbox(4, "feedback_in")
        servicer = CortexServicer(1, INPUT, HIDDEN, *boxes)
        server = start_server(
            lambda s: add_to_server(servicer, s),
            security=ServerSecurity(token=TOKEN),
            service_names=["ccdni.v1.Cortex"],
            max_message_bytes=LIMIT,
            port=port,
        )
        return servicer, server

    first, server = serve(0)
    port = int(server.address.rsplit(":", 1)[1])
    neighbour = neighbour_of(server)
    neighbour.send_activity(ActivityKey(0, 0, 0), torch.randn(2, 3, INPUT))
    neighbour.flush()
    stream = neighbour._streams["StreamActivity"]
    server.stop(grace=0)  # the neighbour restarts between two sends
    assert stream.join(timeout=10) and stream.ended
    second, server = serve(port)
    try:
        neighbour.send_activity(ActivityKey(0, 1, 0), torch.randn(2, 3, INPUT))
        neighbour.flush()
        assert neighbour.streams_opened == 2
        assert second.activity_in.take((0, 1, 0), timeout=5) is not None
        assert first.activity_in.take((0, 0, 0), timeout=5) is not None
        replacement = neighbour._streams["StreamActivity"]
        neighbour.close()
        assert replacement.join(timeout=10)  # no reader left behind
    finally:
        server.stop(0)


def test_server_metrics_time_each_message_of_a_stream_not_each_frame():
    from protos.metrics import ActorMetrics

    metrics = ActorMetrics("run", "chunk", 1)
    activity_in = Mailbox(8, "activity_in")
    servicer = CortexServicer(1, INPUT, HIDDEN, activity_in, Mailbox(8, "feedback"))
    server = start_server(
        lambda s: add_to_server(servicer, s),
        security=ServerSecurity(token=TOKEN),
        service_names=["ccdni.v1.Cortex"],
        max_message_bytes=LIMIT,
        interceptors=[metrics.server_interceptor()],
    )
    try:
        neighbour = neighbour_of(server)
        outputs = torch.randn(256, 200, INPUT)  # 1.2 MiB: two frames each
        for window in range(3):
            neighbour.send_activity(ActivityKey(0, window, 0), outputs)
        neighbour.close()
        count = metrics.registry.get_sample_value(
            "ccdni_grpc_server_seconds_count",
            {"run": "run", "role": "chunk", "chunk": "1", "method": "StreamActivity"},
        )
        assert count == 3
        assert torch.equal(activity_in.take((0, 2, 0), timeout=5), outputs)
    finally:
        server.stop(0)


@pytest.mark.parametrize("token", [None, "wrong-token-abcdefghijkl"])
def test_calls_without_the_right_token_are_unauthenticated(chunk_server, token):
    _, server, _ = chunk_server
    channel = open_channel(server.address, ClientSecurity(token=token), LIMIT)
    stub = pb_grpc.CortexStub(channel)
    calls = [
        lambda: stub.PushActivity(iter([good()]), timeout=5),
        lambda: stub.PushFeedback(
            iter([feedback_frame(torch.randn(1, 1, HIDDEN))]), timeout=5
        ),
        lambda: stub.Configure(pb.ConfigureRequest(), timeout=5),
        lambda: stub.Stats(pb.StatsRequest(), timeout=5),
        lambda: stub.Checkpoint(pb.CheckpointRequest(path="x"), timeout=5),
        lambda: stub.Restore(pb.RestoreRequest(path="x"), timeout=5),
    ]
    for make_call in calls:
        with pytest.raises(grpc.RpcError) as error:
            make_call()
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_standalone_server_prints_its_address_first():
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cortex_service",
            "--port",
            "0",
            "--input-size",
            "4",
            "--insecure-no-auth",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address = process.stdout.readline().strip()
        host, _, port = address.rpartition(":")
        assert host == "127.0.0.1" and int(port) > 0
        channel = open_channel(address)
        reply = pb_grpc.CortexStub(channel).Stats(pb.StatsRequest(), timeout=10)
        assert reply.counters["activity.accepted"] == 0
        channel.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
    refused = subprocess.run(
        [sys.executable, "-m", "cortex_service", "--port", "0", "--input-size", "4"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert refused.returncode != 0
    assert "--insecure-no-auth" in refused.stderr


def test_two_chunks_and_a_remote_cerebellum_give_in_process_gradients():
    """Chunks and cerebellum over loopback gRPC compute what one process does."""
    task = random_task(seq_len=8, n=12)
    config = TrainConfig(
        task="random",
        model="ccrnn",
        truncation=2,
        chunks=2,
        hidden_size=5,
        batch_size=12,
        granule_width=16,
    )
    trainer = Trainer(config, task)
    specs = zone_specs(config, trainer.chunks, "locked", False, 0)
    # The inferior-olive lesion keeps the zones fixed during the batch on both sides,
    # so predictions are the same whatever the server's learning thread does.
    zone_maps = [dict(name=n, **s) for n, s in specs.items()]
    remote_config = CerebellumConfig.from_dict({"zones": zone_maps, "lesion": "olive"})
    servicer = CerebellumServicer(remote_config)
    torch.manual_seed(11)
    for zone in servicer.cerebellum.zones.values():  # non-zero predictions
        torch.nn.init.normal_(zone.purkinje.weight, std=0.5)
    trainer.cerebellum.zones.load_state_dict(
        copy.deepcopy(servicer.cerebellum.zones.state_dict())
    )
    trainer.cerebellum.frozen = True
    server = start_server(
        lambda s: add_cerebellum(servicer, s),
        security=ServerSecurity(token=TOKEN),
        service_names=["ccdni.v1.Cerebellum"],
    )
    # A generous deadline: a loaded machine must not turn this into degraded mode.
    remote = RemoteCerebellum(
        server.address, ClientSecurity(token=TOKEN), deadline_s=60.0
    )
    try:
        from tests.test_schedules import capture_gradients

        batch = BatchStream(task, config.batch_size, config.seed).sequences(0)
        trainer.run_batch(batch, step=False)
        expected = [[p.grad.clone() for p in c.parameters()] for c in trainer.chunks]

        recorded = capture_gradients(
            lambda: run_threaded(
                config, task, "locked", 1, transport="grpc", cerebellum=remote
            )
        )
        got = sorted(recorded, key=lambda grads: grads[0].shape)
        want = sorted(expected, key=lambda grads: grads[0].shape)
        for a, b in zip(got, want):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        # Both chunks asked for state predictions at the 3 inner window ends.
        assert servicer.stats()["zone.state_0.predictions"] == 3
        assert servicer.stats()["zone.state_1.predictions"] == 3
    finally:
        remote.close()
        server.stop(grace=1)
