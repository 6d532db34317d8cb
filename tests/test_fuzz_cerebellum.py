"""Fuzzing every method of the cerebellum service on one server.

About 700 malformed or random messages go to Predict, Learn, Configure, Stats,
Checkpoint and Restore. None may crash the server or escape as UNKNOWN (an
exception the servicer did not turn into a status); every malformed one gets a
specific non-OK status; and at the end the server still answers a correct
Predict with exactly the prediction it gave before the fuzzing.
"""

from __future__ import annotations

import grpc
import msgpack
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from cerebellum_service.learning import ActivityKey, Query
from cerebellum_service.servicer import save_checkpoint
from protos import ccdni_pb2 as pb
from protos import ccdni_pb2_grpc as pb_grpc
from protos.codec import decode
from protos.service import ClientSecurity, open_channel
from tests.fuzzing import (
    TENSOR_FLAWS,
    broken_part_streams,
    malformed_tensors,
    random_messages,
    raw_method,
)
from tests.service_helpers import (
    LIMIT,
    ROWS,
    TOKEN,
    WIDTH,
    ZONE,
    activity,
    query,
    start_cerebellum,
    trained_cerebellum,
    zone_config,
)

PROBE_BATCH = 10**9  # a key no fuzz message uses
Code = grpc.StatusCode
REFUSALS = {
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED,
    Code.PERMISSION_DENIED,
    Code.DATA_LOSS,
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
def fuzzed(tmp_path_factory):
    """One server for the whole module, with the reference weights restored."""
    checkpoint_dir = tmp_path_factory.mktemp("fuzz_checkpoints")
    config, local = trained_cerebellum()
    save_checkpoint(checkpoint_dir / "reference.pt", config, local, step=5)
    servicer, server = start_cerebellum(checkpoint_dir=checkpoint_dir)
    channel = open_channel(server.address, ClientSecurity(token=TOKEN), LIMIT)
    channel_stub = pb_grpc.CerebellumStub(channel)
    channel_stub.channel = channel  # for the raw-bytes test
    channel_stub.Restore(pb.RestoreRequest(path="reference.pt"), timeout=10)
    probe = activity(99)
    expected = local.predict([Query(ZONE, ActivityKey(PROBE_BATCH, 0), probe)])[0]
    yield servicer, server, channel_stub, probe, expected
    server.stop(0)


def outcome(fn, request) -> tuple[Code, object]:
    try:
        return Code.OK, fn(request, timeout=10)
    except grpc.RpcError as error:
        return error.code(), error


# --- Predict -----------------------------------------------------------------------

PREDICT_FLAWS = [f for f in TENSOR_FLAWS if f != "wrong_shape"]  # other rows: valid


@fuzz_settings(150)
@given(
    bad=malformed_tensors([ROWS, WIDTH], flaws=PREDICT_FLAWS),
    position=st.integers(0, 2),
)
def test_predict_malformed_tensor(fuzzed, bad, position):
    servicer, _, channel_stub, _, _ = fuzzed
    flaw, tensor = bad
    queries = [query(activity(i), batch=i) for i in range(2)]
    queries.insert(position, pb.ZoneQuery(zone=ZONE, activity=tensor))
    predictions = servicer.stats()["predictions"]

    code, error = outcome(channel_stub.Predict, pb.PredictRequest(queries=queries))

    assert code == Code.INVALID_ARGUMENT, (flaw, tensor)
    assert error.details().startswith(f"queries[{position}].activity")
    assert servicer.stats()["predictions"] == predictions


zone_names = st.sampled_from([ZONE, "", "state_1"]) | st.text(max_size=8)


@fuzz_settings(80)
@given(request=random_messages(pb.PredictRequest, strings=zone_names))
def test_predict_random_message(fuzzed, request):
    _, _, channel_stub, _, _ = fuzzed
    code, reply = outcome(channel_stub.Predict, request)

    assert code == Code.OK or code in REFUSALS, code
    if code == Code.OK:
        assert len(reply.predictions) == len(reply.available) == len(request.queries)


# --- Learn -------------------------------------------------------------------------


def learn_header(parts: int) -> pb.LearnRequest:
    return pb.LearnRequest(
        zone=ZONE,
        key=pb.ActivityKey(batch=1),
        observed=pb.Tensor(dtype="float32", shape=[ROWS, WIDTH], parts=parts),
    )


@fuzz_settings(100)
@given(
    broken=broken_part_streams(pb.LearnRequest, learn_header, "observed", [ROWS, WIDTH])
)
def test_learn_broken_part_sequence(fuzzed, broken):
    servicer, _, channel_stub, _, _ = fuzzed
    flaw, frames = broken
    step = servicer.step

    code, error = outcome(channel_stub.Learn, iter(frames))

    assert code == Code.INVALID_ARGUMENT, flaw
    assert error.details().startswith("frame ")
    assert servicer.step == step


@fuzz_settings(100)
@given(bad=malformed_tensors([ROWS, WIDTH]), batch=st.integers(0, 3))
def test_learn_malformed_observed(fuzzed, bad, batch):
    servicer, _, channel_stub, _, _ = fuzzed
    flaw, tensor = bad
    frame = pb.LearnRequest(zone=ZONE, key=pb.ActivityKey(batch=batch), observed=tensor)
    accepted = servicer.stats()["accepted"]

    code, reply = outcome(channel_stub.Learn, iter([frame]))

    if flaw in ("wrong_shape", "not_finite"):
        # Well-formed but unfit: counted, the stream itself succeeds.
        assert code == Code.OK, flaw
        assert reply.accepted == 0
        assert reply.rejected + reply.cache_misses == 1
    else:
        assert code == Code.INVALID_ARGUMENT, (flaw, tensor)
    assert servicer.stats()["accepted"] == accepted


unknown_zones = st.text(max_size=8).filter(lambda name: name != ZONE)


@fuzz_settings(60)
@given(
    frames=st.lists(
        random_messages(pb.LearnRequest, strings=unknown_zones), min_size=1, max_size=3
    )
)
def test_learn_random_frames(fuzzed, frames):
    _, _, channel_stub, _, _ = fuzzed
    code, reply = outcome(channel_stub.Learn, iter(frames))

    assert code == Code.OK or code in REFUSALS, code
    if code == Code.OK:
        assert reply.accepted == 0  # no frame names a real zone


# --- Configure ---------------------------------------------------------------------

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)

