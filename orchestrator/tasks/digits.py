"""Digit images and the three tasks built on them: ``digit-lines``, ``digits``,
``patterns``.

Images come from MNIST when ``data_dir`` holds its four IDX files (plain or
``.gz``), and otherwise from scikit-learn's bundled 8x8 digits, resized to 28x28,
so that tests and small runs need no download. Either way an image becomes a
sequence read row by row: :data:`IMAGE_SIZE` steps of :data:`IMAGE_SIZE` pixels
in ``[0, 1]``.

The tasks differ only in their targets:

- ``digit-lines``: draw the straight line from the origin to one of ten points
  evenly spaced on the radius-10 circle, chosen by the class; MSE every 4th step.
- ``digits``: draw the class's pen stroke (:mod:`orchestrator.tasks.strokes`)
  resampled to one point per step; MSE every 4th step.
- ``patterns``: name the class at the last step (cross-entropy there only).
"""

from __future__ import annotations

import functools
import gzip
import logging
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.tasks import strokes
from orchestrator.tasks.base import SequenceData, TaskData
from orchestrator.tasks.line import RADIUS, every_kth_step_mask, straight_lines

logger = logging.getLogger(__name__)

IMAGE_SIZE = 28
N_CLASSES = 10
# The drawing tasks give loss at steps 3, 7, ..., 27 (every 4th, ending on the last).
LOSS_EVERY = 4
# scikit-learn digits: 70% train, 15% validation, 15% test.
SKLEARN_VALIDATION_FRACTION = 0.15
SKLEARN_TEST_FRACTION = 0.15
# MNIST has its own test set; a sixth of its training set (10,000 of 60,000)
# is held out for validation.
MNIST_VALIDATION_FRACTION = 1.0 / 6.0

# The four MNIST files; each may also be gzipped (the name plus ".gz").
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IdxFormatError(ValueError):
    """An IDX file is malformed or does not hold what MNIST should."""


