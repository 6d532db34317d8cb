"""One cortical chunk as a Ray actor: its network, its gRPC server, its loop.

The orchestrator creates the actor inside a placement-group bundle (one GPU where
the cluster has them), asks for its address, wires its neighbours and the
cerebellum, and calls :meth:`ChunkActor.run`. From then on the actor talks to its
neighbours directly over gRPC; the driver only watches, checkpoints and collects.

The class is plain Python (the orchestrator applies ``ray.remote``), so the
chunk can also be driven without Ray.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from cerebellum_service.actor import node_address
from cerebellum_service.config import COMPUTE_DTYPES
from cortex_service.learning import ChunkLearner
from cortex_service.network import build_chunk
from cortex_service.runtime import Aborted, Batch, ChunkRuntime, ChunkSpec, Mailbox
from cortex_service.servicer import (
    REJECTION_REASONS,
    CortexServicer,
    GrpcNeighbour,
    add_to_server,
)
from protos import checkpoint as ckpt
from protos.metrics import metrics_for, stream_timer
from protos.process import batch_scheduling, keep_freed_memory, thread_names
from protos.service import ClientSecurity, ServerSecurity, start_server

logger = logging.getLogger(__name__)


def chunk_name(index: int) -> str:
    return f"chunk-{index}"


@dataclass
class ChunkActorSpec:
    """Everything a chunk actor needs, sent once at creation (picklable).

    Attributes:
        spec: position and schedule of the chunk.
        sizes: input_size, hidden_size, output_size, layers_per_chunk, dropout.
        seed: the run's seed (chunk weights and data order).
        lr, clip, update, kind, seq_len, truncation: the learning settings.
        batches: builds the run's batch source (``step -> Batch``) inside the actor.
        token: the run's secret; every gRPC call carries it.
        checkpoint_dir: where checkpoints go; ``None`` for none.
        checkpoint_every: steps between checkpoints (0: none).
        max_in_flight: windows a mailbox holds before the sender stalls.
        threads: torch threads of this actor (CPU).
        batch_scheduling: run this process's threads as batch jobs (see
            :func:`protos.process.batch_scheduling`).
        cerebellum_factory: builds the cerebellum client from an address.
    """

    spec: ChunkSpec
    sizes: dict[str, Any]
    seed: int
    lr: float
    clip: float
    update: str
    kind: str
    seq_len: int
    truncation: int
    batches: Callable[[], Callable[[int], Batch]]
    token: str
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    max_in_flight: int = 2
    threads: int = 1
    batch_scheduling: bool = True
    host: str | None = None
    cerebellum_factory: Callable[..., Any] | None = None
    metrics: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class ChunkActor:
    """A chunk's process. See the module docstring."""

    def __init__(self, config: ChunkActorSpec) -> None:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        torch.set_num_threads(config.threads)
        if config.batch_scheduling:  # before any server thread: they inherit it
            batch_scheduling()
        keep_freed_memory()
        self.config = config
        self.index = config.spec.index
        self.name = chunk_name(self.index)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        sizes = config.sizes
        torch.manual_seed(0)  # build_chunk seeds itself; this only fixes other draws
        self.chunk = build_chunk(
            self.index,
            config.spec.chunks,
            sizes["input_size"],
            sizes["hidden_size"],
            sizes["output_size"],
            sizes["layers_per_chunk"],
            sizes["dropout"],
            config.seed,
        ).to(self.device)
        self.learner = ChunkLearner(self.chunk, config.lr, config.clip or None)
        capacity = config.max_in_flight * config.spec.micro_batches
        self.activity_in = Mailbox(capacity, f"{self.name}.activity_in")
        self.feedback_in = Mailbox(capacity, f"{self.name}.feedback_in")
        self.servicer = CortexServicer(
            self.index,
            self.chunk.input_size,
            self.chunk.hidden_size,
            self.activity_in,
            self.feedback_in,
            checkpoint=self._checkpoint_to_path,
            restore=self._restore_from_path,
        )
        host = config.host or node_address()
        self.metrics = metrics_for(config.metrics, config.spec.run, "chunk", self.index)
        self.server = start_server(
            lambda s: add_to_server(self.servicer, s),
            security=ServerSecurity(token=config.token),
            service_names=["ccdni.v1.Cortex"],
            host=host,
            interceptors=self._server_interceptors(),
        )
        self.metrics_port = self.metrics.serve(host)
        self.metrics.add_source(self._samples)
        self.host = host
        self.steps_done = 0  # in this process, for monotonic counters
        self.degraded_steps = 0  # steps finished with a window in degraded mode
        self.step_seconds: deque[float] = deque(maxlen=256)
        self.batches = config.batches()
        self.batch_size = config.sizes.get("batch_size", 0)
        self.runtime: ChunkRuntime | None = None
        self.step = 0
        self.losses: dict[int, float] = {}
        self.restarts = int(os.environ.get("CCDNI_ACTOR_RESTARTS", "0"))
        self._running = threading.Event()
        # Native ids of the threads that ran run(): Ray may pick another each call.
        self._compute_threads: set[int] = set()
        logger.info(
            "%s serving on %s (device %s)", self.name, self.server.address, self.device
        )

    # Wiring ------------------------------------------------------------------------

    def address(self) -> str:
        return self.server.address

    def metrics_address(self) -> str | None:
        """``host:port`` of this actor's ``/metrics``, or None when turned off."""
        return None if self.metrics_port is None else f"{self.host}:{self.metrics_port}"

    def set_restarts(self, count: int) -> None:
        self.restarts = count

    def _server_interceptors(self) -> list:
        return [self.metrics.server_interceptor()] if self.metrics.enabled else []

    def _client_interceptors(self) -> list:
        return [self.metrics.client_interceptor()] if self.metrics.enabled else []

    def _samples(self):
        """Counters and gauges read at scrape time (see protos.metrics)."""
        counters = self.servicer.counters.snapshot()
        yield (
            "ccdni_queue_depth",
            "gauge",
            "messages waiting in a mailbox",
            {"queue": "activity_in"},
            len(self.activity_in),
        )
        yield (
            "ccdni_queue_depth",
            "gauge",
            "messages waiting in a mailbox",
            {"queue": "feedback_in"},
            len(self.feedback_in),
        )
        yield (
            "ccdni_queue_stalls",
            "counter",
            "sends that waited for room",
            {},
            self.activity_in.stalls + self.feedback_in.stalls,
        )
        for reason in REJECTION_REASONS:
            yield (
                "ccdni_messages_rejected",
                "counter",
                "messages refused, by reason",
                {"reason": reason},
                counters.get(f"rejected.{reason}", 0),
            )
        yield (
            "ccdni_bytes_received",
            "counter",
            "tensor bytes received",
            {},
            counters.get("bytes.received", 0),
        )
        runtime = self.runtime
        peers = [] if runtime is None else [runtime.below, runtime.above]
        sent = sum(p.bytes_sent for p in peers if p is not None)
        yield (
            "ccdni_bytes_sent",
            "counter",
            "tensor bytes sent to neighbours",
            {},
            sent,
        )
        degraded = 0 if runtime is None else runtime.degraded_windows
        yield (
            "ccdni_degraded_windows",
            "counter",
            "windows without predicted feedback",
            {},
            degraded,
        )
        yield (
            "ccdni_actor_restarts",
            "gauge",
            "restarts of this actor",
            {},
            self.restarts,
        )
        yield ("ccdni_steps", "counter", "training steps done", {}, self.steps_done)
        yield (
            "ccdni_examples",
            "counter",
            "training examples done",
            {},
            self.steps_done * self.batch_size,
        )
        yield ("ccdni_step", "gauge", "the step the chunk is at", {}, self.step)
        if self.losses:
            yield (
                "ccdni_loss",
                "gauge",
                "training loss of the latest step",
                {},
                self.losses[max(self.losses)],
            )

    def pid(self) -> int:
        return os.getpid()

    def thread_names(self) -> dict[int, str]:
        """This process's threads by native id; those that ran steps (Ray's
        executor threads, which Python calls Dummy-N) are ``compute``."""
        return thread_names(dict.fromkeys(self._compute_threads, "compute"))

    def connect(
        self,
        below: str | None,
        above: str | None,
        cerebellum: str | None,
        cerebellum_dtype: str | None = None,
    ) -> None:
        """Open clients to the neighbours and the cerebellum; build the runtime.

        ``cerebellum_dtype`` (a wire dtype name, e.g. ``bfloat16``) is what
        activity and feedback travel to the cerebellum in; None sends them as
        computed.
        """
        security = ClientSecurity(token=self.config.token)
        self._close_peers()
        if self.runtime is not None and hasattr(self.runtime.cerebellum, "close"):
            self.runtime.cerebellum.close()
        interceptors = self._client_interceptors()
        timer = stream_timer(interceptors)  # messages timed as calls are

        def neighbour(address: str | None) -> GrpcNeighbour | None:
            if not address:
                return None
            return GrpcNeighbour(
                address, security, interceptors=interceptors, timer=timer
            )

        below_peer, above_peer = neighbour(below), neighbour(above)
        self.runtime = ChunkRuntime(
            self.config.spec,
            self.learner,
            self.config.kind,
            self.config.seq_len,
            self.config.truncation,
            self.config.update,
            activity_in=self.activity_in,
            feedback_in=self.feedback_in,
            below=below_peer,
            above=above_peer,
            cerebellum=self._cerebellum_client(cerebellum),
            device=self.device,
            cerebellum_dtype=(
                None if cerebellum_dtype is None else COMPUTE_DTYPES[cerebellum_dtype]
            ),
        )
        self.runtime.timeline.on_span = self.metrics.phase

    def set_cerebellum(self, address: str | None) -> None:
        """Point predictions and learning at a (restarted) cerebellum."""
        if self.runtime is None:
            raise RuntimeError(f"{self.name}: connect() first")
        old = self.runtime.cerebellum
        self.runtime.cerebellum = self._cerebellum_client(address)
        if old is not None and hasattr(old, "close"):
            old.close()

    def _cerebellum_client(self, address: str | None):
        if not address or self.config.cerebellum_factory is None:
            return None
        return self.config.cerebellum_factory(
            address, self.config.token, self._client_interceptors()
        )

    def _close_peers(self) -> None:
        if self.runtime is None:
            return
        for peer in (self.runtime.below, self.runtime.above):
            if peer is not None:
                peer.abort()

    # Running -----------------------------------------------------------------------

    def run(self, start: int, stop: int) -> dict[str, Any]:
        """Train steps ``start`` to ``stop - 1``; checkpoint on the way.

        Returns what the driver collects: per-step losses (last chunk), how many
        steps ran, the degraded windows, whether the run was aborted.
        """
        if self.runtime is None:
            raise RuntimeError(f"{self.name}: connect() before run()")
        self._compute_threads.add(threading.get_native_id())
        self._running.set()
        aborted = False
        degraded = 0
        self.step = start
        try:
            for step in range(start, stop):
                tic = time.perf_counter()
                result = self.runtime.run_batch(step, self.batches(step))
                self.step_seconds.append(time.perf_counter() - tic)
                self.steps_done += 1
                degraded += result.degraded_windows
                if result.degraded_windows:
                    self.degraded_steps += 1
                if result.loss is not None:
                    self.losses[step] = result.loss
                self.step = step + 1
                every = self.config.checkpoint_every
                if every and self.config.checkpoint_dir and self.step % every == 0:
                    self.save_checkpoint(self.step)
            for peer in (self.runtime.below, self.runtime.above):
                if peer is not None:
                    peer.flush()
        except Aborted:
            aborted = True
            logger.info("%s: aborted at step %d", self.name, self.step)
        except grpc.RpcError as error:
            # A neighbour went away mid-send: the driver restores and re-wires.
            aborted = True
            logger.warning(
                "%s: lost a neighbour at step %d (%s)",
                self.name,
                self.step,
                error.code().name,
            )
        finally:
            self._running.clear()
        return {
            "chunk": self.index,
            "start": start,
            "steps_done": self.step,
            "aborted": aborted,
            "degraded_windows": degraded,
        }

    def abort(self) -> None:
        """Stop a running loop (it raises out of any wait)."""
        self.activity_in.abort()
        self.feedback_in.abort()

    def progress(self) -> dict[str, Any]:
        runtime = self.runtime
        return {
            "step": self.step,
            "running": self._running.is_set(),
            "last_loss": self.losses.get(self.step - 1),
            "degraded_windows": 0 if runtime is None else runtime.degraded_windows,
            "degraded_steps": self.degraded_steps,
            "activity_depth": len(self.activity_in),
            "feedback_depth": len(self.feedback_in),
            "step_seconds": list(self.step_seconds),
            "cerebellum_dtype": None
            if runtime is None or runtime.cerebellum_dtype is None
            else str(runtime.cerebellum_dtype).removeprefix("torch."),
        }

    def received_cpu_seconds(self) -> float:
        """CPU its server's handlers have spent receiving activity and feedback."""
        return self.servicer.counters.get("receive.cpu_seconds")

    def results(self, since: int = 0) -> dict[str, Any]:
        """Losses from step ``since`` on and the timeline (for reports)."""
        runtime = self.runtime
        return {
            "losses": {s: v for s, v in self.losses.items() if s >= since},
            "timeline": [] if runtime is None else list(runtime.timeline.events),
            "timeline_origin": None if runtime is None else runtime.timeline.origin,
            "wall_origin": time.time() - time.perf_counter(),
            "stalls": self.activity_in.stalls + self.feedback_in.stalls,
        }

    def state_dict(self) -> dict[str, Any]:
        return {k: v.cpu() for k, v in self.chunk.state_dict().items()}

    # Checkpoints -------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> int:
        tic = time.perf_counter()
        state = {
            "chunk": self.state_dict(),
            "optimizer": self.learner.optimizer.state_dict(),
            "step": step,
        }
        _, size = ckpt.save_state(self.config.checkpoint_dir, step, self.name, state)
        self.metrics.checkpoint(time.perf_counter() - tic)
        return size

    def restore(self, step: int) -> int:
        """Load this chunk's checkpoint of ``step``; clear everything in flight."""
        state = ckpt.load_state(
            ckpt.step_dir(self.config.checkpoint_dir, step), self.name
        )
        self._load(state)
        return step

    def _load(self, state: dict[str, Any]) -> None:
        self.chunk.load_state_dict(state["chunk"])
        self.learner.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.losses = {s: v for s, v in self.losses.items() if s < self.step}
        self.activity_in.reset()
        self.feedback_in.reset()
        self.servicer.reset()

    def _checkpoint_to_path(self, path: str) -> tuple[str, int, int]:
        import io

        buffer = io.BytesIO()
        torch.save(
            {
                "chunk": self.state_dict(),
                "optimizer": self.learner.optimizer.state_dict(),
                "step": self.step,
            },
            buffer,
        )
        from pathlib import Path

        ckpt.atomic_write(Path(path), buffer.getvalue())
        return path, self.step, len(buffer.getvalue())

    def _restore_from_path(self, path: str) -> int:
        self._load(torch.load(path, weights_only=False))
        return self.step

    def shutdown(self) -> None:
        self.abort()
        self._close_peers()
        self.server.stop(grace=1.0)
        self.metrics.stop()
