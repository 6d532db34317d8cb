"""``python -m cerebellum_service``: run a cerebellum as a standalone gRPC server.

Examples::

    python -m cerebellum_service --port 0 --token-file token.txt
    CCDNI_TOKEN=... python -m cerebellum_service --port 50061 \\
        --zones state_0:256:256,output_0:128:128 --granule-width 512

The first line on stdout is the bound ``host:port``; logs go to stderr. Without
``--zones`` the server waits for a ``Configure`` call. SIGTERM or SIGINT stops it
gracefully (in-flight calls finish).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import torch

from cerebellum_service.config import (
    PRECISIONS,
    CerebellumConfig,
    ConfigError,
    resolve_precision,
)
from cerebellum_service.servicer import SERVICE_NAME, CerebellumServicer, add_to_server
from protos.service import (
    add_standalone_arguments,
    message_bytes_from_args,
    security_from_args,
    serve_forever,
    start_server,
)

logger = logging.getLogger("cerebellum_service")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cerebellum_service",
        description="Serve cerebellar microzones over gRPC (ccdni.v1.Cerebellum).",
    )
    add_standalone_arguments(parser)
    cerebellum = parser.add_argument_group("cerebellum")
    cerebellum.add_argument(
        "--zones",
        help="microzones to start with, as NAME:IN:OUT[,NAME:IN:OUT...] or a JSON "
        "list of zone maps; without it the server waits for Configure",
    )
    cerebellum.add_argument(
        "--granule-width",
        type=int,
        default=400,
        help="granule cells per layer for --zones NAME:IN:OUT (default %(default)s)",
    )
    cerebellum.add_argument("--lr", type=float, default=1e-3, help="Adam rate")
    cerebellum.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="arithmetic of the --zones microzones (default auto: bfloat16 where "
        "this CPU or GPU computes it natively, else float32; weights stay float32)",
    )
    cerebellum.add_argument(
        "--cache-size",
        type=int,
        default=4096,
        help="activities kept for observed feedback still to come",
    )
    cerebellum.add_argument(
        "--checkpoint-dir",
        help="confine Checkpoint and Restore paths to this directory",
    )
    cerebellum.add_argument(
        "--workers", type=int, default=16, help="threads answering calls"
    )
    cerebellum.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads of torch (default 1: predictions and the learner "
        "each keep to a core)",
    )
    cerebellum.add_argument(
        "--log-level", default="INFO", help="logging level (DEBUG, INFO, ...)"
    )
    return parser.parse_args(argv)


def zones_from_flag(text: str, granule_width: int) -> list[dict]:
    """The zone maps of ``--zones``.

    Raises:
        ValueError: neither a JSON list nor ``NAME:IN:OUT`` entries.
    """
    text = text.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--zones: is not valid JSON ({error})") from error
    zones = []
    for entry in text.split(","):
        parts = entry.strip().split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise ValueError(
                f"--zones: entry {entry!r} is not NAME:IN:OUT (e.g. state_0:64:64)"
            )
        zones.append(
            {
                "name": parts[0],
                "in_features": int(parts[1]),
                "out_features": int(parts[2]),
                "granule_width": granule_width,
            }
        )
    return zones


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    torch.set_num_threads(args.torch_threads)

    try:
        security = security_from_args(args)
        security.require_auth_choice()
        max_bytes = message_bytes_from_args(args)
        config = None
        if args.zones:
            config = CerebellumConfig.from_dict(
                {
                    "zones": zones_from_flag(args.zones, args.granule_width),
                    "lr": args.lr,
                    "cache_size": args.cache_size,
                    "compute_dtype": resolve_precision(args.precision),
                }
            )
            logger.info("microzones compute in %s", config.compute_dtype)
    except (ValueError, ConfigError) as error:
        logger.error("%s", error)
        return 2

    servicer = CerebellumServicer(config, checkpoint_dir=args.checkpoint_dir)
    server = start_server(
        lambda grpc_server: add_to_server(servicer, grpc_server),
        security=security,
        service_names=[SERVICE_NAME],
        host=args.host,
        port=args.port,
        max_message_bytes=max_bytes,
        max_workers=args.workers,
        on_stop=[servicer.close],
    )
    serve_forever(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
