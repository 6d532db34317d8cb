"""PyTorch's own pipeline schedules on the same chunks: the external baseline.

``torch-gpipe`` and ``torch-1f1b`` train the cortical network that ccdni's own
schedules train, with ``torch.distributed.pipelining`` instead of ccdni's
runtime. The chunks come from :func:`cortex_service.network.build_chunk`, so
their weights match chunk for chunk; the batches come from the same seeded
:class:`~orchestrator.batches.BatchStream`; each chunk is trained by the same
:class:`~cortex_service.learning.ChunkLearner` (Adam, gradient-norm clip).

One process per chunk, started with ``torch.multiprocessing`` (spawn), joined in
a gloo process group through a ``TCPStore`` that this process opens on
127.0.0.1 at a port the system picks. Each process wraps its chunk in a
``PipelineStage``; ``ScheduleGPipe`` or ``Schedule1F1B`` moves the micro-batches
between the stages.

PyTorch's schedules know nothing of windows, so truncated BPTT is laid over
them, one pipeline ``step`` per window::

    batch b:  step(window 0)   step(window 1)   …   step(window W-1)   Adam step
              └─ every stage keeps (h, c) of each micro-batch, detached, from
                 one window's step to the next

Within a ``step`` GPipe runs all M forwards and then all M backwards; 1F1B
interleaves them. Between steps each stage keeps the recurrent state of every
micro-batch at the window end, detached (truncated BPTT: no gradient crosses a
window boundary), and the next window starts from it. Gradients accumulate over
the windows; ``scale_grads`` is off because the loss of each micro-batch and
window is already divided by the whole batch's masked steps (as ccdni does), so
the accumulated gradient is the batch's. One optimiser step follows each batch
(``--update sequence``), or each window (``--update window``).

A batch whose size M does not divide (the last of an epoch) is padded with
masked rows to the next multiple of M: they add no loss and no gradient, only a
few rows of work. The driver talks to the stage processes over queues: train a
range of steps, reset to the initial weights, hand over the weights (for
evaluation), stop.
"""

from __future__ import annotations

import copy
import logging
import queue
import resource
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cortex_service.learning import ChunkLearner
from cortex_service.loss import sequence_loss
from cortex_service.network import CorticalChunk, State, build_chunk, window_bounds
from orchestrator.config import ConfigError, TrainConfig
from orchestrator.tasks.base import SequenceData, TaskData

logger = logging.getLogger(__name__)

# Benchmark name -> the torch.distributed.pipelining schedule class.
SCHEDULES: dict[str, str] = {
    "torch-gpipe": "ScheduleGPipe",
    "torch-1f1b": "Schedule1F1B",
}
# One event of a stage's timeline: (phase, batch, window, micro, start, end), with
# start and end in seconds since the epoch (time.time()).
Event = tuple[str, int, int, int, float, float]


@dataclass
class PipelineSegment:
    """What one ``train`` command measured.

    Attributes:
        seconds: from the barrier before the first step to the barrier after the
            last, on stage 0.
        losses: the last stage's training loss of each step.
        events: every stage's forward, backward and update spans.
    """

    seconds: float
    losses: dict[int, float] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)


def pack_targets(data: SequenceData, kind: str) -> torch.Tensor:
    """Targets and mask in one float tensor, so the schedule splits them together.

    Classification: ``(B, S, 2)`` holding the class index and the mask;
    regression: ``(B, S, O + 1)``, the targets then the mask.
    """
    mask = data.mask.to(torch.float32).unsqueeze(-1)
    if kind == "classification":
        return torch.cat([data.targets.to(torch.float32).unsqueeze(-1), mask], -1)
    return torch.cat([data.targets, mask], -1)


def unpack_targets(packed: torch.Tensor, kind: str):
    """Inverse of :func:`pack_targets`: ``(targets, mask)``."""
    mask = packed[..., -1] > 0.5
    if kind == "classification":
        return packed[..., 0].round().to(torch.int64), mask
    return packed[..., :-1], mask


