"""Settings of an actor's own process, applied once when it starts.

None changes what an actor computes, only how its process shares the
machine: :func:`lower_priority` lets the chunks win cores from the cerebellum
where they share them, :func:`batch_scheduling` stops a thread woken by a
message from preempting one that computes, :func:`keep_freed_memory` stops the
allocator from handing window-sized buffers back to the kernel after every use.
:func:`thread_names` tells a profiler which thread is which.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

# The lowest CPU priority (highest niceness) Linux and POSIX systems allow.
MAX_NICE = 19
# Linux lists a process's threads here; priorities and policies are per thread.
_TASKS = "/proc/self/task"
# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, not from a mapping of their own
# (glibc's largest allowed value on 64-bit machines).
MMAP_THRESHOLD = 32 << 20
# Free memory at the top of a heap is returned to the kernel only beyond this.
TRIM_THRESHOLD = 256 << 20


def lower_priority(increment: int) -> int:
    """Lower the CPU priority of every thread of this process by ``increment``.

    The cerebellum's work is off the chunks' critical path (a chunk takes a
    window's prediction one window later, and learning runs beside), so where
    it shares cores with chunks it should yield them: a chunk that waits for a
    core delays every chunk above it, a prediction that waits has a window of
    slack. Only contention changes anything; a process alone on its cores runs
    as fast at any priority. Linux priorities are per thread, hence the loop
    over ``/proc/self/task``; elsewhere ``os.nice`` lowers the process.

    Returns:
        the niceness of the calling thread afterwards (0 to ``MAX_NICE``); the
        increment is capped where it would pass ``MAX_NICE``. Raising a
        priority back would need privileges, so this only ever lowers it.
    """
    if increment < 0:
        raise ValueError(f"nice increment must be at least 0, got {increment}")
    if increment == 0:
        return os.getpriority(os.PRIO_PROCESS, 0)
    if not os.path.isdir(_TASKS):
        return os.nice(increment)

    def lower(tid: int) -> None:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(MAX_NICE, current + increment))

    _each_thread(lower)
    return os.getpriority(os.PRIO_PROCESS, 0)


def batch_scheduling() -> int:
    """Schedule every thread of this process as a batch job (Linux's SCHED_BATCH).

    An actor is throughput work: what matters is how many windows it computes
    per second, not how soon one of its threads runs after waking. Under the
    default policy each wake-up of a gRPC, Ray or handler thread (thousands a
    second in a decoupled run) may preempt whatever computes on that core, and
    the preempted pass comes back to caches another thread has refilled. A
    batch thread that wakes waits for the next scheduler tick or a free core
    instead; batch threads still share cores fairly by niceness, and a thread
    blocked on a message still yields its core at once. On two shared cores
    (``ccdni bench``'s default configuration) the critical chunk's forced
    switches fell from about 900 to 380 a second. Threads inherit the policy
    from the thread that starts them, so call this before starting servers.

    Returns:
        how many threads now run under SCHED_BATCH; 0 where the platform has
        no such policy (nothing changes there).
    """
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None or not os.path.isdir(_TASKS):
        return 0
    return _each_thread(
        lambda tid: os.sched_setscheduler(tid, policy, os.sched_param(0))
    )


def _each_thread(apply: Callable[[int], None]) -> int:
    """Call ``apply`` with the id of every thread of this process (Linux's
    ``/proc/self/task``); returns how many it reached. A thread that ends
    meanwhile is skipped."""
    reached = 0
    for name in os.listdir(_TASKS):
        try:
            apply(int(name))
        except (ProcessLookupError, PermissionError):
            continue  # a thread that ended meanwhile
        reached += 1
    return reached


def keep_freed_memory() -> bool:
    """Keep freed window-sized buffers in the process for the next window.

    A window's tensors and messages are a few hundred KiB to a few MiB each:
    above glibc's initial mapping threshold, so each one was mapped on
    allocation and unmapped when freed, and every page of the next window's
    buffers faulted in again, zeroed by the kernel. A chunk that sends and asks
    the cerebellum every window took about 46,000 page faults a second that
    way (``ccdni bench``'s default configuration), 4 ms of CPU per step; with
    these thresholds about 1,000. The cost is that a process keeps the memory
    of its largest step until it exits.

    Returns:
        whether the allocator took the settings (glibc only; elsewhere nothing
        changes and this returns ``False``).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not applied:
        logger.warning("the allocator refused mallopt; buffers stay mapped per use")
    return applied


def thread_names(labels: Mapping[int, str] | None = None) -> dict[int, str]:
    """Python's name for each thread of this process, by native thread id, with
    ``labels`` (id to name) put over them.

    Threads that Python never ran code on, such as gRPC's own, are missing;
    the kernel's name for them is in ``/proc/<pid>/task/<tid>/comm``.
    """
    names = {
        thread.native_id: thread.name
        for thread in threading.enumerate()
        if thread.native_id is not None
    }
    names.update(labels or {})
    return names
