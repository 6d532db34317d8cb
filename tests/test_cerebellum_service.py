"""The cerebellum service over real loopback gRPC: answers, learning, bad input,
checkpoints and the remote predictor's degraded mode."""

from __future__ import annotations

import errno
import logging
import threading

import grpc
import msgpack
import pytest
import torch

from cerebellum_service.client import RemoteCerebellum
from cerebellum_service.learning import ActivityKey, Observation, Query
from cerebellum_service.servicer import (
    SERVICE_NAME,
    CerebellumServicer,
    add_to_server,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from protos import ccdni_pb2 as pb
from protos import checkpoint as checkpoint_module
from protos.codec import decode, encode, split_frames
from protos.service import ClientSecurity, ServerSecurity, start_server
from tests.helpers import wait_until
from tests.service_helpers import (
    LIMIT,
    ROWS,
    TOKEN,
    WIDTH,
    ZONE,
    activity,
    configure,
    learn_request,
    query,
    start_cerebellum,
    stub,
    trained_cerebellum,
    zone_config,
)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def reference(checkpoint_dir):
    """A checkpoint of a trained cerebellum and the local copy it came from."""
    path = checkpoint_dir / "reference.pt"
    config, cerebellum = trained_cerebellum()
    save_checkpoint(path, config, cerebellum, step=7)
    return path, cerebellum


@pytest.fixture(scope="module")
def served(checkpoint_dir):
    servicer, server = start_cerebellum(checkpoint_dir=checkpoint_dir)
    yield servicer, server
    server.stop(0)


@pytest.fixture
def cerebellum(served, reference):
    """The module server, restored to the reference weights for each test."""
    servicer, server = served
    channel_stub = stub(server)
    channel_stub.Restore(pb.RestoreRequest(path=str(reference[0])), timeout=10)
    return servicer, server, channel_stub


def predict(channel_stub, *queries: pb.ZoneQuery) -> list[torch.Tensor]:
    reply = channel_stub.Predict(pb.PredictRequest(queries=queries), timeout=10)
    assert list(reply.available) == [True] * len(queries)
    return [decode(tensor) for tensor in reply.predictions]


# --- answers ---------------------------------------------------------------------


def test_predict_equals_local_bit_for_bit(cerebellum, reference):
    _, _, channel_stub = cerebellum
    _, local = reference
    inputs = [activity(seed) for seed in range(3)]

    remote = predict(channel_stub, *(query(x, batch=i) for i, x in enumerate(inputs)))
    expected = local.predict(
        [Query(ZONE, ActivityKey(i, 0), x) for i, x in enumerate(inputs)]
    )

    for got, want in zip(remote, expected, strict=True):
        assert got.dtype == torch.float32
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_float_dtypes_are_converted(cerebellum, reference, dtype):
    _, _, channel_stub = cerebellum
    _, local = reference
    x = activity(5).to(dtype)

    (got,) = predict(channel_stub, query(x))
    (want,) = local.predict([Query(ZONE, ActivityKey(0, 0), x.float())])

    assert got.dtype == dtype  # answered in the dtype it was asked in
    assert torch.equal(got, want.to(dtype))


def test_remote_cerebellum_predicts_like_local(cerebellum, reference):
    _, server, _ = cerebellum
    _, local = reference
    queries = [Query(ZONE, ActivityKey(i, 1), activity(10 + i)) for i in range(2)]

    with RemoteCerebellum(server.address, ClientSecurity(token=TOKEN)) as remote:
        got = remote.predict(queries)

    for a, b in zip(got, local.predict(queries), strict=True):
        assert torch.equal(a, b)


def test_predict_async_answers_as_predict_does(cerebellum, reference):
    _, server, _ = cerebellum
    _, local = reference
    queries = [Query(ZONE, ActivityKey(i, 2), activity(20 + i)) for i in range(2)]

    with RemoteCerebellum(server.address, ClientSecurity(token=TOKEN)) as remote:
        # Two calls in flight at once, taken in the other order.
        first, second = (
            remote.predict_async(queries[:1]),
            remote.predict_async(queries[1:]),
        )
        got = second.result() + first.result()
        assert second.result() is second.result()  # taken once, kept
        assert remote.predict_async([]).result() == []
        with pytest.raises(KeyError, match="state_9"):
            remote.predict_async(
                [Query("state_9", ActivityKey(0, 0), activity(0))]
            ).result()
        assert remote.counters.get("predict_calls") == 3
        # All three went on one stream; the refused one raised from there,
        # without being asked again.
        assert remote.counters.get("predict_streams") == 1
        assert remote.counters.get("predict_stream_fallbacks") == 0

    want = local.predict(queries[1:]) + local.predict(queries[:1])
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_a_refused_request_on_the_stream_leaves_the_others_answered(
    cerebellum, reference
):
    servicer, server, _ = cerebellum
    _, local = reference
    good = [Query(ZONE, ActivityKey(i, 3), activity(30 + i)) for i in range(3)]
    narrow = Query(ZONE, ActivityKey(9, 3), activity(0, width=3))
    before = servicer.stats()

    with RemoteCerebellum(server.address, ClientSecurity(token=TOKEN)) as remote:
        # All four in flight on one stream before any is taken.
        pending = [remote.predict_async([q]) for q in (good[0], narrow, *good[1:])]
        first = pending[0].result()
        with pytest.raises(ValueError, match="activity.shape"):
            pending[1].result()
        rest = [p.result() for p in pending[2:]]
        after = remote.predict_async([good[0]]).result()  # on a new stream

        assert remote.counters.get("predict_streams") == 2
        # Those sent behind the refused one were asked again unary; it was not.
        assert remote.counters.get("predict_stream_fallbacks") <= 2
    after_stats = servicer.stats()
    assert after_stats["predict_streams"] == before["predict_streams"] + 2
    assert after_stats["rejected"] == before["rejected"] + 1  # refused once

    want = local.predict(good)
    assert torch.equal(first[0], want[0]) and torch.equal(after[0], want[0])
    for (got,), expected in zip(rest, want[1:], strict=True):
        assert torch.equal(got, expected)


def test_a_late_stream_reply_is_asked_again_unary(reference):
    path, local = reference
    servicer, server = start_cerebellum()
    held, release = [], threading.Event()
    answer = servicer._answer

    def slow_first(request, context):
        if not held:  # the first request (the streamed one) waits for the test
            held.append(request)
            release.wait(30)
        return answer(request, context)

    servicer._answer = slow_first
    queries = [Query(ZONE, ActivityKey(0, 0), activity(0))]
    try:
        with RemoteCerebellum(
            server.address, ClientSecurity(token=TOKEN), deadline_s=0.5
        ) as remote:
            remote.restore(str(path))
            (got,) = remote.predict_async(queries).result()
            assert held, "the streamed request reached the server"
            assert remote.counters.get("predict_stream_fallbacks") == 1
            assert not remote.degraded
        assert torch.equal(got, local.predict(queries)[0])
    finally:
        release.set()
        server.stop(0)


def test_streamed_predictions_are_timed_like_unary_calls(cerebellum):
    _, server, _ = cerebellum
    timed = []
    with RemoteCerebellum(
        server.address,
        ClientSecurity(token=TOKEN),
        timer=lambda method, seconds: timed.append((method, seconds)),
    ) as remote:
        for i in range(3):
            remote.predict_async([Query(ZONE, ActivityKey(i, 4), activity(i))]).result()
    assert [method for method, _ in timed] == ["PredictStream"] * 3
    assert all(seconds > 0 for _, seconds in timed)


def test_a_server_sized_for_its_chunks_answers_with_every_stream_open(reference):
    from cerebellum_service.actor import server_workers

    path, local = reference
    chunks = 10  # 20 long-lived streams: more than the 16 threads of the default
    servicer, server = start_cerebellum(max_workers=server_workers(chunks))
    clients = [
        RemoteCerebellum(server.address, ClientSecurity(token=TOKEN))
        for _ in range(chunks)
    ]
    try:
        clients[0].restore(str(path))
        queries = [Query(ZONE, ActivityKey(i, 0), activity(i)) for i in range(chunks)]
        for client, query_ in zip(clients, queries):  # each opens its PredictStream
            (got,) = client.predict_async([query_]).result()
            assert torch.equal(got, local.predict([query_])[0])
        for client, query_ in zip(clients, queries):  # and its Learn stream
            client.observe([Observation(ZONE, query_.key, activity(100))])
        wait_until(lambda: servicer.stats()["learn_streams"] == chunks, 30, "streams")
        assert all(c.counters.get("predict_stream_fallbacks") == 0 for c in clients)
        assert servicer.stats()["predict_streams"] == chunks
        # Unary and control calls still find a thread.
        assert clients[-1].stats(["predict_calls"])["predict_calls"] == chunks
    finally:
        for client in clients:
            client.close()
        server.stop(0)


def test_server_metrics_time_each_request_of_a_predict_stream(reference):
    from protos.metrics import ActorMetrics

    path, _ = reference
    metrics = ActorMetrics("run", "cerebellum")
    servicer = CerebellumServicer(None)
    server = start_server(
        lambda grpc_server: add_to_server(servicer, grpc_server),
        security=ServerSecurity(token=TOKEN),
        service_names=[SERVICE_NAME],
        max_message_bytes=LIMIT,
        on_stop=[servicer.close],
        interceptors=[metrics.server_interceptor()],
    )
    labels = {"run": "run", "role": "cerebellum", "chunk": "", "method": ""}

    def count(method: str) -> float:
        value = metrics.registry.get_sample_value(
            "ccdni_grpc_server_seconds_count", {**labels, "method": method}
        )
        return value or 0.0

    try:
        with RemoteCerebellum(server.address, ClientSecurity(token=TOKEN)) as remote:
            remote.restore(str(path))
            pending = [
                remote.predict_async([Query(ZONE, ActivityKey(i, 0), activity(i))])
                for i in range(3)
            ]
            assert all(p.result()[0] is not None for p in pending)
            assert remote.counters.get("predict_stream_fallbacks") == 0
            # Each reply is recorded as it is yielded, before the client has it.
            assert count("PredictStream") == 3
            assert count("Restore") == 1
    finally:
        server.stop(0)


def test_learning_moves_predictions_toward_observed_feedback(cerebellum):
    servicer, server, channel_stub = cerebellum
    x = activity(20)
    target = torch.full((ROWS, WIDTH), 0.5)
    (before,) = predict(channel_stub, query(x, batch=100))
    step = servicer.step

    with RemoteCerebellum(server.address, ClientSecurity(token=TOKEN)) as remote:
        for batch in range(101, 106):
            remote.predict([Query(ZONE, ActivityKey(batch, 0), x)])
        remote.observe(
            [Observation(ZONE, ActivityKey(b, 0), target) for b in range(100, 106)]
        )
        assert remote.flush(10)
        assert servicer.wait_for_step(step + 1, timeout=10)
        assert remote.counters.get("accepted") == 6

    (after,) = predict(channel_stub, query(x, batch=200))
    loss_before = torch.mean((before - target) ** 2)
    loss_after = torch.mean((after - target) ** 2)
    assert loss_after < loss_before
    stats = servicer.stats()
    assert stats[f"zone.{ZONE}.updates"] >= 1
    assert stats[f"zone.{ZONE}.last_loss"] == pytest.approx(
        stats[f"zone.{ZONE}.last_loss"]
    )  # a number, not NaN


def test_a_bfloat16_server_answers_each_asker_in_its_dtype_and_learns():
    servicer, server = start_cerebellum({**zone_config(), "compute_dtype": "bfloat16"})
    try:
        channel_stub = stub(server)
        x, target = activity(40), torch.full((ROWS, WIDTH), 0.5)
        (before,) = predict(channel_stub, query(x.bfloat16(), batch=1))
        reply = channel_stub.Learn(
            iter([learn_request(target.bfloat16(), batch=1)]), timeout=10
        )
        assert reply.accepted == 1
        assert servicer.wait_for_step(1, timeout=10)

        (half,) = predict(channel_stub, query(x.bfloat16(), batch=2))
        (full,) = predict(channel_stub, query(x, batch=3))
        zone = servicer.cerebellum.zones[ZONE]
    finally:
        server.stop(0)

    assert before.dtype == half.dtype == torch.bfloat16
    assert full.dtype == torch.float32
    # One computation (in bfloat16), answered in the dtype each was asked in.
    assert torch.equal(full.bfloat16(), half)
    assert torch.mean((half.float() - target) ** 2) < torch.mean(
        (before.float() - target) ** 2
    )
    assert all(p.dtype == torch.float32 for p in zone.parameters())


def test_a_zero_answering_server_checks_queries_answers_zeros_and_learns_nothing():
    servicer, server = start_cerebellum({**zone_config(), "answer_zeros": True})
    try:
        channel_stub = stub(server)
        x, target = activity(50), torch.full((ROWS, WIDTH), 0.5)
        (answer,) = predict(channel_stub, query(x, batch=1))
        (half,) = predict(channel_stub, query(x.bfloat16(), batch=2))
        reply = channel_stub.Learn(iter([learn_request(target, batch=1)]), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:  # still checked as usual
            predict(channel_stub, query(activity(0)[:, :3], batch=3))
        stats = servicer.stats()
    finally:
        server.stop(0)

    assert answer.shape == (ROWS, WIDTH) and not answer.any()
    assert half.dtype == torch.bfloat16 and not half.any()
    assert stats["predictions_zeros"] == 2 and stats["predictions"] == 0
    # Nothing was cached, so the observation has nothing to pair with.
    assert (reply.accepted, reply.cache_misses) == (0, 1)
    assert stats["cache_misses"] == 1 and servicer.step == 0
    assert refused.value.code() == INVALID


def test_on_update_server_learns_only_when_a_frame_asks():
    servicer, server = start_cerebellum({**zone_config(), "learning": "on_update"})
    try:
        channel_stub = stub(server)
        x, target = activity(30), torch.full((ROWS, WIDTH), 0.5)
        (before,) = predict(channel_stub, query(x, batch=1))
        reply = channel_stub.Learn(iter([learn_request(target, batch=1)]), timeout=10)
        assert reply.accepted == 1
        assert not servicer.wait_for_step(1, timeout=0.5)  # taken, not learned
        assert torch.equal(predict(channel_stub, query(x, batch=2))[0], before)

        reply = channel_stub.Learn(
            iter([learn_request(target, batch=2), pb.LearnRequest(update=True)]),
            timeout=10,
        )
        # Applied before the stream's reply: no waiting for a learner thread.
        assert reply.accepted == 1 and servicer.step == 1
        assert servicer.stats()["update_requests"] == 1
        (after,) = predict(channel_stub, query(x, batch=3))
        assert torch.mean((after - target) ** 2) < torch.mean((before - target) ** 2)
    finally:
        server.stop(0)


def test_remote_update_on_call_waits_for_the_servers_update():
    servicer, server = start_cerebellum({**zone_config(), "learning": "on_update"})
    x, target = activity(31), torch.full((ROWS, WIDTH), 0.5)
    try:
        with RemoteCerebellum(
            server.address, ClientSecurity(token=TOKEN), update_on_call=True
        ) as remote:
            (before,) = remote.predict([Query(ZONE, ActivityKey(0, 0), x)])
            remote.observe([Observation(ZONE, ActivityKey(0, 0), target)])
            assert remote.update() == {}
            assert servicer.step == 1  # applied before update() returned
            (after,) = remote.predict([Query(ZONE, ActivityKey(1, 0), x)])
        assert not torch.equal(after, before)
        with RemoteCerebellum(server.address, ClientSecurity(token=TOKEN)) as plain:
            plain.update()  # without update_on_call: nothing sent
            assert plain.flush(10)
        assert servicer.stats()["update_requests"] == 1
    finally:
        server.stop(0)


def test_cache_miss_is_counted_not_fatal(cerebellum):
    servicer, _, channel_stub = cerebellum
    misses = servicer.stats()["cache_misses"]
    predict(channel_stub, query(activity(1), batch=300))

    reply = channel_stub.Learn(
        iter(
            [
                learn_request(torch.zeros(ROWS, WIDTH), batch=999),  # never predicted
                learn_request(torch.zeros(ROWS, WIDTH), batch=300),
                learn_request(torch.zeros(ROWS, WIDTH), batch=300),  # already used
            ]
        ),
        timeout=10,
    )

    assert (reply.accepted, reply.cache_misses, reply.rejected) == (1, 2, 0)
    assert servicer.stats()["cache_misses"] == misses + 2


def test_explicit_activity_and_split_frames_are_learned(cerebellum):
    servicer, _, channel_stub = cerebellum
    rows = 3000  # 3000 x 16 float32 = 192 KB per tensor: split into parts
    frames = list(
        split_frames(
            pb.LearnRequest(zone=ZONE, key=pb.ActivityKey(batch=400)),
            {"observed": torch.zeros(rows, WIDTH), "activity": activity(2, rows)},
            max_bytes=200_000,
            part_bytes=50_000,
        )
    )
    assert len(frames) > 2

    reply = channel_stub.Learn(iter(frames), timeout=10)

    assert (reply.accepted, reply.cache_misses, reply.rejected) == (1, 0, 0)


def test_lesions(cerebellum):
    servicer, _, channel_stub = cerebellum
    x = activity(3)
    (normal,) = predict(channel_stub, query(x, batch=500))

    configure(channel_stub, {"lesion": "olive"})
    (olive,) = predict(channel_stub, query(x, batch=501))
    reply = channel_stub.Learn(
        iter([learn_request(torch.zeros(ROWS, WIDTH), batch=501)]), timeout=10
    )
    assert torch.equal(olive, normal)  # predictions go on
    assert (reply.accepted, reply.rejected) == (0, 1)  # learning stops
    assert servicer.stats()["lesion.olive"] == 1.0

    configure(channel_stub, {"lesion": "cerebellum"})
    reply = channel_stub.Predict(pb.PredictRequest(queries=[query(x)]), timeout=10)
    assert list(reply.available) == [False]
    assert reply.predictions[0] == pb.Tensor()

    configure(channel_stub, {"lesion": None})
    assert torch.equal(predict(channel_stub, query(x, batch=502))[0], normal)


# --- bad input --------------------------------------------------------------------


def good_tensor() -> pb.Tensor:
    return encode(activity(0))


def tensor(**fields) -> pb.Tensor:
    msg = good_tensor()
    for name, value in fields.items():
        if name == "shape":
            del msg.shape[:]
            msg.shape.extend(value)
        else:
            setattr(msg, name, value)
    return msg


def with_nan() -> pb.Tensor:
    x = activity(0)
    x[1, 2] = float("nan")
    return encode(x)


def with_inf() -> pb.Tensor:
    x = activity(0)
    x[0, 0] = float("inf")
    return encode(x)


def too_large_for_float32() -> pb.Tensor:
    return encode(activity(0).double() * 1e300)


INVALID = grpc.StatusCode.INVALID_ARGUMENT
BAD_QUERIES = {
    "byte_count": (
        pb.ZoneQuery(zone=ZONE, activity=tensor(data=b"\0" * 10)),
        INVALID,
        "queries[1].activity.data",
    ),
    "unknown_dtype": (
        pb.ZoneQuery(zone=ZONE, activity=tensor(dtype="float8")),
        INVALID,
        "queries[1].activity.dtype",
    ),
    "integer_dtype": (
        pb.ZoneQuery(zone=ZONE, activity=tensor(dtype="int32")),
        INVALID,
        "queries[1].activity.dtype",
    ),
    "wrong_width": (
        pb.ZoneQuery(zone=ZONE, activity=encode(activity(0, width=WIDTH + 1))),
        INVALID,
        "queries[1].activity.shape",
    ),
    "three_dims": (
        pb.ZoneQuery(zone=ZONE, activity=tensor(shape=[2, 2, WIDTH])),
        INVALID,
        "queries[1].activity.shape",
    ),
    "negative_dim": (
        pb.ZoneQuery(zone=ZONE, activity=tensor(shape=[-4, WIDTH])),
        INVALID,
        "queries[1].activity.shape",
    ),
    "no_rows": (
        pb.ZoneQuery(zone=ZONE, activity=encode(torch.zeros(0, WIDTH))),
        INVALID,
        "queries[1].activity.shape",
    ),
    "nan": (
        pb.ZoneQuery(zone=ZONE, activity=with_nan()),
        INVALID,
        "queries[1].activity",
    ),
    "inf": (
        pb.ZoneQuery(zone=ZONE, activity=with_inf()),
        INVALID,
        "queries[1].activity",
    ),
    "overflow": (
        pb.ZoneQuery(zone=ZONE, activity=too_large_for_float32()),
        INVALID,
        "queries[1].activity",
    ),
    "unknown_zone": (
        pb.ZoneQuery(zone="state_9", activity=good_tensor()),
        grpc.StatusCode.NOT_FOUND,
        "queries[1].zone",
    ),
    "missing_activity": (pb.ZoneQuery(zone=ZONE), INVALID, "queries[1].activity"),
    "unexpected_context": (
        pb.ZoneQuery(zone=ZONE, activity=good_tensor(), context=good_tensor()),
        INVALID,
        "queries[1].context",
    ),
    "placeholder": (
        pb.ZoneQuery(zone=ZONE, activity=tensor(data=b"", parts=2)),
        INVALID,
        "queries[1].activity.parts",
    ),
}
REASONS = {
    "byte_count": "byte_count",
    "unknown_dtype": "dtype",
    "integer_dtype": "dtype",
    "wrong_width": "width",
    "three_dims": "shape",
    "negative_dim": "shape",
    "no_rows": "shape",
    "nan": "not_finite",
    "inf": "not_finite",
    "overflow": "not_finite",
    "unknown_zone": "unknown_zone",
    "missing_activity": "missing_field",
    "unexpected_context": "context",
    "placeholder": "placeholder",
}


def state_counters(servicer) -> dict:
    """The counters that change when a call changes state."""
    stats = servicer.stats()
    names = ("predictions", "accepted", "cache_misses", "updates", "step", "evictions")
    zone = {k: v for k, v in stats.items() if k.startswith("zone.") and v == v}
    return {**{name: stats[name] for name in names}, **zone}


@pytest.mark.parametrize("case", sorted(BAD_QUERIES))
def test_bad_query_gets_specific_status_and_changes_nothing(cerebellum, case):
    servicer, _, channel_stub = cerebellum
    bad, code, field = BAD_QUERIES[case]
    probe = query(activity(9), batch=600)
    (before,) = predict(channel_stub, probe)
    counters = state_counters(servicer)
    rejected = servicer.stats()[f"rejected.{REASONS[case]}"]

    # A valid query first: it must not be answered or cached either.
    request = pb.PredictRequest(queries=[query(activity(8), batch=601), bad])
    with pytest.raises(grpc.RpcError) as caught:
        channel_stub.Predict(request, timeout=10)

    assert caught.value.code() == code
    assert caught.value.details().startswith(field)
    assert state_counters(servicer) == counters
    assert servicer.stats()[f"rejected.{REASONS[case]}"] == rejected + 1
    (after,) = predict(channel_stub, probe)
    assert torch.equal(after, before)
    # Nothing was cached for the valid query of the refused call.
    reply = channel_stub.Learn(
        iter([learn_request(torch.zeros(ROWS, WIDTH), batch=601)]), timeout=10
    )
    assert reply.cache_misses == 1


def test_oversized_message_is_refused(cerebellum):
    servicer, server, _ = cerebellum
    big_client = stub(server, limit=8 * LIMIT)  # may send more than the server takes
    counters = state_counters(servicer)
    rows = LIMIT // (WIDTH * 4) + 16
    request = pb.PredictRequest(queries=[query(activity(0, rows=rows))])

    with pytest.raises(grpc.RpcError) as caught:
        big_client.Predict(request, timeout=10)

    # gRPC refuses it before the servicer sees it (so no reason is counted).
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in caught.value.details()
    assert state_counters(servicer) == counters
    assert predict(big_client, query(activity(0)))  # a correct call still works


def part(field: str, index: int, parts: int, data: bytes, **fields) -> pb.LearnRequest:
    values = {
        "field": field,
        "part": index,
        "parts": parts,
        "total_bytes": ROWS * WIDTH * 4,
        "dtype": "float32",
        "shape": [ROWS, WIDTH],
        "data": data,
    }
    values.update(fields)
    return pb.LearnRequest(part=pb.TensorPart(**values))


def placeholder(parts: int = 2) -> pb.LearnRequest:
    return pb.LearnRequest(
        zone=ZONE,
        key=pb.ActivityKey(batch=700),
        observed=pb.Tensor(dtype="float32", shape=[ROWS, WIDTH], parts=parts),
    )


HALF = b"\0" * (ROWS * WIDTH * 2)
BAD_STREAMS = {
    "part_without_placeholder": ([part("observed", 0, 2, HALF)], "part_sequence"),
    "part_for_wrong_field": (
        [placeholder(), part("activity", 0, 2, HALF)],
        "part_sequence",
    ),
    "part_out_of_order": (
        [placeholder(), part("observed", 1, 2, HALF)],
        "part_sequence",
    ),
    "part_disagrees": (
        [placeholder(), part("observed", 0, 2, HALF, dtype="float64")],
        "part_sequence",
    ),
    "stream_ends_mid_tensor": (
        [placeholder(), part("observed", 0, 2, HALF)],
        "part_sequence",
    ),
    "new_frame_before_parts": ([placeholder(), placeholder()], "part_sequence"),
    "byte_count": (
        [pb.LearnRequest(zone=ZONE, observed=tensor(data=b"\0" * 3))],
        "byte_count",
    ),
    "unknown_dtype": (
        [pb.LearnRequest(zone=ZONE, observed=tensor(dtype="complex64"))],
        "dtype",
    ),
    "missing_observed": ([pb.LearnRequest(zone=ZONE)], "missing_field"),
    "missing_zone": ([pb.LearnRequest(observed=good_tensor())], "missing_field"),
}


@pytest.mark.parametrize("case", sorted(BAD_STREAMS))
def test_malformed_learn_stream_is_refused(cerebellum, case):
    servicer, _, channel_stub = cerebellum
    frames, reason = BAD_STREAMS[case]
    probe = query(activity(9), batch=700)
    (before,) = predict(channel_stub, probe)
    rejected = servicer.stats()[f"rejected.{reason}"]
    step = servicer.step

    with pytest.raises(grpc.RpcError) as caught:
        channel_stub.Learn(iter(frames), timeout=10)

    assert caught.value.code() == INVALID
    assert caught.value.details().startswith("frame ")
    assert servicer.stats()[f"rejected.{reason}"] == rejected + 1
    assert servicer.step == step
    (after,) = predict(channel_stub, probe)  # the cached activity is still there
    assert torch.equal(after, before)
    reply = channel_stub.Learn(
        iter([learn_request(torch.zeros(ROWS, WIDTH), batch=700)]), timeout=10
    )
    assert reply.accepted == 1


UNFIT = {
    "nan": (with_nan(), ZONE, "not_finite"),
    "overflow": (too_large_for_float32(), ZONE, "not_finite"),
    "wrong_width": (encode(activity(0, width=WIDTH - 1)), ZONE, "width"),
    "wrong_rows": (encode(activity(0, rows=ROWS + 1)), ZONE, "shape"),
    "unknown_zone": (good_tensor(), "state_5", "unknown_zone"),
}


@pytest.mark.parametrize("case", sorted(UNFIT))
def test_unfit_observation_is_rejected_and_stream_goes_on(cerebellum, case):
    servicer, _, channel_stub = cerebellum
    observed, zone, reason = UNFIT[case]
    predict(channel_stub, query(activity(4), batch=800))
    rejected = servicer.stats()[f"rejected.{reason}"]

    reply = channel_stub.Learn(
        iter(
            [
                pb.LearnRequest(
                    zone=zone, key=pb.ActivityKey(batch=800), observed=observed
                ),
                learn_request(torch.zeros(ROWS, WIDTH), batch=800),
            ]
        ),
        timeout=10,
    )

    # The unfit one is refused and leaves the cached activity for the good one.
    assert (reply.accepted, reply.cache_misses, reply.rejected) == (1, 0, 1)
    assert servicer.stats()[f"rejected.{reason}"] == rejected + 1


BAD_CONFIGS = {
    "not_msgpack": (b"\xc1\xc1", INVALID, "config: is not a msgpack"),
    "not_a_map": (msgpack.packb([1, 2]), INVALID, "config.config: is a list"),
    "unknown_key": (
        msgpack.packb({**zone_config(), "speed": 1}),
        INVALID,
        "config.config: has unknown key(s) 'speed'",
    ),
    "missing_zones": (msgpack.packb({"lr": 0.1}), INVALID, "config.zones: is missing"),
    "width_type": (
        msgpack.packb(zone_config(in_features="16")),
        INVALID,
        "config.zones[0].in_features",
    ),
    "dotted_name": (
        msgpack.packb(zone_config(name="chunk0.state")),
        INVALID,
        "config.zones[0].name",
    ),
    "negative_lr": (
        msgpack.packb({**zone_config(), "lr": -1.0}),
        INVALID,
        "config.lr",
    ),
    "too_large": (
        msgpack.packb(zone_config(in_features=2**20, granule_width=2**20)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "config.zones[0]",
    ),
    "bad_lesion": (msgpack.packb({"lesion": "cortex"}), INVALID, "config.lesion"),
    "bad_compute_dtype": (
        msgpack.packb({**zone_config(), "compute_dtype": "float16"}),
        INVALID,
        "config.compute_dtype",
    ),
    "bad_learning": (
        msgpack.packb({**zone_config(), "learning": "sometimes"}),
        INVALID,
        "config.learning",
    ),
    "bad_answer_zeros": (
        msgpack.packb({**zone_config(), "answer_zeros": 1}),
        INVALID,
        "config.answer_zeros",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_refused_and_changes_nothing(cerebellum, case):
    servicer, _, channel_stub = cerebellum
    raw, code, prefix = BAD_CONFIGS[case]
    probe = query(activity(9), batch=900)
    (before,) = predict(channel_stub, probe)

    with pytest.raises(grpc.RpcError) as caught:
        channel_stub.Configure(pb.ConfigureRequest(config=raw), timeout=10)

    assert caught.value.code() == code
    assert caught.value.details().startswith(prefix)
    assert torch.equal(predict(channel_stub, probe)[0], before)


def test_stats_names(cerebellum):
    _, _, channel_stub = cerebellum
    reply = channel_stub.Stats(pb.StatsRequest(names=["step", "updates"]), timeout=10)
    assert sorted(reply.counters) == ["step", "updates"]

    with pytest.raises(grpc.RpcError) as caught:
        channel_stub.Stats(pb.StatsRequest(names=["no_such_counter"]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no_such_counter" in caught.value.details()


def test_unconfigured_server_answers_failed_precondition():
    servicer, server = start_cerebellum()
    try:
        channel_stub = stub(server)
        for method, request in (
            ("Predict", pb.PredictRequest(queries=[query(activity(0))])),
            ("Checkpoint", pb.CheckpointRequest(path="x.pt")),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                getattr(channel_stub, method)(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert servicer.stats()["rejected.not_configured"] == 2
    finally:
        server.stop(0)


# --- checkpoints ------------------------------------------------------------------


def test_checkpoint_restore_round_trip(cerebellum):
    servicer, server, channel_stub = cerebellum
    probe = [query(activity(seed), batch=seed) for seed in range(3)]
    before = predict(channel_stub, *probe)
    path = servicer.checkpoint_dir / "round.pt"
    fresh_servicer, fresh = start_cerebellum(checkpoint_dir=servicer.checkpoint_dir)

    try:
        reply = stub(server).Checkpoint(
            pb.CheckpointRequest(path=str(path)), timeout=10
        )
        restored = stub(fresh).Restore(pb.RestoreRequest(path="round.pt"), timeout=10)
        after = predict(stub(fresh), *probe)
    finally:
        fresh.stop(0)

    assert reply.path == str(path) and reply.size_bytes == path.stat().st_size
    assert restored.step == reply.step == servicer.step
    assert fresh_servicer.step == servicer.step
    for a, b in zip(after, before, strict=True):
        assert torch.equal(a, b)
    manifest = read_manifest(path)
    assert manifest["size_bytes"] == reply.size_bytes
    assert manifest["zones"] == [ZONE]


def test_a_restore_brings_back_a_cerebellum_that_computes(cerebellum, reference):
    servicer, _, channel_stub = cerebellum
    probe = query(activity(11), batch=11)
    (trained,) = predict(channel_stub, probe)
    zeros_servicer, zeros = start_cerebellum(
        {**zone_config(), "answer_zeros": True},
        checkpoint_dir=servicer.checkpoint_dir,
    )
    try:
        (before,) = predict(stub(zeros), probe)
        stub(zeros).Restore(pb.RestoreRequest(path=str(reference[0])), timeout=10)
        (after,) = predict(stub(zeros), probe)
    finally:
        zeros.stop(0)

    assert trained.any() and not before.any()
    assert torch.equal(after, trained)
    assert not zeros_servicer.config.answer_zeros


def test_failed_checkpoint_write_keeps_previous_one(cerebellum, monkeypatch):
    servicer, server, channel_stub = cerebellum
    directory = servicer.checkpoint_dir / "failed_write"
    directory.mkdir()
    path = directory / "kept.pt"
    save_checkpoint(path, *trained_cerebellum(seed=1), step=3)
    previous = path.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.os, "fsync", full_disk)
    with pytest.raises(grpc.RpcError) as caught:
        channel_stub.Checkpoint(pb.CheckpointRequest(path=str(path)), timeout=10)
    monkeypatch.undo()

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "unchanged" in caught.value.details()
    assert path.read_bytes() == previous
    assert sorted(p.name for p in directory.iterdir()) == [
        "kept.pt",
        "kept.pt.manifest",
    ]  # no temporary file left behind
    config, restored, step = load_checkpoint(path)
    assert step == 3 and config.zone_names == (ZONE,)


def test_restore_refuses_bad_files(cerebellum):
    servicer, _, channel_stub = cerebellum
    checkpoint_dir = servicer.checkpoint_dir
    (checkpoint_dir / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"format": "something else"}, checkpoint_dir / "other.pt")
    cases = {
        "garbage.pt": grpc.StatusCode.DATA_LOSS,
        "other.pt": INVALID,
        "missing.pt": grpc.StatusCode.NOT_FOUND,
        "../outside.pt": grpc.StatusCode.PERMISSION_DENIED,
        "": INVALID,
    }
    probe = query(activity(9), batch=950)
    (before,) = predict(channel_stub, probe)

    for path, code in cases.items():
        with pytest.raises(grpc.RpcError) as caught:
            channel_stub.Restore(pb.RestoreRequest(path=path), timeout=10)
        assert caught.value.code() == code, path
        assert caught.value.details().startswith("path")

    assert torch.equal(predict(channel_stub, probe)[0], before)


# --- degraded mode ----------------------------------------------------------------


def test_remote_cerebellum_degrades_and_recovers(reference, caplog):
    path, local = reference
    _, server = start_cerebellum()
    port = server.port
    remote = RemoteCerebellum(
        server.address, ClientSecurity(token=TOKEN), deadline_s=1.0, retries=1
    )
    queries = [Query(ZONE, ActivityKey(0, 0), activity(0))]
    restarted = None
    try:
        remote.restore(str(path))
        assert remote.predict(queries)[0] is not None

        server.stop(0)
        with caplog.at_level(logging.WARNING, logger="cerebellum_service.client"):
            answers = [remote.predict(queries) for _ in range(4)]
            remote.observe([Observation(ZONE, ActivityKey(0, 0), activity(1))])
        assert answers == [[None]] * 4
        assert remote.degraded
        assert remote.counters.get("degraded_calls") == 4
        assert remote.predict_async(queries).result() == [None]
        assert remote.counters.get("degraded_calls") == 5
        warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(warnings) == 1  # one warning per outage, not per call

        _, restarted = start_cerebellum(port=port)
        remote.wait_ready(10)
        remote.restore(str(path))
        (answer,) = remote.predict(queries)
        assert not remote.degraded
        assert torch.equal(answer, local.predict(queries)[0])
        assert remote.counters.get("outages") == 1
    finally:
        remote.close()
        server.stop(0)
        if restarted is not None:
            restarted.stop(0)


def test_remote_cerebellum_raises_for_bad_queries(cerebellum):
    _, server, _ = cerebellum
    with RemoteCerebellum(server.address, ClientSecurity(token=TOKEN)) as remote:
        with pytest.raises(KeyError, match="state_9"):
            remote.predict([Query("state_9", ActivityKey(0, 0), activity(0))])
        with pytest.raises(ValueError, match="activity.shape"):
            remote.predict([Query(ZONE, ActivityKey(0, 0), activity(0, width=3))])
        with pytest.raises(ValueError, match="config.zones"):
            remote.configure([{"name": ZONE}])
        assert remote.update() == {}
        assert remote.counters.get("degraded_calls") == 0


def test_latency_tool_times_a_zone_with_context(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "predict.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cerebellum_service.bench",
            *("--width", "8", "--granule-width", "8", "--batch", "4"),
            *("--context-size", "3", "--calls", "5", "--warmup", "1"),
            *("--json", str(out)),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    result = json.loads(out.read_text())
    assert result["config"]["context_size"] == 3
    assert set(result["phases"]) == {"local", "predict", "predict+learn"}
    assert result["phases"]["predict+learn"]["observations_accepted"] == 6


def test_a_failed_update_on_request_is_answered_internal(monkeypatch):
    servicer, server = start_cerebellum({**zone_config(), "learning": "on_update"})
    try:
        channel_stub = stub(server)
        predict(channel_stub, query(activity(40), batch=1))

        def broken():
            raise RuntimeError("optimiser state lost")

        monkeypatch.setattr(servicer._current.cerebellum, "update", broken)
        with pytest.raises(grpc.RpcError) as caught:
            channel_stub.Learn(
                iter(
                    [
                        learn_request(torch.zeros(ROWS, WIDTH), batch=1),
                        pb.LearnRequest(update=True),
                    ]
                ),
                timeout=10,
            )
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "optimiser state lost" in caught.value.details()
        assert servicer.step == 0
    finally:
        server.stop(0)


def test_a_closed_outbox_takes_nothing():
    from cerebellum_service.client import _Flush, _Outbox

    box = _Outbox(4)
    assert box.put([pb.LearnRequest()])
    assert box.close() and not box.put([pb.LearnRequest()])
    assert not box.put(_Flush(), marker=True)  # a flush after close is refused


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="Linux")
def test_lower_priority_reaches_threads_that_exist_and_those_started_later():
    import subprocess
    import sys

    script = """
import json, os, threading, time
from protos.process import lower_priority
from tests.helpers import thread_niceness
base = os.getpriority(os.PRIO_PROCESS, 0)
stop = threading.Event()
early = threading.Thread(target=stop.wait)
early.start()
now = lower_priority(3)
late = threading.Thread(target=stop.wait)
late.start()
print(json.dumps({"base": base, "now": now, "threads": thread_niceness(),
                  "capped": lower_priority(40)}))
stop.set()
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    result = __import__("json").loads(out)
    expected = min(19, result["base"] + 3)
    assert result["now"] == expected
    assert len(result["threads"]) >= 3  # main, early, late (and torch's own)
    assert set(result["threads"].values()) == {expected}
    assert result["capped"] == 19


@pytest.mark.skipif(not hasattr(__import__("os"), "SCHED_BATCH"), reason="Linux")
def test_batch_scheduling_reaches_every_thread_and_keeps_their_niceness():
    import os
    import subprocess
    import sys

    script = """
import json, os, threading
from protos.process import batch_scheduling, lower_priority
from tests.helpers import thread_niceness, thread_policies
stop = threading.Event()
early = threading.Thread(target=stop.wait)
early.start()
before = set(thread_policies().values())
lower_priority(4)
nice = thread_niceness()
marked = batch_scheduling()
late = threading.Thread(target=stop.wait)
late.start()
print(json.dumps({"before": sorted(before), "marked": marked,
                  "policies": thread_policies(), "nice": nice,
                  "nice_after": thread_niceness()}))
stop.set()
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    result = __import__("json").loads(out)
    assert result["before"] == [os.SCHED_OTHER]
    assert result["marked"] >= 2  # main and early (and torch's own, if any)
    assert len(result["policies"]) == result["marked"] + 1  # and late
    assert set(result["policies"].values()) == {os.SCHED_BATCH}
    # Still 4 below, for the threads that existed before and the one started after.
    assert set(result["nice_after"].values()) == set(result["nice"].values())
    assert len(set(result["nice"].values())) == 1


def test_lower_priority_refuses_to_raise_it():
    from protos.process import lower_priority

    with pytest.raises(ValueError, match="at least 0"):
        lower_priority(-1)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc")
def test_freed_window_buffers_stay_in_the_process():
    import subprocess
    import sys

    # Window-sized buffers, each a page larger than the last: glibc maps every
    # one afresh (each is above the threshold the previous free set), so every
    # page faults in again, unless freed memory stays in the heap.
    script = """
import resource, sys
from protos.process import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for step in range(200):
    buffer = bytearray(b"\\1") * (448 * 1024 + step * 4096)
    del buffer
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", script, mode],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for mode in ("default", "tuned")
    }
    assert faults["default"] > 200 * 112  # a 448 KiB buffer is 112 pages
    assert faults["tuned"] * 20 < faults["default"]
