"""Generated scenes of simple objects, their images and their captions.

A scene holds two or three objects, each a shape of one colour and one size in its
own cell of a 3x3 grid. It is rendered as a ``(3, 32, 32)`` RGB image on a black
background and described by :data:`CAPTIONS_PER_SCENE` grammatical captions of
:data:`MIN_WORDS` to :data:`MAX_WORDS` words, which name the objects with their
attributes and state spatial relations that hold in the image (``left of``,
``right of``, ``above``, ``below``).

Everything is drawn from a ``numpy`` generator seeded by the caller, so one seed
always gives the same scenes, images and captions.

Held-out colour-shape pairs (:func:`held_out_pairs`) let a split test
composition: training scenes never contain them, while half of the held-out
scenes contain at least one.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.2, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "white": (1.0, 1.0, 1.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: dict[str, float] = {"small": 3.0, "large": 5.0}  # half-width in pixels
IMAGE_SIZE = 32
GRID = 3
MIN_WORDS = 11
MAX_WORDS = 15
CAPTIONS_PER_SCENE = 5
# Colour-shape pairs kept out of training: one per colour for this many colours,
# each with a different shape, so every colour and shape is still seen in training.
N_HELD_OUT_PAIRS = 4

Pair = tuple[str, str]  # (colour, shape)


@dataclass(frozen=True)
class SceneObject:
    """One object: what it is and which grid cell it sits in (row 0 is the top)."""

    shape: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def pair(self) -> Pair:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Scene:
    """Two or three objects in distinct cells, and the captions that describe them."""

    objects: tuple[SceneObject, ...]
    captions: tuple[str, ...]
    jitter: tuple[tuple[int, int], ...]  # pixel offset of each object from its cell

    def pairs(self) -> set[Pair]:
        return {o.pair for o in self.objects}


def all_pairs() -> list[Pair]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def held_out_pairs(seed: int) -> list[Pair]:
    """The colour-shape pairs that ``seed`` keeps out of training.

    :data:`N_HELD_OUT_PAIRS` pairs with distinct colours and distinct shapes, so
    each colour and each shape keeps at least three pairs in training.
    """
    rng = np.random.default_rng([seed, 17])
    colours = rng.permutation(list(COLOURS))[:N_HELD_OUT_PAIRS]
    shapes = rng.permutation(list(SHAPES))[:N_HELD_OUT_PAIRS]
    return sorted((str(c), str(s)) for c, s in zip(colours, shapes))


# Captions ----------------------------------------------------------------------------


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``, along the axis on which they differ most."""
    dx, dy = a.col - b.col, a.row - b.row
    if dx == 0 and dy == 0:
        raise ValueError(f"objects share the cell ({a.row}, {a.col})")
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _full(o: SceneObject, article: str = "a") -> str:
    return f"{article} {o.size} {o.colour} {o.shape}"


def _short(o: SceneObject, article: str = "a") -> str:
    return f"{article} {o.colour} {o.shape}"


def _two_object_captions(x: SceneObject, y: SceneObject) -> list[str]:
    r = relation(x, y)
    return [
        f"there is {_full(x)} {r} {_full(y)}",
        f"{_full(x)} is {r} {_full(y)}",
        f"{_full(x)} is {r} {_full(y)} in the picture",
        f"the picture shows {_full(x)} {r} {_full(y)}",
        f"a picture of {_full(x)} {r} {_full(y)}",
        f"{_full(x, 'the')} is {r} {_full(y, 'the')} in this image",
        f"{_short(x)} is {r} {_short(y)} on a black background",
        f"we can see {_full(x)} and {_full(y)} in this picture",
        f"{_full(x)} and {_full(y)} are shown on a black background",
    ]


