"""Distributed training on Ray: chunks and the cerebellum as actors.

The driver reserves one placement-group bundle per actor (a GPU each where the
cluster has GPUs, fractional CPUs otherwise), starts the actors, hands each the
addresses of its neighbours, the cerebellum's and the run's secret token, and
lets them run. It then only watches: progress, evaluations, checkpoints, and
faults. A dead chunk is restarted by Ray; the driver restores the newest complete
checkpoint on every actor, re-wires and continues. A dead cerebellum leaves the
chunks in degraded mode until Ray brings it back, when the driver restores its
checkpoint and points the chunks at it again.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from cerebellum_service.config import LEARNING, PRECISIONS
from cortex_service.actor import ChunkActor, ChunkActorSpec, chunk_name
from cortex_service.runtime import SCHEDULES, ChunkSpec
from orchestrator.batches import BatchSource, BatchStream
from orchestrator.config import ConfigError, TrainConfig
from orchestrator.tasks.base import TaskData
from orchestrator.zones import cerebellum_settings, context_size, zone_specs
from protos import checkpoint as ckpt

logger = logging.getLogger(__name__)

CEREBELLUM = "cerebellum"
RAY_DEFAULTS = {
    # One machine: bind to loopback, report nothing home, no cluster token.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    # A local cluster's workers start at niceness 0, not Ray's 15, so that the
    # cerebellum's --cerebellum-nice 10 puts it 10 steps below the chunks
    # rather than at the cap of 19, 4 below (a cluster joined keeps its own).
    "RAY_worker_niceness": "0",
}


@dataclass(frozen=True)
class DistributedConfig:
    """How the chunks are laid out and scheduled; see ``ccdni train --help``.

    Attributes:
        schedule: locked, pipelined or decoupled.
        micro_batches: M for pipelined.
        forward_unlock: chunks above the first run on predicted input.
        max_in_flight: windows between two chunks before the sender stalls.
        steps: batches to train (default: the configuration's epochs).
        ray_address: ``None`` starts a local cluster; ``auto`` or an address joins.
        cpus_per_actor: CPU share reserved per actor where there are no GPUs.
        gpus: ``None`` uses one GPU per actor when the cluster has enough.
        checkpoint_every: steps between checkpoints (0: only at the start).
        resume: a run directory to continue from its newest complete checkpoint.
        max_restarts: restarts Ray grants each actor.
        metrics: serve Prometheus ``/metrics`` from every actor.
        prometheus_sd: where to write the Prometheus file-based service-discovery
            list of the actors' endpoints (default ``OUT/prometheus-targets.json``).
        cerebellum_learning: ``background`` (the server learns as feedback
            arrives) or ``on_update`` (it learns when a chunk's optimiser steps,
            waiting for it; with one chunk that is where the in-process
            trainer's cerebellum learns, with K chunks it makes K updates per
            batch; see ``cerebellum_service.config.LEARNING``).
        cerebellum_nice: how far the cerebellum actor lowers its CPU priority
            (0 to 19; 0 leaves it). Its work has slack where a chunk's has
            none, so where they share cores the chunks should win them; on
            cores of its own the cerebellum runs as fast at any priority.
        batch_scheduling: every actor's threads run as batch jobs (Linux's
            SCHED_BATCH), so a thread woken by a message does not preempt one
            that computes (:func:`protos.process.batch_scheduling`).
        cerebellum_precision: the dtype of the cerebellum's arithmetic and of
            the activity and feedback the chunks send it: ``float32``,
            ``bfloat16`` (weights and optimiser state stay float32), or
            ``auto``, bfloat16 where the cerebellum's device computes it
            natively (:func:`cerebellum_service.config.resolve_precision`).
    """

    schedule: str = "decoupled"
    micro_batches: int = 1
    forward_unlock: bool = False
    max_in_flight: int = 2
    steps: int | None = None
    ray_address: str | None = None
    cpus_per_actor: float = 0.5
    gpus: bool | None = None
    checkpoint_every: int = 50
    resume: str | None = None
    max_restarts: int = 3
    wait_timeout: float = 120.0
    metrics: bool = True
    prometheus_sd: str | None = None
    cerebellum_learning: str = "background"
    cerebellum_nice: int = 10
    batch_scheduling: bool = True
    cerebellum_precision: str = "auto"

    def __post_init__(self) -> None:
        check_cerebellum_nice(self.cerebellum_nice)
        check_cerebellum_precision(self.cerebellum_precision)
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}"
            )
        if self.cerebellum_learning not in LEARNING:
            raise ConfigError(
                f"--cerebellum-learning {self.cerebellum_learning!r}: choose one of "
                f"{', '.join(LEARNING)}"
            )
        if self.micro_batches < 1:
            raise ConfigError(
                f"--micro-batches must be at least 1, got {self.micro_batches}"
            )
        if self.schedule != "pipelined" and self.micro_batches != 1:
            raise ConfigError(
                f"--micro-batches {self.micro_batches} needs --schedule pipelined"
            )
        if self.forward_unlock and self.schedule != "decoupled":
            raise ConfigError("--forward-unlock needs --schedule decoupled")
        if self.max_in_flight < 1:
            raise ConfigError(
                f"--max-in-flight must be at least 1, got {self.max_in_flight}"
            )
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        if self.checkpoint_every < 0:
            raise ConfigError(
                f"--checkpoint-every must be 0 or more, got {self.checkpoint_every}"
            )
        if not 0 < self.cpus_per_actor <= 64:
            raise ConfigError(
                f"--cpus-per-actor must be in (0, 64], got {self.cpus_per_actor}"
            )


def check_cerebellum_precision(value: str) -> None:
    if value not in PRECISIONS:
        raise ConfigError(
            f"--cerebellum-precision {value!r}: choose one of {', '.join(PRECISIONS)}"
        )


def check_cerebellum_nice(value: int) -> None:
    """ConfigError naming ``--cerebellum-nice`` unless ``value`` is a niceness
    step the cerebellum actor can take (training's and the bench's flag)."""
    from protos.process import MAX_NICE

    if not 0 <= value <= MAX_NICE:
        raise ConfigError(
            f"--cerebellum-nice must be in 0..{MAX_NICE} (0: the chunks' "
            f"priority), got {value}"
        )


def connect_ray(address: str | None) -> None:
    """Join the cluster at ``address``, or start a local one when it is ``None``."""
    import ray

    if ray.is_initialized():
        return
    for name, value in RAY_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if address is None:
        logger.info("starting a local Ray cluster")
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
    else:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, configure_logging=False)


def make_remote_cerebellum(
    address: str, token: str, interceptors=(), update_on_call: bool = False
):
    """The cerebellum client a chunk actor uses (picklable by reference)."""
    import grpc

    from cerebellum_service.client import RemoteCerebellum
    from protos.metrics import stream_timer
    from protos.service import ClientSecurity, open_channel

    channel = open_channel(address, ClientSecurity(token=token))
    if interceptors:
        channel = grpc.intercept_channel(channel, *interceptors)
    # Predictions on the stream are timed per request, as the interceptor times
    # a unary call (ccdni_grpc_client_seconds{method="PredictStream"}).
    timer = stream_timer(interceptors)
    return RemoteCerebellum(
        address, channel=channel, update_on_call=update_on_call, timer=timer
    )


@dataclass
class RunRecord:
    """What the driver collected about a run."""

    steps: int = 0
    wall_seconds: float = 0.0
    losses: dict[int, float] = field(default_factory=dict)
    restarts: int = 0
    repeated_steps: int = 0
    cerebellum_restarts: int = 0
    degraded_windows: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)
    # The cerebellum's prediction error over training, sampled every few seconds.
    cerebellum_curve: list[dict[str, Any]] = field(default_factory=list)


class Cluster:
    """The actors of one distributed run and the driver's side of it.

    Args:
        config: the training configuration (``config.chunks`` chunks).
        dist: layout and schedule.
        task: the task (the driver evaluates on it).
        out: the run directory (checkpoints go to ``out/checkpoints``).
    """

    def __init__(
        self, config: TrainConfig, dist: DistributedConfig, task: TaskData, out: Path
    ) -> None:
        self.config = config
        self.dist = dist
        self.task = task
        self.out = Path(out)
        self.checkpoint_dir = str((self.out / "checkpoints").resolve())
        self.run_id = f"run-{secrets.token_hex(4)}"
        self.token = secrets.token_urlsafe(32)
        self.truncation = config.effective_truncation(task.seq_len)
        self.stream = BatchStream(task, config.batch_size, config.seed, config.context)
        self.zone_specs = zone_specs(
            config,
            _chunk_shapes(config, task),
            dist.schedule,
            dist.forward_unlock,
            context_size(config, int(task.train.labels.max()) + 1, task.seq_len),
        )
        self.uses_cerebellum = bool(self.zone_specs)
        self.chunks: list[Any] = []
        self.cerebellum: Any = None
        self.cerebellum_address: str | None = None
        # What the cerebellum computes in, as it resolved --cerebellum-precision.
        self.cerebellum_precision: str | None = None
        self.cerebellum_pid: int | None = None
        self._stopping = False
        # Lesions by the step they take effect at (config.lesions in steps), and
        # the step the chunks last reported, for re-lesioning a restored actor.
        self.lesion_steps: dict[int, str] = {}
        # A measuring device instead of a cerebellum (CerebellumConfig's
        # answer_zeros): set before start(), by the bench's profile only.
        self.cerebellum_answers_zeros = False
        self._furthest = 0
        self.placement_group = None
        self.record = RunRecord()
        self._cerebellum_checkpoint = 0
        self._last_sample = 0.0
        self.chunk_restarts = [0] * config.chunks

    # Start-up ----------------------------------------------------------------------

    @property
    def actor_names(self) -> list[str]:
        names = [chunk_name(k) for k in range(self.config.chunks)]
        return names + ([CEREBELLUM] if self.uses_cerebellum else [])

    def start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        connect_ray(self.dist.ray_address)
        bundles, use_gpus = self._bundles()
        self.placement_group = placement_group(bundles, strategy="PACK")
        if not self.placement_group.wait(timeout_seconds=60):
            ray.util.remove_placement_group(self.placement_group)
            raise ConfigError(
                f"the Ray cluster could not place {len(bundles)} actors of "
                f"{bundles[0]} within 60 s (it has {ray.available_resources()}); "
                "lower --chunks or --cpus-per-actor, or add nodes"
            )

        def strategy(index: int):
            return PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=index
            )

        resources = dict(
            num_cpus=bundles[0].get("CPU", 0), num_gpus=1 if use_gpus else 0
        )
        chunk_class = ray.remote(ChunkActor)
        self.chunks = [
            chunk_class.options(
                name=f"{self.run_id}-{chunk_name(k)}",
                max_restarts=self.dist.max_restarts,
                max_task_retries=0,
                max_concurrency=8,
                scheduling_strategy=strategy(k),
                **resources,
            ).remote(self._chunk_spec(k))
            for k in range(self.config.chunks)
        ]
        if self.uses_cerebellum:
            from cerebellum_service.actor import CerebellumActor

            self.cerebellum = (
                ray.remote(CerebellumActor)
                .options(
                    name=f"{self.run_id}-{CEREBELLUM}",
                    max_restarts=self.dist.max_restarts,
                    max_task_retries=0,
                    max_concurrency=4,
                    scheduling_strategy=strategy(self.config.chunks),
                    **resources,
                )
                .remote(self._cerebellum_spec())
            )
        self.wire()
        logger.info(
            "%d chunk actors%s placed (%s each); schedule %s",
            self.config.chunks,
            " and a cerebellum" if self.uses_cerebellum else "",
            bundles[0],
            self.dist.schedule,
        )

    def _bundles(self) -> tuple[list[dict[str, float]], bool]:
        import ray

        count = self.config.chunks + (1 if self.uses_cerebellum else 0)
        total = ray.cluster_resources()
        gpus = int(total.get("GPU", 0))
        use_gpus = self.dist.gpus if self.dist.gpus is not None else gpus >= count
        if use_gpus and gpus < count:
            raise ConfigError(
                f"--gpus asks for one GPU per actor ({count} actors: "
                f"{self.config.chunks} chunks and the cerebellum) but the cluster has "
                f"{gpus}; lower --chunks or drop --gpus"
            )
        cpus = self.dist.cpus_per_actor
        if not use_gpus and total.get("CPU", 0) < cpus * count:
            raise ConfigError(
                f"{count} actors of {cpus} CPU need {cpus * count} CPUs; the cluster "
                f"has {total.get('CPU', 0)}: lower --cpus-per-actor or --chunks"
            )
        bundle = {"CPU": cpus, "GPU": 1} if use_gpus else {"CPU": cpus}
        return [dict(bundle) for _ in range(count)], use_gpus

    def _chunk_spec(self, index: int) -> ChunkActorSpec:
        config, task = self.config, self.task
        return ChunkActorSpec(
            spec=ChunkSpec(
                index=index,
                chunks=config.chunks,
                schedule=self.dist.schedule,
                micro_batches=self.dist.micro_batches,
                forward_unlock=self.dist.forward_unlock,
                **cerebellum_settings(config),
                run=self.run_id,
                wait_timeout=self.dist.wait_timeout,
            ),
            sizes=dict(
                input_size=task.input_size,
                hidden_size=config.hidden_size,
                output_size=task.output_size,
                layers_per_chunk=config.layers_per_chunk,
                dropout=config.dropout,
                batch_size=config.batch_size,
            ),
            seed=config.seed,
            lr=config.lr,
            clip=config.clip,
            update=config.update,
            kind=task.kind,
            seq_len=task.seq_len,
            truncation=self.truncation,
            batches=BatchSource(
                config.task,
                config.seed,
                config.batch_size,
                config.data_dir,
                config.n_train,
                config.context,
            ),
            token=self.token,
            checkpoint_dir=self.checkpoint_dir,
            checkpoint_every=self.dist.checkpoint_every,
            max_in_flight=self.dist.max_in_flight,
            threads=config.threads,
            batch_scheduling=self.dist.batch_scheduling,
            cerebellum_factory=(
                functools.partial(
                    make_remote_cerebellum,
                    update_on_call=self.dist.cerebellum_learning == "on_update",
                )
                if self.uses_cerebellum
                else None
            ),
            metrics=self.dist.metrics,
        )

    def _cerebellum_spec(self) -> dict[str, Any]:
        return {
            "zones": [
                dict(name=name, **spec) for name, spec in self.zone_specs.items()
            ],
            "lr": self.config.cerebellum_lr,
            "learning": self.dist.cerebellum_learning,
            "nice": self.dist.cerebellum_nice,
            "batch_scheduling": self.dist.batch_scheduling,
            "precision": self.dist.cerebellum_precision,
            "answer_zeros": self.cerebellum_answers_zeros,
            "clients": self.config.chunks,
            "token": self.token,
            "threads": self.config.threads,
            "metrics": self.dist.metrics,
            "run": self.run_id,
        }

    def wire(self) -> None:
        """Ask every actor for its address and hand each its neighbours'."""
        import ray

        addresses = ray.get([c.address.remote() for c in self.chunks])
        if self.cerebellum is not None:
            self.cerebellum_address = ray.get(self.cerebellum.address.remote())
            self.cerebellum_pid = ray.get(self.cerebellum.pid.remote())
            self.cerebellum_precision = ray.get(self.cerebellum.precision.remote())
        calls = []
        for index, actor in enumerate(self.chunks):
            below = addresses[index - 1] if index > 0 else None
            above = addresses[index + 1] if index + 1 < len(addresses) else None
            calls.append(
                actor.connect.remote(
                    below, above, self.cerebellum_address, self.cerebellum_precision
                )
            )
        ray.get(calls)
        logger.debug(
            "wired chunks %s, cerebellum %s", addresses, self.cerebellum_address
        )
        self.write_service_discovery()

    @property
    def sd_path(self) -> Path:
        if self.dist.prometheus_sd:
            return Path(self.dist.prometheus_sd)
        return self.out / "prometheus-targets.json"

    def write_service_discovery(self) -> list[dict[str, Any]]:
        """Prometheus file_sd list of every live actor's /metrics (atomic)."""
        import ray

        if not self.dist.metrics:
            return []
        actors = [
            (chunk_name(k), "chunk", str(k), a) for k, a in enumerate(self.chunks)
        ]
        if self.cerebellum is not None:
            actors.append((CEREBELLUM, CEREBELLUM, "", self.cerebellum))
        endpoints = ray.get([a.metrics_address.remote() for *_, a in actors])
        groups = [
            {
                "targets": [endpoint],
                "labels": {
                    "job": "ccdni",
                    "run": self.run_id,
                    "role": role,
                    "chunk": chunk,
                    "actor": name,
                },
            }
            for (name, role, chunk, _), endpoint in zip(actors, endpoints)
            if endpoint
        ]
        ckpt.atomic_write(self.sd_path, (json.dumps(groups, indent=2) + "\n").encode())
        return groups

    # Checkpoints -------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> None:
        """Every actor writes its state of ``step`` (the run is between steps)."""
        import ray

        calls = [c.save_checkpoint.remote(step) for c in self.chunks]
        if self.cerebellum is not None:
            calls.append(
                self.cerebellum.save_checkpoint.remote(self.checkpoint_dir, step)
            )
        ray.get(calls)

    def restore_latest(self) -> int:
        """Restore every actor from the newest complete checkpoint; its step."""
        import ray

        chunks = [chunk_name(k) for k in range(self.config.chunks)]
        step = ckpt.latest_complete(self.checkpoint_dir, chunks)
        if step is None:
            raise RuntimeError(
                f"no complete checkpoint in {self.checkpoint_dir} to restore from"
            )
        calls = [c.restore.remote(step) for c in self.chunks]
        cerebellum_step = None
        if self.cerebellum is not None:
            # The driver checkpoints the cerebellum as the chunks pass each
            # interval; take its newest checkpoint that is not ahead of theirs.
            done = ckpt.complete_steps(self.checkpoint_dir, [CEREBELLUM])
            cerebellum_step = next((s for s in done if s <= step), None)
            if cerebellum_step is not None:
                calls.append(
                    self.cerebellum.restore.remote(self.checkpoint_dir, cerebellum_step)
                )
        ray.get(calls)
        logger.info(
            "restored the chunks from step %d (cerebellum from step %s)",
            step,
            cerebellum_step,
        )
        return step

    # Running -----------------------------------------------------------------------

    def run(
        self,
        start: int,
        stop: int,
        on_progress: Callable[..., None] | None = None,
        poll_s: float = 0.25,
    ) -> RunRecord:
        """Train steps ``start`` to ``stop - 1``, recovering from actor failures."""
        import ray
        from ray.exceptions import RayActorError

        started = time.perf_counter()
        step = start
        self._stopping = False
        while step < stop and not self._stopping:
            refs = {c.run.remote(step, stop): k for k, c in enumerate(self.chunks)}
            pending = list(refs)
            failed: int | None = None
            lost_peer = False
            furthest = step
            while pending and failed is None and not lost_peer:
                ready, pending = ray.wait(pending, timeout=poll_s)
                for ref in ready:
                    try:
                        lost_peer |= ray.get(ref)["aborted"] and not self._stopping
                    except RayActorError as error:
                        failed = refs[ref]
                        logger.warning("chunk %d failed: %s", failed, error)
                self._furthest = furthest
                self._watch_cerebellum()
                furthest = max(furthest, self._report_progress(on_progress))
                self._checkpoint_cerebellum(furthest)
                self._sample_cerebellum(furthest)
            if self._stopping:
                break
            if failed is None and not lost_peer:
                step = stop
                break
            step = self._recover(failed, pending, furthest)
        self._collect()
        self.record.wall_seconds += time.perf_counter() - started
        self.record.steps = stop
        return self.record

    def stop(self) -> None:
        """Ask a running :meth:`run` to end early (from another thread)."""
        self._stopping = True
        for actor in self.chunks:
            actor.abort.remote()

    def _sample_cerebellum(self, step: int, every_s: float = 2.0) -> None:
        import ray
        from ray.exceptions import RayActorError

        now = time.perf_counter()
        if self.cerebellum is None or now - self._last_sample < every_s:
            return
        self._last_sample = now
        try:
            zones = ray.get(self.cerebellum.zone_stats.remote(), timeout=5)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            return
        record = {"step": step, "zones": zones}
        self.record.cerebellum_curve.append(record)
        logger.debug("step %d: cerebellum %s", step, zones)

    def _checkpoint_cerebellum(self, step: int) -> None:
        every = self.dist.checkpoint_every
        if self.cerebellum is None or not every:
            return
        due = step // every * every
        if due > self._cerebellum_checkpoint:
            self._cerebellum_checkpoint = due
            self.cerebellum.save_checkpoint.remote(self.checkpoint_dir, due)

    def _report_progress(self, on_progress) -> int:
        import ray
        from ray.exceptions import RayActorError

        try:
            progress = ray.get(self.chunks[-1].progress.remote(), timeout=10)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            return 0
        if on_progress is not None:
            on_progress(
                progress["step"], progress["last_loss"], progress["step_seconds"]
            )
        return progress["step"]

    def _recover(self, failed: int | None, pending: list, furthest: int) -> int:
        """Stop every chunk, restore the newest complete checkpoint, re-wire."""
        import ray

        self.record.restarts += 1
        for index, actor in enumerate(self.chunks):
            if index != failed:
                actor.abort.remote()
        ray.wait(pending, num_returns=len(pending), timeout=self.dist.wait_timeout)
        for actor in self.chunks:
            self._await_alive(actor)
        if failed is not None:
            self.chunk_restarts[failed] += 1
            ray.get(
                self.chunks[failed].set_restarts.remote(self.chunk_restarts[failed])
            )
        self.wire()
        step = self.restore_latest()
        self.apply_lesions(step)
        repeated = max(0, furthest - step)
        self.record.repeated_steps += repeated
        logger.warning(
            "%s; resuming from step %d (%d steps repeated)",
            "a neighbour was lost" if failed is None else f"chunk {failed} restarted",
            step,
            repeated,
        )
        return step

    def _await_alive(self, actor, timeout: float = 120.0) -> str:
        import ray
        from ray.exceptions import RayActorError

        deadline = time.monotonic() + timeout
        while True:
            try:
                return ray.get(actor.address.remote(), timeout=10)
            except (RayActorError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # Ray is restarting the actor; ask again

    def _watch_cerebellum(self) -> None:
        """Notice a restarted cerebellum; restore it and point the chunks at it."""
        import ray
        from ray.exceptions import RayActorError

        if self.cerebellum is None:
            return
        try:
            pid = ray.get(self.cerebellum.pid.remote(), timeout=0.5)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            return  # down or restarting: the chunks are in degraded mode meanwhile
        if pid == self.cerebellum_pid:
            return
        self.cerebellum_pid = pid
        address = ray.get(self.cerebellum.address.remote())
        self.record.cerebellum_restarts += 1
        step = ckpt.latest_complete(self.checkpoint_dir, [CEREBELLUM])
        if step is not None:
            ray.get(self.cerebellum.restore.remote(self.checkpoint_dir, step))
        self.cerebellum_address = address
        ray.get([c.set_cerebellum.remote(address) for c in self.chunks])
        ray.get(self.cerebellum.set_restarts.remote(self.record.cerebellum_restarts))
        self.apply_lesions(self._furthest)  # its checkpoint may predate a lesion
        self.write_service_discovery()
        logger.warning(
            "cerebellum restarted at %s (restored step %s); chunks rejoined",
            address,
            step,
        )

    def _collect(self) -> None:
        import ray

        results = ray.get([c.results.remote() for c in self.chunks])
        self.record.losses = {int(s): v for s, v in results[-1]["losses"].items()}
        self.timelines = results

    # Evaluation and reports --------------------------------------------------------

    def evaluate(self, split: str = "validation") -> dict[str, Any]:
        """Gather the chunks' weights and evaluate the whole network here."""
        return self.gathered().evaluate(getattr(self.task, split))

    def gathered(self):
        """An in-process ``Trainer`` holding the chunks' current weights."""
        import ray

        from orchestrator.trainer import Trainer

        trainer = Trainer(self.config.replace(model="crnn", lesions=()), self.task)
        states = ray.get([c.state_dict.remote() for c in self.chunks])
        for chunk, state in zip(trainer.chunks, states):
            chunk.load_state_dict(state)
        return trainer

    def apply_lesions(self, step: int) -> None:
        """Give the cerebellum actor the lesion due at ``step`` (see lesion_for).

        ``cerebellum``: it answers no predictions, so the chunks train as in
        degraded mode, which is what ``--lesion cerebellum@E`` does in one
        process (and what a stopped actor does; docs/experiments/lesions.md);
        ``olive``: it predicts on with frozen weights (``lesion_at`` combines
        several). Called at every lesion step and after every restore, since a
        checkpoint may predate a lesion.
        """
        from cerebellum_service.client import RemoteCerebellum
        from protos.service import ClientSecurity

        if not self.lesion_steps or self.cerebellum is None:
            return
        lesion = lesion_at(self.lesion_steps, step)
        for attempt in range(3):
            self._watch_cerebellum()  # a restarted actor has a new address
            try:
                with RemoteCerebellum(
                    self.cerebellum_address, ClientSecurity(token=self.token)
                ) as client:
                    client.set_lesion(lesion)
                break
            except ConnectionError:
                if attempt == 2:
                    raise
                self._await_alive(self.cerebellum)
        logger.info("step %d: cerebellum actor lesion %s", step, lesion)

    def cerebellum_stats(self) -> dict[str, float]:
        import ray

        if self.cerebellum is None:
            return {}
        return ray.get(self.cerebellum.stats.remote())

    def write_timeline(self, path: Path) -> None:
        """All actors' spans on one clock (seconds since the earliest)."""
        events = []
        for result in self.timelines:
            offset = result["wall_origin"] + result["timeline_origin"]
            for phase, batch, window, micro, start, end in result["timeline"]:
                events.append(
                    dict(
                        chunk=self.timelines.index(result),
                        phase=phase,
                        batch=batch,
                        window=window,
                        micro=micro,
                        start=start + offset,
                        end=end + offset,
                    )
                )
        origin = min((e["start"] for e in events), default=0.0)
        for event in events:
            event["start"] -= origin
            event["end"] -= origin
        path.write_text(json.dumps({"schedule": self.dist.schedule, "events": events}))

    def shutdown(self) -> None:
        import ray

        for actor in [*self.chunks, self.cerebellum]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)


