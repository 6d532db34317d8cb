"""The cerebellum as a Ray actor: its microzones behind a gRPC server.

Chunks talk to it directly over gRPC (``Predict``, ``Learn``); the driver only
creates it, asks for its address and tells it when to checkpoint or restore.
The class is plain Python; the orchestrator applies ``ray.remote``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from cerebellum_service.config import CerebellumConfig
from cerebellum_service.servicer import CerebellumServicer, add_to_server
from protos import checkpoint as ckpt
from protos.service import ServerSecurity, start_server

logger = logging.getLogger(__name__)

ACTOR_NAME = "cerebellum"


class CerebellumActor:
    """Hosts the cerebellum service.

    Args:
        spec: ``zones`` (microzone maps, as ``Configure`` takes them), ``lr``,
            ``token`` (the run's secret), ``threads`` (torch threads), and
            optionally ``host``.
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        torch.set_num_threads(int(spec.get("threads", 1)))
        config = CerebellumConfig.from_dict(
            {"zones": spec["zones"], "lr": spec.get("lr", 1e-3)}
        )
        self.servicer = CerebellumServicer(config)
        host = spec.get("host") or node_address()
        self.server = start_server(
            lambda server: add_to_server(self.servicer, server),
            security=ServerSecurity(token=spec["token"]),
            service_names=["ccdni.v1.Cerebellum"],
            host=host,
            on_stop=[self.servicer.close],
        )
        logger.info("cerebellum serving on %s", self.server.address)

    def address(self) -> str:
        return self.server.address

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, float]:
        return self.servicer.stats()

    def save_checkpoint(self, root: str, step: int) -> int:
        """Write the microzones and their optimiser for run step ``step``."""
        current = self.servicer._current
        state = {
            "config": current.config.to_dict(),
            "cerebellum": current.cerebellum.state_dict(),
            "learning_step": self.servicer.step,
        }
        _, size = ckpt.save_state(root, step, ACTOR_NAME, state)
        return size

    def restore(self, root: str, step: int) -> int:
        state = ckpt.load_state(ckpt.step_dir(root, step), ACTOR_NAME)
        config = CerebellumConfig.from_dict(state["config"])
        cerebellum = config.build()
        cerebellum.load_state_dict(state["cerebellum"])
        self.servicer._install(config, cerebellum, step=int(state["learning_step"]))
        return step

    def shutdown(self) -> None:
        self.server.stop(grace=1.0)


def node_address() -> str:
    """The address other actors reach this one at (loopback on one machine)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"