MUTATIONS = {
    "unknown_key": lambda c: {**c, "colour": "red"},
    "no_zones": lambda c: {k: v for k, v in c.items() if k != "zones"},
    "empty_zones": lambda c: {**c, "zones": []},
    "zones_not_list": lambda c: {**c, "zones": "state_0"},
    "duplicate_names": lambda c: {**c, "zones": c["zones"] * 2},
    "lr_zero": lambda c: {**c, "lr": 0},
    "lr_text": lambda c: {**c, "lr": "fast"},
    "cache_bool": lambda c: {**c, "cache_size": True},
    "cache_huge": lambda c: {**c, "cache_size": 10**12},
    "lesion_bad": lambda c: {**c, "lesion": "cortex"},
}
ZONE_MUTATIONS = {
    "in_features": [0, -1, "16", 2.5, None, 2**21],
    "out_features": [0, [16], 2**40],
    "granule_width": [0, -5, "wide", 2**25],
    "granule_layers": [0, 9, 1.0],
    "inputs_per_granule": [0, WIDTH + 1, "all"],
    "context_size": [-1, "0"],
    "seed": [-1, 2**63, "seed"],
    "dtype": ["int8", "bfloat16", 32],
    "name": ["", "a.b", "keys", 7, "x" * 201],
    "colour": ["red"],
}


