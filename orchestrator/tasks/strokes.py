"""Hand-made pen strokes, one per digit class, for the ``digits`` drawing task.

Each digit is drawn as a single polyline, the way one would write it without
lifting the pen, in a frame whose x runs over about ``[-5, 5]`` and y over
``[-8, 8]``: every vertex lies within the radius-10 circle that the drawing
tasks use. Where a digit needs a second stroke (the stem of a 4, say) the
polyline goes back over its own line instead.

A network draws one point per step, so :func:`resample` turns a polyline into
points evenly spaced along its arc length: the pen moves at constant speed.
"""

from __future__ import annotations

import math

import torch

N_DIGITS = 10
# Every template vertex lies within this distance of the origin.
FRAME_RADIUS = 10.0


def _ellipse(n_vertices: int, half_width: float, half_height: float) -> list:
    # Anticlockwise from the top, closed: the way a 0 is usually written.
    return [
        (
            -half_width * math.sin(2.0 * math.pi * k / n_vertices),
            half_height * math.cos(2.0 * math.pi * k / n_vertices),
        )
        for k in range(n_vertices + 1)
    ]


def _figure_eight(n_vertices: int, half_width: float, half_height: float) -> list:
    # From the top, down through the waist to the bottom and back up: x swings
    # twice as fast as y so the path crosses itself at the centre.
    return [
        (
            half_width * math.sin(4.0 * math.pi * k / n_vertices),
            half_height * math.cos(2.0 * math.pi * k / n_vertices),
        )
        for k in range(n_vertices + 1)
    ]


# Vertices of each digit's polyline, in drawing order.
_VERTICES: dict[int, list] = {
    0: _ellipse(24, 4.5, 8.0),
    # A short lead-in flag, then the stem.
    1: [(-2.5, 5.0), (0.5, 8.0), (0.5, -8.0)],
    # Top arc, diagonal down to the bottom left, base line.
    2: [
        (-4.5, 5.0),
        (-3.0, 7.5),
        (0.0, 8.0),
        (3.0, 7.5),
        (4.5, 5.0),
        (4.0, 2.0),
        (-4.5, -8.0),
        (5.0, -8.0),
    ],
    # Two bowls open to the left, meeting in the middle.
    3: [
        (-4.5, 6.5),
        (-2.0, 8.0),
        (2.0, 8.0),
        (4.5, 6.0),
        (4.0, 2.5),
        (0.0, 0.5),
        (4.0, -1.0),
        (5.0, -4.5),
        (2.5, -7.5),
        (-2.0, -8.0),
        (-4.5, -6.0),
    ],
    # Up the stem, diagonal down to the left, crossbar to the right.
    4: [(2.5, -8.0), (2.5, 8.0), (-5.0, -2.5), (5.0, -2.5)],
    # Top bar from the right, down the left side, round belly.
    5: [
        (4.5, 8.0),
        (-3.5, 8.0),
        (-4.0, 1.0),
        (-1.0, 2.5),
        (2.5, 2.0),
        (4.8, -1.0),
        (4.5, -5.0),
        (2.0, -7.8),
        (-2.0, -8.0),
        (-4.8, -6.0),
    ],
    # From the top right, down the left, round a closed lower loop.
    6: [
        (3.5, 7.5),
        (0.0, 8.0),
        (-3.5, 6.0),
        (-5.0, 1.0),
        (-5.0, -4.0),
        (-3.5, -7.5),
        (0.0, -8.0),
        (3.5, -7.0),
        (5.0, -4.0),
        (4.0, -1.0),
        (0.0, 0.0),
        (-3.5, -1.5),
        (-5.0, -4.0),
    ],
    # Top bar, then a long diagonal down.
    7: [(-5.0, 8.0), (5.0, 8.0), (-1.0, -8.0)],
    8: _figure_eight(24, 4.0, 8.0),
    # Anticlockwise loop at the top, then the stem from its right side.
    9: [
        (4.5, 4.5),
        (3.0, 7.5),
        (0.0, 8.0),
        (-3.0, 7.5),
        (-4.5, 4.5),
        (-3.0, 1.5),
        (0.0, 0.5),
        (3.0, 1.5),
        (4.5, 4.5),
        (4.5, -8.0),
    ],
}


def template(digit: int) -> torch.Tensor:
    """The polyline vertices of ``digit``: ``(P, 2)`` float64, in drawing order.

    Raises:
        ValueError: ``digit`` is not in ``0..9``.
    """
    if digit not in _VERTICES:
        raise ValueError(f"digit must be one of 0..{N_DIGITS - 1}, got {digit!r}")
    return torch.tensor(_VERTICES[digit], dtype=torch.float64)


def arc_length(points: torch.Tensor) -> torch.Tensor:
    """Cumulative length along a polyline: ``(P,)``, starting at 0."""
    segments = (points[1:] - points[:-1]).norm(dim=-1)
    return torch.cat([segments.new_zeros(1), segments.cumsum(0)])


def resample(points: torch.Tensor, n_points: int) -> torch.Tensor:
    """``n_points`` points evenly spaced along the arc length of a polyline.

    The first and last points are the polyline's ends; in between, point ``k``
    lies ``k / (n_points - 1)`` of the way along the path, wherever that falls.

    Args:
        points: ``(P, 2)`` polyline vertices, ``P >= 2``, of non-zero length.
        n_points: number of points to return, at least 2.

    Returns:
        ``(n_points, 2)`` in the dtype of ``points``.

    Raises:
        ValueError: bad shape, too few points, or a polyline of zero length.
    """
    if points.dim() != 2 or points.shape[1] != 2 or points.shape[0] < 2:
        raise ValueError(
            f"points must have shape (P, 2) with P >= 2, got {tuple(points.shape)}"
        )
    if n_points < 2:
        raise ValueError(f"n_points must be at least 2, got {n_points}")
    cumulative = arc_length(points)
    total = float(cumulative[-1])
    if total <= 0.0:
        raise ValueError("the polyline has zero length: all its points coincide")

    # (n,) arc position of each new point
    wanted = torch.linspace(0.0, total, n_points, dtype=cumulative.dtype)
    # The segment each wanted position falls in; right=True moves past repeated
    # vertices, whose segments have zero length.
    segment = torch.searchsorted(cumulative, wanted, right=True) - 1
    segment = segment.clamp(0, points.shape[0] - 2)
    start = cumulative[segment]
    length = cumulative[segment + 1] - start
    fraction = torch.where(
        length > 0, (wanted - start) / length.clamp_min(1e-12), torch.zeros_like(start)
    ).clamp(0.0, 1.0)
    a, b = points[segment], points[segment + 1]
    return a + fraction[:, None] * (b - a)


def resampled_templates(n_points: int) -> torch.Tensor:
    """Every digit's stroke resampled to ``n_points``: ``(10, n_points, 2)`` float32."""
    return torch.stack([resample(template(d), n_points) for d in range(N_DIGITS)]).to(
        torch.float32
    )
