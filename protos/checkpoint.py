"""Atomic checkpoints: write to a temporary file, fsync, rename; never half a file.

A run's checkpoints live in ``DIR/checkpoints/step-NNNNNNNN/``. Every actor writes
its own state file there and then a small msgpack manifest naming the file, its
size and its SHA-256. A step is *complete* when every expected actor's manifest
is there and every file matches it; resuming takes the newest complete step, so a
crash in the middle of writing one leaves the one before it in charge.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import torch

logger = logging.getLogger(__name__)

STEP_PREFIX = "step-"


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"{STEP_PREFIX}{step:08d}"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one.

    The bytes go to a temporary file in the same directory, flushed to disk and
    renamed over ``path``, and the directory is synced so the rename survives a
    crash. On any failure the temporary file is removed and ``path`` is untouched.

    Raises:
        OSError: as raised by the file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_state(
    root: str | Path, step: int, actor: str, state: dict[str, Any]
) -> tuple[Path, int]:
    """Write ``actor``'s state for ``step``, then its manifest; returns path, bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    directory = step_dir(root, step)
    path = directory / f"{actor}.pt"
    started = time.perf_counter()
    atomic_write(path, data)
    manifest = {
        "actor": actor,
        "step": step,
        "file": path.name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "written_at": time.time(),
    }
    atomic_write(directory / f"{actor}.manifest", msgpack.packb(manifest))
    logger.debug(
        "%s: checkpoint of step %d, %d bytes in %.3f s",
        actor,
        step,
        len(data),
        time.perf_counter() - started,
    )
    return path, len(data)


def verify(directory: Path, actor: str) -> bool:
    """Whether ``actor``'s file in ``directory`` is there and matches its manifest."""
    try:
        manifest = msgpack.unpackb((directory / f"{actor}.manifest").read_bytes())
        data = (directory / manifest["file"]).read_bytes()
    except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException):
        return False
    return len(data) == manifest["bytes"] and (
        hashlib.sha256(data).hexdigest() == manifest["sha256"]
    )


def load_state(directory: Path, actor: str) -> dict[str, Any]:
    """``actor``'s state from a step directory, checked against its manifest."""
    if not verify(directory, actor):
        raise ValueError(
            f"{directory / (actor + '.pt')} is missing or does not match its manifest"
        )
    return torch.load(directory / f"{actor}.pt", weights_only=False)


def complete_steps(root: str | Path, actors: list[str]) -> list[int]:
    """Steps whose checkpoint is complete for every actor, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = []
    for directory in root.iterdir():
        if not directory.name.startswith(STEP_PREFIX):
            continue
        try:
            step = int(directory.name[len(STEP_PREFIX) :])
        except ValueError:
            continue
        if all(verify(directory, actor) for actor in actors):
            steps.append(step)
        elif any(
            (directory / f"{actor}{suffix}").exists()
            for actor in actors
            for suffix in (".manifest", ".pt")
        ):
            logger.warning("checkpoint %s is incomplete or corrupt; skipped", directory)
        # else: a step none of these actors wrote (the cerebellum checkpoints less
        # often than the chunks), nothing to warn about
    return sorted(steps, reverse=True)


def latest_complete(root: str | Path, actors: list[str]) -> int | None:
    steps = complete_steps(root, actors)
    return steps[0] if steps else None
