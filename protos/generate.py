"""Regenerate the Python modules of the wire schema from ``protos/ccdni.proto``.

Usage, from anywhere::

    python -m protos.generate          # rewrite the committed modules
    python -m protos.generate --check  # exit 1 if they differ from fresh output

protoc runs with the repository root as its only include path, so the descriptor
records the file as ``protos/ccdni.proto`` and the gRPC module imports
``from protos import ccdni_pb2``. The output depends on the grpcio-tools version
(it embeds its protoc and plugin versions); the committed files record it.
"""

from __future__ import annotations

import argparse
import filecmp
import logging
import shutil
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("protos") / "ccdni.proto"
GENERATED = (
    Path("protos") / "ccdni_pb2.py",
    Path("protos") / "ccdni_pb2_grpc.py",
    Path("protos") / "ccdni_pb2.pyi",
)


class GenerateError(RuntimeError):
    """protoc failed or is unavailable."""


def generate_into(out_dir: Path) -> list[Path]:
    """Run protoc on the schema, writing the generated modules under ``out_dir``.

    Args:
        out_dir: root of the output tree; files land in ``out_dir/protos/``.

    Returns:
        The generated file paths, in the order of ``GENERATED``.

    Raises:
        GenerateError: grpcio-tools is missing or protoc reported an error.
    """
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise GenerateError(
            "grpcio-tools is not installed; install the dev extra: "
            "pip install -e '.[dev]'"
        ) from exc

    out_dir = Path(out_dir)
    (out_dir / "protos").mkdir(parents=True, exist_ok=True)
    argv = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(REPO_ROOT / PROTO),
    ]
    status = protoc.main(argv)
    if status != 0:
        raise GenerateError(
            f"protoc exited with status {status} on {PROTO}; see its messages above"
        )

    return [out_dir / rel for rel in GENERATED]


def drifted_files(repo_root: Path = REPO_ROOT) -> list[Path]:
    """Generate into a temporary folder and list committed files that differ.

    Returns:
        Paths, relative to the repository root, of generated modules whose bytes
        differ from fresh protoc output (or that are missing). Empty when in sync.
    """
    with tempfile.TemporaryDirectory(prefix="ccdni-protos-") as tmp:
        fresh = generate_into(Path(tmp))
        return [
            rel
            for rel, new in zip(GENERATED, fresh, strict=True)
            if not (repo_root / rel).is_file()
            or not filecmp.cmp(repo_root / rel, new, shallow=False)
        ]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m protos.generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare fresh output with the committed files; exit 1 on drift",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        if args.check:
            stale = drifted_files()
            for rel in stale:
                logger.error("%s differs from protoc output of %s", rel, PROTO)
            if stale:
                logger.error("run `python -m protos.generate` and commit the result")
                return 1
            logger.info("generated modules match %s", PROTO)
            return 0

        # Generate beside the tree first so a protoc error leaves the committed
        # files untouched.
        with tempfile.TemporaryDirectory(prefix="ccdni-protos-") as tmp:
            fresh = generate_into(Path(tmp))
            for rel, new in zip(GENERATED, fresh, strict=True):
                shutil.copyfile(new, REPO_ROOT / rel)
                logger.info("wrote %s", rel)
    except GenerateError as exc:
        logger.error("%s", exc)
        return 2

    return 0


if __name__ == "__main__":
    sys.exit(main())