@st.composite
def bad_configs(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json_like", "top", "zone"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "json_like":
        value = draw(json_like)
        assume(not (isinstance(value, dict) and set(value) == {"lesion"}))
        return msgpack.packb(value)
    config = zone_config()
    if kind == "top":
        return msgpack.packb(
            MUTATIONS[draw(st.sampled_from(sorted(MUTATIONS)))](config)
        )
    key = draw(st.sampled_from(sorted(ZONE_MUTATIONS)))
    config["zones"][0][key] = draw(st.sampled_from(ZONE_MUTATIONS[key]))
    return msgpack.packb(config)


@fuzz_settings(80)
@given(raw=bad_configs())
def test_configure_malformed(fuzzed, raw):
    servicer, _, channel_stub, _, _ = fuzzed
    configures = servicer.stats()["configures"]

    code, error = outcome(channel_stub.Configure, pb.ConfigureRequest(config=raw))

    assert code in (Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED), raw
    assert error.details().startswith("config")
    assert servicer.stats()["configures"] == configures


# --- Stats, Checkpoint, Restore ----------------------------------------------------

counter_names = st.sampled_from(["step", "updates", "rejected", "nope"]) | st.text(
    max_size=8
)


@fuzz_settings(50)
@given(request=random_messages(pb.StatsRequest, strings=counter_names))
def test_stats_random(fuzzed, request):
    _, _, channel_stub, _, _ = fuzzed
    code, reply = outcome(channel_stub.Stats, request)

    assert code in (Code.OK, Code.NOT_FOUND), code
    if code == Code.OK and request.names:
        assert set(reply.counters) == set(request.names)


paths = st.text(max_size=24) | st.sampled_from(
    ["../escape.pt", "/etc/passwd", "sub/dir/x.pt", ".", "", "a\x00b", "reference.pt"]
)


@fuzz_settings(40)
@given(path=paths)
def test_checkpoint_random_path(fuzzed, path):
    servicer, _, channel_stub, _, _ = fuzzed
    assume(path != "reference.pt")  # keep the reference file as it is
    code, reply = outcome(channel_stub.Checkpoint, pb.CheckpointRequest(path=path))

    assert code == Code.OK or code in REFUSALS, (code, path)
    if code == Code.OK:
        assert reply.path.startswith(str(servicer.checkpoint_dir))


# Random bytes read as a checkpoint make torch.load warn about the pickle
# protocol they happen to name; the server's answer is what is tested.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@fuzz_settings(40)
@given(path=paths, content=st.binary(max_size=128), truncate=st.floats(0, 0.99))
def test_restore_random(fuzzed, path, content, truncate):
    servicer, _, channel_stub, _, _ = fuzzed
    directory = servicer.checkpoint_dir
    (directory / "random.pt").write_bytes(content)
    reference = (directory / "reference.pt").read_bytes()
    (directory / "truncated.pt").write_bytes(
        reference[: int(len(reference) * truncate)]
    )

    for name in ("random.pt", "truncated.pt"):
        code, _ = outcome(channel_stub.Restore, pb.RestoreRequest(path=name))
        assert code in (Code.DATA_LOSS, Code.INVALID_ARGUMENT), (name, code)

    code, _ = outcome(channel_stub.Restore, pb.RestoreRequest(path=path))
    assert code == Code.OK or code in REFUSALS, (code, path)


# --- raw bytes to every method -----------------------------------------------------

METHODS = {m.name: m for m in pb.DESCRIPTOR.services_by_name["Cerebellum"].methods}


@fuzz_settings(60)
@given(
    method=st.sampled_from(sorted(METHODS)),
    payloads=st.lists(st.binary(max_size=96), min_size=1, max_size=3),
)
# Two empty requests parse, and a stream answers each: both replies read.
@example(method="PredictStream", payloads=[b"", b""])
def test_raw_bytes_to_every_method(fuzzed, method, payloads):
    _, server, channel_stub, _, _ = fuzzed
    streaming = METHODS[method].client_streaming
    send = raw_method(
        channel_stub.channel,
        "Cerebellum",
        method,
        streaming,
        server_streaming=METHODS[method].server_streaming,
    )
    # Keep the reference checkpoint: a Restore of it would only reset the cache,
    # but a Checkpoint over it would change what the other tests restore.
    assume(b"reference" not in b"".join(payloads))

    code, _ = outcome(send, iter(payloads) if streaming else payloads[0])

    # Bytes that do not parse as the request are INVALID_ARGUMENT, like any
    # other malformed input (protos.service.add_servicer parses them).
    assert code == Code.OK or code in REFUSALS, code


# --- afterwards ----------------------------------------------------------------------


def test_server_still_answers_correctly(fuzzed):
    servicer, _, channel_stub, probe, expected = fuzzed
    # Fuzzed Restores of a checkpoint of the same weights are allowed; nothing
    # may have learned.
    channel_stub.Configure(
        pb.ConfigureRequest(config=msgpack.packb({"lesion": None})), timeout=10
    )
    reply = channel_stub.Predict(
        pb.PredictRequest(queries=[query(probe, batch=PROBE_BATCH)]), timeout=10
    )

    assert list(reply.available) == [True]
    assert torch.equal(decode(reply.predictions[0]), expected)
    stats = servicer.stats()
    assert stats["updates"] == 0
    assert stats["learner_failed"] == 0
    assert stats["rejected"] >= 500