@dataclass(frozen=True)
class ImageSplit:
    """Images ``(N, 28, 28)`` float32 in ``[0, 1]`` and labels ``(N,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class DigitImages:
    """The three image splits and where they came from (``mnist`` or ``sklearn``)."""

    train: ImageSplit
    validation: ImageSplit
    test: ImageSplit
    source: str


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (the MNIST format), gzipped if its name ends in ``.gz``.

    The header is a 4-byte magic number (two zero bytes, a type code, the number
    of dimensions), then each dimension as a big-endian uint32, then the data,
    big-endian.

    Returns:
        A tensor of the file's shape; uint8 data stays uint8.

    Raises:
        IdxFormatError: the file is not valid IDX; the message names the file and
            what is wrong with it.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as stream:
                raw = stream.read()
        else:
            raw = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise IdxFormatError(f"{path}: not a readable gzip file ({error})") from error

    if len(raw) < 4:
        raise IdxFormatError(
            f"{path}: {len(raw)} bytes is too short for the 4-byte IDX magic number"
        )
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError(
            f"{path}: magic number 0x{magic:08x} does not start with two zero "
            "bytes, so this is not an IDX file"
        )
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        known = ", ".join(f"0x{code:02x}" for code in _IDX_DTYPES)
        raise IdxFormatError(
            f"{path}: magic number 0x{magic:08x} has type code 0x{type_code:02x}; "
            f"IDX type codes are {known}"
        )
    if ndim == 0:
        raise IdxFormatError(f"{path}: magic number 0x{magic:08x} gives 0 dimensions")

    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise IdxFormatError(
            f"{path}: {len(raw)} bytes is too short for a header of {ndim} "
            f"dimensions ({header_size} bytes)"
        )
    shape = tuple(
        int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    dtype = _IDX_DTYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise IdxFormatError(
            f"{path}: holds {len(raw) - header_size} data bytes after the header, "
            f"but shape {shape} of {dtype.name} needs {expected}"
        )

    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    # Native byte order, and a copy that torch may own and write to.
    return torch.from_numpy(data.astype(dtype.newbyteorder("="), copy=True))


def _find_idx(data_dir: Path, name: str) -> Path | None:
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_mnist_pair(images_path: Path, labels_path: Path) -> ImageSplit:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != torch.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise IdxFormatError(
            f"{images_path}: MNIST images must be uint8 of shape "
            f"(N, {IMAGE_SIZE}, {IMAGE_SIZE}), got {images.dtype} of shape "
            f"{tuple(images.shape)}"
        )
    if labels.dtype != torch.uint8 or labels.dim() != 1:
        raise IdxFormatError(
            f"{labels_path}: MNIST labels must be uint8 of shape (N,), got "
            f"{labels.dtype} of shape {tuple(labels.shape)}"
        )
    if labels.shape[0] != images.shape[0]:
        raise IdxFormatError(
            f"{labels_path}: {labels.shape[0]} labels for the {images.shape[0]} "
            f"images of {images_path}"
        )
    if labels.numel() and int(labels.max()) >= N_CLASSES:
        raise IdxFormatError(
            f"{labels_path}: labels must lie in 0..{N_CLASSES - 1}, found "
            f"{int(labels.max())}"
        )
    return ImageSplit(images.to(torch.float32) / 255.0, labels.to(torch.int64))


def _mnist_files(data_dir: Path) -> dict[str, Path] | None:
    """The four MNIST paths, None if there are none, an error if only some."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, name in MNIST_FILES.items():
        path = _find_idx(data_dir, name)
        if path is None:
            missing.append(name)
        else:
            found[key] = path
    if not found:
        return None
    if missing:
        raise FileNotFoundError(
            f"{data_dir} holds some MNIST IDX files but not {', '.join(missing)} "
            "(plain or .gz); add them or point data_dir elsewhere"
        )
    return found


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    # Cached per process: the resize is the slow part and every load repeats it.
    # Callers index these tensors, which copies, so the cache is never mutated.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # (N, 1, 8, 8) in [0, 1]: the raw pixel values run from 0 to 16
    small = torch.from_numpy(bunch.images).to(torch.float32).unsqueeze(1) / 16.0
    large = F.interpolate(
        small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    # (N, 28, 28)
    images = large.squeeze(1).clamp(0.0, 1.0)
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    return images, labels


def _take(
    images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor
) -> ImageSplit:
    return ImageSplit(images[index], labels[index])


def _cap(split: ImageSplit, n_train: int | None) -> ImageSplit:
    if n_train is None or n_train >= len(split):
        return split
    return ImageSplit(split.images[:n_train], split.labels[:n_train])


def load_digit_images(
    *, seed: int = 0, data_dir: str | Path | None = None, n_train: int | None = None
) -> DigitImages:
    """Digit images split into train, validation and test by ``seed``.

    With MNIST IDX files in ``data_dir`` the test split is MNIST's own and
    validation is a seeded sixth of its training set. Otherwise scikit-learn's
    1,797 digits are resized to 28x28 and split 70/15/15 (1257/270/270).

    Args:
        seed: seed of the split permutation.
        data_dir: folder that may hold the four MNIST files (see
            :data:`MNIST_FILES`); None means use scikit-learn's digits.
        n_train: keep at most this many training images.

    Raises:
        FileNotFoundError: ``data_dir`` does not exist, or holds only some of the
            MNIST files.
        IdxFormatError: an MNIST file is malformed.
        ValueError: ``n_train`` is not positive.
    """
    if n_train is not None and n_train < 1:
        raise ValueError(f"n_train must be a positive integer or None, got {n_train}")
    generator = torch.Generator().manual_seed(seed)

    paths = None
    if data_dir is not None:
        directory = Path(data_dir)
        if not directory.is_dir():
            raise FileNotFoundError(f"data_dir {str(directory)!r} is not a folder")
        paths = _mnist_files(directory)
        if paths is None:
            logger.warning(
                "no MNIST IDX files in %s; using scikit-learn's 8x8 digits resized "
                "to 28x28 instead",
                directory,
            )

    if paths is not None:
        pool = _read_mnist_pair(paths["train_images"], paths["train_labels"])
        test = _read_mnist_pair(paths["test_images"], paths["test_labels"])
        n_validation = round(len(pool) * MNIST_VALIDATION_FRACTION)
        if n_validation < 1 or n_validation >= len(pool):
            raise IdxFormatError(
                f"{paths['train_images']}: {len(pool)} training images are too few "
                "to hold out a validation set"
            )
        order = torch.randperm(len(pool), generator=generator)
        validation = _take(pool.images, pool.labels, order[:n_validation])
        train = _take(pool.images, pool.labels, order[n_validation:])
        source = "mnist"
    else:
        images, labels = _sklearn_digits()
        n = images.shape[0]
        n_validation = round(n * SKLEARN_VALIDATION_FRACTION)
        n_test = round(n * SKLEARN_TEST_FRACTION)
        order = torch.randperm(n, generator=generator)
        validation = _take(images, labels, order[:n_validation])
        test = _take(images, labels, order[n_validation : n_validation + n_test])
        train = _take(images, labels, order[n_validation + n_test :])
        source = "sklearn"

    train = _cap(train, n_train)
    logger.info(
        "digit images from %s, seed %d: %d train, %d validation, %d test",
        source,
        seed,
        len(train),
        len(validation),
        len(test),
    )
    return DigitImages(train, validation, test, source)


def digit_line_ends() -> torch.Tensor:
    """Each class's end point for ``digit-lines``: ``(10, 2)`` float32.

    Class ``c`` ends at angle ``2 * pi * c / 10`` on the radius-10 circle.
    """
    angles = 2.0 * math.pi * torch.arange(N_CLASSES, dtype=torch.float64) / N_CLASSES
    points = RADIUS * torch.stack([angles.cos(), angles.sin()], dim=-1)
    return points.to(torch.float32)


def _line_split(split: ImageSplit) -> SequenceData:
    targets = straight_lines(digit_line_ends()[split.labels], IMAGE_SIZE)
    mask = every_kth_step_mask(len(split), IMAGE_SIZE, LOSS_EVERY)
    return SequenceData(split.images, targets, mask, split.labels)


def _stroke_split(split: ImageSplit) -> SequenceData:
    targets = strokes.resampled_templates(IMAGE_SIZE)[split.labels]
    mask = every_kth_step_mask(len(split), IMAGE_SIZE, LOSS_EVERY)
    return SequenceData(split.images, targets, mask, split.labels)


def _pattern_split(split: ImageSplit) -> SequenceData:
    n = len(split)
    # (N, S): the class at the last step, 0 (ignored by the mask) before it
    targets = torch.zeros(n, IMAGE_SIZE, dtype=torch.int64)
    targets[:, -1] = split.labels
    mask = torch.zeros(n, IMAGE_SIZE, dtype=torch.bool)
    mask[:, -1] = True
    return SequenceData(split.images, targets, mask, split.labels)


def _build(
    name: str,
    images: DigitImages,
    make_split: Callable[[ImageSplit], SequenceData],
    *,
    drawing: bool,
) -> TaskData:
    return TaskData(
        name=name,
        kind="regression" if drawing else "classification",
        input_size=IMAGE_SIZE,
        output_size=2 if drawing else N_CLASSES,
        seq_len=IMAGE_SIZE,
        train=make_split(images.train),
        validation=make_split(images.validation),
        test=make_split(images.test),
        drawing=drawing,
    )


def make_digit_lines_task(
    *, seed: int = 0, data_dir: str | Path | None = None, n_train: int | None = None
) -> TaskData:
    """``digit-lines``: read a digit, draw a line towards its class's point.

    Arguments and errors are those of :func:`load_digit_images`.
    """
    images = load_digit_images(seed=seed, data_dir=data_dir, n_train=n_train)
    return _build("digit-lines", images, _line_split, drawing=True)


def make_digits_task(
    *, seed: int = 0, data_dir: str | Path | None = None, n_train: int | None = None
) -> TaskData:
    """``digits``: read a digit, draw its pen stroke.

    Arguments and errors are those of :func:`load_digit_images`.
    """
    images = load_digit_images(seed=seed, data_dir=data_dir, n_train=n_train)
    return _build("digits", images, _stroke_split, drawing=True)


def make_patterns_task(
    *, seed: int = 0, data_dir: str | Path | None = None, n_train: int | None = None
) -> TaskData:
    """``patterns``: read a digit, name its class at the last step.

    Arguments and errors are those of :func:`load_digit_images`.
    """
    images = load_digit_images(seed=seed, data_dir=data_dir, n_train=n_train)
    return _build("patterns", images, _pattern_split, drawing=False)
