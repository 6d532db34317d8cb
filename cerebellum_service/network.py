"""Cerebellar microzones: mossy fibres → granule layer → Purkinje read-out.

One microzone serves one interface of the cortex (a chunk's state at window ends,
or a chunk's output). It receives a copy of cortical activity ("mossy fibres"),
expands it in a wide ReLU granule layer and reads out the predicted feedback with
a linear Purkinje layer that starts at zero, so a new cerebellum predicts nothing.

Besides ``forward`` (autograd, for analyses), a microzone computes its
predictions and the gradient of its mean squared error by hand
(:meth:`Microzone.infer`, :meth:`Microzone.mse_backward`): the matrix products
autograd would run, without its graph or autocast's bookkeeping, which cost as
much as the products themselves in the small zones a server updates once per
window. ``infer`` returns a :class:`Trace` (each layer's input and the
prediction), which ``mse_backward`` backpropagates the error from. Tests hold
the gradients equal to autograd's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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

    def effective_weight(self) -> torch.Tensor:
        """The weight with absent connections zeroed."""
        if self.connectivity is None:
            return self.weight
        return self.weight * self.connectivity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.effective_weight(), self.bias)


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
        return self.granule(self._mossy_input(activity, context))

    def _mossy_input(
        self, activity: torch.Tensor, context: torch.Tensor | None
    ) -> torch.Tensor:
        """Activity and context side by side, ``(N, in + context)``, once their
        widths are checked."""
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
            return torch.cat([activity, context], dim=-1)
        return activity

    def forward(
        self, activity: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted feedback ``(N, out)`` for activity ``(N, in)``."""
        return self.purkinje(self.granule_activity(activity, context))

    @torch.no_grad()
    def infer(
        self,
        activity: torch.Tensor,
        context: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> Trace:
        """``forward`` without autograd, its products in ``dtype`` (default: the
        weights'); the trace holds the prediction, in ``dtype``."""
        dtype = dtype or self.purkinje.weight.dtype
        x = self._mossy_input(activity, context).to(dtype)  # (N, in + context)
        layers = self._affine_layers()

        inputs = []
        for index, layer in enumerate(layers):
            inputs.append(x)
            weight = _weight(layer).to(dtype)
            x = torch.addmm(layer.bias.to(dtype), x, weight.t())
            if index < len(layers) - 1:
                x = x.relu_()
        return Trace(tuple(inputs), x)

    @torch.no_grad()
    def mse_backward(self, trace: Trace, target: torch.Tensor) -> float:
        """Set every parameter's ``.grad`` to the gradient of the mean squared
        error between ``trace``'s prediction and ``target``.

        The error is taken in the wider of the prediction's and the target's
        dtypes, the products run in the trace's dtype with the current weights,
        sums and the loss in at least float32, and each gradient is cast to its
        parameter's dtype. For a trace of the current weights this is what
        autograd computes for ``F.mse_loss(self(activity, context), target)``
        under autocast to the trace's dtype (there the biases' gradients are
        summed in the trace's dtype).

        Returns:
            The loss; NaN for a trace of no rows, whose gradients are zero.
        """
        own = self.purkinje.weight.dtype
        dtype = trace.prediction.dtype
        wide = torch.promote_types(own, torch.float32)  # sums and the loss
        error_dtype = torch.promote_types(dtype, target.dtype)
        error = trace.prediction.to(error_dtype) - target.to(error_dtype)  # (N, out)
        flat = error.reshape(-1).to(wide)
        count = flat.numel()
        loss = float(torch.dot(flat, flat)) / count if count else math.nan
        scale = 2.0 / count if count else 0.0  # d(mean of squares)/d(error), last

        layers = self._affine_layers()
        grad = error.to(dtype)
        for index in reversed(range(len(layers))):
            layer, x = layers[index], trace.inputs[index]
            grad_weight = grad.t().mm(x).to(own).mul_(scale)
            if isinstance(layer, MossyFibres) and layer.connectivity is not None:
                grad_weight.mul_(layer.connectivity)
            layer.weight.grad = grad_weight
            layer.bias.grad = grad.sum(0, dtype=wide).mul_(scale).to(own)
            if index:
                # x is the previous layer's ReLU output: positive where it passed.
                weight = _weight(layer).to(dtype)
                grad = torch.ops.aten.threshold_backward(grad.mm(weight), x, 0)
        return loss

    def _affine_layers(self) -> list[nn.Linear]:
        """Mossy fibres first, the Purkinje layer last; a ReLU after all others."""
        layers = [m for m in self.granule if isinstance(m, nn.Linear)]
        layers.append(self.purkinje)
        return layers


@dataclass(frozen=True)
class Trace:
    """What a forward pass leaves for its backward pass: each affine layer's
    input and the prediction, in the dtype they were computed in."""

    inputs: tuple[torch.Tensor, ...]  # (N, in + context), then (N, granule) each
    prediction: torch.Tensor  # (N, out)


def _weight(layer: nn.Linear) -> torch.Tensor:
    if isinstance(layer, MossyFibres):
        return layer.effective_weight()
    return layer.weight