def pad_rows(data: SequenceData, multiple: int) -> SequenceData:
    """Append masked rows of zeros until the batch size divides by ``multiple``."""
    extra = -len(data) % multiple
    if not extra:
        return data

    def grow(tensor: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros((extra, *tensor.shape[1:]), dtype=tensor.dtype)
        return torch.cat([tensor, zeros])

    return SequenceData(
        grow(data.inputs), grow(data.targets), grow(data.mask), grow(data.labels)
    )


class WindowLoss:
    """The last stage's loss of one micro-batch over one window.

    ``normaliser`` is set once per batch: the masked steps of the whole batch, so
    micro-batches and windows add up to the batch's mean loss.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.normaliser: torch.Tensor | float = 1.0

    def __call__(self, outputs: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        targets, mask = unpack_targets(packed, self.kind)
        return sequence_loss(outputs, targets, mask, self.kind, self.normaliser)


class WindowStage(nn.Module):
    """A chunk as a pipeline stage that carries each micro-batch's state.

    The schedule calls :meth:`forward` once per micro-batch per window;
    ``micro`` says which micro-batch (set by the instrumented stage just before),
    so the matching ``(h, c)`` is read and replaced, detached.
    """

    def __init__(self, chunk: CorticalChunk) -> None:
        super().__init__()
        self.chunk = chunk
        self.micro = 0
        self.states: list[State] = []

    def begin_batch(
        self, micro_batches: int, rows: int, device: torch.device | str = "cpu"
    ) -> None:
        """Zero state for each of ``micro_batches`` micro-batches of ``rows`` rows."""
        self.states = [
            self.chunk.initial_state(rows, device) for _ in range(micro_batches)
        ]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden, (h, c) = self.chunk(inputs, self.states[self.micro])
        self.states[self.micro] = (h.detach(), c.detach())
        if self.chunk.is_last:
            return self.chunk.read_out(hidden)
        # batch_first LSTM outputs are a transposed view; gloo sends contiguous data
        return hidden.contiguous()


@dataclass(frozen=True)
class StageJob:
    """What a stage process needs (picklable); ``device`` is cpu or cuda."""

    config: TrainConfig
    schedule: str
    micro_batches: int
    rank: int
    store_port: int
    device: str = "cpu"


class _StageRunner:
    """One stage process's side: its chunk, its schedules, its loop over steps."""

    def __init__(self, job: StageJob) -> None:
        import torch.distributed as dist

        from orchestrator.batches import BatchStream
        from orchestrator.tasks.registry import load_task

        config = job.config
        self.job = job
        self.rank = job.rank
        self.world = config.chunks
        self.dist = dist
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if job.device == "cuda"
            else torch.device("cpu")
        )
        task = load_task(
            config.task,
            seed=config.seed,
            data_dir=config.data_dir,
            n_train=config.n_train,
        )
        self.kind = task.kind
        self.seq_len = task.seq_len
        self.input_size = task.input_size
        self.output_size = task.output_size
        self.stream = BatchStream(task, config.batch_size, config.seed)
        self.bounds = list(
            window_bounds(task.seq_len, config.effective_truncation(task.seq_len))
        )
        self.chunk = build_chunk(
            self.rank,
            self.world,
            task.input_size,
            config.hidden_size,
            task.output_size,
            config.layers_per_chunk,
            config.dropout,
            config.seed,
        ).to(self.device)
        self.learner = ChunkLearner(self.chunk, config.lr, config.clip or None)
        self.initial = copy.deepcopy(
            (self.chunk.state_dict(), self.learner.optimizer.state_dict())
        )
        self.module = WindowStage(self.chunk)
        self.loss = WindowLoss(task.kind)
        self.schedules: dict[tuple[int, int], Any] = {}
        self.events: list[Event] = []
        self.step_index = 0
        self.window_index = 0
        self._prewarm(len(task.train))

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world - 1

    # Schedules ---------------------------------------------------------------------

    def _schedule_for(self, rows: int, steps: int):
        """The schedule for micro-batches of ``rows`` rows and windows of ``steps``.

        Stage buffers have static shapes, so each shape gets its own stage and
        schedule over the same module (a full batch and the last, shorter batch of
        an epoch; a shorter last window).
        """
        key = (rows, steps)
        if key in self.schedules:
            return self.schedules[key]
        from torch.distributed import pipelining

        width_in = self.input_size if self.first else self.job.config.hidden_size
        width_out = self.output_size if self.last else self.job.config.hidden_size
        zeros = dict(device=self.device)
        stage = pipelining.PipelineStage(
            self.module,
            self.rank,
            self.world,
            self.device,
            # Static shapes; requires_grad tells a stage to send input feedback back.
            input_args=(
                torch.zeros(rows, steps, width_in, **zeros).requires_grad_(
                    not self.first
                ),
            ),
            output_args=(
                torch.zeros(rows, steps, width_out, **zeros).requires_grad_(True),
            ),
        )
        self._instrument(stage)
        schedule_class = getattr(pipelining, SCHEDULES[self.job.schedule])
        schedule = schedule_class(
            stage,
            self.job.micro_batches,
            # Every rank passes the loss: without one a schedule runs forward only.
            loss_fn=self.loss,
            scale_grads=False,
        )
        self.schedules[key] = schedule
        return schedule

    def _instrument(self, stage) -> None:
        """Time each micro-batch's forward and backward; tell the module which."""
        forward, backward = stage.forward_one_chunk, stage.backward_one_chunk

        def timed_forward(chunk_id, *args, **kwargs):
            self.module.micro = chunk_id
            started = time.perf_counter()
            try:
                return forward(chunk_id, *args, **kwargs)
            finally:
                self._record("forward", chunk_id, started)

        def timed_backward(chunk_id, *args, **kwargs):
            started = time.perf_counter()
            try:
                return backward(chunk_id, *args, **kwargs)
            finally:
                self._record("backward", chunk_id, started)

        stage.forward_one_chunk = timed_forward
        stage.backward_one_chunk = timed_backward

    def _record(self, phase: str, micro: int, started: float) -> None:
        self.events.append(
            (
                phase,
                self.step_index,
                self.window_index,
                micro,
                started,
                time.perf_counter(),
            )
        )

    def _prewarm(self, n_train: int) -> None:
        """Build every schedule the run will need and run each once on zeros.

        The first step of a schedule exchanges shapes between stages; doing that
        here keeps it out of the measured steps. Gradients are thrown away.
        """
        batch = self.job.config.batch_size
        sizes = {batch if n_train >= batch else n_train}
        if n_train % batch:
            sizes.add(n_train % batch)
        micro = self.job.micro_batches
        for size in sorted(sizes):
            rows = -(-size // micro)
            for start, stop in self.bounds:
                n, steps = rows * micro, stop - start
                targets = (
                    torch.zeros(n, steps, dtype=torch.int64)
                    if self.kind == "classification"
                    else torch.zeros(n, steps, self.output_size)
                )
                zeros = SequenceData(
                    torch.zeros(n, steps, self.input_size),
                    targets,
                    torch.zeros(n, steps, dtype=torch.bool),
                    torch.zeros(n, dtype=torch.int64),
                )
                self.module.begin_batch(micro, rows, self.device)
                self.loss.normaliser = 1.0
                self._window(zeros, rows, 0, steps, [])
        self.learner.optimizer.zero_grad(set_to_none=True)
        self.events.clear()

    # Steps -------------------------------------------------------------------------

    def _window(
        self, data: SequenceData, rows: int, start: int, stop: int, losses: list
    ) -> None:
        schedule = self._schedule_for(rows, stop - start)
        inputs = data.inputs[:, start:stop]
        window = SequenceData(
            inputs, data.targets[:, start:stop], data.mask[:, start:stop], data.labels
        )
        inputs = inputs.to(self.device, non_blocking=True)
        packed = pack_targets(window, self.kind).to(self.device, non_blocking=True)
        if self.first and self.last:
            schedule.step(inputs, target=packed, losses=losses, return_outputs=False)
        elif self.first:
            schedule.step(inputs, return_outputs=False)
        elif self.last:
            schedule.step(target=packed, losses=losses, return_outputs=False)
        else:
            schedule.step(return_outputs=False)

    def train_batch(self, step: int) -> float:
        """Every window of batch ``step``, then the update; the batch's loss."""
        micro = self.job.micro_batches
        data = self.stream.sequences(step)
        self.loss.normaliser = data.mask.sum().clamp_min(1).to(self.device)
        data = pad_rows(data, micro)
        rows = len(data) // micro
        self.module.begin_batch(micro, rows, self.device)
        self.step_index = step
        total = 0.0
        for window, (start, stop) in enumerate(self.bounds):
            self.window_index = window
            losses: list[torch.Tensor] = []
            self._window(data, rows, start, stop, losses)
            total += sum(float(loss.detach()) for loss in losses)
            if self.job.config.update == "window":
                self._update(window)
        if self.job.config.update == "sequence":
            self._update(len(self.bounds) - 1)
        return total

    def _update(self, window: int) -> None:
        self.window_index = window
        started = time.perf_counter()
        self.learner.step()
        self._record("update", 0, started)

    def train(self, start: int, stop: int) -> dict[str, Any]:
        """Steps ``start`` to ``stop - 1`` between two barriers."""
        self.events.clear()
        self._synchronize()
        self.dist.barrier()
        began = time.perf_counter()
        losses = {step: self.train_batch(step) for step in range(start, stop)}
        self._synchronize()
        self.dist.barrier()
        seconds = time.perf_counter() - began
        offset = time.time() - time.perf_counter()
        events = [(*e[:4], e[4] + offset, e[5] + offset) for e in self.events]
        return {
            "seconds": seconds,
            "losses": losses if self.last else {},
            "events": events,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.chunk.state_dict().items()}

    def reset(self) -> None:
        """Back to the initial weights and optimiser state."""
        chunk_state, optimiser_state = copy.deepcopy(self.initial)
        self.chunk.load_state_dict(chunk_state)
        self.learner.optimizer.load_state_dict(optimiser_state)
        self.learner.optimizer.zero_grad(set_to_none=True)


def _stage_main(job: StageJob, commands, replies) -> None:
    """Entry point of one stage process: join the group, then serve commands."""
    import os

    import torch.distributed as dist

    failed = False
    try:
        torch.set_num_threads(job.config.threads)
        backend = "gloo"
        if job.device == "cuda":
            torch.cuda.set_device(job.rank % torch.cuda.device_count())
            backend = "nccl"
        store = dist.TCPStore("127.0.0.1", job.store_port, is_master=False)
        dist.init_process_group(
            backend, store=store, rank=job.rank, world_size=job.config.chunks
        )
        runner = _StageRunner(job)
        replies.put((job.rank, "ready", None))
        while True:
            command, *arguments = commands.get()
            if command == "train":
                replies.put((job.rank, "train", runner.train(*arguments)))
            elif command == "reset":
                runner.reset()
                replies.put((job.rank, "reset", None))
            elif command == "state":
                replies.put((job.rank, "state", runner.state_dict()))
            elif command == "stop":
                break
            else:
                raise ValueError(f"unknown command {command!r}")
    except BaseException:  # reported to the driver, which raises it there
        failed = True
        replies.put((job.rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        # Hand every reply over, then skip the interpreter's teardown: after
        # torch.distributed it waits about 10 s in native code for nothing.
        replies.close()
        replies.join_thread()
        os._exit(1 if failed else 0)


class TorchPipeline:
    """The chunks trained by a ``torch.distributed.pipelining`` schedule.

    It offers what the benchmark needs of a contender, like
    :class:`~orchestrator.cluster.Cluster`: :meth:`start`, :meth:`run`,
    :meth:`reset`, :meth:`evaluate`, :meth:`shutdown`.

    Args:
        config: the training configuration (``config.chunks`` stages).
        schedule: ``torch-gpipe`` or ``torch-1f1b``.
        micro_batches: M, micro-batches per batch.
        device: ``cpu`` (gloo) or ``cuda`` (one GPU per stage, NCCL).
        timeout: seconds to wait for any answer from the stage processes.

    Raises:
        ConfigError: an unknown schedule, or fewer micro-batches than 1F1B needs.
    """

    def __init__(
        self,
        config: TrainConfig,
        schedule: str,
        micro_batches: int,
        device: str = "cpu",
        timeout: float = 600.0,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ConfigError(
                f"--schedules {schedule!r}: the PyTorch baselines are "
                f"{', '.join(SCHEDULES)}"
            )
        if micro_batches < 1:
            raise ConfigError(
                f"--micro-batches must be at least 1, got {micro_batches}"
            )
        if schedule == "torch-1f1b" and micro_batches < config.chunks:
            raise ConfigError(
                f"torch-1f1b needs --micro-batches >= --chunks, got {micro_batches} "
                f"micro-batches for {config.chunks} chunks"
            )
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"device {device!r}: choose cpu or cuda")
        self.config = config
        self.schedule = schedule
        self.micro_batches = micro_batches
        self.device = device
        self.timeout = timeout
        self.processes: list[Any] = []
        self._commands: list[Any] = []
        self._replies: Any = None
        self._store: Any = None
        self.peak_rss: dict[str, int] = {}

    @property
    def actor_names(self) -> list[str]:
        """Stage k trains chunk k: named as ccdni names its chunk actors."""
        return [f"chunk-{k}" for k in range(self.config.chunks)]

    def pids(self) -> dict[str, int]:
        """The stage processes by name (for CPU and memory readings)."""
        return {
            name: process.pid for name, process in zip(self.actor_names, self.processes)
        }

    def start(self) -> None:
        """Open the store, spawn one process per stage, wait until all are ready."""
        import torch.distributed as dist
        import torch.multiprocessing as mp

        self._store = dist.TCPStore(
            "127.0.0.1", 0, is_master=True, wait_for_workers=False
        )
        context = mp.get_context("spawn")
        self._replies = context.Queue()
        for rank in range(self.config.chunks):
            commands = context.Queue()
            job = StageJob(
                self.config,
                self.schedule,
                self.micro_batches,
                rank,
                self._store.port,
                self.device,
            )
            process = context.Process(
                target=_stage_main,
                args=(job, commands, self._replies),
                name=f"ccdni-{self.schedule}-{rank}",
                daemon=True,
            )
            process.start()
            self._commands.append(commands)
            self.processes.append(process)
        self._gather("ready")
        logger.info(
            "%s: %d stage processes ready (%d micro-batches, %s)",
            self.schedule,
            self.config.chunks,
            self.micro_batches,
            "NCCL, a GPU each" if self.device == "cuda" else "gloo on 127.0.0.1",
        )

    def _send(self, *command: Any) -> None:
        for commands in self._commands:
            commands.put(command)

    def _gather(self, kind: str) -> list[Any]:
        """One reply of ``kind`` from every stage, in rank order."""
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout
        while len(answers) < len(self.processes):
            try:
                rank, got, payload = self._replies.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self.processes if not p.is_alive()]
                if dead:
                    raise RuntimeError(
                        f"{self.schedule}: stage processes {dead} exited while the "
                        f"driver waited for {kind!r}"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.schedule}: no {kind!r} from every stage within "
                        f"{self.timeout} s"
                    ) from None
                continue
            if got == "error":
                raise RuntimeError(f"{self.schedule}: stage {rank} failed:\n{payload}")
            if got != kind:
                raise RuntimeError(
                    f"{self.schedule}: stage {rank} answered {got!r}, expected {kind!r}"
                )
            answers[rank] = payload
        return [answers[rank] for rank in sorted(answers)]

    def run(self, start: int, stop: int) -> PipelineSegment:
        """Train steps ``start`` to ``stop - 1`` on every stage."""
        self._send("train", start, stop)
        replies = self._gather("train")
        events = [
            dict(
                chunk=rank,
                phase=phase,
                batch=batch,
                window=window,
                micro=micro,
                start=begin,
                end=end,
            )
            for rank, reply in enumerate(replies)
            for phase, batch, window, micro, begin, end in reply["events"]
        ]
        self.peak_rss = {
            name: reply["peak_rss"] for name, reply in zip(self.actor_names, replies)
        }
        return PipelineSegment(replies[0]["seconds"], replies[-1]["losses"], events)

    def reset(self) -> None:
        """Every stage back to its initial weights and optimiser state."""
        self._send("reset")
        self._gather("reset")

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        self._send("state")
        return self._gather("state")

    def evaluate(self, task: TaskData, split: str = "validation") -> dict[str, Any]:
        """Gather the stages' weights and evaluate the whole network here."""
        from orchestrator.trainer import Trainer

        trainer = Trainer(self.config.replace(model="crnn"), task)
        for chunk, state in zip(trainer.chunks, self.state_dicts()):
            chunk.load_state_dict(state)
        return trainer.evaluate(getattr(task, split))

    def shutdown(self) -> None:
        """Stop the stage processes (terminate those that do not stop in time)."""
        for commands, process in zip(self._commands, self.processes):
            if process.is_alive():
                commands.put(("stop",))
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                logger.warning("%s did not stop; terminating it", process.name)
                process.terminate()
                process.join(timeout=5)
        self.processes, self._commands = [], []
        self._store = None