def _chunk_shapes(config: TrainConfig, task: TaskData):
    """Chunk modules only for their sizes (zone widths), built cheaply."""
    from cortex_service.network import build_chunks

    return build_chunks(
        task.input_size,
        config.hidden_size,
        task.output_size,
        config.chunks,
        config.layers_per_chunk,
        config.dropout,
        config.seed,
    )


class ProgressLine:
    """The progress bar, and every ``interval_s`` a line: steps/s, loss, p50/p99.

    The p50 and p99 are of the last chunk's recent step times.
    """

    def __init__(self, bar, interval_s: float = 10.0, first_step: int = 0) -> None:
        self.bar = bar
        self.interval_s = interval_s
        self._last_time = time.perf_counter()
        self._last_step = first_step

    def __call__(self, step: int, loss: float | None, step_seconds=()) -> None:
        self.bar.update(max(0, step - self.bar.n))
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}")
        now = time.perf_counter()
        if now - self._last_time < self.interval_s or not step_seconds:
            return
        rate = (step - self._last_step) / (now - self._last_time)
        times = sorted(step_seconds)
        p50 = times[len(times) // 2]
        p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
        line = (
            f"step {step}: {rate:.2f} steps/s, loss "
            f"{'–' if loss is None else f'{loss:.4f}'}, chunk step p50 "
            f"{p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms"
        )
        if self.bar.disable:
            logger.info("%s", line)
        else:
            self.bar.write(line)
        self._last_time, self._last_step = now, step


def train_distributed(
    config: TrainConfig,
    dist: DistributedConfig,
    task: TaskData,
    out: str | Path,
    progress: bool = True,
    progress_interval: float = 10.0,
) -> dict[str, Any]:
    """``ccdni train --distributed``: run, evaluate, write the run directory.

    It stops the actors every ``eval_every`` epochs to evaluate (``curve.jsonl``
    gets the in-process trainer's keys) and at the epochs of ``config.lesions``
    to lesion the cerebellum actor (``cerebellum@E``: no more predictions;
    ``olive@E``: frozen learning), so a run directory serves ``ccdni sweep`` and
    ``ccdni compare`` as an in-process one does.
    """
    from tqdm.auto import tqdm

    from orchestrator.trainer import example_trajectories, summary_fields

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(config, dist, task, out)
    steps = dist.steps or config.epochs * cluster.stream.batches_per_epoch
    if dist.resume:
        cluster.checkpoint_dir = str((Path(dist.resume) / "checkpoints").resolve())
    cluster.start()
    try:
        start = 0
        if dist.resume:
            start = cluster.restore_latest()
            if start >= steps and (out / "summary.json").exists():
                # Nothing to train, and rewriting the outputs would lose the
                # finished run's training losses, timeline and cerebellum log.
                raise ConfigError(
                    f"--resume {dist.resume}: the run's newest checkpoint is at "
                    f"step {start}, and it trains {steps} steps, so it has "
                    f"finished ({out / 'summary.json'} is its summary); raise "
                    "--steps or --epochs to train it further"
                )
        else:
            cluster.save_checkpoint(0)
        bar = tqdm(
            total=steps,
            initial=start,
            disable=not progress,
            unit="step",
            desc=f"{config.task}/{dist.schedule}",
        )

        reporter = ProgressLine(bar, interval_s=progress_interval, first_step=start)
        per_epoch = cluster.stream.batches_per_epoch
        cluster.lesion_steps = lesion_steps(config.lesions, per_epoch)
        cluster.apply_lesions(start)
        kept = _curve_until(Path(dist.resume), start) if dist.resume else []
        record = cluster.record
        final = None  # the gathered network at the last evaluation, and its result
        with (out / "curve.jsonl").open("w") as curve:
            for line in kept:
                curve.write(line + "\n")
            ends = _segment_ends(start, steps, per_epoch, config, cluster.lesion_steps)
            for stop in ends:
                record = cluster.run(start, stop, reporter)
                start = stop
                if stop in cluster.lesion_steps:
                    cluster.apply_lesions(stop)
                if _evaluates(stop, steps, per_epoch, config.eval_every):
                    final = cluster.gathered()
                    validation = final.evaluate(task.validation)
                    point = _curve_point(record, stop, per_epoch, validation)
                    curve.write(json.dumps(point) + "\n")
                    curve.flush()
        bar.close()
        if final is None:  # resumed at its last step: nothing ran, nothing evaluated
            final = cluster.gathered()
            validation = final.evaluate(task.validation)
        # The last segment ends at ``steps`` and is evaluated: reuse that.
        fields = summary_fields(validation, final.evaluate(task.test), task.drawing)
        summary = _summary(cluster, record, fields, steps)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if task.drawing:
            trajectories = example_trajectories(final, task.validation)
            (out / "trajectories.json").write_text(json.dumps(trajectories))
        cluster.write_timeline(out / "timeline.json")
        with (out / "cerebellum.jsonl").open("w") as log:
            for sample in record.cerebellum_curve:
                log.write(json.dumps(sample) + "\n")
        _log_cerebellum_trend(record)
        (out / "manifest.msgpack").write_bytes(
            msgpack.packb(
                {"run": cluster.run_id, "checkpoints": cluster.checkpoint_dir}
            )
        )
        return summary
    finally:
        cluster.shutdown()


def _log_cerebellum_trend(record: RunRecord) -> None:
    """Say how each microzone's relative prediction error moved over the run."""
    curve = [c for c in record.cerebellum_curve if c["zones"]]
    if len(curve) < 2:
        return
    first, last = curve[0], curve[-1]
    for zone in last["zones"]:
        before = first["zones"].get(zone, {}).get("relative_error")
        after = last["zones"][zone]["relative_error"]
        logger.info(
            "cerebellum %s: relative prediction error %.3f at step %d -> %.3f at "
            "step %d",
            zone,
            before,
            first["step"],
            after,
            last["step"],
        )


def lesion_steps(lesions, per_epoch: int) -> dict[int, str]:
    """``config.lesions`` by the step they take effect at (epoch E: step
    E * per_epoch, before its first batch, as the trainer applies them); of two
    at one step the cerebellar lesion, which outranks the olive's."""
    steps: dict[int, str] = {}
    for lesion in lesions:
        at = lesion.epoch * per_epoch
        if steps.get(at) != "cerebellum":
            steps[at] = lesion.kind
    return steps


def lesion_at(steps: dict[int, str], step: int) -> str | None:
    """The cerebellum's lesion from ``step`` on: ``cerebellum`` once any
    cerebellar lesion has taken effect (nothing undoes it), else ``olive`` once
    an olive lesion has, else None."""
    kinds = {kind for at, kind in steps.items() if at <= step}
    if "cerebellum" in kinds:
        return "cerebellum"
    return "olive" if "olive" in kinds else None


def fit_run(
    config: TrainConfig,
    task: TaskData,
    out: str | Path,
    dist: DistributedConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """One training run into ``out``: in this process, or on Ray with ``dist``."""
    if dist is None:
        from orchestrator.trainer import Trainer

        return Trainer(config, task).fit(out, progress=progress)
    return train_distributed(config, dist, task, out, progress=progress)


def _segment_ends(
    start: int, steps: int, per_epoch: int, config: TrainConfig, lesions
) -> list[int]:
    """Where a run stops between ``start`` and ``steps``: every evaluation (each
    ``eval_every`` epochs, and the end) and every lesion."""
    every = max(1, config.eval_every) * per_epoch
    ends = set(range(every, steps, every)) | {steps} | set(lesions)
    return sorted(end for end in ends if start < end <= steps)


def _curve_until(run_dir: Path, step: int) -> list[str]:
    """The lines of ``run_dir/curve.jsonl`` up to ``step`` (a resumed run's past)."""
    path = run_dir / "curve.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if json.loads(line)["step"] <= step]


def _epoch_loss(record: RunRecord, step: int, per_epoch: int) -> float | None:
    """Mean training loss of the epoch before ``step``, as the trainer reports it."""
    losses = [v for s, v in record.losses.items() if step - per_epoch <= s < step]
    return sum(losses) / len(losses) if losses else None


def _evaluates(step: int, steps: int, per_epoch: int, eval_every: int) -> bool:
    return step == steps or step % (max(1, eval_every) * per_epoch) == 0


def _curve_point(
    record: RunRecord, step: int, per_epoch: int, validation: dict[str, Any]
) -> dict[str, Any]:
    """One line of ``curve.jsonl``, with the in-process trainer's keys."""
    from orchestrator.trainer import curve_fields

    return {
        "step": step,
        "epoch": step / per_epoch,
        "wall_seconds": record.wall_seconds,
        "train_loss": _epoch_loss(record, step, per_epoch),
        **curve_fields(validation),
    }


def _summary(cluster: Cluster, record: RunRecord, fields: dict, steps: int):
    """``summary.json``; ``fields``: ``summary_fields`` of the final evaluation."""
    config = cluster.config
    losses = [record.losses[s] for s in sorted(record.losses)]
    ran = len(losses)
    return {
        "task": config.task,
        "model": config.model,
        "schedule": cluster.dist.schedule,
        "chunks": config.chunks,
        "micro_batches": cluster.dist.micro_batches,
        "forward_unlock": cluster.dist.forward_unlock,
        "truncation": cluster.truncation,
        "seq_len": cluster.task.seq_len,
        "seed": config.seed,
        "steps": steps,
        "epochs": steps / cluster.stream.batches_per_epoch,
        "wall_seconds": record.wall_seconds,
        "seconds_per_epoch": record.wall_seconds
        * cluster.stream.batches_per_epoch
        / max(ran, 1),
        "steps_per_second": ran / record.wall_seconds if record.wall_seconds else None,
        "train_loss": _epoch_loss(record, steps, cluster.stream.batches_per_epoch),
        "train_losses": losses,
        **fields,
        "restarts": record.restarts,
        "repeated_steps": record.repeated_steps,
        "cerebellum_restarts": record.cerebellum_restarts,
        "cerebellum_learning": cluster.dist.cerebellum_learning,
        # What --cerebellum-precision asked for, and what the cerebellum ran.
        "cerebellum_precision_asked": cluster.dist.cerebellum_precision,
        "cerebellum_precision": cluster.cerebellum_precision,
        "cerebellum": cluster.cerebellum_stats(),
        "config": config.to_dict(),
    }
