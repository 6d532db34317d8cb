"""Every chunk's runtime as a thread of this process, wired by local mailboxes.

This runs the same schedule code as the Ray actors with in-process neighbours
and an in-process cerebellum. Tests use it to check the schedules' arithmetic
without starting a cluster; it is not meant to be fast (threads share the GIL).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from cerebellum_service.learning import FeedbackPredictor, LocalCerebellum
from cortex_service.learning import ChunkLearner
from cortex_service.network import build_chunks
from cortex_service.runtime import (
    ChunkRuntime,
    ChunkSpec,
    LocalNeighbour,
    Mailbox,
    StepResult,
)
from cortex_service.servicer import CortexServicer, GrpcNeighbour, add_to_server
from orchestrator.batches import BatchStream
from orchestrator.config import TrainConfig
from orchestrator.tasks.base import TaskData
from orchestrator.zones import (
    build_microzones,
    cerebellum_settings,
    context_size,
    zone_specs,
)


@dataclass
class ThreadedRun:
    runtimes: list[ChunkRuntime]
    cerebellum: FeedbackPredictor | None
    results: list[list[StepResult]]

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self.results[-1]]


def run_threaded(
    config: TrainConfig,
    task: TaskData,
    schedule: str,
    steps: int,
    micro_batches: int = 1,
    forward_unlock: bool = False,
    max_in_flight: int = 2,
    transport: str = "local",
    token: str = "threaded-run-token",
    cerebellum: FeedbackPredictor | None = None,
    look_ahead: bool = True,
    cerebellum_dtype: torch.dtype | None = None,
) -> ThreadedRun:
    """Train ``steps`` batches with every chunk in its own thread.

    Args:
        transport: ``local`` hands tensors over in memory; ``grpc`` starts a real
            cortex service per chunk on loopback and sends everything through it.
        cerebellum: use this predictor (a remote cerebellum, say) instead of
            building a local one.
        look_ahead: ``ChunkSpec.look_ahead``.
        cerebellum_dtype: the cerebellum's precision: the chunks send it
            activity and feedback in this dtype (``ChunkRuntime``'s), and the
            local one built here computes in it. None: float32 arithmetic, the
            chunks' own dtype on the way.
    """
    chunks = build_chunks(
        task.input_size,
        config.hidden_size,
        task.output_size,
        config.chunks,
        config.layers_per_chunk,
        config.dropout,
        config.seed,
    )
    n_labels = int(task.train.labels.max()) + 1
    specs = zone_specs(
        config,
        chunks,
        schedule,
        forward_unlock,
        context_size(config, n_labels, task.seq_len),
    )
    if cerebellum is None and specs:
        cerebellum = LocalCerebellum(
            build_microzones(specs),
            lr=config.cerebellum_lr,
            compute_dtype=cerebellum_dtype or torch.float32,
        )
    truncation = config.effective_truncation(task.seq_len)
    boxes = [
        (
            Mailbox(max_in_flight * micro_batches, f"activity_in[{k}]"),
            Mailbox(max_in_flight * micro_batches, f"feedback_in[{k}]"),
        )
        for k in range(config.chunks)
    ]
    servers, neighbours = [], []
    if transport == "grpc":
        servers, neighbours = _serve_chunks(chunks, boxes, token)
    elif transport != "local":
        raise ValueError(f"transport {transport!r}: choose 'local' or 'grpc'")

    def neighbour(index: int):
        if transport == "grpc":
            return neighbours[index]
        return LocalNeighbour(*boxes[index])

    runtimes = []
    for index, chunk in enumerate(chunks):
        spec = ChunkSpec(
            index=index,
            chunks=config.chunks,
            schedule=schedule,
            micro_batches=micro_batches,
            forward_unlock=forward_unlock,
            **cerebellum_settings(config),
            look_ahead=look_ahead,
        )
        below = neighbour(index - 1) if index > 0 else None
        above = neighbour(index + 1) if index < config.chunks - 1 else None
        runtimes.append(
            ChunkRuntime(
                spec,
                ChunkLearner(chunk, config.lr, config.clip or None),
                task.kind,
                task.seq_len,
                truncation,
                config.update,
                activity_in=boxes[index][0],
                feedback_in=boxes[index][1],
                below=below,
                above=above,
                cerebellum=cerebellum,
                cerebellum_dtype=cerebellum_dtype,
            )
        )

    results: list[list[StepResult]] = [[] for _ in runtimes]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        stream = BatchStream(task, config.batch_size, config.seed, config.context)
        try:
            for step in range(steps):
                results[index].append(
                    runtimes[index].run_batch(step, stream.batch(step))
                )
        except BaseException as error:  # reported to the caller below
            errors.append(error)
            for activity_in, feedback_in in boxes:
                activity_in.abort()
                feedback_in.abort()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(runtimes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        for runtime in runtimes:
            for peer in (runtime.above, runtime.below):
                if not isinstance(peer, GrpcNeighbour):
                    continue
                if errors:  # what is still in flight no longer matters
                    peer.abort()
                else:
                    peer.close()
    finally:
        for server in servers:
            server.stop(grace=1.0)
    if errors:
        raise errors[0]
    return ThreadedRun(runtimes, cerebellum, results)


def _serve_chunks(chunks, boxes, token: str):
    """A cortex service per chunk on loopback, and a client for each."""
    from protos.service import ClientSecurity, ServerSecurity, start_server

    servers, neighbours = [], []
    for index, chunk in enumerate(chunks):
        servicer = CortexServicer(
            index, chunk.input_size, chunk.hidden_size, *boxes[index]
        )
        servers.append(
            start_server(
                lambda s, sv=servicer: add_to_server(sv, s),
                security=ServerSecurity(token=token),
                service_names=["ccdni.v1.Cortex"],
            )
        )
        neighbours.append(
            GrpcNeighbour(servers[-1].address, ClientSecurity(token=token))
        )
    return servers, neighbours
