"""``ccdni bench``: the wall-clock speed of every schedule on the same network.

One invocation trains the same cortical network, cut into the same chunks, under
each of ccdni's schedules (``locked``, ``pipelined``, ``decoupled``) and under
PyTorch's own pipeline schedules (``torch-gpipe``, ``torch-1f1b``; see
:mod:`orchestrator.baselines.torch_pipeline`). Every contender is started once,
warmed up, reset to the initial weights, and then measured in turns::

    start all ─ warm-up all ─┬─ repeat 0: A B C D E ─┬─ repeat 1: A B C D E ─ …
                             └ each turn: reset to step 0, train --steps steps in
                               segments of --eval-every, evaluate between segments
                               with the clock stopped

so that drift in the machine's load hits every contender alike. A turn is one
independent run from the same initial weights on the same batches: its speed
(steps per second over the measured segments), its learning curve against
measured seconds, the validation loss and metric it reaches after a fixed
number of examples, and the measured seconds it needs to reach a target
validation loss. A segment's seconds run from the first span of work on any
actor to the last (ccdni), or between two barriers (PyTorch): start-up,
evaluation and the driver's bookkeeping are outside.

From every actor's timeline the bench also derives where time goes (computing,
asking the cerebellum, sending, waiting), and from ``/proc`` each process's CPU
time and peak resident memory and how busy the whole machine was meanwhile.

With ``--sweep-chunks`` it measures throughput again for other numbers of chunks
(speed-up against the number of chunks). It writes ``bench.json`` (the
configuration and, per schedule and per baseline, steps per second, speed-up over
``locked`` and the loss reached; :data:`BENCH_SCHEMA` describes it), ``bench.md``
and PNG plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import queue
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cerebellum_service.config import PRECISIONS
from cortex_service.runtime import SCHEDULES
from orchestrator.baselines.torch_pipeline import SCHEDULES as TORCH_SCHEDULES
from orchestrator.config import (
    MODELS,
    OUTPUT_CONTEXT,
    ConfigError,
    TrainConfig,
    for_task,
)
from orchestrator.tasks.base import TaskData

logger = logging.getLogger(__name__)

ALL_SCHEDULES: tuple[str, ...] = (*SCHEDULES, *TORCH_SCHEDULES)
COMPUTE_PHASES = ("forward", "backward", "update")
# The speed-up over locked in steps/s that docs/BENCHMARKS.md sets decoupled as
# its target in the headline configuration (2× is the limit with two chunks);
# the findings judge the headline against it.
TARGET_SPEEDUP = 1.6
WAIT_PHASES = ("predict", "send", "wait_input", "wait_feedback")
DOC_BEGIN = "<!-- bench:begin (written by scripts/bench.sh; do not edit) -->"
DOC_END = "<!-- bench:end -->"


# Configuration ---------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """What ``ccdni bench`` measures; see ``ccdni bench --help``.

    Attributes:
        task: the task (its sequences, inputs and loss).
        model: ``crnn`` (no cerebellum, so only ``decoupled`` uses one, for the
            spatial cut between chunks), ``ccrnn`` (state microzones on every
            ccdni schedule) or ``bptt`` (one window). The PyTorch baselines have
            no cerebellum: they always train truncated BPTT.
        chunks: K, chunks of the cortex (one actor or process each).
        layers_per_chunk: LSTM layers per chunk.
        hidden_size: LSTM units per layer.
        truncation: window length T.
        seq_len: steps per sequence; only the task's own length is accepted.
        batch_size: sequences per batch.
        micro_batches: M for ``pipelined`` and the PyTorch schedules.
        steps: batches per measured run.
        repeats: measured runs per contender, interleaved.
        warmup: batches each contender trains (then forgets) before measuring.
        eval_every: batches between evaluations (the clock stops for them).
        schedules: contenders, in the order they take turns.
        threads: torch threads per actor or process.
        n_train: cap on training sequences (``None``: the task's own).
        granule_width: granule cells of each microzone (``None``: the task's).
            128 by default: on a CPU-only machine the cerebellum's compute
            competes with the chunks' for the cores (docs/BENCHMARKS.md).
        output_context: decoupled's output microzone gets the label and the
            time step (``--context --time-context --context-zones output``),
            with which decoupled learns as well as locked (docs/DISTRIBUTED.md).
        target_loss: validation loss for time-to-target (``None``: the loss
            ``locked`` ends its runs at, see :func:`choose_target`).
        target_steps: the most batches a run trains to reach the target loss
            (``None``: 4 × ``steps``). A run that has not reached it after its
            ``steps`` measured batches goes on, evaluating as before, until it
            does or has trained this many; the batches beyond ``steps`` count
            only towards time to target, not towards throughput or the loss
            after a fixed number of examples. The value of ``steps`` turns it
            off, and so does a default target without ``locked`` to set it.
        sweep_chunks: other numbers of chunks to measure throughput at.
        sweep_steps: batches per run in the sweep.
        seed: weights and batch order.
        cpus_per_actor: Ray's CPU reservation per actor without GPUs (bookkeeping
            only: it does not pin or limit anything).
        ray_address: join this Ray cluster (``None``: start a local one).
        gpus: one GPU per actor (``None``: when the cluster has enough).
        fresh: start every contender anew for each repeat instead of keeping all
            of them alive (needed where the cluster cannot hold them at once).
        park: stop the processes of every contender but the one taking its
            turn (``SIGSTOP``, ``SIGCONT`` for its turn), so that contenders
            waiting for their turn take no CPU from the one measured; only
            where :func:`parks` says it can.
        metrics: serve Prometheus ``/metrics`` from the actors, as a training run
            does (the bench itself reads nothing from it).
        timeline_seconds: seconds of the representative timelines to draw.
        cerebellum_nice: how far decoupled's cerebellum lowers its CPU priority
            (``--cerebellum-nice`` of training, the same default).
        cerebellum_precision: the dtype of decoupled's cerebellum's arithmetic
            and traffic (``--cerebellum-precision`` of training, the same
            default, ``auto``); the chunks compute in float32 under every
            schedule.
        batch_scheduling: ccdni's actors run their threads as batch jobs
            (``--batch-scheduling`` of training, the same default). The
            PyTorch stages keep the system's default policy, as their users
            would: under batch scheduling they measured slower.
        profile: also time, alone on the machine and with the run's shapes, a
            cerebellum's Predict (``python -m cerebellum_service.bench``), one
            window's activity sent between two processes, and a chunk's compute
            alone and side by side with copies of itself, to tell compute and
            transport from contention; and run ``decoupled`` once more with its
            cerebellum lesioned, to measure the slowest chunk's own pace, once
            with a cerebellum that answers zeros and computes nothing, to
            measure what its arithmetic costs, and once as measured, to read
            the CPU of every actor's threads.
    """

    task: str = "patterns"
    model: str = "crnn"
    chunks: int = 2
    layers_per_chunk: int = 1
    hidden_size: int = 256
    truncation: int = 7
    seq_len: int | None = None
    batch_size: int = 64
    micro_batches: int = 4
    steps: int = 60
    repeats: int = 3
    warmup: int = 3
    eval_every: int = 10
    schedules: tuple[str, ...] = ALL_SCHEDULES
    threads: int = 1
    n_train: int | None = None
    granule_width: int | None = 128
    output_context: bool = True
    target_loss: float | None = None
    target_steps: int | None = None
    sweep_chunks: tuple[int, ...] = ()
    sweep_steps: int = 20
    seed: int = 0
    cpus_per_actor: float = 0.5
    ray_address: str | None = None
    gpus: bool | None = None
    fresh: bool = False
    park: bool = True
    metrics: bool = True
    timeline_seconds: float | None = None
    profile: bool = False
    cerebellum_nice: int = 10
    batch_scheduling: bool = True
    cerebellum_precision: str = "auto"

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ConfigError(f"--model {self.model!r}: choose one of {MODELS}")
        positive = {
            "--chunks": self.chunks,
            "--layers-per-chunk": self.layers_per_chunk,
            "--hidden": self.hidden_size,
            "--truncation": self.truncation,
            "--batch-size": self.batch_size,
            "--micro-batches": self.micro_batches,
            "--steps": self.steps,
            "--repeats": self.repeats,
            "--eval-every": self.eval_every,
            "--threads": self.threads,
            "--sweep-steps": self.sweep_steps,
        }
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be 0 or more, got {self.warmup}")
        from orchestrator.cluster import (
            check_cerebellum_nice,
            check_cerebellum_precision,
        )

        check_cerebellum_nice(self.cerebellum_nice)
        check_cerebellum_precision(self.cerebellum_precision)
        if not self.schedules:
            raise ConfigError("--schedules is empty: name at least one schedule")
        unknown = [s for s in self.schedules if s not in ALL_SCHEDULES]
        if unknown:
            raise ConfigError(
                f"--schedules: unknown {', '.join(unknown)}; choose from "
                f"{', '.join(ALL_SCHEDULES)}"
            )
        if len(set(self.schedules)) != len(self.schedules):
            raise ConfigError(f"--schedules names one twice: {self.schedules}")
        bad = [k for k in self.sweep_chunks if k < 1]
        if bad:
            raise ConfigError(f"--sweep-chunks must be at least 1, got {bad}")
        if self.target_loss is not None and not self.target_loss > 0:
            raise ConfigError(f"--target-loss must be positive, got {self.target_loss}")
        if self.target_steps is not None and self.target_steps < self.steps:
            raise ConfigError(
                f"--target-steps {self.target_steps} is below --steps {self.steps}: "
                "a run trains at least its measured steps (--target-steps equal "
                "to --steps turns the chase for the target off)"
            )
        if self.micro_batches > self.batch_size:
            raise ConfigError(
                f"--micro-batches {self.micro_batches} exceeds --batch-size "
                f"{self.batch_size}"
            )
        largest = max((self.chunks, *self.sweep_chunks))
        if "torch-1f1b" in self.schedules and self.micro_batches < largest:
            raise ConfigError(
                f"torch-1f1b needs --micro-batches at least the number of chunks; "
                f"got {self.micro_batches} for {largest} chunks (--chunks, "
                "--sweep-chunks): raise --micro-batches or drop torch-1f1b"
            )

    @property
    def max_target_steps(self) -> int:
        """Batches a run may train in all to reach the target loss: ``steps``
        where nothing can chase it (a default target and no ``locked``)."""
        if self.target_loss is None and "locked" not in self.schedules:
            return self.steps
        return 4 * self.steps if self.target_steps is None else self.target_steps

    def train_config(self) -> TrainConfig:
        """The training configuration every contender shares."""
        return for_task(
            self.task,
            model=self.model,
            chunks=self.chunks,
            layers_per_chunk=self.layers_per_chunk,
            hidden_size=self.hidden_size,
            truncation=self.truncation,
            batch_size=self.batch_size,
            threads=self.threads,
            n_train=self.n_train,
            seed=self.seed,
            **(
                {}
                if self.granule_width is None
                else {"granule_width": self.granule_width}
            ),
            **(OUTPUT_CONTEXT if self.output_context else {}),
        )

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["schedules"] = list(self.schedules)
        record["sweep_chunks"] = list(self.sweep_chunks)
        record["max_target_steps"] = self.max_target_steps
        return record


QUICK = dict(
    hidden_size=32,
    batch_size=32,
    steps=4,
    repeats=2,
    warmup=1,
    eval_every=2,
    n_train=128,
)
"""What ``--quick`` changes (flags given explicitly still win): a smoke run."""


# Contenders ------------------------------------------------------------------------


@dataclass
class Segment:
    """One stretch of training between two evaluations.

    Attributes:
        seconds: the measured seconds (see the module docstring).
        driver_seconds: the same stretch timed by the driver, overheads included.
        losses: training loss per step.
        events: spans ``{chunk, phase, batch, window, micro, start, end}``,
            seconds since the epoch.
        cpu: CPU seconds each process spent meanwhile (where ``/proc`` tells).
        machine_busy: cores the whole machine kept busy meanwhile, on average.
        received: CPU seconds each chunk's server handlers spent receiving
            activity and feedback meanwhile (ccdni's chunks only).
    """

    seconds: float
    driver_seconds: float
    losses: dict[int, float]
    events: list[dict[str, Any]]
    cpu: dict[str, float] = field(default_factory=dict)
    machine_busy: float | None = None
    received: dict[str, float] = field(default_factory=dict)


class Contender(Protocol):
    """A way of training the network that the bench can time."""

    name: str
    kind: str  # "ccdni" or "torch"

    def launch(self) -> None: ...

    def reset(self) -> None: ...

    def train(self, start: int, stop: int) -> tuple[float, dict[int, float], list]: ...

    def evaluate(self) -> dict[str, Any]: ...

    def pids(self) -> dict[str, int]: ...

    def peak_rss(self) -> dict[str, int | None]: ...

    def shutdown(self) -> None: ...


class RaySchedule:
    """One of ccdni's schedules, as a :class:`~orchestrator.cluster.Cluster`."""

    kind = "ccdni"

    def __init__(
        self,
        name: str,
        config: TrainConfig,
        bench: BenchConfig,
        task: TaskData,
        scratch: Path,
        placement: Placement,
        lesion: str | None = None,
        answer_zeros: bool = False,
    ) -> None:
        from orchestrator.cluster import Cluster, DistributedConfig

        self.name = name
        # Profile probes only: the cerebellum's lesion from step 0, or a
        # cerebellum that answers zeros and computes nothing.
        self.lesion = lesion
        dist = DistributedConfig(
            schedule=name,
            micro_batches=bench.micro_batches if name == "pipelined" else 1,
            checkpoint_every=0,
            ray_address=bench.ray_address,
            cpus_per_actor=placement.cpus_per_actor,
            gpus=placement.gpus,
            metrics=bench.metrics,
            cerebellum_nice=bench.cerebellum_nice,
            batch_scheduling=bench.batch_scheduling,
            cerebellum_precision=bench.cerebellum_precision,
        )
        self.cluster = Cluster(config, dist, task, scratch / f"{name}-k{config.chunks}")
        self.cluster.cerebellum_answers_zeros = answer_zeros
        self._pids: dict[str, int] = {}
        self._handles: dict[str, Any] = {}

    def launch(self) -> None:
        import ray

        self.cluster.start()
        self._lesion()
        # The step-0 checkpoint is what reset() goes back to.
        self.cluster.save_checkpoint(0)
        names = self.cluster.actor_names
        handles = list(self.cluster.chunks)
        if self.cluster.cerebellum is not None:
            handles.append(self.cluster.cerebellum)
        self._handles = dict(zip(names, handles, strict=True))
        self._pids = dict(zip(names, ray.get([h.pid.remote() for h in handles])))

    @property
    def cerebellum_precision(self) -> str | None:
        return self.cluster.cerebellum_precision

    def reset(self) -> None:
        self.cluster.restore_latest()
        self._lesion()  # whatever the checkpoint says

    def _lesion(self) -> None:
        if self.lesion is not None and self.cluster.cerebellum is not None:
            self.cluster.lesion_steps = {0: self.lesion}
            self.cluster.apply_lesions(0)

    def train(self, start: int, stop: int):
        began = time.time()
        record = self.cluster.run(start, stop)
        events = [e for e in _cluster_events(self.cluster) if e["start"] >= began]
        losses = {s: v for s, v in record.losses.items() if start <= s < stop}
        if len(losses) != stop - start:
            raise RuntimeError(
                f"{self.name}: got losses for {len(losses)} of {stop - start} steps "
                f"(restarts {record.restarts})"
            )
        if record.restarts:
            logger.warning(
                "%s: %d actor restarts during the measurement; its numbers include "
                "recovery",
                self.name,
                record.restarts,
            )
        seconds = _span(events)
        return seconds, losses, events

    def evaluate(self) -> dict[str, Any]:
        return self.cluster.evaluate("validation")

    def received_cpu_seconds(self) -> dict[str, float]:
        """Each chunk's CPU spent receiving so far (its server's handlers)."""
        import ray

        chunks = self.cluster.chunks
        seconds = ray.get([c.received_cpu_seconds.remote() for c in chunks])
        return {f"chunk-{k}": v for k, v in enumerate(seconds)}

    def pids(self) -> dict[str, int]:
        return dict(self._pids)

    def thread_names(self) -> dict[str, dict[int, str]]:
        """Each actor's Python threads by native id (``compute``: a chunk's steps)."""
        import ray

        names = ray.get([h.thread_names.remote() for h in self._handles.values()])
        return dict(zip(self._handles, names, strict=True))

    def peak_rss(self) -> dict[str, int | None]:
        return {name: _peak_rss(pid) for name, pid in self._pids.items()}

    def shutdown(self) -> None:
        self.cluster.shutdown()


class TorchSchedule:
    """A PyTorch pipeline schedule on the same chunks (the external baseline)."""

    kind = "torch"

    def __init__(
        self,
        name: str,
        config: TrainConfig,
        bench: BenchConfig,
        task: TaskData,
        placement: Placement,
    ) -> None:
        from orchestrator.baselines.torch_pipeline import TorchPipeline

        self.name = name
        self.task = task
        # The baselines have no cerebellum: truncated BPTT whatever --model says.
        crnn = config.replace(model="crnn") if config.model == "ccrnn" else config
        self.pipeline = TorchPipeline(
            crnn,
            name,
            bench.micro_batches,
            device="cuda" if placement.gpus else "cpu",
        )

    def launch(self) -> None:
        self.pipeline.start()

    def reset(self) -> None:
        self.pipeline.reset()

    def train(self, start: int, stop: int):
        segment = self.pipeline.run(start, stop)
        return segment.seconds, segment.losses, segment.events

    def evaluate(self) -> dict[str, Any]:
        return self.pipeline.evaluate(self.task)

    def pids(self) -> dict[str, int]:
        return self.pipeline.pids()

    def peak_rss(self) -> dict[str, int | None]:
        # The stages report their own peak too, for machines without /proc.
        return {
            name: _peak_rss(pid) or self.pipeline.peak_rss.get(name)
            for name, pid in self.pids().items()
        }

    def shutdown(self) -> None:
        self.pipeline.shutdown()


def _cluster_events(cluster) -> list[dict[str, Any]]:
    """Every chunk's spans on the epoch clock, from the cluster's last collection."""
    events = []
    for index, result in enumerate(cluster.timelines):
        offset = result["wall_origin"] + result["timeline_origin"]
        for phase, batch, window, micro, start, end in result["timeline"]:
            events.append(
                dict(
                    chunk=index,
                    phase=phase,
                    batch=batch,
                    window=window,
                    micro=micro,
                    start=start + offset,
                    end=end + offset,
                )
            )
    return events


def _span(events: list[dict[str, Any]]) -> float:
    if not events:
        raise RuntimeError("a measured segment recorded no spans of work")
    return max(e["end"] for e in events) - min(e["start"] for e in events)


# Process and machine readings (Linux /proc; None elsewhere) ------------------------


def _proc_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of process ``pid``, from ``/proc``."""
    try:
        return _stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return None


def _stat_fields(stat: str) -> list[str]:
    """The fields of a ``/proc`` ``stat`` line after the name (which may hold
    spaces and parentheses): ``[0]`` the state, ``[1]`` the parent's pid,
    ``[11]`` and ``[12]`` user and system CPU in clock ticks."""
    return stat.rsplit(")", 1)[1].split()


def _stat_cpu_seconds(stat: str) -> float:
    """User plus system CPU seconds of a ``/proc`` ``stat`` line (process or
    thread), in clock ticks of 10 ms."""
    fields = _stat_fields(stat)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of ``pid``: its kernel name and CPU seconds, from ``/proc``
    (empty elsewhere, or once the process is gone).

    The time on a CPU comes from ``schedstat`` (nanoseconds) where the kernel
    keeps it, else from ``stat`` (user plus system, in clock ticks of 10 ms:
    too coarse for a thread that runs a few milliseconds).
    """
    threads = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        task = Path(f"/proc/{pid}/task/{tid}")
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        try:
            seconds = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            seconds = _stat_cpu_seconds(stat)
        threads[int(tid)] = (name, seconds)
    return threads


def thread_breakdown(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    names: dict[int, str],
    steps: int,
) -> list[dict[str, Any]]:
    """CPU per step of one process's threads between two readings, busiest first.

    A thread is named as Python knows it (``names``) or else as the kernel
    does; threads of one name are summed (``threads`` counts them). A thread
    that started in between counts from zero; one that ended is missing.
    """
    totals: dict[str, list[float]] = {}
    for tid, (kernel_name, seconds) in after.items():
        spent = seconds - before.get(tid, (kernel_name, 0.0))[1]
        entry = totals.setdefault(names.get(tid, kernel_name), [0.0, 0])
        entry[0] += spent
        entry[1] += 1
    rows = [
        {"thread": name, "threads": count, "ms_per_step": 1000 * spent / steps}
        for name, (spent, count) in totals.items()
    ]
    return sorted(rows, key=lambda row: -row["ms_per_step"])


def _peak_rss(pid: int) -> int | None:
    """Peak resident memory of ``pid`` in bytes (``VmHWM``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _machine_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of every CPU together, from ``/proc/stat``."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def measure(contender: Contender, start: int, stop: int) -> Segment:
    """Train ``start`` to ``stop - 1`` and read what the processes spent."""
    pids = contender.pids()
    pids["driver"] = os.getpid()
    received = getattr(contender, "received_cpu_seconds", dict)
    received_before = received()
    cpu_before = {name: _proc_cpu_seconds(pid) for name, pid in pids.items()}
    ticks_before = _machine_ticks()
    began = time.perf_counter()

    seconds, losses, events = contender.train(start, stop)

    driver_seconds = time.perf_counter() - began
    ticks_after = _machine_ticks()
    cpu = {}
    for name, pid in pids.items():
        after = _proc_cpu_seconds(pid)
        if after is not None and cpu_before[name] is not None:
            cpu[name] = after - cpu_before[name]
    received_after = received()  # its calls are outside the CPU read above
    busy = None
    if ticks_before and ticks_after and ticks_after[1] > ticks_before[1]:
        share = (ticks_after[0] - ticks_before[0]) / (ticks_after[1] - ticks_before[1])
        busy = share * (os.cpu_count() or 1)
    receiving = {
        name: received_after[name] - received_before[name]
        for name in received_after
        if name in received_before
    }
    return Segment(seconds, driver_seconds, losses, events, cpu, busy, receiving)


# Running ---------------------------------------------------------------------------


@dataclass
class Run:
    """One measured run of one contender from the initial weights.

    Attributes:
        segments: the measured stretches between evaluations (``steps``
            batches in all).
        curve: an evaluation before the first segment and after each, then
            after each stretch of the chase for the target.
        actor_names: the contender's processes (``chunk-k``, ``cerebellum``).
        peak_rss: peak resident bytes of each, read after the run.
        cerebellum_precision: what the contender's cerebellum computed in
            (``--cerebellum-precision`` as it resolved), None without one.
        chase_steps: batches trained after the measured ones to reach the
            target loss (they count towards time to target only).
        chase_seconds: what they took, on the same clock.
    """

    segments: list[Segment] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    actor_names: list[str] = field(default_factory=list)
    peak_rss: dict[str, int | None] = field(default_factory=dict)
    cerebellum_precision: str | None = None
    chase_steps: int = 0
    chase_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.segments)

    @property
    def steps(self) -> int:
        return sum(len(s.losses) for s in self.segments)

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds

    @property
    def measured_curve(self) -> list[dict[str, Any]]:
        """The evaluations up to the end of the measured steps."""
        return self.curve[: len(self.segments) + 1]


def batch_rows(task: TaskData, batch_size: int, step: int) -> int:
    """Sequences in batch ``step`` (the last batch of an epoch may be short)."""
    n = len(task.train)
    per_epoch = -(-n // batch_size)
    position = step % per_epoch
    return min(batch_size, n - position * batch_size)


def run_once(
    contender: Contender,
    bench: BenchConfig,
    task: TaskData,
    steps: int,
    evaluate: bool,
    chase: float | None = None,
) -> Run:
    """Reset ``contender`` and train ``steps`` batches, evaluating between segments.

    Segments are ``bench.eval_every`` batches long either way, so that runs with
    and without evaluations (the sweep) pay the same pipeline fill and drain.

    Args:
        chase: a target validation loss. A run still above it after ``steps``
            batches trains on, segment by segment and evaluating after each,
            until it reaches it or has trained ``bench.max_target_steps``
            batches in all. Those batches are timed for time to target only.
    """
    contender.reset()
    run = Run(
        actor_names=list(contender.pids()),
        cerebellum_precision=getattr(contender, "cerebellum_precision", None),
    )
    every = bench.eval_every
    examples = 0
    seconds = 0.0

    def trained(start: int, stop: int, taken: float, losses: dict) -> None:
        """Count batches ``start`` to ``stop - 1``, then evaluate (if asked)."""
        nonlocal examples, seconds
        seconds += taken
        examples += sum(
            batch_rows(task, bench.batch_size, s) for s in range(start, stop)
        )
        if evaluate:
            train_loss = statistics.fmean(losses.values())
            run.curve.append(
                _curve_point(contender.evaluate(), stop, examples, seconds, train_loss)
            )

    if evaluate:
        run.curve.append(_curve_point(contender.evaluate(), 0, 0, 0.0, None))
    for start in range(0, steps, every):
        stop = min(start + every, steps)
        segment = measure(contender, start, stop)
        run.segments.append(segment)
        trained(start, stop, segment.seconds, segment.losses)
    run.peak_rss = contender.peak_rss()  # of the measured steps
    if evaluate and chase is not None:
        for start in range(steps, bench.max_target_steps, every):
            if time_to_target(run.curve, chase) is not None:
                break
            stop = min(start + every, bench.max_target_steps)
            taken, losses, _ = contender.train(start, stop)
            run.chase_steps += stop - start
            run.chase_seconds += taken
            trained(start, stop, taken, losses)
    return run


def _curve_point(validation, step, examples, seconds, train_loss) -> dict[str, Any]:
    return {
        "step": step,
        "examples": examples,
        "seconds": seconds,
        "train_loss": train_loss,
        "validation_loss": validation["loss"],
        "metric": validation["metric"],
        "metric_name": validation["metric_name"],
    }


def build_contenders(
    bench: BenchConfig, task: TaskData, scratch: Path, placement: Placement
) -> list[Contender]:
    """One contender per schedule of ``bench``, not yet started."""
    config = bench.train_config()
    contenders: list[Contender] = []
    for name in bench.schedules:
        if name in TORCH_SCHEDULES:
            contenders.append(TorchSchedule(name, config, bench, task, placement))
        else:
            contenders.append(
                RaySchedule(name, config, bench, task, scratch, placement)
            )
    return contenders


def launch_all(contenders: Sequence[Contender], warmup: int) -> None:
    """Start every contender at once (start-up is not measured), then warm up."""
    with ThreadPoolExecutor(max_workers=len(contenders)) as pool:
        for future in [pool.submit(c.launch) for c in contenders]:
            future.result()
    for contender in contenders:
        if warmup:
            contender.reset()
            contender.train(0, warmup)
        logger.info("%s: started and warmed up (%d steps)", contender.name, warmup)


def parks(bench: BenchConfig, placement: Placement) -> bool:
    """Whether contenders waiting for their turn are stopped (``--park``).

    Only processes on this machine can be, so only in a cluster the bench
    started itself, and of those only the ones this process started (see
    :func:`park`); and only on CPUs, where they compete for the cores the
    measured contender uses (a stopped process would also stop the watchdogs
    of its GPU's collectives).
    """
    return (
        bench.park
        and bench.ray_address is None
        and not placement.gpus
        and not placement.fresh
        and os.path.isdir("/proc/self")  # to tell our processes from others
    )


def park(contenders: Sequence[Contender]) -> None:
    """Stop every process of ``contenders`` (``SIGSTOP``) until :func:`unpark`.

    A contender waiting for its turn is otherwise not idle: every Ray worker's
    main thread wakes a hundred times a second, gRPC and gloo poll, and on a
    machine with as many cores as the measured contender keeps busy each wake
    is taken from it. Stopped, the waiting ones take no CPU at all. Only
    processes this one started are stopped (Ray's workers through the raylet
    it started, the PyTorch stages directly); any other pid is left alone,
    whatever it is.
    """
    for contender in contenders:
        for name, pid in contender.pids().items():
            if not _descends_from_us(pid):
                if pid not in _NOT_OURS:
                    _NOT_OURS.add(pid)
                    logger.warning(
                        "%s/%s: pid %d was not started by this process, so it "
                        "is never stopped between turns (--park)",
                        contender.name,
                        name,
                        pid,
                    )
                continue
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:  # gone: its next call says so
                continue
            _STOPPED.add(pid)


def unpark(contenders: Sequence[Contender]) -> None:
    """Let the processes :func:`park` stopped run again (``SIGCONT``): every one
    it stopped, even one that is no longer a child of ours (its raylet gone)."""
    for contender in contenders:
        for pid in contender.pids().values():
            if pid in _STOPPED:
                _STOPPED.discard(pid)
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass


_STOPPED: set[int] = set()
"""Pids :func:`park` stopped that :func:`unpark` has not let run again."""

_NOT_OURS: set[int] = set()
"""Pids :func:`park` has warned about."""


def _descends_from_us(pid: int) -> bool:
    """Whether ``pid`` is a descendant of this process (from ``/proc``)."""
    me = os.getpid()
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(_stat_fields(stat)[1])  # the parent
        if pid == me:
            return True
    return False


def shutdown_all(contenders: Sequence[Contender]) -> None:
    for contender in contenders:
        try:
            contender.shutdown()
        except Exception as error:  # one failed shutdown must not hide the others
            logger.warning("%s: shutdown failed: %s", contender.name, error)


def run_interleaved(
    bench: BenchConfig,
    task: TaskData,
    scratch: Path,
    placement: Placement,
    evaluate: bool = True,
) -> dict[str, list[Run]]:
    """Every contender's ``bench.repeats`` runs, taken in turns (A B C A B C …).

    All contenders stay alive throughout, idle but for their turn; with
    ``placement.fresh`` each turn starts and warms up its contender anew.

    With evaluations, a run that has not reached the target loss after its
    measured steps chases it (:func:`run_once`). The target is
    ``--target-loss``, or else the loss ``locked`` ended its runs so far at
    (the default target, :func:`choose_target`), so ``locked`` takes the first
    turn of every round and does not chase its own.
    """
    runs: dict[str, list[Run]] = {name: [] for name in bench.schedules}
    order = list(bench.schedules)
    if evaluate and bench.target_loss is None and "locked" in order:
        order.remove("locked")
        order.insert(0, "locked")

    def chase(name: str) -> float | None:
        if not evaluate:
            return None
        if bench.target_loss is not None:
            return bench.target_loss
        if name == "locked" or not runs.get("locked"):
            return None
        return choose_target({"locked": [r.measured_curve for r in runs["locked"]]})

    if placement.fresh:
        for repeat in range(bench.repeats):
            for name in order:
                alone = dataclasses.replace(bench, schedules=(name,))
                (contender,) = build_contenders(alone, task, scratch, placement)
                try:
                    launch_all([contender], bench.warmup)
                    run = run_once(
                        contender, bench, task, bench.steps, evaluate, chase(name)
                    )
                finally:
                    shutdown_all([contender])
                runs[name].append(run)
                _log_run(name, bench.chunks, repeat, run)
        return runs

    contenders = build_contenders(
        dataclasses.replace(bench, schedules=tuple(order)), task, scratch, placement
    )
    parking = placement.parked and len(contenders) > 1
    try:
        launch_all(contenders, bench.warmup)
        for repeat in range(bench.repeats):
            for contender in contenders:
                if parking:
                    park([c for c in contenders if c is not contender])
                    unpark([contender])
                run = run_once(
                    contender,
                    bench,
                    task,
                    bench.steps,
                    evaluate,
                    chase(contender.name),
                )
                runs[contender.name].append(run)
                _log_run(contender.name, bench.chunks, repeat, run)
    finally:
        failed = None
        if parking:
            try:
                unpark(contenders)  # a stopped process cannot shut down
            except BaseException as error:  # shut them down regardless, then say
                failed = error
        shutdown_all(contenders)
        if failed is not None:
            raise failed
    return runs


def _log_run(name: str, chunks: int, repeat: int, run: Run) -> None:
    chased = (
        f", then {run.chase_steps} steps more towards the target loss"
        if run.chase_steps
        else ""
    )
    logger.info(
        "%s on %d chunks, run %d: %.2f steps/s%s (load average %s)",
        name,
        chunks,
        repeat,
        run.steps_per_second,
        chased,
        load_average(),
    )


def _actors_per_contender(name: str, chunks: int, model: str) -> int:
    """Processes a contender runs: its chunks, and a cerebellum where it has one."""
    if name in TORCH_SCHEDULES:
        return chunks
    return chunks + (model == "ccrnn" or (name == "decoupled" and chunks > 1))


@dataclass(frozen=True)
class Placement:
    """Where one configuration's contenders run.

    Attributes:
        gpus: one GPU per actor and per PyTorch stage, for every contender alike.
        fresh: one contender alive at a time (the cluster cannot hold them all).
        cpus_per_actor: Ray's CPU reservation per actor, shrunk so that every
            live actor fits (bookkeeping only: it pins and limits nothing).
        parked: the processes of contenders waiting for their turn are
            stopped (:func:`parks`).
    """

    gpus: bool
    fresh: bool
    cpus_per_actor: float
    parked: bool = False


def prepare_ray(bench: BenchConfig) -> None:
    """Join the Ray cluster, or start a local one large enough for every actor."""
    if not any(s in SCHEDULES for s in bench.schedules):
        return
    import ray

    from orchestrator.cluster import RAY_DEFAULTS, connect_ray

    if ray.is_initialized():
        return
    if bench.ray_address is not None:
        connect_ray(bench.ray_address)
        return
    largest = max((bench.chunks, *bench.sweep_chunks))
    actors = sum(
        _actors_per_contender(s, largest, bench.model)
        for s in bench.schedules
        if s in SCHEDULES
    )
    for name, value in RAY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logger.info("starting a local Ray cluster")
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(actors * bench.cpus_per_actor)),
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )


def plan(bench: BenchConfig) -> Placement:
    """GPUs or not, all alive or one at a time, for ``bench.chunks`` chunks.

    Every contender gets the same kind of device: GPUs only when the widest
    contender (the decoupled one, with its cerebellum) can have one per actor and
    every PyTorch stage can have one here; otherwise every contender runs on CPU.
    """
    import torch

    ray_names = [s for s in bench.schedules if s in SCHEDULES]
    sizes = [_actors_per_contender(s, bench.chunks, bench.model) for s in ray_names]
    gpus, cpus = 0, 0.0
    if ray_names:
        import ray

        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 0.0)
    local_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    torch_ok = local_gpus >= bench.chunks or not any(
        s in TORCH_SCHEDULES for s in bench.schedules
    )
    enough = (not ray_names or gpus >= max(sizes)) and torch_ok
    use_gpus = bench.gpus if bench.gpus is not None else bool(gpus or local_gpus)
    if use_gpus and not enough:
        if bench.gpus:
            raise ConfigError(
                f"--gpus: {bench.chunks} chunks need {max(sizes, default=0)} GPUs "
                f"for the widest contender and {bench.chunks} here for the PyTorch "
                f"stages; the cluster has {gpus}, this machine {local_gpus}: lower "
                "--chunks or drop --gpus"
            )
        use_gpus = False
    fresh = bench.fresh or (use_gpus and sum(sizes) > gpus)
    alive = max(sizes, default=1) if fresh else max(sum(sizes), 1)
    cpus_per_actor = bench.cpus_per_actor
    if cpus:
        cpus_per_actor = min(cpus_per_actor, math.floor(100 * cpus / alive) / 100)
    placement = Placement(use_gpus, fresh, cpus_per_actor)
    return dataclasses.replace(placement, parked=parks(bench, placement))


# Summaries -------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, minimum, maximum and every value."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": list(values),
    }


def phase_seconds(runs: Sequence[Run]) -> dict[int, dict[str, float]]:
    """Seconds each chunk spent in each phase, over every segment of ``runs``."""
    totals: dict[int, dict[str, float]] = {}
    for run in runs:
        for segment in run.segments:
            for event in segment.events:
                chunk = totals.setdefault(event["chunk"], {})
                chunk[event["phase"]] = (
                    chunk.get(event["phase"], 0.0) + event["end"] - event["start"]
                )
    return totals


def phase_seconds_per_step(runs: Sequence[Run], chunks: int) -> list[dict[str, float]]:
    """Each chunk's seconds per step in each phase (zero where it has none)."""
    steps = sum(r.steps for r in runs)
    totals = phase_seconds(runs)
    return [
        {
            p: totals.get(k, {}).get(p, 0.0) / steps
            for p in (*COMPUTE_PHASES, *WAIT_PHASES)
        }
        for k in range(chunks)
    ]


def actor_breakdown(runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Per actor: shares of the measured seconds by phase, CPU, peak memory.

    Shares are of the summed segment seconds of every run. ``busy`` is computing
    (forward, backward, update); ``other`` is what no span covers: Python between
    spans and loading batches, and for the PyTorch stages every transfer and
    wait too (its schedules do not expose them). ``cpu`` is CPU seconds per
    second of the driver's clock over the same segments (1.0: one core flat out).
    """
    wall = sum(r.seconds for r in runs)
    driver_wall = sum(s.driver_seconds for r in runs for s in r.segments)
    totals = phase_seconds(runs)
    result: dict[str, dict[str, Any]] = {}
    for name in [*runs[0].actor_names, "driver"]:
        entry: dict[str, Any] = {}
        if name.startswith("chunk-"):
            phases = totals.get(int(name.split("-")[1]), {})
            shares = {
                p: phases.get(p, 0.0) / wall for p in (*COMPUTE_PHASES, *WAIT_PHASES)
            }
            entry["busy"] = sum(shares[p] for p in COMPUTE_PHASES)
            entry.update(shares)
            entry["other"] = max(0.0, 1.0 - sum(shares.values()))
        cpu = [s.cpu.get(name) for r in runs for s in r.segments]
        entry["cpu"] = (
            sum(cpu) / driver_wall if cpu and None not in cpu and driver_wall else None
        )
        peaks = [r.peak_rss.get(name) for r in runs if r.peak_rss.get(name)]
        entry["peak_rss_bytes"] = max(peaks) if peaks else None
        result[name] = entry
    return result


def receive_seconds_per_step(runs: Sequence[Run]) -> dict[str, float] | None:
    """Per chunk, CPU seconds per measured step its server's handlers spent
    receiving activity and feedback; None where the contender does not say
    (the PyTorch stages)."""
    segments = [s for r in runs for s in r.segments]
    if not segments or any(not s.received for s in segments):
        return None
    steps = sum(r.steps for r in runs)
    names = segments[0].received
    return {n: sum(s.received.get(n, 0.0) for s in segments) / steps for n in names}


def ideal_speedups(
    per_step: dict[str, list[dict[str, float]]], chunks: int, micro: int
) -> dict[str, float | None]:
    """What each schedule could reach over ``locked``, from the measured costs.

    ``c_k`` is chunk k's compute per step (forward, backward, update) measured
    under ``locked``, where one chunk computes at a time. ``locked`` pays the sum
    of the ``c_k`` per step. ``decoupled`` pays at best the largest ``c_k`` plus
    that chunk's wait for predicted feedback (measured under ``decoupled``): K
    minus the cerebellum's cost when the chunks are equal. ``pipelined`` and the
    PyTorch schedules pay (M + K − 1)/M times the largest ``c_k``: K·M/(M + K − 1)
    when the chunks are equal.
    """
    reference = per_step.get("locked") or next(iter(per_step.values()), None)
    if not reference:
        return {}
    compute = [sum(chunk[p] for p in COMPUTE_PHASES) for chunk in reference]
    total = sum(compute)
    if not total:
        return {}
    result: dict[str, float | None] = {}
    for name in per_step:
        if name == "locked":
            result[name] = 1.0
        elif name == "decoupled":
            predict = [chunk["predict"] for chunk in per_step[name]]
            result[name] = total / max(c + p for c, p in zip(compute, predict))
        else:
            result[name] = total / (max(compute) * (micro + chunks - 1) / micro)
    return result


def choose_target(curves: dict[str, list[list[dict[str, Any]]]]) -> float | None:
    """The default target validation loss: what ``locked`` ends its runs at.

    ``locked`` trains with exact feedback, so its final loss (the highest over its
    runs) is the level the other contenders are asked to reach: those doing the
    same arithmetic reach it at their last evaluation, and one that runs faster
    but learns worse reaches it late or not at all, and shows it. Without
    ``locked``, the highest of every run's lowest loss, which every run reaches.
    """
    if curves.get("locked"):
        return max(c[-1]["validation_loss"] for c in curves["locked"])
    bests = [
        min(p["validation_loss"] for p in curve)
        for runs in curves.values()
        for curve in runs
        if curve
    ]
    return max(bests) if bests else None


def censored_median(times: list[float | None]) -> float | None:
    """The median of ``times`` where ``None`` (a run that never got there) is
    slower than any time; ``None`` when that median falls on such a run."""
    if not times:
        return None
    median = statistics.median(math.inf if t is None else t for t in times)
    return None if math.isinf(median) else median


def time_to_target(curve: list[dict[str, Any]], target: float) -> float | None:
    """Measured seconds to the first evaluation at or below ``target``.

    A relative 1e-5 of slack lets contenders that do locked's arithmetic in
    another order (micro-batches, another runtime) reach locked's own loss.
    """
    point = _first_at(curve, target)
    return None if point is None else point["seconds"]


def steps_to_target(curve: list[dict[str, Any]], target: float) -> int | None:
    """Batches trained by the first evaluation at or below ``target``."""
    point = _first_at(curve, target)
    return None if point is None else point["step"]


def _first_at(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    for point in curve:
        if point["validation_loss"] <= target * (1 + 1e-5):
            return point
    return None


def summarise(
    bench: BenchConfig, task: TaskData, runs: dict[str, list[Run]]
) -> dict[str, Any]:
    """bench.json's target, ``schedules`` and ``baselines`` from the runs."""
    per_step = {n: phase_seconds_per_step(rs, bench.chunks) for n, rs in runs.items()}
    ideals = ideal_speedups(per_step, bench.chunks, bench.micro_batches)
    curves = {name: [r.measured_curve for r in rs] for name, rs in runs.items()}
    target = bench.target_loss or choose_target(curves)
    locked_rates = [r.steps_per_second for r in runs.get("locked", [])]
    records = {}
    for name, rs in runs.items():
        rates = [r.steps_per_second for r in rs]
        examples = [
            sum(batch_rows(task, bench.batch_size, s) for s in range(r.steps))
            / r.seconds
            for r in rs
        ]
        ccdni = name in SCHEDULES
        record: dict[str, Any] = {
            "kind": "ccdni" if ccdni else "torch",
            "model": bench.model if ccdni else "crnn",
            "uses_cerebellum": "cerebellum" in rs[0].actor_names,
            "cerebellum_precision": rs[0].cerebellum_precision,
            "steps_per_second": statistics.median(rates),
            "steps_per_second_spread": spread(rates),
            "examples_per_second": statistics.median(examples),
            "examples_per_second_spread": spread(examples),
            "speedup": None,
            "speedup_spread": None,
            "ideal_speedup": ideals.get(name),
        }
        if locked_rates:
            record["speedup"] = record["steps_per_second"] / statistics.median(
                locked_rates
            )
            record["speedup_spread"] = spread(
                [a / b for a, b in zip(rates, locked_rates)]
            )
        final = [r.measured_curve[-1] for r in rs]
        record.update(
            examples=final[0]["examples"],
            train_loss=statistics.median(p["train_loss"] for p in final),
            validation_loss=statistics.median(p["validation_loss"] for p in final),
            validation_loss_spread=spread([p["validation_loss"] for p in final]),
            metric=statistics.median(p["metric"] for p in final),
            metric_name=final[0]["metric_name"],
        )
        times = [time_to_target(r.curve, target) for r in rs] if target else []
        reached = [t for t in times if t is not None]
        record["time_to_target"] = {
            "seconds": censored_median(times),
            "reached": len(reached),
            "runs": times,
            "steps": [steps_to_target(r.curve, target) for r in rs] if target else [],
            "max_steps": bench.max_target_steps,
            "speedup": None,
        }
        busy = [s.machine_busy for r in rs for s in r.segments]
        record["machine_busy_cores"] = (
            statistics.median(busy) if busy and None not in busy else None
        )
        record["actors"] = actor_breakdown(rs)
        ours = [a["cpu"] for a in record["actors"].values()]
        record["other_load_cores"] = (
            max(0.0, record["machine_busy_cores"] - sum(ours))
            if record["machine_busy_cores"] is not None and None not in ours
            else None
        )
        record["phase_seconds_per_step"] = {
            f"chunk-{k}": v for k, v in enumerate(per_step[name])
        }
        record["receive_seconds_per_step"] = receive_seconds_per_step(rs)
        record["runs"] = [
            {
                "seconds": r.seconds,
                "steps": r.steps,
                "driver_seconds": sum(s.driver_seconds for s in r.segments),
                "chase_steps": r.chase_steps,
                "chase_seconds": r.chase_seconds,
                "curve": r.curve,
            }
            for r in rs
        ]
        records[name] = record

    reference = records.get("locked", {}).get("time_to_target", {}).get("seconds")
    for record in records.values():
        own = record["time_to_target"]["seconds"]
        if reference and own:
            record["time_to_target"]["speedup"] = reference / own
    return {
        "target_loss": target,
        "target_source": "given" if bench.target_loss else "auto",
        "schedules": {n: r for n, r in records.items() if n in SCHEDULES},
        "baselines": {n: r for n, r in records.items() if n in TORCH_SCHEDULES},
    }


def summarise_sweep(
    bench: BenchConfig, points: dict[int, dict[str, list[Run]]]
) -> dict[str, Any]:
    """Throughput and speed-up over ``locked`` at each number of chunks."""
    result = []
    for chunks in sorted(points):
        runs = points[chunks]
        per_step = {n: phase_seconds_per_step(rs, chunks) for n, rs in runs.items()}
        ideals = ideal_speedups(per_step, chunks, bench.micro_batches)
        rates = {
            n: statistics.median(r.steps_per_second for r in rs)
            for n, rs in runs.items()
        }
        result.append(
            {
                "chunks": chunks,
                "schedules": {
                    name: {
                        "steps_per_second": rate,
                        "speedup": rate / rates["locked"]
                        if "locked" in rates
                        else None,
                        "ideal_speedup": ideals.get(name),
                    }
                    for name, rate in rates.items()
                },
            }
        )
    return {"steps": bench.sweep_steps, "repeats": bench.repeats, "points": result}


def machine_record() -> dict[str, Any]:
    """What the numbers were measured on.

    A virtual machine's model name is often generic ("Intel(R) Xeon(R)
    Processor"), so the record also keeps the processor's family, model and
    stepping and its cache sizes: two hosts that report the same name can
    compute at different speeds, and the ratios between schedules move with it.
    """
    import ray
    import torch

    gpus = [
        torch.cuda.get_device_name(i)
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    ]
    cpu = _cpu_identity()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu.get("model name"),
        "cpu_id": _cpu_id(cpu),
        "caches": _cpu_caches(),
        "gpus": gpus,
        "platform": platform.platform(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }


def _cpu_identity(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block ends here
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    return fields


def _cpu_id(cpu: dict[str, str]) -> str | None:
    """``family F model M stepping S``, or None where /proc/cpuinfo has none."""
    parts = [
        f"{name.removeprefix('cpu ')} {cpu[name]}"
        for name in ("cpu family", "model", "stepping")
        if name in cpu
    ]
    return " ".join(parts) or None


def _cpu_caches(
    root: Path = Path("/sys/devices/system/cpu/cpu0/cache"),
) -> dict[str, str] | None:
    """The first CPU's caches as sysfs names them: ``{"L1d": "48K", ...}``."""
    caches = {}
    for index in sorted(root.glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        caches[f"L{level}{suffix}"] = size
    return caches or None


# Plots -----------------------------------------------------------------------------

COLOURS = {
    "locked": "tab:gray",
    "pipelined": "tab:orange",
    "decoupled": "tab:blue",
    "torch-gpipe": "tab:green",
    "torch-1f1b": "tab:red",
}
BREAKDOWN = (
    ("busy", "computing", "tab:blue"),
    ("predict", "predict", "tab:purple"),
    ("send", "send", "tab:gray"),
    ("wait_input", "wait for input", "#cccccc"),
    ("wait_feedback", "wait for feedback", "#999999"),
    ("other", "other", "#eeeeee"),
)


def _records(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {**result["schedules"], **result["baselines"]}


def plot_loss_vs_time(result: dict[str, Any], path: Path) -> Path:
    """Validation loss against measured seconds, every run of every contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, record in _records(result).items():
        for index, run in enumerate(record["runs"]):
            curve = run["curve"]
            ax.plot(
                [p["seconds"] for p in curve],
                [p["validation_loss"] for p in curve],
                marker=".",
                color=COLOURS.get(name),
                alpha=0.8 if index == 0 else 0.35,
                label=name if index == 0 else None,
            )
    if result["target_loss"]:
        ax.axhline(result["target_loss"], ls="--", color="black", lw=0.8)
        ax.annotate(
            "target",
            (0, result["target_loss"]),
            textcoords="offset points",
            xytext=(2, 3),
            fontsize=8,
        )
    ax.set(
        xlabel="measured seconds (evaluation excluded)",
        ylabel="validation loss",
        title="loss against wall-clock time, every run",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(result: dict[str, Any], path: Path) -> Path:
    """Speed-up over ``locked`` against the number of chunks, with ideal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result["sweep"]
    micro = result["config"]["micro_batches"]
    chunks = [p["chunks"] for p in sweep["points"]]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = sorted(
        {n for p in sweep["points"] for n in p["schedules"]}, key=ALL_SCHEDULES.index
    )
    for name in names:
        xs, ys = [], []
        for point in sweep["points"]:
            value = point["schedules"].get(name, {}).get("speedup")
            if value is not None:
                xs.append(point["chunks"])
                ys.append(value)
        ax.plot(xs, ys, marker="o", color=COLOURS.get(name), label=name)
    grid = range(min(chunks), max(chunks) + 1)
    ax.plot(grid, list(grid), ls=":", color="tab:blue", label="ideal decoupled: K")
    ax.plot(
        grid,
        [k * micro / (micro + k - 1) for k in grid],
        ls=":",
        color="tab:orange",
        label=f"ideal pipelined: K·M/(M+K−1), M={micro}",
    )
    cores = result["machine"]["cpus"]
    if not result["machine"]["gpus"] and cores and cores < max(chunks):
        ax.axhline(cores, ls="--", color="black", lw=0.8, label=f"{cores} cores")
    ax.set(
        xlabel="chunks K",
        ylabel="steps/s over locked at the same K",
        title="speed-up against the number of chunks",
        xticks=chunks,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_breakdown(result: dict[str, Any], path: Path) -> Path:
    """Where each chunk's measured seconds go, per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        (f"{name} {actor}", shares)
        for name, record in _records(result).items()
        for actor, shares in record["actors"].items()
        if actor.startswith("chunk-")
    ]
    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.32 * len(rows)))
    for index, (_, shares) in enumerate(rows):
        left = 0.0
        for key, _, colour in BREAKDOWN:
            width = shares.get(key, 0.0)
            ax.barh(index, width, left=left, color=colour, height=0.7)
            left += width
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of measured seconds")
    ax.set_title("where each chunk's time goes")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for *_, c in BREAKDOWN]
    ax.legend(handles, [label for _, label, _ in BREAKDOWN], fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def representative_events(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """The middle segment of the run with the median speed, on its own clock."""
    ordered = sorted(runs, key=lambda r: r.steps_per_second)
    run = ordered[len(ordered) // 2]
    segment = run.segments[len(run.segments) // 2]
    origin = min(e["start"] for e in segment.events)
    return [
        {**e, "start": e["start"] - origin, "end": e["end"] - origin}
        for e in segment.events
    ]


def draw_figures(
    result: dict[str, Any],
    runs: dict[str, list[Run]],
    out: Path,
    timeline_seconds: float | None,
) -> list[str]:
    """Every plot; returns their file names (in ``out``)."""
    from orchestrator.timeline import plot_timeline

    written = [
        plot_loss_vs_time(result, out / "loss_vs_time.png"),
        plot_breakdown(result, out / "breakdown.png"),
    ]
    if result["sweep"]:
        written.append(plot_sweep(result, out / "speedup_vs_chunks.png"))
    slowest = min(r["steps_per_second"] for r in _records(result).values())
    seconds = timeline_seconds or 3.0 / slowest  # three steps of the slowest
    with tempfile.TemporaryDirectory(prefix="ccdni-timeline-") as scratch:
        for name, rs in runs.items():
            run_dir = Path(scratch) / name
            run_dir.mkdir()
            data = {"schedule": name, "events": representative_events(rs)}
            (run_dir / "timeline.json").write_text(json.dumps(data))
            written.append(
                plot_timeline(run_dir, seconds, path=out / f"timeline-{name}.png")
            )
    return [p.name for p in written]


# Tables ----------------------------------------------------------------------------


def _x(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}×"


def _range(spread_: dict[str, Any] | None, digits: int = 2, suffix: str = "") -> str:
    if not spread_:
        return "–"
    low, high = spread_["min"], spread_["max"]
    return f"{low:.{digits}f}–{high:.{digits}f}{suffix}"


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.0f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def describe_setup(result: dict[str, Any]) -> str:
    """The configuration, machine and load in a few lines."""
    config, task, machine = result["config"], result["task"], result["machine"]
    gpus = ", ".join(machine["gpus"]) if machine["gpus"] else "no GPU"
    load = result["load"]
    placement = result["placement"][str(config["chunks"])]
    precision = next(
        (
            record["cerebellum_precision"]
            for record in result["schedules"].values()
            if record.get("cerebellum_precision")
        ),
        None,
    )
    devices = (
        "one GPU per actor and per PyTorch stage"
        if placement["gpus"]
        else "CPU only (one process per actor or stage)"
    )
    return "\n".join(
        [
            f"- network: {config['chunks']} chunks × {config['layers_per_chunk']} "
            f"LSTM layer(s) × {config['hidden_size']} units; model "
            f"`{config['model']}` (the PyTorch baselines: truncated BPTT, no "
            "cerebellum)",
            f"- task `{task['name']}`: {task['seq_len']} steps of "
            f"{task['input_size']} inputs, {task['output_size']} outputs; "
            f"{task['train_sequences']} training and {task['validation_sequences']} "
            "validation sequences",
            f"- windows of {config['truncation']} steps, batch {config['batch_size']}, "
            f"{config['micro_batches']} micro-batches (pipelined, torch-*), "
            f"{config['threads']} thread(s) per actor; decoupled's output microzone: "
            f"{config.get('granule_width') or 'the task default'} granule cells"
            + (
                ", given the label and the time step"
                if config.get("output_context")
                else ""
            )
            + (
                f", its process at nice {config['cerebellum_nice']} "
                "(`--cerebellum-nice`)"
                if config.get("cerebellum_nice")
                else ""
            )
            + (
                f", its arithmetic and the traffic to it in {precision} "
                f"(`--cerebellum-precision {config.get('cerebellum_precision')}`; "
                "the chunks compute in float32 under every schedule)"
                if precision
                else ""
            )
            + (
                "; the actors' threads scheduled as batch jobs "
                "(`--batch-scheduling`; the PyTorch stages under the default "
                "policy)"
                if config.get("batch_scheduling")
                else ""
            )
            + "; Prometheus /metrics "
            + ("served by every actor" if config.get("metrics", True) else "off"),
            f"- {config['repeats']} runs of {config['steps']} steps per contender, "
            f"taken in turns after {config['warmup']} warm-up steps; evaluation "
            f"every {config['eval_every']} steps with the clock stopped"
            + _chase_note(config, result.get("target_source", "auto")),
            f"- machine: {machine['cpus']} × {machine['cpu_model']}"
            + _cpu_details(machine)
            + f", {gpus}; "
            f"Python {machine['python']}, torch {machine['torch']}, "
            f"Ray {machine['ray']}",
            f"- devices: {devices}; "
            + (
                "each contender started anew for every run"
                if placement["fresh"]
                else "every contender alive throughout, its processes stopped "
                "(SIGSTOP) but for its turns (`--park`)"
                if placement.get("parked")
                else "every contender alive throughout, idle but for its turns"
            ),
            f"- load average (1, 5, 15 min) before: {load['before']}, after: "
            f"{load['after']}",
        ]
    )


def _cpu_details(machine: dict[str, Any]) -> str:
    """`` (family 6 model 167 stepping 1; caches of CPU 0 L1d 48K, …; kernel …)``,
    or '' for a record without them (pages written before they were kept)."""
    parts = []
    if machine.get("cpu_id"):
        parts.append(machine["cpu_id"])
    if machine.get("caches"):
        caches = ", ".join(f"{k} {v}" for k, v in machine["caches"].items())
        parts.append(f"caches of CPU 0 {caches}")
    if machine.get("kernel"):
        parts.append(f"kernel {machine['kernel']}")
    return f" ({'; '.join(parts)})" if parts else ""


def _probed(result: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A profile probe's numbers, or None when it did not run or failed."""
    probe = result.get(name)
    return probe if probe and "error" not in probe else None


def _chase_note(config: dict[str, Any], source: str) -> str:
    """How the setup chased the target loss, for the setup list."""
    steps = config["steps"]
    most = config.get("max_target_steps", steps)
    if most <= steps:
        return ""
    whose = (
        "locked's final loss, locked first in each round"
        if source == "auto"
        else "the given loss"
    )
    return (
        f"; a run above the target loss ({whose}) after its {steps} steps trains "
        f"on, evaluating as before, until it reaches it or has trained {most} "
        "steps (those steps count towards time to target only)"
    )


def _reached_steps(ttt: dict[str, Any]) -> list[int]:
    """The steps at which the runs of a time-to-target record reached it
    (none in files written before the chase recorded them)."""
    return [s for s in ttt.get("steps", []) if s is not None]


def _steps_range(steps: list[int]) -> str:
    low, high = min(steps), max(steps)
    return str(low) if low == high else f"{low}–{high}"


def _thread_table(threads: dict[str, Any], shown: int = 5) -> list[str]:
    """The busiest threads of each actor in a run of decoupled, and the rest."""
    lines = [
        f"CPU per step of each actor's threads in one more run of decoupled "
        f"({threads['config']['steps']} steps, {threads['steps_per_second']:.2f} "
        "steps/s, not evaluated; from /proc), in ms: *compute* ran a chunk's "
        "steps, the others are named as Python names them or, for threads of "
        "gRPC and Ray that Python never ran, as the kernel does (×n: n threads of "
        "that name):",
        "",
        "| actor | thread | ms per step |",
        "| --- | --- | --- |",
    ]
    for actor, rows in threads["thread_ms_per_step"].items():
        for row in rows[:shown]:
            count = f" ×{row['threads']}" if row["threads"] > 1 else ""
            lines.append(
                f"| {actor} | {row['thread']}{count} | {row['ms_per_step']:.1f} |"
            )
        rest = rows[shown:]
        if rest:
            spent = sum(row["ms_per_step"] for row in rest)
            count = sum(row["threads"] for row in rest)
            lines.append(f"| {actor} | {count} other threads | {spent:.1f} |")
    return lines


def _time_to_target_cell(ttt: dict[str, Any]) -> str:
    """Seconds to the target (median) and the range of steps it took, and how
    many runs missed it."""
    runs = len(ttt["runs"])
    steps = _reached_steps(ttt)
    within = f" in {ttt['max_steps']} steps" if "max_steps" in ttt and runs else ""
    if ttt["seconds"] is None:
        return f"not reached{within} ({ttt['reached']}/{runs})"
    notes = []
    if steps:
        word = "step" if min(steps) == max(steps) else "steps"
        notes.append(f"{word} {_steps_range(steps)}")
    if ttt["reached"] < runs:
        notes.append(f"{runs - ttt['reached']}/{runs} not reached{within}")
    return f"{ttt['seconds']:.1f}" + (f" ({'; '.join(notes)})" if notes else "")


def render_tables(result: dict[str, Any]) -> str:
    """The Markdown tables of ``bench.json``."""
    records = _records(result)
    target = result["target_loss"]
    metric = next(iter(records.values())).get("metric_name", "metric")
    examples = next(iter(records.values())).get("examples")
    lines = [
        f"| schedule | steps/s (range) | examples/s | speed-up over locked (range) "
        f"| ideal | validation loss after {examples} examples | {metric} "
        f"| seconds to loss {target:.3f} | time-to-target speed-up "
        "| machine busy (cores) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in records.items():
        seconds = _time_to_target_cell(r["time_to_target"])
        busy = r["machine_busy_cores"]
        lines.append(
            f"| {name} | {r['steps_per_second']:.2f} "
            f"({_range(r['steps_per_second_spread'])}) "
            f"| {r['examples_per_second']:.0f} "
            f"| {_x(r['speedup'])} ({_range(r['speedup_spread'], suffix='×')}) "
            f"| {_x(r['ideal_speedup'])} | {r['validation_loss']:.3f} "
            f"| {r['metric']:.3f} | {seconds} | {_x(r['time_to_target']['speedup'])} "
            f"| {'–' if busy is None else f'{busy:.2f}'} |"
        )

    lines += [
        "",
        "Where each actor's measured seconds go (shares), its CPU use (cores) and "
        "peak resident memory:",
        "",
        "| schedule | actor | computing | predict | send | wait for input "
        "| wait for feedback | other | CPU (cores) | peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in records.items():
        for actor, a in r["actors"].items():
            cpu = "–" if a.get("cpu") is None else f"{a['cpu']:.2f}"
            cells = [
                _percent(a.get(key)) if actor.startswith("chunk-") else "–"
                for key in ("busy", "predict", "send", "wait_input", "wait_feedback")
            ]
            other = _percent(a.get("other")) if actor.startswith("chunk-") else "–"
            lines.append(
                f"| {name} | {actor} | {' | '.join(cells)} | {other} | {cpu} "
                f"| {_mib(a.get('peak_rss_bytes'))} |"
            )

    lines += [
        "",
        "Milliseconds per step in each phase, per chunk (*receive*: CPU that "
        "the chunk's server spends taking in activity and feedback, on threads "
        "beside the phases):",
        "",
        "| schedule | chunk | forward | backward | update | predict | send "
        "| wait for input | wait for feedback | receive |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in records.items():
        receive = r.get("receive_seconds_per_step") or {}
        for chunk, phases in r["phase_seconds_per_step"].items():
            cells = " | ".join(
                f"{1000 * phases[p]:.1f}" for p in (*COMPUTE_PHASES, *WAIT_PHASES)
            )
            got = receive.get(chunk)
            cells += " | " + ("–" if got is None else f"{1000 * got:.1f}")
            lines.append(f"| {name} | {chunk} | {cells} |")

    probes = (
        "send_latency",
        "predict_latency",
        "core_scaling",
        "critical_pace",
        "free_cerebellum_pace",
        "thread_cpu",
    )
    for name in probes:
        error = (result.get(name) or {}).get("error")
        if error:
            first = error.splitlines()[0]
            lines += ["", f"The {name.replace('_', ' ')} probe failed: {first}"]

    send = _probed(result, "send_latency")
    if send:
        shape = send["config"]
        lines += [
            "",
            f"One window's activity ({shape['rows']} × {shape['steps']} × "
            f"{shape['width']}) sent to a lone cortex service in another process, "
            f"{shape['calls']} calls, in ms (*send*: the sender's own call; "
            "*accepted*: until the receiver holds it):",
            "",
            "| phase | median | p90 | p99 | mean |",
            "| --- | --- | --- | --- | --- |",
        ]
        for phase, numbers in send["phases"].items():
            lines.append(
                f"| {phase} | {numbers['median_ms']:.1f} | {numbers['p90_ms']:.1f} "
                f"| {numbers['p99_ms']:.1f} | {numbers['mean_ms']:.1f} |"
            )

    latency = _probed(result, "predict_latency")
    if latency:
        shape = latency["config"]
        lines += [
            "",
            f"Predict of {shape['batch']} rows × {shape['width']} (and "
            f"{shape.get('context_size', 0)} of context) against a lone "
            f"cerebellum server (granule layer {shape['granule_width']}), "
            f"{shape['calls']} calls, in ms:",
            "",
            "| phase | median | p90 | p99 | mean |",
            "| --- | --- | --- | --- | --- |",
        ]
        for phase, numbers in latency["phases"].items():
            lines.append(
                f"| {phase} | {numbers['median_ms']:.1f} | {numbers['p90_ms']:.1f} "
                f"| {numbers['p99_ms']:.1f} | {numbers['mean_ms']:.1f} |"
            )

    threads = _probed(result, "thread_cpu")
    if threads and threads.get("thread_ms_per_step"):
        lines += ["", *_thread_table(threads)]

    sweep = result.get("sweep")
    if sweep:
        names = sorted(
            {n for p in sweep["points"] for n in p["schedules"]},
            key=ALL_SCHEDULES.index,
        )
        lines += [
            "",
            f"Speed-up over locked against the number of chunks ({sweep['steps']} "
            f"steps per run, {sweep['repeats']} runs; at {result['config']['chunks']} "
            "chunks the runs above); measured steps/s in brackets, the ideal from "
            "measured costs after the slash:",
            "",
            "| chunks | " + " | ".join(names) + " |",
            "| --- |" + " --- |" * len(names),
        ]
        for point in sweep["points"]:
            cells = []
            for name in names:
                entry = point["schedules"].get(name)
                cells.append(
                    "–"
                    if entry is None
                    else f"{_x(entry['speedup'])} ({entry['steps_per_second']:.2f}) / "
                    f"{_x(entry['ideal_speedup'])}"
                )
            lines.append(f"| {point['chunks']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def disturbances(result: dict[str, Any]) -> list[str]:
    """Reasons not to trust the speed numbers of ``result`` (none: trust them).

    Runs of one contender that differ by more than 30 %, a speed-up more than 10 %
    above what the measured costs allow, or more than a quarter of a core busy
    outside the bench's own processes while a contender ran.
    """
    reasons = []
    records = _records(result)
    for name, r in records.items():
        rates = r["steps_per_second_spread"]
        if rates["max"] > 1.3 * rates["min"]:
            reasons.append(
                f"{name}'s runs ranged from {rates['min']:.2f} to "
                f"{rates['max']:.2f} steps/s"
            )
        if (
            r["ideal_speedup"]
            and r["speedup"]
            and r["speedup"] > 1.1 * r["ideal_speedup"]
        ):
            reasons.append(
                f"{name} measured {_x(r['speedup'])} over locked, above the "
                f"{_x(r['ideal_speedup'])} its measured costs allow"
            )
    others = {n: r["other_load_cores"] for n, r in records.items()}
    others = {n: v for n, v in others.items() if v is not None}
    if others and max(others.values()) > 0.25:
        worst = max(others, key=others.get)
        reasons.append(
            f"up to {others[worst]:.2f} cores were busy outside the bench's "
            f"processes (while {worst} ran)"
        )
    return reasons


def findings(result: dict[str, Any]) -> list[str]:
    """Plain statements the numbers support: the target, and what limits it."""
    schedules, baselines = result["schedules"], result["baselines"]
    notes = []
    disturbed = disturbances(result)
    if disturbed:
        notes.append(
            "**these speed numbers are disturbed**: "
            + "; ".join(disturbed)
            + ". They are no verdict on the target: rerun scripts/bench.sh on a "
            "quiet machine."
        )
    decoupled, locked = schedules.get("decoupled"), schedules.get("locked")
    if not (decoupled and locked and decoupled["speedup"] is not None):
        return notes
    best_torch = max(
        (b["speedup"] for b in baselines.values() if b["speedup"]), default=None
    )
    met = decoupled["speedup"] >= TARGET_SPEEDUP and (
        best_torch is None or decoupled["speedup"] > best_torch
    )
    verdict = (
        "no verdict, the numbers are disturbed"
        if disturbed
        else ("target met" if met else "target not met")
    )
    notes.append(
        f"decoupled reached {_x(decoupled['speedup'])} the steps/s of locked "
        f"(the target is at least {TARGET_SPEEDUP}× and above both PyTorch "
        "schedules"
        + (
            ""
            if best_torch is None
            else f", the better of which reached {_x(best_torch)}"
        )
        + f"): {verdict}."
    )

    if decoupled["validation_loss"] > 1.05 * locked["validation_loss"]:
        ttt = decoupled["time_to_target"]
        reached = (
            f"{ttt['reached']} of its {len(ttt['runs'])} runs reached the target "
            f"loss {result['target_loss']:.3f}"
        )
        steps = _reached_steps(ttt)
        locked_steps = _reached_steps(locked["time_to_target"])
        if ttt["speedup"] is not None and steps and locked_steps:
            reached += (
                f", after {_steps_range(steps)} steps against "
                f"locked's {_steps_range(locked_steps)}, so its time-to-target "
                f"speed-up is {_x(ttt['speedup'])} against "
                f"{_x(decoupled['speedup'])} in steps/s"
            )
        elif "max_steps" in ttt:
            reached += f" within {ttt['max_steps']} steps"
        notes.append(
            f"decoupled learns less per example: after {decoupled['examples']} "
            f"examples its validation loss is {decoupled['validation_loss']:.3f} "
            f"({decoupled['metric_name']} {decoupled['metric']:.3f}) against "
            f"locked's {locked['validation_loss']:.3f} ({locked['metric']:.3f}); "
            f"{reached}."
        )

    phases = locked["phase_seconds_per_step"]
    compute = {c: sum(p[q] for q in COMPUTE_PHASES) for c, p in phases.items()}
    if len(compute) > 1 and min(compute.values()) > 0:
        heavy = max(compute, key=compute.get)
        why = (
            " (chunks above the first read the hidden activity of the chunk "
            "below, wider than the task's input, and also compute the feedback "
            "of their input)"
            if heavy != "chunk-0"
            else ""
        )
        step = 1 / locked["steps_per_second"]
        notes.append(
            f"the chunks are unequal: under locked {heavy} computes "
            f"{1000 * compute[heavy]:.0f} ms per step of the "
            f"{1000 * sum(compute.values()):.0f} ms all chunks compute, so no "
            f"schedule can beat {sum(compute.values()) / compute[heavy]:.2f}× "
            f"locked's compute alone here{why}. Locked's measured step also "
            f"pays its transport and waits ({1000 * step:.0f} ms in all), which "
            "a schedule that overlaps them hides: against it the slowest chunk "
            f"allows {step / compute[heavy]:.2f}×, so a measured speed-up can "
            "stand above the ideal column."
        )
        scaling = _probed(result, "core_scaling")
        if scaling:
            copies = scaling["config"]["copies"]
            # Above copies (the lone run timed on a slower moment): no slow-down.
            slowdown = max(1.0, copies / scaling["work_rate"])
            ceiling = sum(compute.values()) / (compute[heavy] * slowdown)
            measured = (
                f"one window's forward and backward pass of an upper chunk takes "
                f"{scaling['alone_ms']:.1f} ms alone and "
                + ", ".join(f"{v:.1f}" for v in scaling["side_by_side_ms"])
                + f" ms in {copies} processes side by side (nothing else running, "
                f"nothing sent): the cores together do {scaling['work_rate']:.2f}× "
                "the work of one"
            )
            if slowdown < 1.05:
                notes.append(
                    f"pure compute scales to {copies} cores here: {measured}, which "
                    f"leaves the ceiling above at {ceiling:.2f}×. Where chunks "
                    "compute slower side by side under decoupled (below), it is "
                    "the other work on their cores (the cerebellum, gRPC, Ray), "
                    "not the cores themselves."
                )
            else:
                notes.append(
                    f"pure compute does not scale to {copies} cores here: "
                    f"{measured}. Chunks that compute side by side are slowed as "
                    f"much, which lowers the ceiling above to {ceiling:.2f}× "
                    "before any cerebellum or communication cost."
                )

    own = decoupled["phase_seconds_per_step"]
    windows = -(-result["task"]["seq_len"] // result["config"]["truncation"])
    latency = _probed(result, "predict_latency")
    for chunk, seconds in ((c, p["predict"]) for c, p in own.items()):
        if not seconds:
            continue
        line = (
            f"under decoupled {chunk} waits {1000 * seconds:.1f} ms per step "
            f"({1000 * seconds / windows:.1f} ms per window) for the "
            "cerebellum's predictions (Predict over gRPC), against "
            f"{1000 * compute[chunk]:.0f} ms of its own compute under locked"
        )
        if latency:
            lone = latency["phases"]
            line += (
                "; a lone server answers the same call in "
                f"{lone['predict']['median_ms']:.1f} ms (median; "
                f"{lone['predict+learn']['median_ms']:.1f} ms while learning), "
                f"of which the microzone's own compute is "
                f"{lone['local']['median_ms']:.1f} ms"
            )
        notes.append(line + ".")

    sends = {c: p["send"] / windows for c, p in phases.items() if p["send"]}
    if sends:
        line = (
            "each send of a window's activity or feedback costs the sender "
            + ", ".join(f"{1000 * v:.1f} ms ({c})" for c, v in sends.items())
            + " under locked"
        )
        lone = _probed(result, "send_latency")
        if lone:
            alone = lone["phases"]
            line += (
                f"; alone, the same send takes {alone['send']['median_ms']:.1f} ms "
                f"(median) and is accepted after {alone['accepted']['median_ms']:.1f}"
                " ms"
            )
        notes.append(line + ".")

    inflation = [
        sum(own[c][q] for q in COMPUTE_PHASES) / compute[c]
        for c in compute
        if compute[c]
    ]
    if inflation:
        notes.append(
            "running side by side the chunks compute "
            + ", ".join(f"{x:.2f}×" for x in inflation)
            + " as long per step as they do one at a time under locked "
            "(above 1: contention for cores and memory bandwidth)."
        )
    busy, other = decoupled["machine_busy_cores"], decoupled["other_load_cores"]
    if busy is not None and other is not None:
        notes.append(
            f"while decoupled ran, the machine kept {busy:.2f} of its "
            f"{result['machine']['cpus']} cores busy: {busy - other:.2f} in the "
            f"bench's own processes (chunks, cerebellum, driver), {other:.2f} "
            "elsewhere (Ray's daemons, anything else running)."
        )
    pace = _pace_note(result, decoupled, locked)
    if pace:
        notes.append(pace)
    free = _free_cerebellum_note(result, decoupled, locked)
    if free:
        notes.append(free)
    bound = cpu_bound(result)
    if bound is not None:
        notes.append(
            f"on {bound['cores']} cores the CPU is a limit of its own: decoupled's "
            f"processes spend {bound['decoupled_ms']:.0f} ms of CPU per step "
            f"(chunks {bound['chunks_ms']:.0f}, cerebellum "
            f"{bound['cerebellum_ms']:.0f}, driver {bound['driver_ms']:.0f}) "
            f"against locked's {bound['locked_ms']:.0f}, so with every core busy "
            f"on that work it could reach at most {bound['steps_per_second']:.2f} "
            f"steps/s, {_x(bound['speedup'])} locked; it reached "
            f"{100 * bound['reached']:.0f} % of that. {TARGET_SPEEDUP}× here needs "
            "a step to "
            f"cost at most {bound['target_ms']:.0f} ms of CPU in all, which "
            + (
                f"would leave the cerebellum "
                f"{max(0.0, bound['cerebellum_budget_ms']):.0f} ms of the "
                f"{bound['cerebellum_ms']:.0f} it takes."
                if bound["cerebellum_budget_ms"] < bound["cerebellum_ms"]
                else "it does"
                + (
                    "."
                    if decoupled["speedup"] >= TARGET_SPEEDUP
                    else ": what is missing is the share of the bound reached "
                    "(time in which a core waits or does other work)."
                )
            )
        )
    return notes


def _free_cerebellum_note(
    result: dict[str, Any], decoupled: dict[str, Any], locked: dict[str, Any]
) -> str | None:
    """What decoupled reaches when its cerebellum costs only its messages."""
    free = _probed(result, "free_cerebellum_pace")
    if not free:
        return None
    rate = free["steps_per_second"]
    cpu = free["cpu_ms_per_step"].get("cerebellum")
    full = (cpu_seconds_per_step(decoupled) or {}).get("cerebellum")
    costs = (
        f" (its CPU {cpu:.0f} ms per step against {1000 * full:.0f} ms in the "
        "measured runs)"
        if cpu is not None and full is not None
        else ""
    )
    free_speedup = rate / locked["steps_per_second"]
    # Within 2 % of each other the two are one speed, given how far runs of
    # one contender spread here.
    cost = (
        "the cost of the cerebellum's arithmetic on these cores, which a "
        "cluster gives a device of its own"
        if free_speedup > 1.02 * decoupled["speedup"]
        else "so the cerebellum's arithmetic costs decoupled no speed that "
        "shows on these cores"
    )
    return (
        "with a cerebellum that answers every Predict at once with zero "
        "feedback, decoding each query and sending a full-sized answer but "
        f"computing and learning nothing{costs}, while every chunk keeps all its "
        f"work and every message travels, decoupled ran at {rate:.2f} steps/s, "
        f"{_x(free_speedup)} locked, against {_x(decoupled['speedup'])} with "
        f"the cerebellum at work: {cost}."
    )


def _on_cpus(result: dict[str, Any]) -> bool:
    """Whether the headline runs placed their actors on CPUs (no GPUs)."""
    placement = result["placement"].get(str(result["config"]["chunks"]), {})
    return not placement.get("gpus", False)


def cpu_seconds_per_step(record: dict[str, Any]) -> dict[str, float] | None:
    """Each process's CPU seconds per step in a contender's record (its CPU in
    cores over its steps/s), or None where ``/proc`` did not give every one."""
    cpu = {name: actor.get("cpu") for name, actor in record["actors"].items()}
    rate = record["steps_per_second"]
    if None in cpu.values() or not rate:
        return None
    return {name: v / rate for name, v in cpu.items()}


def _pace_note(
    result: dict[str, Any], decoupled: dict[str, Any], locked: dict[str, Any]
) -> str | None:
    """What the critical-pace probe says: the slowest chunk's ceiling, and
    whether the rest of decoupled's work fits beside it on this machine."""
    pace = _probed(result, "critical_pace")
    if not pace or not pace["busy"]:
        return None
    heavy = max(pace["busy"], key=pace["busy"].get)
    line = (
        "with the cerebellum lesioned (it answers no predictions, so it computes "
        "nothing, and chunk-0, left without feedback, skips its backward pass) "
        f"decoupled ran at {pace['steps_per_second']:.2f} steps/s, "
        f"{_x(pace['steps_per_second'] / locked['steps_per_second'])} locked, "
        f"with {heavy} computing {100 * pace['busy'][heavy]:.0f} % of the time: "
        "the pace of the slowest chunk when it waits for nothing, the most "
        "decoupled can reach with these chunks."
    )
    per_step = cpu_seconds_per_step(decoupled)
    if not _on_cpus(result) or per_step is None:
        return line
    beside = {n: 1000 * v for n, v in per_step.items() if n != heavy}
    other = decoupled.get("other_load_cores") or 0.0
    elsewhere = 1000 * other / decoupled["steps_per_second"]
    need = sum(beside.values()) + elsewhere
    cores = result["machine"]["cpus"] - 1
    room = cores * 1000 / pace["steps_per_second"]
    if need <= room:
        fit = "it fits, so what keeps decoupled below that pace is waiting."
    else:
        fit = f"it does not fit, so {heavy} shares its core and slows"
        excess = beside.get("cerebellum", 0.0)
        fit += (
            "; without the cerebellum's share, which on a cluster runs on a "
            "device of its own, it would."
            if excess and need - excess <= room
            else "."
        )
    return (
        f"{line} At full work the rest of decoupled's work, "
        + ", ".join(f"{n} {v:.0f}" for n, v in beside.items())
        + f" ms of CPU per step and {elsewhere:.0f} ms elsewhere (Ray's daemons), "
        f"comes to {need:.0f} ms against the {room:.0f} ms that "
        + ("the other core gives" if cores == 1 else f"the other {cores} cores give")
        + f" during one step of {heavy} at that pace: {fit}"
    )


def cpu_bound(result: dict[str, Any]) -> dict[str, float] | None:
    """The most steps/s ``decoupled`` could reach with every core busy on its work.

    CPU seconds per step are each process's CPU (cores, per second of the
    driver's clock) over the measured steps/s; summed over the bench's own
    processes. Only for CPU placement (on GPUs the cores are not the limit),
    and only where ``/proc`` gave every process's CPU.
    """
    schedules = result["schedules"]
    decoupled, locked = schedules.get("decoupled"), schedules.get("locked")
    if not decoupled or not locked or not _on_cpus(result):
        return None
    dec, loc = cpu_seconds_per_step(decoupled), cpu_seconds_per_step(locked)
    if dec is None or loc is None:
        return None
    cores = result["machine"]["cpus"]
    total = sum(dec.values())
    steps = cores / total
    target = cores / (TARGET_SPEEDUP * locked["steps_per_second"])
    cerebellum = dec.get("cerebellum", 0.0)
    return {
        "cores": cores,
        "decoupled_ms": 1000 * total,
        "locked_ms": 1000 * sum(loc.values()),
        "chunks_ms": 1000 * sum(v for n, v in dec.items() if n.startswith("chunk")),
        "cerebellum_ms": 1000 * cerebellum,
        "driver_ms": 1000 * dec.get("driver", 0.0),
        "steps_per_second": steps,
        "speedup": steps / locked["steps_per_second"],
        "reached": decoupled["steps_per_second"] / steps,
        "target_ms": 1000 * target,
        "cerebellum_budget_ms": 1000 * (target - (total - cerebellum)),
    }


def render_markdown(result: dict[str, Any], figures_prefix: str = "") -> str:
    """``bench.md``: setup, tables, findings and figures."""
    parts = [
        "### Setup",
        "",
        describe_setup(result),
        "",
        "### Results",
        "",
        render_tables(result),
        "",
        "### What the numbers say",
        "",
        *[f"- {line}" for line in findings(result)],
        "",
        "### Figures",
        "",
    ]
    for name in result["figures"]:
        parts += [f"![{name}]({figures_prefix}{name})", ""]
    return "\n".join(parts)


def splice_doc(doc: Path, markdown: str) -> None:
    """Replace what lies between the bench markers of ``doc`` with ``markdown``."""
    text = doc.read_text()
    if DOC_BEGIN not in text or DOC_END not in text:
        raise ConfigError(
            f"--doc {doc}: no bench markers; add the lines {DOC_BEGIN!r} and "
            f"{DOC_END!r} where the generated section goes"
        )
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    doc.write_text(f"{head}{DOC_BEGIN}\n\n{markdown.strip()}\n\n{DOC_END}{tail}")


# bench.json ------------------------------------------------------------------------

_NUMBER = {"type": "number"}
_OPTIONAL_NUMBER = {"type": ["number", "null"]}
_SPREAD = {
    "type": "object",
    "required": ["median", "min", "max", "runs"],
    "properties": {
        "median": _NUMBER,
        "min": _NUMBER,
        "max": _NUMBER,
        "runs": {"type": "array", "items": _NUMBER, "minItems": 1},
    },
}
_CURVE_POINT = {
    "type": "object",
    "required": ["step", "examples", "seconds", "validation_loss", "metric"],
    "properties": {
        "step": {"type": "integer", "minimum": 0},
        "examples": {"type": "integer", "minimum": 0},
        "seconds": {"type": "number", "minimum": 0},
        "train_loss": _OPTIONAL_NUMBER,
        "validation_loss": _NUMBER,
        "metric": _NUMBER,
        "metric_name": {"type": "string"},
    },
}
_RECORD = {
    "type": "object",
    "required": [
        "kind",
        "model",
        "uses_cerebellum",
        "steps_per_second",
        "steps_per_second_spread",
        "examples_per_second",
        "speedup",
        "ideal_speedup",
        "examples",
        "train_loss",
        "validation_loss",
        "metric",
        "metric_name",
        "time_to_target",
        "actors",
        "phase_seconds_per_step",
        "runs",
    ],
    "properties": {
        "kind": {"enum": ["ccdni", "torch"]},
        "model": {"enum": list(MODELS)},
        "uses_cerebellum": {"type": "boolean"},
        "cerebellum_precision": {"enum": ["float32", "bfloat16", None]},
        "steps_per_second": {"type": "number", "exclusiveMinimum": 0},
        "steps_per_second_spread": _SPREAD,
        "examples_per_second": {"type": "number", "exclusiveMinimum": 0},
        "speedup": _OPTIONAL_NUMBER,
        "speedup_spread": {"anyOf": [_SPREAD, {"type": "null"}]},
        "ideal_speedup": _OPTIONAL_NUMBER,
        "examples": {"type": "integer", "minimum": 1},
        "train_loss": _NUMBER,
        "validation_loss": _NUMBER,
        "metric": _NUMBER,
        "metric_name": {"type": "string"},
        "time_to_target": {
            "type": "object",
            # steps and max_steps came with the chase for the target; files
            # written before it lack them.
            "required": ["seconds", "reached", "runs", "speedup"],
            "properties": {
                "seconds": _OPTIONAL_NUMBER,
                "reached": {"type": "integer", "minimum": 0},
                "runs": {"type": "array", "items": _OPTIONAL_NUMBER},
                "steps": {
                    "type": "array",
                    "items": {"type": ["integer", "null"], "minimum": 0},
                },
                "max_steps": {"type": "integer", "minimum": 1},
                "speedup": _OPTIONAL_NUMBER,
            },
        },
        "machine_busy_cores": _OPTIONAL_NUMBER,
        "other_load_cores": _OPTIONAL_NUMBER,
        "actors": {
            "type": "object",
            "required": ["chunk-0"],
            "additionalProperties": {
                "type": "object",
                "required": ["cpu", "peak_rss_bytes"],
                "properties": {
                    "busy": {"type": "number", "minimum": 0},
                    "other": {"type": "number", "minimum": 0},
                    "cpu": _OPTIONAL_NUMBER,
                    "peak_rss_bytes": {"type": ["integer", "null"]},
                },
            },
        },
        "phase_seconds_per_step": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": {"type": "number", "minimum": 0},
            },
        },
        "receive_seconds_per_step": {
            "anyOf": [
                {
                    "type": "object",
                    "additionalProperties": {"type": "number", "minimum": 0},
                },
                {"type": "null"},
            ]
        },
        "runs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["seconds", "steps", "curve"],
                "properties": {
                    "seconds": {"type": "number", "exclusiveMinimum": 0},
                    "steps": {"type": "integer", "minimum": 1},
                    "chase_steps": {"type": "integer", "minimum": 0},
                    "chase_seconds": {"type": "number", "minimum": 0},
                    "curve": {"type": "array", "minItems": 2, "items": _CURVE_POINT},
                },
            },
        },
    },
}
BENCH_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "ccdni bench.json",
    "type": "object",
    "required": [
        "version",
        "config",
        "train_config",
        "task",
        "machine",
        "load",
        "placement",
        "target_loss",
        "schedules",
        "baselines",
        "sweep",
        "figures",
    ],
    "properties": {
        "version": {"const": 1},
        "config": {
            "type": "object",
            "required": [
                "task",
                "model",
                "chunks",
                "hidden_size",
                "truncation",
                "batch_size",
                "micro_batches",
                "steps",
                "repeats",
                "warmup",
                "schedules",
            ],
        },
        "machine": {"type": "object", "required": ["cpus", "gpus", "torch", "ray"]},
        "load": {"type": "object", "required": ["before", "after"]},
        "placement": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["gpus", "fresh", "cpus_per_actor"],
            },
        },
        "target_loss": _OPTIONAL_NUMBER,
        "schedules": {
            "type": "object",
            "propertyNames": {"enum": list(SCHEDULES)},
            "additionalProperties": _RECORD,
        },
        "baselines": {
            "type": "object",
            "propertyNames": {"enum": list(TORCH_SCHEDULES)},
            "additionalProperties": _RECORD,
        },
        "sweep": {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["steps", "repeats", "points"],
                    "properties": {
                        "points": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["chunks", "schedules"],
                            },
                        }
                    },
                },
            ]
        },
        "figures": {"type": "array", "items": {"type": "string"}},
    },
}
"""The JSON Schema of ``bench.json`` (tests validate every run against it)."""


# Profile ---------------------------------------------------------------------------


def _drain_server(address_queue, width: int) -> None:
    """A cortex service on loopback that takes every activity as it arrives."""
    from cortex_service.runtime import Mailbox
    from cortex_service.servicer import CortexServicer
    from protos import ccdni_pb2_grpc as pb_grpc
    from protos.service import ServerSecurity, start_server

    activity, feedback = Mailbox(4, "activity_in"), Mailbox(4, "feedback_in")
    servicer = CortexServicer(1, width, width, activity, feedback)
    server = start_server(
        lambda s: pb_grpc.add_CortexServicer_to_server(servicer, s),
        security=ServerSecurity(token=SEND_TOKEN),
        service_names=["ccdni.v1.Cortex"],
        host="127.0.0.1",
    )
    address_queue.put(server.address)
    step = 0
    while True:
        activity.take((step, 0, 0))
        step += 1


SEND_TOKEN = "ccdni-bench-send-latency-token"


def measure_send_latency(
    bench: BenchConfig, task: TaskData, calls: int = 200
) -> dict[str, Any]:
    """One window's activity sent to a lone cortex service in another process.

    ``send`` is what a chunk spends in its send span when the previous send has
    long been accepted (a pause of 20 ms between sends stands for compute);
    ``accepted`` is the full round trip until the receiver has the message.
    """
    import multiprocessing

    import torch

    from cerebellum_service.learning import ActivityKey
    from cortex_service.servicer import GrpcNeighbour
    from protos.service import ClientSecurity

    config = bench.train_config()
    steps = config.effective_truncation(task.seq_len)
    context = multiprocessing.get_context("spawn")
    addresses = context.Queue()
    server = context.Process(
        target=_drain_server, args=(addresses, config.hidden_size), daemon=True
    )
    server.start()
    try:
        peer = GrpcNeighbour(addresses.get(timeout=120), ClientSecurity(SEND_TOKEN))
        activity = torch.randn(bench.batch_size, steps, config.hidden_size)
        sends, accepts = [], []
        for index in range(2 * calls + 20):
            began = time.perf_counter()
            peer.send_activity(ActivityKey(index, 0, 0, 0, ""), activity)
            sent = time.perf_counter()
            if index >= calls + 10:
                peer.flush()
                accepts.append(time.perf_counter() - began)
            elif index >= 10:
                sends.append(sent - began)
                time.sleep(0.02)  # the chunk computing before its next send
        peer.close()
    finally:
        server.kill()
        server.join(timeout=10)
    return {
        "config": {
            "rows": bench.batch_size,
            "steps": steps,
            "width": config.hidden_size,
            "calls": calls,
        },
        "phases": {"send": _percentiles(sends), "accepted": _percentiles(accepts)},
    }


def _percentiles(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(1000 * s for s in samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "median_ms": statistics.median(ordered),
        "p90_ms": at(0.9),
        "p99_ms": at(0.99),
        "mean_ms": statistics.fmean(ordered),
    }


def measure_predict_latency(
    bench: BenchConfig, task: TaskData, calls: int = 200
) -> dict[str, Any]:
    """Predict latency of a lone cerebellum server, decoupled's shapes.

    Under ``decoupled`` chunk 0 asks its output microzone for the feedback of
    ``batch × window`` rows of ``hidden`` activity each window; this times the
    same call against a cerebellum server of its own, alone on the machine, and
    the microzone's forward pass in this process (the compute floor).
    """
    from orchestrator.zones import context_size

    config = bench.train_config()
    rows = bench.batch_size * config.effective_truncation(task.seq_len)
    labels = int(task.train.labels.max()) + 1  # as the cluster sizes its zones
    context = (
        context_size(config, labels, task.seq_len)
        if config.context_zones != "state"
        else 0
    )
    with tempfile.TemporaryDirectory(prefix="ccdni-predict-") as scratch:
        path = Path(scratch) / "predict.json"
        command = [
            sys.executable,
            "-m",
            "cerebellum_service.bench",
            "--width",
            str(config.hidden_size),
            "--granule-width",
            str(config.granule_width),
            "--batch",
            str(rows),
            "--context-size",
            str(context),
            "--calls",
            str(calls),
            "--warmup",
            "20",
            "--server-torch-threads",
            str(config.threads),
            "--json",
            str(path),
        ]
        logger.info("timing Predict alone: %s", " ".join(command[1:]))
        subprocess.run(command, check=True, capture_output=True, timeout=900)
        return json.loads(path.read_text())


def _core_worker(shape: dict[str, int], start, seconds: float, results) -> None:
    """Time forward and backward passes of one window of an upper chunk."""
    import torch

    from cortex_service.network import CorticalChunk

    torch.set_num_threads(shape["threads"])
    torch.manual_seed(0)
    chunk = CorticalChunk(shape["width"], shape["width"], shape["layers"])
    x = torch.randn(shape["batch"], shape["steps"], shape["width"])
    x.requires_grad_(True)  # an upper chunk computes the feedback of its input
    state = chunk.initial_state(shape["batch"])

    def window() -> None:
        hidden, _ = chunk(x, state)
        hidden.square().mean().backward()

    for _ in range(5):
        window()
    start.wait(timeout=120)  # every copy starts its timed loop together
    samples, began = [], time.perf_counter()
    while time.perf_counter() - began < seconds:
        tic = time.perf_counter()
        window()
        samples.append(time.perf_counter() - tic)
    results.put(statistics.median(samples))


def measure_core_scaling(
    bench: BenchConfig, task: TaskData, seconds: float = 4.0
) -> dict[str, Any]:
    """The same pure compute alone and in ``copies`` processes side by side.

    Every copy runs the forward and backward pass of one window of an upper
    chunk (the bench's shapes and threads, nothing sent, no cerebellum), first
    one process alone, then ``copies`` at once (the chunks of ``decoupled``, at
    most one per core). ``work_rate`` is the work the copies do together, in
    units of one copy alone: what running chunks side by side can buy at best
    on this machine, whatever the schedule.
    """
    import multiprocessing

    config = bench.train_config()
    shape = {
        "width": config.hidden_size,
        "layers": config.layers_per_chunk,
        "batch": bench.batch_size,
        "steps": config.effective_truncation(task.seq_len),
        "threads": config.threads,
    }
    copies = max(2, min(bench.chunks, os.cpu_count() or 1))
    context = multiprocessing.get_context("spawn")

    def run(count: int) -> list[float]:
        start, results = context.Barrier(count), context.Queue()
        workers = [
            context.Process(
                target=_core_worker, args=(shape, start, seconds, results), daemon=True
            )
            for _ in range(count)
        ]
        for worker in workers:
            worker.start()
        try:
            return sorted(results.get(timeout=300) for _ in workers)
        except queue.Empty:
            raise TimeoutError(
                f"{count} compute copies gave no timing in 300 s"
            ) from None
        finally:
            for worker in workers:
                worker.join(timeout=30)
                if worker.is_alive():  # a copy stuck at the barrier or hung
                    worker.terminate()
                    worker.join(timeout=10)

    alone = run(1)[0]
    side = run(copies)
    return {
        "config": {**shape, "copies": copies, "seconds": seconds},
        "alone_ms": 1000 * alone,
        "side_by_side_ms": [1000 * v for v in side],
        "work_rate": sum(alone / v for v in side),
    }


def measure_critical_pace(bench: BenchConfig, task: TaskData) -> dict[str, Any]:
    """``decoupled`` with its cerebellum lesioned: how fast the slowest chunk goes.

    The lesioned cerebellum answers every Predict with no prediction, so it
    computes nothing and learns nothing, and the chunk below the cut, left
    without feedback, skips its backward pass; every chunk above the first keeps
    all its work (receiving activity, forward, backward, sending observations).
    What remains sets the pace of a chunk that waits for nothing: the most
    ``decoupled`` can reach on these chunks, with its other work on cores of
    its own. Same chunks, placement, steps and segments as the measured runs;
    one run, no evaluations.
    """
    return _pace_run(bench, task, lesion="cerebellum")


def measure_free_cerebellum_pace(bench: BenchConfig, task: TaskData) -> dict[str, Any]:
    """``decoupled`` with a cerebellum that costs nothing but its messages.

    The cerebellum answers every Predict at once with zero feedback
    (``answer_zeros``): it checks and decodes each query and sends an answer
    of full size, but computes, caches and learns nothing. Every chunk keeps
    all its work, the chunk below the cut its backward pass too, and every
    message travels as in the measured runs. What this run loses against them
    is the cerebellum's arithmetic, the part that a cluster gives a device of
    its own; what it keeps is everything else. One run, no evaluations.
    """
    return _pace_run(bench, task, answer_zeros=True)


def measure_thread_cpu(bench: BenchConfig, task: TaskData) -> dict[str, Any]:
    """``decoupled`` as measured, once more: the CPU each thread of each actor
    spends per step, read from ``/proc`` around one unevaluated run."""
    return _pace_run(bench, task)


def _pace_run(bench: BenchConfig, task: TaskData, **cerebellum) -> dict[str, Any]:
    """One unevaluated ``decoupled`` run with its cerebellum changed as given
    (nothing given: as in the measured runs)."""
    placement = plan(bench)
    with tempfile.TemporaryDirectory(prefix="ccdni-bench-pace-") as scratch:
        contender = RaySchedule(
            "decoupled",
            bench.train_config(),
            bench,
            task,
            Path(scratch),
            placement,
            **cerebellum,
        )
        try:
            launch_all([contender], bench.warmup)
            pids = contender.pids()
            before = {n: _thread_cpu_seconds(pid) for n, pid in pids.items()}
            run = run_once(contender, bench, task, bench.steps, evaluate=False)
            after = {n: _thread_cpu_seconds(pid) for n, pid in pids.items()}
            names = contender.thread_names()
            counters = contender.cluster.cerebellum_stats()
        finally:
            shutdown_all([contender])
    actors = actor_breakdown([run])
    phases = phase_seconds_per_step([run], bench.chunks)
    busy = [s.machine_busy for s in run.segments]
    return {
        "config": {**cerebellum, "steps": run.steps},
        "steps_per_second": run.steps_per_second,
        # The server's own count, warm-up included.
        "predictions": {
            "answered": counters.get("predictions", 0.0),
            "lesioned": counters.get("predictions_lesioned", 0.0),
            "zeros": counters.get("predictions_zeros", 0.0),
        },
        "busy": {n: a["busy"] for n, a in actors.items() if "busy" in a},
        "cpu_ms_per_step": {
            n: 1000 * a["cpu"] / run.steps_per_second
            for n, a in actors.items()
            if a["cpu"] is not None
        },
        "phase_ms_per_step": {
            f"chunk-{k}": {p: 1000 * v for p, v in chunk.items()}
            for k, chunk in enumerate(phases)
        },
        "machine_busy_cores": (
            statistics.fmean(busy) if busy and None not in busy else None
        ),
        # Over the whole run_once, pipeline fill and drain included.
        "thread_ms_per_step": {
            n: thread_breakdown(before[n], after[n], names.get(n, {}), run.steps)
            for n in pids
            if after[n]
        },
    }


# The whole benchmark ---------------------------------------------------------------


def run_bench(
    bench: BenchConfig,
    out: Path,
    command: str | None = None,
    doc: Path | None = None,
) -> dict[str, Any]:
    """Measure every contender; write ``bench.json``, ``bench.md`` and the plots.

    Args:
        bench: what to measure.
        out: the directory to write.
        command: the command line, recorded in ``bench.json``.
        doc: a Markdown file whose bench markers get the tables and figures.
    """
    from orchestrator.tasks.registry import load_task

    task = load_task(bench.task, seed=bench.seed, n_train=bench.n_train)
    if bench.seq_len is not None and bench.seq_len != task.seq_len:
        raise ConfigError(
            f"--seq-len {bench.seq_len}: task {bench.task} has sequences of "
            f"{task.seq_len} steps only; drop --seq-len or pick another task"
        )
    if doc is not None and not doc.exists():
        raise ConfigError(f"--doc {doc}: no such file")
    out.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    prepare_ray(bench)
    placement = plan(bench)
    logger.info("placement: %s", placement)
    started = time.perf_counter()

    placements = {bench.chunks: placement}
    with tempfile.TemporaryDirectory(prefix="ccdni-bench-") as scratch:
        runs = run_interleaved(bench, task, Path(scratch), placement)
        sweep_points = {bench.chunks: runs} if bench.sweep_chunks else {}
        for chunks in bench.sweep_chunks:
            if chunks in sweep_points:
                continue
            other = dataclasses.replace(
                bench, chunks=chunks, steps=bench.sweep_steps, sweep_chunks=()
            )
            placements[chunks] = plan(other)
            logger.info("sweep: %d chunks, %s", chunks, placements[chunks])
            sweep_points[chunks] = run_interleaved(
                other, task, Path(scratch), placements[chunks], evaluate=False
            )

    result: dict[str, Any] = {
        "version": 1,
        "command": command,
        "config": bench.to_dict(),
        "train_config": bench.train_config().to_dict(),
        "task": {
            "name": task.name,
            "seq_len": task.seq_len,
            "input_size": task.input_size,
            "output_size": task.output_size,
            "train_sequences": len(task.train),
            "validation_sequences": len(task.validation),
        },
        "machine": machine_record(),
        "load": {"before": load_before, "after": load_average()},
        "placement": {
            str(k): dataclasses.asdict(p) for k, p in sorted(placements.items())
        },
        "wall_seconds": time.perf_counter() - started,
        **summarise(bench, task, runs),
        "sweep": summarise_sweep(bench, sweep_points) if sweep_points else None,
    }
    result["figures"] = draw_figures(result, runs, out, bench.timeline_seconds)
    write_results(result, out, doc)
    if bench.profile:
        # After the runs are safely written: a failed probe costs only itself.
        result["send_latency"] = _probe(measure_send_latency, bench, task)
        result["predict_latency"] = _probe(measure_predict_latency, bench, task)
        result["core_scaling"] = _probe(measure_core_scaling, bench, task)
        if "decoupled" in bench.schedules and bench.chunks > 1:
            result["critical_pace"] = _probe(measure_critical_pace, bench, task)
            result["free_cerebellum_pace"] = _probe(
                measure_free_cerebellum_pace, bench, task
            )
            result["thread_cpu"] = _probe(measure_thread_cpu, bench, task)
        write_results(result, out, doc)
    logger.info("wrote %s in %.0f s", out / "bench.json", result["wall_seconds"])
    return result


def write_results(result: dict[str, Any], out: Path, doc: Path | None) -> None:
    """``bench.json``, ``bench.md`` and, with ``doc``, its generated section."""
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, out, doc)


def write_report(result: dict[str, Any], out: Path, doc: Path | None) -> None:
    """``bench.md`` and, with ``doc``, its generated section (not the figures)."""
    (out / "bench.md").write_text(render_markdown(result) + "\n")
    if doc is not None:
        prefix = os.path.relpath(out.resolve(), doc.resolve().parent) + "/"
        splice_doc(doc, render_markdown(result, figures_prefix=prefix))


def _probe(measure, bench: BenchConfig, task: TaskData) -> dict[str, Any]:
    """Run one profile probe; a probe that fails is recorded as such, with why."""
    try:
        return measure(bench, task)
    except Exception as error:  # a probe's failure must not cost the runs above
        detail = getattr(error, "stderr", None)
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        reason = f"{error}" + (f"\n{detail.strip()[-2000:]}" if detail else "")
        logger.warning("profile probe %s failed: %s", measure.__name__, reason)
        return {"error": reason}


# Command line ----------------------------------------------------------------------


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sweep-chunks {text!r}: expected numbers separated by commas, e.g. "
            "1,2,3,4"
        ) from None


def add_bench_parser(commands) -> argparse.ArgumentParser:
    """``ccdni bench``'s options, on the ``ccdni`` subcommands."""
    from orchestrator.tasks.registry import TASKS

    parser = commands.add_parser(
        "bench",
        help="steps/s of every schedule beside PyTorch's pipeline schedules",
        description="Train the same network under every schedule (and PyTorch's "
        "GPipe and 1F1B), in turns, and write bench.json, bench.md and plots. "
        "Defaults: the headline configuration of docs/BENCHMARKS.md.",
    )
    parser.add_argument("--task", choices=TASKS, help="default patterns")
    parser.add_argument(
        "--model",
        choices=MODELS,
        help="default crnn: no cerebellum, so only decoupled uses one (for the "
        "spatial cut between chunks); ccrnn adds state microzones to every ccdni "
        "schedule",
    )
    parser.add_argument("--chunks", type=int, help="chunks K (default 2)")
    parser.add_argument("--layers-per-chunk", type=int, help="default 1")
    parser.add_argument(
        "--hidden", type=int, dest="hidden_size", help="LSTM units (default 256)"
    )
    parser.add_argument("--truncation", type=int, help="window length (default 7)")
    parser.add_argument(
        "--granule-width",
        type=int,
        help="granule cells per microzone (default 128; the task's own is 512)",
    )
    parser.add_argument(
        "--output-context",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="give decoupled's output microzone the label and the time step "
        "(default on)",
    )
    parser.add_argument(
        "--seq-len", type=int, help="steps per sequence; only the task's own length"
    )
    parser.add_argument("--batch-size", type=int, help="default 64")
    parser.add_argument(
        "--micro-batches", type=int, help="M for pipelined and torch-* (default 4)"
    )
    parser.add_argument("--steps", type=int, help="batches per measured run (60)")
    parser.add_argument("--repeats", type=int, help="runs per contender (default 3)")
    parser.add_argument("--warmup", type=int, help="warm-up batches (default 3)")
    parser.add_argument(
        "--eval-every", type=int, help="batches between evaluations (default 10)"
    )
    parser.add_argument(
        "--schedules",
        type=_names,
        help=f"comma list, in turn order (default {','.join(ALL_SCHEDULES)})",
    )
    parser.add_argument("--threads", type=int, help="torch threads per actor (1)")
    parser.add_argument("--n-train", type=int, help="cap on training sequences")
    parser.add_argument(
        "--target-loss",
        type=float,
        help="validation loss for time-to-target (default: the loss locked "
        "ends its runs at)",
    )
    parser.add_argument(
        "--target-steps",
        type=int,
        help="batches a run may train in all to reach the target loss; those "
        "beyond --steps count only towards time to target (default 4 × --steps; "
        "the value of --steps turns the chase off)",
    )
    parser.add_argument(
        "--sweep-chunks",
        type=_counts,
        help="also measure throughput at these numbers of chunks, e.g. 1,2,3,4",
    )
    parser.add_argument("--sweep-steps", type=int, help="batches per sweep run (20)")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--cpus-per-actor", type=float, help="Ray CPU reservation per actor (0.5)"
    )
    parser.add_argument("--ray-address", help="join this Ray cluster")
    parser.add_argument(
        "--gpus",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one GPU per actor (default: when the cluster has enough)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        default=None,
        help="start each contender anew for every run instead of keeping all alive",
    )
    parser.add_argument(
        "--park",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stop the processes of the contenders waiting for their turn "
        "(SIGSTOP, SIGCONT for their turn) so they take no CPU from the one "
        "measured (default on; only processes the bench started, on CPUs, "
        "without --fresh or --ray-address)",
    )
    parser.add_argument(
        "--metrics",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve Prometheus /metrics from every actor, as training does "
        "(default on; --no-metrics measures what they cost)",
    )
    parser.add_argument(
        "--timeline-seconds", type=float, help="seconds of each timeline plot"
    )
    parser.add_argument(
        "--cerebellum-nice",
        type=int,
        help="lower decoupled's cerebellum's CPU priority by this much (0-19, "
        "default 10, as in training)",
    )
    parser.add_argument(
        "--batch-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the threads of ccdni's actors as batch jobs (Linux "
        "SCHED_BATCH; default on, as in training; --no-batch-scheduling "
        "measures what it buys; the PyTorch stages keep the default policy)",
    )
    parser.add_argument(
        "--cerebellum-precision",
        choices=PRECISIONS,
        help="dtype of decoupled's cerebellum's arithmetic and of the traffic "
        "to it (default auto, as in training: bfloat16 where the CPU or GPU "
        "computes it natively)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        default=None,
        help="also time a lone cerebellum's Predict, a lone activity send and a "
        "chunk's compute with the run's shapes, and run decoupled once more "
        "with its cerebellum lesioned (the slowest chunk's own pace), once "
        "with a cerebellum that answers zeros (what its arithmetic costs) and "
        "once as measured (the CPU of every actor's threads)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of every schedule in under two minutes (tiny network, "
        "few steps); its speeds mean nothing",
    )
    parser.add_argument("--out", default="runs/bench", help="directory to write")
    parser.add_argument(
        "--doc", help="rewrite the generated section of this Markdown file"
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="measure nothing: write OUT/bench.md (and --doc's generated section) "
        "anew from the numbers in OUT/bench.json, after a change to how the "
        "report words them; the figures are left as they are",
    )
    return parser


def bench_from_args(args: argparse.Namespace) -> BenchConfig:
    """Flags given on the command line, then ``--quick``'s, then the defaults."""
    names = [f.name for f in dataclasses.fields(BenchConfig)]
    values = dict(QUICK) if args.quick else {}
    values.update(
        {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    )
    return BenchConfig(**values)


def run_bench_command(args: argparse.Namespace) -> int:
    """``ccdni bench``: run, write, print the tables."""
    if args.render:
        return render_command(Path(args.out), Path(args.doc) if args.doc else None)
    bench = bench_from_args(args)
    command = "ccdni " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_bench(
        bench,
        Path(args.out),
        command=command,
        doc=Path(args.doc) if args.doc else None,
    )
    sys.stdout.write(render_tables(result) + "\n")
    return 0


def render_command(out: Path, doc: Path | None) -> int:
    """``ccdni bench --render``: the report anew from ``out/bench.json``."""
    source = out / "bench.json"
    if not source.is_file():
        raise ConfigError(
            f"--render reads {source}, which does not exist: pass the --out of "
            "an earlier bench run"
        )
    result = json.loads(source.read_text())
    write_report(result, out, doc)
    sys.stdout.write(render_tables(result) + "\n")
    return 0
