"""Task names and the one function that builds a task by name.

Every builder takes the same keyword arguments, so a new task (``captions``, for
one) is added by writing its builder and adding one entry to ``_BUILDERS``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from orchestrator.tasks.base import TaskData
from orchestrator.tasks.captions import make_captions_task
from orchestrator.tasks.digits import (
    make_digit_lines_task,
    make_digits_task,
    make_patterns_task,
)
from orchestrator.tasks.line import make_line_task

Builder = Callable[..., TaskData]


def _line(*, seed: int, data_dir: str | Path | None, n_train: int | None) -> TaskData:
    # The line task is generated, not read, so it has no use for data_dir.
    del data_dir
    return make_line_task(seed=seed, n_train=n_train)


# Each builder is called as builder(seed=..., data_dir=..., n_train=...).
_BUILDERS: dict[str, Builder] = {
    "line": _line,
    "digit-lines": make_digit_lines_task,
    "digits": make_digits_task,
    "patterns": make_patterns_task,
    "captions": make_captions_task,
}

TASKS: tuple[str, ...] = tuple(_BUILDERS)


def load_task(
    name: str,
    *,
    seed: int = 0,
    data_dir: str | None = None,
    n_train: int | None = None,
) -> TaskData:
    """Build the task called ``name``.

    Args:
        name: one of :data:`TASKS`.
        seed: seeds the task's draws and splits; the same seed gives the same data.
        data_dir: where tasks that read files look for them (the digit tasks use
            MNIST IDX files there when present); ignored by generated tasks.
        n_train: keep at most this many training sequences, to keep runs small.

    Raises:
        ValueError: ``name`` is not a known task, or ``seed`` or ``n_train`` is
            not a valid integer.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; known tasks are {', '.join(TASKS)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if n_train is not None and (
        isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 1
    ):
        raise ValueError(f"n_train must be a positive integer or None, got {n_train!r}")
    return _BUILDERS[name](seed=seed, data_dir=data_dir, n_train=n_train)