def _three_object_captions(x: SceneObject, y: SceneObject, z: SceneObject) -> list:
    r = relation(x, y)
    return [
        f"there is {_short(x)} {r} {_short(y)} and also {_short(z)}",
        f"{_short(x)} is {r} {_short(y)} and there is {_short(z)}",
        f"{_short(x)} is {r} {_short(y)} in a picture with {_short(z)}",
        f"the picture shows {_short(x)} {_short(y)} and {_short(z)}",
        f"there are three shapes {_short(x)} {_short(y)} and {_short(z)}",
        f"{_full(x)} {_full(y)} and {_full(z)}",
        f"there are {_full(x)} {_full(y)} and {_full(z)}",
    ]


def candidate_captions(objects: tuple[SceneObject, ...]) -> list[str]:
    """Every true caption of ``objects`` with :data:`MIN_WORDS`-:data:`MAX_WORDS` words.

    Each one names every object by its colour and shape, so a colour-shape pair is
    in a scene exactly when its two words follow each other in a caption.
    """
    if len(objects) not in (2, 3):
        raise ValueError(f"a scene has 2 or 3 objects, got {len(objects)}")
    captions: list[str] = []
    for order in itertools.permutations(objects):
        if len(objects) == 2:
            captions += _two_object_captions(*order)
        else:
            captions += _three_object_captions(*order)
    seen: set[str] = set()
    kept = []
    for caption in captions:
        if MIN_WORDS <= len(caption.split()) <= MAX_WORDS and caption not in seen:
            seen.add(caption)
            kept.append(caption)
    return kept


# Scenes -------------------------------------------------------------------------------


def draw_scene(
    rng: np.random.Generator, pairs: list[Pair], n_objects: int | None = None
) -> Scene:
    """One scene whose objects use only ``pairs``; captions chosen by ``rng``."""
    n = int(rng.integers(2, 4)) if n_objects is None else n_objects
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objects = []
    for cell in cells:
        colour, shape = pairs[int(rng.integers(len(pairs)))]
        size = str(rng.choice(list(SIZES)))
        objects.append(
            SceneObject(shape, colour, size, int(cell) // GRID, int(cell) % GRID)
        )
    objects_t = tuple(objects)
    candidates = candidate_captions(objects_t)
    picked = rng.choice(len(candidates), size=CAPTIONS_PER_SCENE, replace=False)
    jitter = tuple(
        (int(a), int(b)) for a, b in rng.integers(-1, 2, size=(n, 2)).tolist()
    )
    return Scene(objects_t, tuple(candidates[i] for i in sorted(picked)), jitter)


def draw_scenes(
    rng: np.random.Generator,
    n: int,
    pairs: list[Pair],
    must_include: list[Pair] | None = None,
) -> list[Scene]:
    """``n`` scenes from ``pairs``; with ``must_include``, each holds one of those."""
    scenes = []
    while len(scenes) < n:
        scene = draw_scene(rng, pairs)
        if must_include is not None and not scene.pairs() & set(must_include):
            continue
        scenes.append(scene)
    return scenes


def render(scene: Scene) -> np.ndarray:
    """The scene as a ``(3, 32, 32)`` float32 image in ``[0, 1]``."""
    image = np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    cell = IMAGE_SIZE / GRID
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    for obj, (jy, jx) in zip(scene.objects, scene.jitter):
        cy = (obj.row + 0.5) * cell + jy
        cx = (obj.col + 0.5) * cell + jx
        inside = _shape_mask(obj.shape, ys - cy, xs - cx, SIZES[obj.size])
        image[:, inside] = np.asarray(COLOURS[obj.colour], dtype=np.float32)[:, None]
    return image


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":
        # Apex up: the half-width grows from 0 at the top to r at the base.
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        arm = max(r / 3, 1.0)
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | (
            (np.abs(dy) <= arm) & (np.abs(dx) <= r)
        )
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def caption_pairs(caption: str) -> set[Pair]:
    """The colour-shape pairs a caption names (adjacent colour and shape words)."""
    words = caption.split()
    return {(a, b) for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES}


def references_pairs(references: Iterable[str]) -> set[Pair]:
    found: set[Pair] = set()
    for caption in references:
        found |= caption_pairs(caption)
    return found
