"""The committed generated modules must be exactly what protoc makes of the schema.

protoc's output depends on the grpcio-tools version, which the generated gRPC
module records as GRPC_GENERATED_VERSION; a failure quotes both versions.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil

import pytest

pytest.importorskip(
    "grpc_tools", reason="grpcio-tools (dev extra) generates the modules; not installed"
)

from protos import generate  # noqa: E402 (after the skip on purpose)

REGENERATE = "run `python -m protos.generate` and commit the three generated files"


def _versions() -> str:
    committed = generate.REPO_ROOT / "protos" / "ccdni_pb2_grpc.py"
    found = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", committed.read_text())
    recorded = found.group(1) if found else "unknown"
    installed = importlib.metadata.version("grpcio-tools")
    return f"committed files made by grpcio-tools {recorded}; installed {installed}"


@pytest.mark.parametrize("relative", generate.GENERATED, ids=str)
def test_generated_module_matches_schema(tmp_path, relative):
    fresh = generate.generate_into(tmp_path)[generate.GENERATED.index(relative)]
    committed = generate.REPO_ROOT / relative

    assert committed.is_file(), f"{relative} is missing; {REGENERATE}"
    assert committed.read_bytes() == fresh.read_bytes(), (
        f"{relative} differs from protoc output of {generate.PROTO} "
        f"({_versions()}); {REGENERATE}"
    )


def test_check_detects_drift(tmp_path):
    for relative in generate.GENERATED:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(generate.REPO_ROOT / relative, tmp_path / relative)
    stale = tmp_path / generate.GENERATED[1]
    stale.write_text(stale.read_text() + "\n# edited by hand\n")

    assert generate.drifted_files(tmp_path) == [generate.GENERATED[1]]


def test_check_command_passes_on_committed_files():
    assert generate.main(["--check"]) == 0, REGENERATE


def test_grpc_module_imports_schema_package_relative():
    import protos.ccdni_pb2_grpc as grpc_module

    source = (generate.REPO_ROOT / "protos" / "ccdni_pb2_grpc.py").read_text()
    assert "from protos import ccdni_pb2" in source
    assert hasattr(grpc_module, "CortexStub") and hasattr(grpc_module, "CerebellumStub")
