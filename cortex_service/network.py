"""The cortical chunk: a stack of LSTM layers, run window by window.

A chunk is a contiguous group of cortical layers (DESIGN.md). The last chunk of a
network also owns the linear read-out. The recurrent state is a pair ``(h, c)`` of
``(layers, batch, hidden)`` tensors; the activity a chunk sends downstream is its
hidden outputs over a window plus that state at the window end.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

State = tuple[torch.Tensor, torch.Tensor]


class CorticalChunk(nn.Module):
    """A stack of LSTM layers and, for the last chunk, a linear read-out.

    Args:
        input_size: width of the chunk's input (network input or the chunk below).
        hidden_size: LSTM units per layer.
        num_layers: LSTM layers in this chunk.
        output_size: read-out width; ``None`` for chunks other than the last.
        dropout: dropout on the hidden outputs before the read-out (captions).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        output_size: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("input_size", input_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.readout = nn.Linear(hidden_size, output_size) if output_size else None

    @property
    def is_last(self) -> bool:
        return self.readout is not None

    @property
    def state_size(self) -> int:
        """Width of the flattened recurrent state ``(h, c)`` of one example."""
        return 2 * self.num_layers * self.hidden_size

    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> State:
        shape = (self.num_layers, batch, self.hidden_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Run one window.

        Args:
            x: ``(B, T, I)`` input over the window.
            state: ``(h, c)`` at the window start, each ``(L, B, H)``.

        Returns:
            hidden outputs of the top layer ``(B, T, H)`` and the state at the end.
        """
        if x.dim() != 3 or x.shape[-1] != self.input_size:
            raise ValueError(
                f"chunk input has shape {tuple(x.shape)}, expected "
                f"(batch, steps, {self.input_size})"
            )
        hidden, (h, c) = self.lstm(x, state)
        return hidden, (h, c)

    def read_out(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` hidden outputs to ``(B, T, O)`` network output."""
        if self.readout is None:
            raise RuntimeError("only the last chunk has a read-out")
        return self.readout(self.dropout(hidden))


def flatten_state(state: State) -> torch.Tensor:
    """``(h, c)`` of ``(L, B, H)`` each to one ``(B, 2·L·H)`` activity vector."""
    h, c = state
    return torch.cat([h, c], dim=0).permute(1, 0, 2).reshape(h.shape[1], -1)


def unflatten_state(flat: torch.Tensor, num_layers: int, hidden_size: int) -> State:
    """Inverse of :func:`flatten_state`."""
    batch = flat.shape[0]
    both = flat.reshape(batch, 2 * num_layers, hidden_size).permute(1, 0, 2)
    return both[:num_layers].contiguous(), both[num_layers:].contiguous()


def window_bounds(seq_len: int, truncation: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each window of ``truncation`` steps (last may be short)."""
    if truncation < 1:
        raise ValueError(f"truncation must be at least 1, got {truncation}")
    for start in range(0, seq_len, truncation):
        yield start, min(start + truncation, seq_len)


def build_chunk(
    index: int,
    chunks: int,
    input_size: int,
    hidden_size: int,
    output_size: int,
    layers_per_chunk: int = 1,
    dropout: float = 0.0,
    seed: int = 0,
) -> CorticalChunk:
    """Chunk ``index`` of a cortex cut into ``chunks`` chunks, seeded on its own.

    Seeding each chunk by its index makes chunk ``index`` identical whether it is
    built in one process with all the others or alone inside its own actor.
    """
    if not 0 <= index < chunks:
        raise ValueError(f"chunk index {index} outside 0..{chunks - 1} (--chunks)")
    torch.manual_seed(seed * 1009 + index)
    last = index == chunks - 1
    return CorticalChunk(
        input_size if index == 0 else hidden_size,
        hidden_size,
        layers_per_chunk,
        output_size if last else None,
        dropout if last else 0.0,
    )


def build_chunks(
    input_size: int,
    hidden_size: int,
    output_size: int,
    chunks: int,
    layers_per_chunk: int = 1,
    dropout: float = 0.0,
    seed: int = 0,
) -> list[CorticalChunk]:
    """The cortical network cut into ``chunks`` chunks (see :func:`build_chunk`)."""
    return [
        build_chunk(
            index,
            chunks,
            input_size,
            hidden_size,
            output_size,
            layers_per_chunk,
            dropout,
            seed,
        )
        for index in range(chunks)
    ]
