"""``python -m cortex_service``: serve one cortical chunk's wires over gRPC.

Examples::

    python -m cortex_service --port 0 --token-file token.txt --chunk 1 \\
        --input-size 256 --hidden 256
    CCDNI_TOKEN=... python -m cortex_service --port 50051 --chunk 0 --input-size 28

The first line on stdout is the bound ``host:port``; logs go to stderr. The
server accepts activity from the chunk below and observed feedback from the
chunk above into bounded mailboxes (``--max-in-flight`` windows each); a full
mailbox stalls the sender. A training run drives the chunk through its Ray actor
(``ccdni train --distributed``); standalone, the server is for wiring checks and
for tools that speak the protocol. SIGTERM or SIGINT stops it gracefully.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cortex_service.runtime import Mailbox
from cortex_service.servicer import CortexServicer, add_to_server
from protos.service import (
    add_standalone_arguments,
    message_bytes_from_args,
    security_from_args,
    serve_forever,
    start_server,
)

logger = logging.getLogger("cortex_service")

SERVICE_NAME = "ccdni.v1.Cortex"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cortex_service",
        description="Serve one cortical chunk's inbound wires (ccdni.v1.Cortex).",
    )
    add_standalone_arguments(parser)
    chunk = parser.add_argument_group("chunk")
    chunk.add_argument("--chunk", type=int, default=0, help="this chunk's index")
    chunk.add_argument(
        "--input-size", type=int, required=True, help="width of incoming activity"
    )
    chunk.add_argument("--hidden", type=int, default=256, help="LSTM units per layer")
    chunk.add_argument(
        "--max-in-flight", type=int, default=2, help="windows each mailbox holds"
    )
    chunk.add_argument(
        "--workers", type=int, default=16, help="threads answering calls"
    )
    chunk.add_argument("--log-level", default="INFO", help="DEBUG, INFO, ...")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        security = security_from_args(args)
        security.require_auth_choice()
        max_bytes = message_bytes_from_args(args)
        if args.chunk < 0:
            raise ValueError(f"--chunk: {args.chunk}; expected 0 or more")
        for flag, value in (
            ("--input-size", args.input_size),
            ("--hidden", args.hidden),
            ("--max-in-flight", args.max_in_flight),
        ):
            if value < 1:
                raise ValueError(f"{flag}: {value}; expected at least 1")
    except ValueError as error:
        logger.error("%s", error)
        return 2

    servicer = CortexServicer(
        args.chunk,
        args.input_size,
        args.hidden,
        Mailbox(args.max_in_flight, f"chunk-{args.chunk}.activity_in"),
        Mailbox(args.max_in_flight, f"chunk-{args.chunk}.feedback_in"),
    )
    server = start_server(
        lambda grpc_server: add_to_server(servicer, grpc_server),
        security=security,
        service_names=[SERVICE_NAME],
        host=args.host,
        port=args.port,
        max_message_bytes=max_bytes,
        max_workers=args.workers,
    )
    serve_forever(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
