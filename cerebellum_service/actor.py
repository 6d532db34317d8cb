"""The cerebellum as a Ray actor: its microzones behind a gRPC server.

Chunks talk to it directly over gRPC (``Predict``, ``Learn``); the driver only
creates it, asks for its address and tells it when to checkpoint or restore.
The class is plain Python; the orchestrator applies ``ray.remote``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import torch

from cerebellum_service.config import CerebellumConfig, resolve_precision
from cerebellum_service.servicer import CerebellumServicer, add_to_server
from protos import checkpoint as ckpt
from protos.metrics import metrics_for
from protos.process import (
    batch_scheduling,
    keep_freed_memory,
    lower_priority,
    thread_names,
)
from protos.service import DEFAULT_MAX_WORKERS, ServerSecurity, start_server

logger = logging.getLogger(__name__)

ACTOR_NAME = "cerebellum"


def server_workers(clients: int) -> int:
    """Call threads for a server with ``clients`` chunks: each may hold two for
    as long as it runs (its Learn stream and its PredictStream), and the rest
    answer unary and control calls."""
    return DEFAULT_MAX_WORKERS + 2 * max(0, clients)


# Per-microzone statistics of the servicer and the metric each becomes.
ZONE_METRICS = {
    "last_loss": (
        "ccdni_prediction_error",
        "gauge",
        "mean squared error of predicted against observed feedback",
    ),
    "last_cosine": (
        "ccdni_prediction_cosine",
        "gauge",
        "cosine similarity of predicted and observed feedback",
    ),
    "predictions": ("ccdni_cerebellum_predictions", "counter", "predictions served"),
    "observations": (
        "ccdni_cerebellum_observations",
        "counter",
        "observed feedback paired with its activity",
    ),
    "cache_misses": (
        "ccdni_cerebellum_cache_misses",
        "counter",
        "observed feedback whose activity was no longer cached",
    ),
}


class CerebellumActor:
    """Hosts the cerebellum service.

    Args:
        spec: ``zones`` (microzone maps, as ``Configure`` takes them), ``lr``,
            ``learning`` (``background`` or ``on_update``), ``token`` (the run's
            secret), ``threads`` (torch threads), ``nice`` (how far to lower
            this process's CPU priority, 0 for not at all), ``batch_scheduling``
            (its threads run as batch jobs, default on; see
            :func:`protos.process.batch_scheduling`), ``precision`` (the dtype
            of its arithmetic and of the traffic it is sent: ``float32``, the
            default, ``bfloat16``, or ``auto``, resolved on this machine by
            :func:`cerebellum_service.config.resolve_precision`), ``clients``
            (the chunks that will call it, which sizes its call threads),
            ``answer_zeros`` (a measuring device that answers zeros and
            computes nothing, see :class:`CerebellumConfig`; default off) and
            optionally ``host``.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        # Before any server thread exists: threads inherit their creator's
        # priority and policy, so everything this actor starts runs with them.
        lower_priority(int(spec.get("nice", 0)))
        if spec.get("batch_scheduling", True):
            batch_scheduling()
        keep_freed_memory()
        torch.set_num_threads(int(spec.get("threads", 1)))
        config = CerebellumConfig.from_dict(
            {
                "zones": spec["zones"],
                "lr": spec.get("lr", 1e-3),
                "learning": spec.get("learning", "background"),
                "compute_dtype": resolve_precision(spec.get("precision", "float32")),
                "answer_zeros": spec.get("answer_zeros", False),
            }
        )
        self.servicer = CerebellumServicer(config)
        host = spec.get("host") or node_address()
        self.metrics = metrics_for(
            spec.get("metrics", True), spec.get("run", ""), ACTOR_NAME
        )
        self.server = start_server(
            lambda server: add_to_server(self.servicer, server),
            security=ServerSecurity(token=spec["token"]),
            service_names=["ccdni.v1.Cerebellum"],
            host=host,
            max_workers=server_workers(int(spec.get("clients", 1))),
            on_stop=[self.servicer.close],
            interceptors=(
                [self.metrics.server_interceptor()] if self.metrics.enabled else []
            ),
        )
        self.host = host
        self.restarts = 0
        self.metrics_port = self.metrics.serve(host)
        self.metrics.add_source(self._samples)
        self._hook_staleness()
        logger.info(
            "cerebellum serving on %s, computing in %s",
            self.server.address,
            config.compute_dtype,
        )

    def address(self) -> str:
        return self.server.address

    def precision(self) -> str:
        """The dtype of this cerebellum's arithmetic, which its clients send in."""
        return self.servicer.config.compute_dtype

    def metrics_address(self) -> str | None:
        if self.metrics_port is None:
            return None
        return f"{self.host}:{self.metrics_port}"

    def set_restarts(self, count: int) -> None:
        self.restarts = count

    def _hook_staleness(self) -> None:
        cerebellum = self.servicer.cerebellum
        if cerebellum is not None and self.metrics.enabled:
            cerebellum.staleness_observer = self.metrics.staleness

    def _samples(self):
        """The servicer's counters as Prometheus samples, read at scrape time."""
        stats = self.servicer.stats()
        for name, value in stats.items():
            if name.startswith("zone."):
                _, zone, field = name.split(".", 2)
                if field in ZONE_METRICS:
                    metric, kind, doc = ZONE_METRICS[field]
                    yield metric, kind, doc, {"zone": zone}, value
            elif name.startswith("rejected."):
                reason = name.split(".", 1)[1]
                yield (
                    "ccdni_messages_rejected",
                    "counter",
                    "messages refused, by reason",
                    {"reason": reason},
                    value,
                )
        yield (
            "ccdni_cerebellum_updates",
            "counter",
            "learning steps",
            {},
            stats.get("step", 0),
        )
        yield (
            "ccdni_actor_restarts",
            "gauge",
            "restarts of this actor",
            {},
            self.restarts,
        )

    def pid(self) -> int:
        return os.getpid()

    def thread_names(self) -> dict[int, str]:
        """This process's threads by native id (Python's names)."""
        return thread_names()

    def stats(self) -> dict[str, float]:
        return self.servicer.stats()

    def zone_stats(self) -> dict[str, dict[str, float]]:
        """Per microzone: relative prediction error, cosine, updates (for logs)."""
        cerebellum = self.servicer.cerebellum
        if cerebellum is None:
            return {}
        return {
            name: {
                "relative_error": stats.last_relative_error,
                "cosine": stats.last_cosine,
                "loss": stats.last_loss,
                "updates": stats.updates,
            }
            for name, stats in cerebellum.stats.items()
        }

    def save_checkpoint(self, root: str, step: int) -> int:
        """Write the microzones and their optimiser for run step ``step``."""
        state = {
            "config": self.servicer.config.to_dict(),
            "cerebellum": self.servicer.cerebellum.state_dict(),
            "learning_step": self.servicer.step,
        }
        tic = time.perf_counter()
        _, size = ckpt.save_state(root, step, ACTOR_NAME, state)
        self.metrics.checkpoint(time.perf_counter() - tic)
        return size

    def restore(self, root: str, step: int) -> int:
        """Load the microzones and optimiser of run step ``step``.

        The checkpoint's settings come back but for the precision, which
        belongs to the machine this actor runs on (``auto`` resolves here; the
        weights it would apply to are float32 either way), and for
        ``answer_zeros``, which belongs to the measurement this actor serves.
        """
        state = ckpt.load_state(ckpt.step_dir(root, step), ACTOR_NAME)
        config = dataclasses.replace(
            CerebellumConfig.from_dict(state["config"]),
            compute_dtype=self.servicer.config.compute_dtype,
            answer_zeros=self.servicer.config.answer_zeros,
        )
        cerebellum = config.build()
        cerebellum.load_state_dict(state["cerebellum"])
        self.servicer.install(config, cerebellum, step=int(state["learning_step"]))
        self._hook_staleness()
        return step

    def shutdown(self) -> None:
        self.server.stop(grace=1.0)
        self.metrics.stop()


def node_address() -> str:
    """The address other actors reach this one at (loopback on one machine)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"
