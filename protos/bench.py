"""Loopback benchmark of the wire schema and tensor codec.

``python -m protos.bench [--json PATH] [--quick]`` starts a real gRPC server on
127.0.0.1 (port 0) in this process, serving ``SinkCortex``, and measures:

- round-trip latency of one activity (encode, one-frame PushActivity call,
  reassemble and decode on the server, Ack back) for 4 KiB, 256 KiB and 4 MiB
  outputs;
- sustained client-stream throughput of 4 MiB activities, with the codec on both
  ends and with a pre-encoded frame (wire only);
- throughput of 64 MiB activities split into parts by ``split_frames``.

Client and server share one process and its GIL; in a real run they are separate
processes and do not contend for it. ``SinkCortex`` and ``start_server`` double
as the test servicer in tests/test_codec.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import torch

from protos import ccdni_pb2 as pb
from protos import ccdni_pb2_grpc as pb_grpc
from protos.codec import (
    MAX_MESSAGE_BYTES,
    CodecError,
    decode_frames,
    encode,
    grpc_options,
    split_frames,
)

logger = logging.getLogger(__name__)

KIB = 1024
MIB = 1024 * KIB


class SinkCortex(pb_grpc.CortexServicer):
    """A Cortex stand-in: reassembles and decodes what it is sent, then acks.

    It exercises the receiving half of the codec exactly as a real chunk would
    (every tensor is decoded), and can keep what it decoded for tests to compare.
    Control RPCs other than Stats are left unimplemented (UNIMPLEMENTED).
    """

    def __init__(self, keep: bool = False) -> None:
        """Args: keep: store every decoded activity and feedback in ``received``."""
        self.keep = keep
        self.received: list[tuple[pb.ActivityKey, dict[str, torch.Tensor]]] = []
        self._lock = threading.Lock()
        self._counters = {"activities": 0.0, "feedbacks": 0.0, "bytes": 0.0}

    def PushActivity(self, request_iterator, context):  # noqa: N802 (gRPC name)
        """Decode every activity of the stream; ack the count at its end."""
        return self._sink(request_iterator, context, "activity", "activities")

    def PushFeedback(self, request_iterator, context):  # noqa: N802 (gRPC name)
        """Decode every feedback of the stream; ack the count at its end."""
        return self._sink(request_iterator, context, "feedback", "feedbacks")

    def Stats(self, request, context):  # noqa: N802 (gRPC name)
        """Counters: activities, feedbacks, and tensor bytes decoded."""
        with self._lock:
            counters = dict(self._counters)
        if request.names:
            counters = {k: v for k, v in counters.items() if k in request.names}
        return pb.StatsReply(counters=counters)

    def _sink(self, frames, context, body: str, counter: str) -> pb.Ack:
        accepted = 0
        try:
            for frame, tensors in decode_frames(frames, stream=body):
                size = sum(t.numel() * t.element_size() for t in tensors.values())
                with self._lock:
                    self._counters[counter] += 1
                    self._counters["bytes"] += size
                    if self.keep:
                        self.received.append((getattr(frame, body).key, tensors))
                accepted += 1
        except CodecError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        return pb.Ack(accepted=accepted)


def start_server(
    servicer: pb_grpc.CortexServicer,
    max_bytes: int = MAX_MESSAGE_BYTES,
    workers: int = 4,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server for a Cortex servicer on 127.0.0.1, port chosen by the OS.

    Returns:
        The started server (call ``stop``) and its port.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        options=grpc_options(max_bytes),
    )
    pb_grpc.add_CortexServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def activity_frame(outputs: torch.Tensor, batch: int = 0) -> pb.ActivityFrame:
    """One whole ActivityFrame holding ``outputs`` (no state), keyed by ``batch``."""
    frame = pb.ActivityFrame()
    frame.activity.key.run = "bench"
    frame.activity.key.batch = batch
    encode(outputs, out=frame.activity.outputs)
    return frame


def outputs_of(size_bytes: int) -> torch.Tensor:
    """A float32 (B, T, H) outputs tensor of exactly ``size_bytes`` bytes."""
    elements = size_bytes // 4
    hidden = min(256, elements)
    steps = min(64, elements // hidden)
    batch = elements // (hidden * steps)
    if batch * steps * hidden * 4 != size_bytes:
        raise ValueError(
            f"size_bytes={size_bytes} must be 4 * B * T * H for H=256, T=64 "
            "(any power of two from 4 KiB up works)"
        )
    return torch.randn(batch, steps, hidden, generator=torch.Generator().manual_seed(0))


@dataclass
class Latency:
    """Round-trip latency of one activity, in milliseconds."""

    size_bytes: int
    samples: int
    median_ms: float
    p99_ms: float


@dataclass
class Throughput:
    """Sustained client-stream throughput."""

    name: str
    message_bytes: int
    messages: int
    seconds: float
    mb_per_s: float


def measure_latency(
    stub: pb_grpc.CortexStub, size_bytes: int, samples: int, warmup_s: float = 0.5
) -> Latency:
    """Time ``samples`` one-activity PushActivity calls, codec included.

    ``size_bytes`` 0 times a unary Stats call instead: the floor that gRPC alone
    puts under every round trip. Calls during the first ``warmup_s`` seconds are
    not counted; the first few hundred calls on a fresh channel run several
    times slower (thread pools, allocator, CPU frequency).
    """
    outputs = outputs_of(size_bytes) if size_bytes else None
    times = []
    warm_until = time.perf_counter() + warmup_s
    index = 0
    while len(times) < samples:
        start = time.perf_counter()
        if outputs is None:
            stub.Stats(pb.StatsRequest())
        else:
            ack = stub.PushActivity(iter([activity_frame(outputs, index)]))
            if ack.accepted != 1:
                raise RuntimeError(f"server accepted {ack.accepted} activities; sent 1")
        end = time.perf_counter()
        if start >= warm_until:
            times.append((end - start) * 1e3)
        index += 1

    times.sort()
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    return Latency(size_bytes, samples, statistics.median(times), p99)


def measure_stream(
    stub: pb_grpc.CortexStub,
    name: str,
    frames: Iterable[pb.ActivityFrame],
    messages: int,
    message_bytes: int,
) -> Throughput:
    """Push ``frames`` over one client stream; report payload MB/s (1 MB = 1e6 B)."""
    start = time.perf_counter()
    ack = stub.PushActivity(iter(frames))
    seconds = time.perf_counter() - start
    if ack.accepted != messages:
        raise RuntimeError(
            f"server accepted {ack.accepted} activities; sent {messages}"
        )

    mb_per_s = messages * message_bytes / seconds / 1e6
    return Throughput(name, message_bytes, messages, seconds, mb_per_s)


def encoded_stream(outputs: torch.Tensor, messages: int) -> Iterator[pb.ActivityFrame]:
    """Encode each activity as it is sent, as a chunk would."""
    for index in range(messages):
        yield activity_frame(outputs, index)


def split_stream(
    outputs: torch.Tensor, messages: int, part_bytes: int
) -> Iterator[pb.ActivityFrame]:
    """Encode each activity and split it into parts of ``part_bytes``."""
    for index in range(messages):
        header = pb.ActivityFrame()
        header.activity.key.run = "bench"
        header.activity.key.batch = index
        yield from split_frames(
            header, {"activity.outputs": outputs}, part_bytes=part_bytes
        )


def run(quick: bool = False) -> dict:
    """Run every measurement; return the results as a JSON-ready dict."""
    servicer = SinkCortex()
    server, port = start_server(servicer)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options())
    stub = pb_grpc.CortexStub(channel)
    scale = 4 if quick else 1
    try:
        latencies = [
            measure_latency(stub, 0, 400 // scale),
            measure_latency(stub, 4 * KIB, 400 // scale),
            measure_latency(stub, 256 * KIB, 200 // scale),
            measure_latency(stub, 4 * MIB, 100 // scale),
        ]

        big = outputs_of(4 * MIB)
        count = 256 // scale
        # Warm the stream path (allocator, HTTP/2 windows) before timing it.
        measure_stream(stub, "warmup", encoded_stream(big, 8), 8, 4 * MIB)
        pre_encoded = activity_frame(big)
        huge = outputs_of(64 * MIB)
        huge_count = 16 // scale
        throughputs = [
            measure_stream(
                stub,
                "4 MiB, codec both ends",
                encoded_stream(big, count),
                count,
                4 * MIB,
            ),
            measure_stream(
                stub,
                "4 MiB, pre-encoded frame",
                itertools.repeat(pre_encoded, count),
                count,
                4 * MIB,
            ),
            measure_stream(
                stub,
                "64 MiB in 4 MiB parts",
                split_stream(huge, huge_count, 4 * MIB),
                huge_count,
                64 * MIB,
            ),
        ]
    finally:
        channel.close()
        server.stop(grace=None)

    return {
        "machine": machine(),
        "latency": [asdict(item) for item in latencies],
        "throughput": [asdict(item) for item in throughputs],
    }


def machine() -> dict:
    """Describe where the numbers came from."""
    return {
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def markdown(results: dict) -> str:
    """Render results as two small Markdown tables."""
    lines = [
        "| round trip | median ms | p99 ms | samples |",
        "| --- | ---: | ---: | ---: |",
    ]
    for item in results["latency"]:
        size = item["size_bytes"]
        label = f"{_size(size)} activity" if size else "Stats (unary, no tensor)"
        lines.append(
            f"| {label} | {item['median_ms']:.3f} | "
            f"{item['p99_ms']:.3f} | {item['samples']} |"
        )
    lines += [
        "",
        "| client stream | MB/s | messages | seconds |",
        "| --- | ---: | ---: | ---: |",
    ]
    for item in results["throughput"]:
        lines.append(
            f"| {item['name']} | {item['mb_per_s']:.0f} | {item['messages']} | "
            f"{item['seconds']:.2f} |"
        )
    return "\n".join(lines)


def _size(size_bytes: int) -> str:
    if size_bytes >= MIB:
        return f"{size_bytes // MIB} MiB"
    return f"{size_bytes // KIB} KiB"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m protos.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument(
        "--quick", action="store_true", help="a quarter of the samples (smoke test)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    results = run(quick=args.quick)
    sys.stdout.write(markdown(results) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
