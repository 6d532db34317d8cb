"""Loopback gRPC servers and certificates shared by the service tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import msgpack
import pytest
import torch

from cerebellum_service.config import CerebellumConfig
from cerebellum_service.servicer import SERVICE_NAME, CerebellumServicer, add_to_server
from protos import ccdni_pb2 as pb
from protos import ccdni_pb2_grpc as pb_grpc
from protos.codec import encode
from protos.service import (
    ClientSecurity,
    RunningServer,
    ServerSecurity,
    open_channel,
    start_server,
)

TOKEN = "test-token-0123456789abcdef"
LIMIT = 1 << 20
"""Message limit of the test servers: small, so oversized messages are cheap."""

ZONE = "state_0"
WIDTH = 16
ROWS = 4


def zone_config(**overrides: object) -> dict:
    """A small one-zone Configure map."""
    zone = {
        "name": ZONE,
        "in_features": WIDTH,
        "out_features": WIDTH,
        "granule_width": 32,
        "seed": 3,
    }
    zone.update(overrides)
    return {"zones": [zone], "lr": 0.01, "cache_size": 64}


def start_cerebellum(
    config: dict | None = None,
    *,
    port: int = 0,
    security: ServerSecurity | None = None,
    checkpoint_dir: Path | None = None,
    servicer: CerebellumServicer | None = None,
    max_workers: int = 8,
) -> tuple[CerebellumServicer, RunningServer]:
    """An in-process cerebellum server on loopback."""
    if servicer is None:
        parsed = None if config is None else CerebellumConfig.from_dict(config)
        servicer = CerebellumServicer(parsed, checkpoint_dir=checkpoint_dir)
    server = start_server(
        lambda grpc_server: add_to_server(servicer, grpc_server),
        security=security or ServerSecurity(token=TOKEN),
        service_names=[SERVICE_NAME],
        port=port,
        max_message_bytes=LIMIT,
        max_workers=max_workers,
        on_stop=[servicer.close],
    )
    return servicer, server


def stub(
    server: RunningServer, token: str | None = TOKEN, limit: int = LIMIT
) -> pb_grpc.CerebellumStub:
    channel = open_channel(server.address, ClientSecurity(token=token), limit)
    return pb_grpc.CerebellumStub(channel)


def configure(cerebellum: pb_grpc.CerebellumStub, config: dict) -> dict:
    reply = cerebellum.Configure(
        pb.ConfigureRequest(config=msgpack.packb(config)), timeout=10
    )
    return msgpack.unpackb(reply.config)


def query(
    activity: torch.Tensor, batch: int = 0, zone: str = ZONE, window: int = 0
) -> pb.ZoneQuery:
    return pb.ZoneQuery(
        zone=zone,
        key=pb.ActivityKey(batch=batch, window=window),
        activity=encode(activity),
    )


def learn_request(
    observed: torch.Tensor, batch: int = 0, zone: str = ZONE, window: int = 0
) -> pb.LearnRequest:
    return pb.LearnRequest(
        zone=zone,
        key=pb.ActivityKey(batch=batch, window=window),
        observed=encode(observed),
    )


def make_certificate(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (cert, key)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed; it makes the test's cert")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def status_of(fn, request, **kwargs) -> grpc.StatusCode:
    """The status code a call ends with (OK when it returns)."""
    try:
        fn(request, timeout=kwargs.pop("timeout", 10), **kwargs)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def trained_cerebellum(seed: int = 0):
    """A local cerebellum whose Purkinje layer is not zero, so answers differ."""
    config = CerebellumConfig.from_dict(zone_config())
    cerebellum = config.build()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in cerebellum.zones.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return config, cerebellum


def activity(seed: int, rows: int = ROWS, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))
