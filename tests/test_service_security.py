"""Token authentication, TLS, health, the standalone server and graceful stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cerebellum_service.servicer import SERVICE_NAME, CerebellumServicer
from protos import ccdni_pb2 as pb
from protos import ccdni_pb2_grpc as pb_grpc
from protos.service import (
    ClientSecurity,
    ServerSecurity,
    call,
    open_channel,
    security_from_args,
    start_server,
    wait_ready,
)
from tests.service_helpers import (
    LIMIT,
    TOKEN,
    configure,
    make_certificate,
    start_cerebellum,
    status_of,
    stub,
    zone_config,
)

REPO = Path(__file__).resolve().parent.parent
METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["Cerebellum"].methods]


def request_for(method: str):
    """A harmless request for each method (an iterator for the client streams)."""
    if method == "Learn":
        return iter([pb.LearnRequest(zone="state_0")])
    if method == "PredictStream":
        return iter([pb.PredictRequest()])
    return {
        "Predict": pb.PredictRequest(),
        "Configure": pb.ConfigureRequest(),
        "Stats": pb.StatsRequest(),
        "Checkpoint": pb.CheckpointRequest(path="refused.pt"),
        "Restore": pb.RestoreRequest(path="refused.pt"),
    }[method]


@pytest.fixture(scope="module")
def served():
    servicer, server = start_cerebellum(zone_config())
    yield servicer, server
    server.stop(0)


def test_every_method_is_covered():
    assert sorted(METHODS) == sorted(
        [
            "Predict",
            "PredictStream",
            "Learn",
            "Configure",
            "Stats",
            "Checkpoint",
            "Restore",
        ]
    )


@pytest.mark.parametrize("token", [None, "wrong-token"], ids=["missing", "wrong"])
@pytest.mark.parametrize("method", METHODS)
def test_unauthenticated_calls_are_refused(served, method, token):
    servicer, server = served
    before = servicer.stats()
    cerebellum = stub(server, token=token)

    with pytest.raises(grpc.RpcError) as caught:
        answer = getattr(cerebellum, method)(request_for(method), timeout=10)
        if method == "PredictStream":
            list(answer)  # a stream's status arrives with its replies

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in caught.value.details()
    assert servicer.stats() == before  # the servicer never saw the call


def test_right_token_is_accepted(served):
    _, server = served
    assert status_of(stub(server).Stats, pb.StatsRequest()) == grpc.StatusCode.OK


def test_health_answers_without_token(served):
    _, server = served
    channel = open_channel(server.address)  # no token at all
    health = health_pb2_grpc.HealthStub(channel)

    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_end_to_end(tmp_path):
    cert, key = make_certificate(tmp_path)
    other_cert, _ = make_certificate(tmp_path, "other")
    security = ServerSecurity(token=TOKEN, tls_cert=cert, tls_key=key)
    _, server = start_cerebellum(zone_config(), security=security)
    try:
        good = ClientSecurity(token=TOKEN, tls_root_cert=cert)
        tls = pb_grpc.CerebellumStub(open_channel(server.address, good, LIMIT))
        assert status_of(tls.Stats, pb.StatsRequest()) == grpc.StatusCode.OK

        named = ClientSecurity(
            token=TOKEN, tls_root_cert=cert, server_name_override="localhost"
        )
        tls_named = pb_grpc.CerebellumStub(open_channel(server.address, named, LIMIT))
        assert status_of(tls_named.Stats, pb.StatsRequest()) == grpc.StatusCode.OK

        no_token = ClientSecurity(tls_root_cert=cert)
        anonymous = pb_grpc.CerebellumStub(open_channel(server.address, no_token))
        assert (
            status_of(anonymous.Stats, pb.StatsRequest())
            == grpc.StatusCode.UNAUTHENTICATED
        )

        plaintext = stub(server)
        assert status_of(plaintext.Stats, pb.StatsRequest(), timeout=5) in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )

        wrong_root = ClientSecurity(token=TOKEN, tls_root_cert=other_cert)
        untrusted = pb_grpc.CerebellumStub(open_channel(server.address, wrong_root))
        assert status_of(untrusted.Stats, pb.StatsRequest(), timeout=5) in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
    finally:
        server.stop(0)


def test_server_refuses_to_start_without_token():
    with pytest.raises(ValueError, match="--token-file.*CCDNI_TOKEN.*--insecure"):
        start_server(lambda server: None, security=ServerSecurity())


def test_security_settings_are_checked():
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        ServerSecurity(token=TOKEN, tls_cert="a.crt")
    with pytest.raises(ValueError, match="--insecure-no-auth"):
        ServerSecurity(token=TOKEN, insecure=True)
    with pytest.raises(ValueError, match="printable ASCII"):
        ServerSecurity(token="has space")


def test_token_comes_from_file_before_environment(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")

    def args(path):
        return type(
            "Args",
            (),
            {
                "token_file": path,
                "insecure_no_auth": False,
                "tls_cert": None,
                "tls_key": None,
            },
        )()

    assert security_from_args(args(token_file), {"CCDNI_TOKEN": "env"}).token == TOKEN
    assert security_from_args(args(None), {"CCDNI_TOKEN": "env"}).token == "env"
    assert security_from_args(args(None), {}).token is None
    with pytest.raises(ValueError, match="--token-file"):
        security_from_args(args(tmp_path / "missing"), {})


# --- the standalone server ------------------------------------------------------


def launch(*flags: str, env: dict | None = None) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if k != "CCDNI_TOKEN"}
    environ.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "cerebellum_service", "--port", "0", *flags],
        cwd=REPO,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_line(process: subprocess.Popen) -> str:
    line = process.stdout.readline().strip()
    if not line:
        raise AssertionError(f"no address printed; stderr: {process.stderr.read()}")
    return line


def stop_process(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=20)
    process.stdout.close()
    process.stderr.close()
    return code


def test_standalone_prints_address_and_reads_token_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    process = launch(
        "--token-file",
        str(token_file),
        "--zones",
        "state_0:8:8",
        "--precision",
        "bfloat16",
        "--log-level",
        "WARNING",
    )
    try:
        address = first_line(process)
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0

        channel = open_channel(address, ClientSecurity(token=TOKEN))
        wait_ready(channel, 20)
        cerebellum = pb_grpc.CerebellumStub(channel)
        reply = cerebellum.Stats(pb.StatsRequest(names=["configured"]), timeout=10)
        assert reply.counters["configured"] == 1.0  # --zones configured it
        # A lesion-only Configure answers the effective map, unchanged but for it.
        assert configure(cerebellum, {"lesion": None})["compute_dtype"] == "bfloat16"
        wrong = pb_grpc.CerebellumStub(open_channel(address, ClientSecurity("bad")))
        assert status_of(wrong.Stats, pb.StatsRequest()) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        channel.close()
    finally:
        assert stop_process(process) == 0


def test_standalone_reads_environment_token():
    process = launch("--log-level", "WARNING", env={"CCDNI_TOKEN": TOKEN})
    try:
        address = first_line(process)
        channel = open_channel(address, ClientSecurity(token=TOKEN))
        wait_ready(channel, 20)
        cerebellum = pb_grpc.CerebellumStub(channel)
        assert configure(cerebellum, zone_config())["zones"][0]["name"] == "state_0"
        channel.close()
    finally:
        assert stop_process(process) == 0


def test_standalone_refuses_to_start_without_token():
    process = launch()
    code = process.wait(timeout=30)
    stdout, stderr = process.stdout.read(), process.stderr.read()
    process.stdout.close()
    process.stderr.close()

    assert code != 0
    assert stdout == ""
    for flag in ("--token-file", "CCDNI_TOKEN", "--insecure-no-auth"):
        assert flag in stderr


def test_standalone_insecure_mode_needs_no_token():
    process = launch("--insecure-no-auth", "--log-level", "WARNING")
    try:
        address = first_line(process)
        channel = open_channel(address)
        wait_ready(channel, 20)
        anonymous = pb_grpc.CerebellumStub(channel)
        assert status_of(anonymous.Stats, pb.StatsRequest()) == grpc.StatusCode.OK
        channel.close()
    finally:
        assert stop_process(process) == 0


# --- graceful stop ----------------------------------------------------------------


class SlowStats(CerebellumServicer):
    """Stats that waits for the test to release it."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def Stats(self, request, context):
        self.entered.set()
        assert self.release.wait(10)
        return super().Stats(request, context)


