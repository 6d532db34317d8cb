"""``python -m cerebellum_service.bench``: Predict latency of a real cerebellum server.

Starts ``python -m cerebellum_service`` as its own process on loopback (with a
token, as in a run), configures one state microzone and times
``RemoteCerebellum.predict`` end to end (encode, gRPC round trip, the microzone's
forward pass, decode):

- ``local``: ``LocalCerebellum.predict`` in this process, the compute floor;
- ``predict``: Predict calls alone, after a warm-up;
- ``predict+learn``: the same while every prediction's observed feedback
  streams back over Learn and the server's learner updates beside it.

Prints a Markdown table; ``--json PATH`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cerebellum_service.client import RemoteCerebellum
from cerebellum_service.config import CerebellumConfig
from cerebellum_service.learning import ActivityKey, Observation, Query
from protos.service import ClientSecurity

logger = logging.getLogger(__name__)

ZONE = "state_0"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cerebellum_service.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--width", type=int, default=256, help="zone in = out")
    parser.add_argument("--granule-width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="activity rows")
    parser.add_argument(
        "--context-size", type=int, default=0, help="context inputs of the zone (0)"
    )
    parser.add_argument("--calls", type=int, default=500, help="timed calls a phase")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--server-torch-threads",
        type=int,
        default=1,
        help="torch threads of the server (its --torch-threads)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def percentiles(samples_s: Sequence[float]) -> dict[str, float]:
    """Median, p90, p99, mean and max of latencies, in milliseconds."""
    ordered = sorted(samples_s)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1e3

    return {
        "median_ms": statistics.median(ordered) * 1e3,
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "mean_ms": statistics.fmean(ordered) * 1e3,
        "max_ms": ordered[-1] * 1e3,
    }


def time_calls(fn: Callable[[int], object], calls: int, warmup: int) -> list[float]:
    for index in range(warmup):
        fn(-1 - index)
    samples = []
    for index in range(calls):
        start = time.perf_counter()
        fn(index)
        samples.append(time.perf_counter() - start)
    return samples


def start_server(token_file: Path, torch_threads: int) -> tuple[subprocess.Popen, str]:
    """A ``python -m cerebellum_service`` process and the address it printed."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cerebellum_service",
            "--port",
            "0",
            "--token-file",
            str(token_file),
            "--torch-threads",
            str(torch_threads),
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    address = process.stdout.readline().strip()
    if not address:
        process.kill()
        raise RuntimeError(
            f"the server exited with {process.wait()} before printing its address"
        )
    return process, address


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    zones = [
        {
            "name": ZONE,
            "in_features": args.width,
            "out_features": args.width,
            "granule_width": args.granule_width,
            "context_size": args.context_size,
            "seed": 1,
        }
    ]
    generator = torch.Generator().manual_seed(0)
    # (64, 256) activity, as the state of a chunk with 2·L·H = 256.
    activity = torch.randn(args.batch, args.width, generator=generator)
    feedback = torch.randn(args.batch, args.width, generator=generator) * 0.1
    context = (
        torch.randn(args.batch, args.context_size, generator=generator)
        if args.context_size
        else None
    )
    results: dict = {
        "config": {
            "width": args.width,
            "granule_width": args.granule_width,
            "batch": args.batch,
            "context_size": args.context_size,
            "calls": args.calls,
            "warmup": args.warmup,
            "server_torch_threads": args.server_torch_threads,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.is_available(),
            # Other work on the machine inflates the tails; recorded for honesty.
            "load_average_1min": os.getloadavg()[0],
        },
        "phases": {},
    }

    local = CerebellumConfig.from_dict({"zones": zones}).build()

    def local_predict(index: int) -> None:
        local.predict([Query(ZONE, ActivityKey(index, 0), activity, context)])

    results["phases"]["local"] = percentiles(
        time_calls(
            local_predict,
            args.calls,
            args.warmup,
        )
    )

    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as scratch:
        token_file = Path(scratch) / "token"
        token_file.write_text(token)
        process, address = start_server(token_file, args.server_torch_threads)
        try:
            results["address"] = address
            results["phases"].update(
                remote_phases(address, token, zones, activity, feedback, context, args)
            )
        finally:
            process.terminate()
            process.wait(timeout=10)
    return results


def remote_phases(
    address: str,
    token: str,
    zones: list[dict],
    activity: torch.Tensor,
    feedback: torch.Tensor,
    context: torch.Tensor | None,
    args: argparse.Namespace,
) -> dict:
    phases = {}
    with RemoteCerebellum(address, ClientSecurity(token=token)) as remote:
        remote.wait_ready(10)
        remote.configure(zones, cache_size=8192)

        def predict(index: int) -> None:
            remote.predict([Query(ZONE, ActivityKey(index, 0), activity, context)])

        phases["predict"] = percentiles(time_calls(predict, args.calls, args.warmup))

        before = remote.stats(["updates"])["updates"]

        def predict_and_learn(index: int) -> None:
            key = ActivityKey(10**6 + index, 0)
            remote.predict([Query(ZONE, key, activity, context)])
            remote.observe([Observation(ZONE, key, feedback)])

        samples = time_calls(predict_and_learn, args.calls, args.warmup)
        remote.flush(30)
        phases["predict+learn"] = percentiles(samples)
        stats = remote.stats()
        phases["predict+learn"]["server_updates"] = stats["updates"] - before
        phases["predict+learn"]["observations_accepted"] = remote.counters.get(
            "accepted"
        )
    return phases


def markdown(results: dict) -> str:
    config, machine = results["config"], results["machine"]
    lines = [
        f"Predict latency, zone {config['width']}→{config['granule_width']}→"
        f"{config['width']}, batch {config['batch']}, {config['calls']} calls after "
        f"{config['warmup']} warm-up; {machine['cpus']} CPUs, "
        f"{'GPU' if machine['gpu'] else 'no GPU'}, torch {machine['torch']}, "
        f"load average {machine['load_average_1min']:.1f}",
        "",
        "| phase | median ms | p90 ms | p99 ms | mean ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, phase in results["phases"].items():
        lines.append(
            f"| {name} | {phase['median_ms']:.3f} | {phase['p90_ms']:.3f} | "
            f"{phase['p99_ms']:.3f} | {phase['mean_ms']:.3f} | {phase['max_ms']:.3f} |"
        )
    learn = results["phases"].get("predict+learn")
    if learn is not None:
        lines += [
            "",
            f"During predict+learn the server made {learn['server_updates']:.0f} "
            f"updates from {learn['observations_accepted']:.0f} observations.",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    results = run(args)
    sys.stdout.write(markdown(results) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
