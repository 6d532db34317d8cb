"""Cerebellar microzones: mossy fibres → granule layer → Purkinje read-out.

One microzone serves one interface of the cortex (a chunk's state at window ends,
or a chunk's output). It receives a copy of cortical activity ("mossy fibres"),
expands it in a wide ReLU granule layer and reads out the predicted feedback with
a linear Purkinje layer that starts at zero, so a new cerebellum predicts nothing.
"""

from __future__ import annotations

import torch
from torch import nn


class MossyFibres(nn.Linear):
    """The input projection, optionally sparse: each granule cell sees ``k`` inputs.

    The sparsity pattern is drawn once from ``seed`` and kept as a buffer, so it
    travels with checkpoints and is the same on every replica.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        inputs_per_granule: int | None,
        seed: int,
    ) -> None:
        super().__init__(in_features, out_features)
        if inputs_per_granule is None:
            self.register_buffer("connectivity", None)
            return
        if not 1 <= inputs_per_granule <= in_features:
            raise ValueError(
                f"inputs_per_granule must be in [1, {in_features}], "
                f"got {inputs_per_granule}"
            )
        generator = torch.Generator().manual_seed(seed)
        scores = torch.rand(out_features, in_features, generator=generator)
        chosen = scores.topk(inputs_per_granule, dim=1).indices
        mask = torch.zeros(out_features, in_features).scatter_(1, chosen, 1.0)
        self.register_buffer("connectivity", mask)
        # Keep the fan-in scale of a dense layer with k inputs.
        bound = inputs_per_granule**-0.5
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (
            self.weight
            if self.connectivity is None
            else self.weight * self.connectivity
        )
        return nn.functional.linear(x, weight, self.bias)


class Microzone(nn.Module):
    """A small cerebellar network predicting the feedback of one interface.

    Args:
        in_features: width of the cortical activity it receives.
        out_features: width of the feedback it predicts.
        granule_width: granule cells per layer.
        granule_layers: granule layers (1, or 2 for captions as in the paper).
        inputs_per_granule: mossy-fibre inputs per granule cell (``None``: all).
        context_size: width of extra context (the target, as in cDNI), 0 for none.
        seed: seed of the sparse connectivity.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        granule_width: int = 400,
        granule_layers: int = 1,
        inputs_per_granule: int | None = None,
        context_size: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if granule_width < 1 or granule_layers < 1:
            raise ValueError(
                f"granule_width and granule_layers must be at least 1, got "
                f"{granule_width} and {granule_layers}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.context_size = context_size
        layers: list[nn.Module] = [
            MossyFibres(
                in_features + context_size, granule_width, inputs_per_granule, seed
            ),
            nn.ReLU(),
        ]
        for _ in range(granule_layers - 1):
            layers += [nn.Linear(granule_width, granule_width), nn.ReLU()]
        self.granule = nn.Sequential(*layers)
        self.purkinje = nn.Linear(granule_width, out_features)
        nn.init.zeros_(self.purkinje.weight)
        nn.init.zeros_(self.purkinje.bias)

    def granule_activity(
        self, activity: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(N, in)`` activity (and ``(N, context)``) to ``(N, granule_width)``."""
        if activity.shape[-1] != self.in_features:
            raise ValueError(
                f"microzone expects activity of width {self.in_features}, "
                f"got {activity.shape[-1]}"
            )
        if self.context_size:
            if context is None or context.shape[-1] != self.context_size:
                got = None if context is None else context.shape[-1]
                raise ValueError(
                    f"microzone expects context of width {self.context_size}, got {got}"
                )
            activity = torch.cat([activity, context], dim=-1)
        return self.granule(activity)

    def forward(
        self, activity: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted feedback ``(N, out)`` for activity ``(N, in)``."""
        return self.purkinje(self.granule_activity(activity, context))