def test_graceful_stop_lets_in_flight_call_finish():
    servicer = SlowStats()
    _, server = start_cerebellum(servicer=servicer)
    cerebellum = stub(server)
    stop_called = threading.Event()
    grpc_stop = server.server.stop

    def stop_and_signal(grace):
        event = grpc_stop(grace)
        stop_called.set()
        return event

    server.server.stop = stop_and_signal
    in_flight = cerebellum.Stats.future(pb.StatsRequest(), timeout=20)
    assert servicer.entered.wait(10)

    stopper = threading.Thread(target=server.stop, args=(10,))
    stopper.start()
    assert stop_called.wait(10)
    late = status_of(cerebellum.Stats, pb.StatsRequest(), timeout=5)
    servicer.release.set()
    stopper.join(20)

    assert late == grpc.StatusCode.UNAVAILABLE  # new calls are refused
    assert in_flight.result().counters["configured"] == 0.0  # the old one finished
    assert not stopper.is_alive()
    status = server.health.Check(health_pb2.HealthCheckRequest(service=""), None)
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING


# --- client retries -----------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def failing(codes: list[grpc.StatusCode], calls: list[float]):
    """A stub method failing with ``codes`` in turn, then answering "ok"."""

    def method(request, timeout, metadata):
        calls.append(timeout)
        if codes:
            raise FakeRpcError(codes.pop(0))
        return "ok"

    return method


def test_call_retries_transient_codes_with_a_deadline_each_time():
    calls: list[float] = []
    codes = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED]
    method = failing(codes, calls)

    assert call(method, None, deadline_s=0.25, retries=2, backoff_s=0) == "ok"
    assert calls == [0.25, 0.25, 0.25]


def test_call_gives_up_after_the_retry_limit():
    calls: list[float] = []
    method = failing([grpc.StatusCode.UNAVAILABLE] * 5, calls)

    with pytest.raises(grpc.RpcError) as caught:
        call(method, None, retries=2, backoff_s=0)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(calls) == 3


def test_call_raises_other_codes_at_once():
    calls: list[float] = []
    method = failing([grpc.StatusCode.INVALID_ARGUMENT], calls)

    with pytest.raises(grpc.RpcError) as caught:
        call(method, None, retries=5, backoff_s=0)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(calls) == 1
