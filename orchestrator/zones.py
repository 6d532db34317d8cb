"""Which microzones a run needs, built the same way in every process."""

from __future__ import annotations

from typing import Any

import torch

from cerebellum_service.network import Microzone
from cortex_service.network import CorticalChunk
from cortex_service.runtime import input_zone, output_zone, state_zone
from orchestrator.config import TrainConfig


def context_size(config: TrainConfig, n_labels: int, seq_len: int) -> int:
    """Features of a microzone's context: the label (``--context``) and the time
    step (``--time-context``), each one-hot."""
    return (n_labels if config.context else 0) + (seq_len if config.time_context else 0)


def cerebellum_settings(config: TrainConfig) -> dict[str, Any]:
    """The ``ChunkSpec`` fields a chunk takes from the run's cerebellum settings."""
    return dict(
        temporal=config.uses_cerebellum,
        feedback_scale=config.feedback_scale,
        output_feedback_scale=config.output_feedback_scale,
        time_context=config.time_context,
        context_zones=config.context_zones,
    )


def zone_specs(
    config: TrainConfig,
    chunks: list[CorticalChunk],
    schedule: str,
    forward_unlock: bool,
    context_size: int,
) -> dict[str, dict[str, Any]]:
    """The microzones a run needs, by name, as Microzone keyword arguments.

    State zones serve the ccRNN's temporal cut, output zones the decoupled
    schedule's spatial cut, input zones the forward unlock.
    """
    state_context = context_size if config.context_zones != "output" else 0
    output_context = context_size if config.context_zones != "state" else 0
    common = dict(
        granule_width=config.granule_width,
        granule_layers=config.granule_layers,
        inputs_per_granule=config.inputs_per_granule,
    )
    specs: dict[str, dict[str, Any]] = {}
    for index, chunk in enumerate(chunks):
        base_seed = config.seed * 1009 + index
        if config.uses_cerebellum:
            specs[state_zone(index)] = dict(
                in_features=chunk.state_size,
                out_features=chunk.state_size,
                context_size=state_context,
                seed=base_seed + 700,
                init_seed=base_seed + 500,
                **common,
            )
        if schedule == "decoupled" and index < len(chunks) - 1:
            specs[output_zone(index)] = dict(
                in_features=chunk.hidden_size,
                out_features=chunk.hidden_size,
                context_size=output_context,
                seed=base_seed + 800,
                init_seed=base_seed + 600,
                **common,
            )
        if forward_unlock and index > 0:
            specs[input_zone(index)] = dict(
                in_features=chunks[0].input_size,
                out_features=chunk.input_size,
                context_size=0,
                seed=base_seed + 900,
                init_seed=base_seed + 300,
                **common,
            )
    return specs


def build_microzones(specs: dict[str, dict[str, Any]]) -> dict[str, Microzone]:
    """Microzones from :func:`zone_specs`, each initialised from its own seed."""
    zones = {}
    for name, spec in specs.items():
        kwargs = dict(spec)
        torch.manual_seed(kwargs.pop("init_seed"))
        zones[name] = Microzone(**kwargs)
    return zones
