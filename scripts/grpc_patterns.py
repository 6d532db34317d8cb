#!/usr/bin/env python
"""CPU per message of Python gRPC's call patterns, with nothing of ccdni in the way.

A bare server in another process answers the same bytes in each of the patterns
ccdni uses or could use, over TCP loopback and a Unix socket; both processes'
CPU (user + system, from getrusage) is read around every measured stretch::

    python scripts/grpc_patterns.py                  # a window: 448 x 256 float32
    python scripts/grpc_patterns.py --bytes 229376   # the same in bfloat16
    python scripts/grpc_patterns.py --calls 3000 --json out.json

Patterns:

- ``client-stream``: one short client stream per message, the caller waiting
  for the previous one's acknowledgement (how ``GrpcNeighbour`` sent a chunk's
  activity and feedback before it kept a stream open);
- ``unary``: one unary call per message, a small reply (a Learn frame as a call);
- ``unary-echo``: one unary call whose reply is as large as the request (how a
  chunk asks for predictions, Predict);
- ``stream``: one long-lived bidirectional stream, a small acknowledgement per
  message, the caller waiting for it before the next (how a chunk sends
  activity and feedback, ``GrpcNeighbour`` on ``StreamActivity``);
- ``stream-echo``: the same stream, each reply as large as the request.

docs/BENCHMARKS.md quotes its numbers for the transport floor of a window.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import resource
import sys
import tempfile
import time
from concurrent import futures

LIMIT = 64 * 1024 * 1024
OPTIONS = [
    ("grpc.max_send_message_length", LIMIT),
    ("grpc.max_receive_message_length", LIMIT),
]
SERVICE = "patterns.Bench"
ACK = b"ok"
PATTERNS = ("client-stream", "unary", "unary-echo", "stream", "stream-echo")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def serve(address: str, control) -> None:
    """The bare server: answers every pattern, reports its CPU when asked."""
    import grpc

    def client_stream(requests, context):
        for _ in requests:
            pass
        return ACK

    def stream(requests, context):
        for _ in requests:
            yield ACK

    def stream_echo(requests, context):
        yield from requests

    handlers = {
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Unary": grpc.unary_unary_rpc_method_handler(lambda request, context: ACK),
        "UnaryEcho": grpc.unary_unary_rpc_method_handler(
            lambda request, context: request
        ),
        "Stream": grpc.stream_stream_rpc_method_handler(stream),
        "StreamEcho": grpc.stream_stream_rpc_method_handler(stream_echo),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, handlers),)
    )
    if server.add_insecure_port(address) == 0 and not address.startswith("unix:"):
        control.send(("error", f"could not bind {address}"))
        return
    server.start()
    control.send(("ready", None))
    while True:
        command = control.recv()
        if command == "cpu":
            control.send(("cpu", cpu_seconds()))
        else:
            server.stop(grace=None)
            return


def run_pattern(channel, pattern: str, payload: bytes, calls: int) -> None:
    """``calls`` messages of ``payload`` in ``pattern``, one in flight at a time."""
    path = f"/{SERVICE}/"
    if pattern == "client-stream":
        method = channel.stream_unary(path + "ClientStream")
        pending = None
        for _ in range(calls):
            if pending is not None:
                pending.result()
            pending = method.future(iter([payload]))
        pending.result()
    elif pattern in ("unary", "unary-echo"):
        method = channel.unary_unary(
            path + ("Unary" if pattern == "unary" else "UnaryEcho")
        )
        for _ in range(calls):
            method(payload)
    else:
        method = channel.stream_stream(
            path + ("Stream" if pattern == "stream" else "StreamEcho")
        )
        outbox: queue.Queue = queue.Queue()

        def requests():
            while (message := outbox.get()) is not None:
                yield message

        replies = method(requests())
        for _ in range(calls):
            outbox.put(payload)
            next(replies)
        outbox.put(None)
        for _ in replies:
            pass


def measure(address: str, size: int, calls: int, warmup: int) -> list[dict]:
    import grpc

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    server = context.Process(target=serve, args=(address, theirs), daemon=True)
    server.start()
    try:
        status, detail = ours.recv()
        if status != "ready":
            raise RuntimeError(detail)

        def server_cpu() -> float:
            ours.send("cpu")
            return ours.recv()[1]

        channel = grpc.insecure_channel(address, options=OPTIONS)
        grpc.channel_ready_future(channel).result(timeout=30)
        payload = os.urandom(size)
        rows = []
        for pattern in PATTERNS:
            run_pattern(channel, pattern, payload, warmup)
            theirs_before, ours_before = server_cpu(), cpu_seconds()
            began = time.perf_counter()
            run_pattern(channel, pattern, payload, calls)
            wall = time.perf_counter() - began
            client, served = cpu_seconds() - ours_before, server_cpu() - theirs_before
            rows.append(
                {
                    "pattern": pattern,
                    "transport": "unix" if address.startswith("unix:") else "tcp",
                    "bytes": size,
                    "calls": calls,
                    "wall_ms": 1000 * wall / calls,
                    "client_cpu_ms": 1000 * client / calls,
                    "server_cpu_ms": 1000 * served / calls,
                    "cpu_ms": 1000 * (client + served) / calls,
                }
            )
        channel.close()
        return rows
    finally:
        ours.send("stop")
        server.join(timeout=30)
        if server.is_alive():
            server.terminate()


def render(rows: list[dict]) -> str:
    lines = [
        "| pattern | transport | wall ms/message | client CPU ms | server CPU ms "
        "| CPU ms in all |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['pattern']} | {r['transport']} | {r['wall_ms']:.3f} | "
            f"{r['client_cpu_ms']:.3f} | {r['server_cpu_ms']:.3f} | "
            f"{r['cpu_ms']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bytes",
        type=int,
        default=448 * 256 * 4,
        help="payload per message (default: one window's activity, 448 x 256 float32)",
    )
    parser.add_argument("--calls", type=int, default=1500, help="messages per pattern")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--port", type=int, default=0, help="0: pick a free port")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.bytes < 1 or args.bytes > LIMIT - 1024:
        parser.error(f"--bytes must be between 1 and {LIMIT - 1024}")
    if args.calls < 1 or args.warmup < 0:
        parser.error("--calls must be at least 1 and --warmup at least 0")

    port = args.port or _free_port()
    with tempfile.TemporaryDirectory(prefix="grpc-patterns-") as scratch:
        rows = measure(f"127.0.0.1:{port}", args.bytes, args.calls, args.warmup)
        rows += measure(
            f"unix://{scratch}/bench.sock", args.bytes, args.calls, args.warmup
        )
    print(
        f"{args.calls} messages of {args.bytes} bytes per pattern, one in flight, "
        f"server in another process; {os.cpu_count()} CPUs"
    )
    print(render(rows))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
