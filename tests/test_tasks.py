"""Tests of the task data sets: shapes, exact targets, masks, splits, loaders."""

from __future__ import annotations

import gzip
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchestrator.tasks import digits, line, strokes
from orchestrator.tasks.base import TaskData
from orchestrator.tasks.registry import TASKS, load_task

# ---------------------------------------------------------------- helpers


def _all_splits(task: TaskData):
    return [task.train, task.validation, task.test]


def _write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> None:
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[type_code]
    header = bytes([0, 0, type_code, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(dtype).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as stream:
            stream.write(payload)
    else:
        path.write_bytes(payload)


def _write_mnist(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = False):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for key, name in digits.MNIST_FILES.items():
        # With gz, write the label files plain so both kinds are read in one load.
        suffix = ".gz" if gz and key.endswith("images") else ""
        _write_idx(folder / f"{name}{suffix}", arrays[key])
    return arrays


def _arc_positions(polyline: torch.Tensor, points: torch.Tensor) -> list[float]:
    # Where along the polyline each point lies, walking forwards only, so a path
    # that crosses or retraces itself still gives each point one position.
    cumulative = strokes.arc_length(polyline)
    positions, segment = [], 0
    for point in points:
        while True:
            a, b = polyline[segment], polyline[segment + 1]
            length = float((b - a).norm())
            along = float(((point - a) * (b - a)).sum()) / max(length, 1e-12)
            off = float((a + (b - a) * along / max(length, 1e-12) - point).norm())
            on_segment = -1e-9 <= along <= length + 1e-9 and off < 1e-9
            if on_segment and (
                not positions or cumulative[segment] + along >= positions[-1] - 1e-9
            ):
                positions.append(float(cumulative[segment]) + along)
                break
            segment += 1
    return positions


@pytest.fixture(scope="module")
def sklearn_tasks() -> dict[str, TaskData]:
    digit_tasks = [name for name in TASKS if name not in ("line", "captions")]
    return {name: load_task(name, seed=0) for name in digit_tasks}


# ---------------------------------------------------------------- line


def test_line_shapes_and_dtypes():
    task = load_task("line", seed=0)

    assert (task.kind, task.input_size, task.output_size, task.seq_len) == (
        "regression",
        1,
        2,
        10,
    )
    assert task.drawing is True
    for split in _all_splits(task):
        n = len(split)
        assert split.inputs.shape == (n, 10, 1)
        assert split.inputs.dtype == torch.float32
        assert split.targets.shape == (n, 10, 2)
        assert split.targets.dtype == torch.float32
        assert split.mask.shape == (n, 10) and split.mask.dtype == torch.bool
        assert split.labels.shape == (n,) and split.labels.dtype == torch.int64


def test_line_split_sizes_and_cap():
    task = load_task("line", seed=0)
    assert (len(task.train), len(task.validation), len(task.test)) == (800, 200, 200)

    small = load_task("line", seed=0, n_train=50)
    assert (len(small.train), len(small.validation), len(small.test)) == (50, 200, 200)
    # The cap keeps a prefix, so the capped run trains on a subset of the full one.
    assert torch.equal(small.train.labels, task.train.labels[:50])


def test_line_cues_are_tenths_at_the_first_step_only():
    task = load_task("line", seed=0)
    inputs, labels = task.train.inputs, task.train.labels

    assert set(labels.tolist()) == set(range(7))
    expected = (labels.to(torch.float64) - 3) * 0.1
    assert torch.allclose(inputs[:, 0, 0].to(torch.float64), expected, atol=1e-7)
    assert torch.all(inputs[:, 1:] == 0)
    assert torch.allclose(
        line.cue_values().to(torch.float64),
        torch.tensor([-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3], dtype=torch.float64),
        atol=1e-7,
    )


def test_line_end_points_are_six_evenly_spaced_points_on_the_circle():
    ends = line.end_points().to(torch.float64)
    moving = [k for k in range(7) if k != line.STAY_LABEL]

    assert torch.equal(ends[line.STAY_LABEL], torch.zeros(2, dtype=torch.float64))
    radii = ends[moving].norm(dim=-1)
    assert torch.allclose(radii, torch.full((6,), 10.0, dtype=torch.float64), atol=1e-5)
    angles = sorted(math.degrees(math.atan2(y, x)) % 360 for x, y in ends[moving])
    assert angles == pytest.approx([0, 60, 120, 180, 240, 300], abs=1e-4)
    # Opposite cues point at opposite points.
    for m in (1, 2, 3):
        plus, minus = ends[line.STAY_LABEL + m], ends[line.STAY_LABEL - m]
        assert torch.allclose(plus, -minus, atol=1e-5)


def test_line_targets_are_straight_lines_and_the_stay_cue_stays():
    split = load_task("line", seed=0).train
    ends = line.end_points()[split.labels]
    fractions = torch.arange(1, 11, dtype=torch.float32) / 10

    expected = fractions[None, :, None] * ends[:, None, :]
    assert torch.allclose(split.targets, expected, atol=1e-6)
    assert torch.allclose(split.targets[:, -1], ends, atol=1e-6)
    stay = split.labels == line.STAY_LABEL
    assert stay.any() and torch.all(split.targets[stay] == 0)
    # Equal steps along one direction: every step moves by end / 10.
    steps = split.targets[~stay].diff(dim=1)
    assert torch.allclose(
        steps, ends[~stay, None, :] / 10 * torch.ones(9, 1), atol=1e-5
    )


def test_line_mask_every_second_step_ending_on_the_last():
    mask = load_task("line", seed=0).train.mask

    assert torch.nonzero(mask[0]).flatten().tolist() == [1, 3, 5, 7, 9]
    assert torch.equal(mask, mask[:1].expand_as(mask))


def test_line_determinism_by_seed():
    a, b, c = (load_task("line", seed=s) for s in (3, 3, 4))

    for split_a, split_b in zip(_all_splits(a), _all_splits(b), strict=True):
        assert torch.equal(split_a.inputs, split_b.inputs)
        assert torch.equal(split_a.targets, split_b.targets)
    assert not torch.equal(a.train.labels, c.train.labels)


# ---------------------------------------------------------------- digit images


def test_sklearn_split_sizes_partition_and_cap():
    images = digits.load_digit_images(seed=0)
    assert images.source == "sklearn"
    assert (len(images.train), len(images.validation), len(images.test)) == (
        1257,
        270,
        270,
    )

    # The three splits together are the whole data set, class by class.
    from sklearn.datasets import load_digits

    every = torch.cat(
        [s.labels for s in (images.train, images.validation, images.test)]
    )
    source = torch.from_numpy(load_digits().target)
    assert torch.equal(every.bincount(minlength=10), source.bincount(minlength=10))
    pixel_sums = torch.cat(
        [s.images.sum((1, 2)) for s in (images.train, images.validation, images.test)]
    )
    reference = digits._sklearn_digits()[0].sum((1, 2))
    assert torch.allclose(pixel_sums.sort().values, reference.sort().values)

    capped = digits.load_digit_images(seed=0, n_train=100)
    assert len(capped.train) == 100 and len(capped.validation) == 270


def test_sklearn_images_are_bilinear_resized_and_cached():
    from sklearn.datasets import load_digits

    digits._sklearn_digits.cache_clear()
    images, labels = digits._sklearn_digits()
    raw = torch.from_numpy(load_digits().images[:3]).float()[:, None] / 16

    expected = F.interpolate(raw, size=(28, 28), mode="bilinear", align_corners=False)
    assert images.shape == (1797, 28, 28) and images.dtype == torch.float32
    assert torch.allclose(images[:3], expected[:, 0])
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert labels.dtype == torch.int64
    digits.load_digit_images(seed=1)
    assert digits._sklearn_digits.cache_info().hits >= 1


def test_digit_images_determinism_by_seed():
    a, b, c = (digits.load_digit_images(seed=s) for s in (5, 5, 6))

    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.labels, c.train.labels)


# ---------------------------------------------------------------- digit tasks


@pytest.mark.parametrize("name", ["digit-lines", "digits", "patterns"])
def test_digit_task_shapes_and_dtypes(sklearn_tasks, name):
    task = sklearn_tasks[name]
    drawing = name != "patterns"

    assert task.name == name
    assert (task.input_size, task.seq_len) == (28, 28)
    assert task.output_size == (2 if drawing else 10)
    assert task.kind == ("regression" if drawing else "classification")
    assert task.drawing is drawing
    for split in _all_splits(task):
        n = len(split)
        assert split.inputs.shape == (n, 28, 28)
        assert split.inputs.dtype == torch.float32
        if drawing:
            assert split.targets.shape == (n, 28, 2)
            assert split.targets.dtype == torch.float32
        else:
            assert split.targets.shape == (n, 28)
            assert split.targets.dtype == torch.int64
        assert split.mask.shape == (n, 28) and split.mask.dtype == torch.bool
        assert split.labels.dtype == torch.int64


def test_digit_sequences_are_images_row_by_row(sklearn_tasks):
    images = digits.load_digit_images(seed=0)
    for name in ("digit-lines", "digits", "patterns"):
        assert torch.equal(sklearn_tasks[name].train.inputs, images.train.images)
        assert torch.equal(sklearn_tasks[name].test.labels, images.test.labels)


def test_digit_lines_targets_and_mask(sklearn_tasks):
    split = sklearn_tasks["digit-lines"].train
    angles = 2 * math.pi * split.labels.to(torch.float64) / 10
    ends = 10 * torch.stack([angles.cos(), angles.sin()], dim=-1)

    assert torch.allclose(split.targets[:, -1].to(torch.float64), ends, atol=1e-5)
    fractions = torch.arange(1, 29, dtype=torch.float64) / 28
    expected = fractions[None, :, None] * ends[:, None, :]
    assert torch.allclose(split.targets.to(torch.float64), expected, atol=1e-5)
    assert torch.nonzero(split.mask[0]).flatten().tolist() == list(range(3, 28, 4))
    assert torch.equal(split.mask, split.mask[:1].expand_as(split.mask))


def test_digits_targets_are_the_class_strokes(sklearn_tasks):
    split = sklearn_tasks["digits"].train
    templates = strokes.resampled_templates(28)

    assert torch.equal(split.targets, templates[split.labels])
    assert torch.nonzero(split.mask[0]).flatten().tolist() == [3, 7, 11, 15, 19, 23, 27]


def test_patterns_targets_and_mask_at_the_last_step(sklearn_tasks):
    split = sklearn_tasks["patterns"].train

    assert torch.equal(split.targets[:, -1], split.labels)
    assert torch.all(split.targets[:, :-1] == 0)
    assert torch.all(split.mask[:, -1]) and not split.mask[:, :-1].any()


# ---------------------------------------------------------------- IDX files


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_are_read(tmp_path, gz):
    arrays = _write_mnist(tmp_path, gz=gz)

    task = load_task("patterns", seed=0, data_dir=str(tmp_path))
    # A sixth of the 12 training images is held out for validation.
    assert (len(task.train), len(task.validation), len(task.test)) == (10, 2, 5)
    expected_test = torch.from_numpy(arrays["test_images"]).float() / 255
    assert torch.allclose(task.test.inputs, expected_test)
    assert task.test.labels.tolist() == arrays["test_labels"].tolist()
    # Train and validation together are the training file, image for image.
    pool = torch.cat([task.train.inputs, task.validation.inputs]).sum((1, 2))
    file_sums = torch.from_numpy(arrays["train_images"]).float().sum((1, 2)) / 255
    assert torch.allclose(pool.sort().values, file_sums.sort().values)

    other = load_task("patterns", seed=1, data_dir=str(tmp_path))
    again = load_task("patterns", seed=0, data_dir=str(tmp_path))
    assert torch.equal(again.validation.labels, task.validation.labels)
    assert not torch.equal(other.train.labels, task.train.labels)
    assert len(load_task("digits", data_dir=str(tmp_path), n_train=4).train) == 4


def test_read_idx_other_types_and_shapes(tmp_path):
    values = np.arange(-6, 6, dtype=np.int16).reshape(2, 3, 2)
    _write_idx(tmp_path / "a.idx", values, 0x0B)
    floats = np.linspace(0, 1, 5, dtype=np.float32)
    _write_idx(tmp_path / "b.idx.gz", floats, 0x0D)

    read = digits.read_idx(tmp_path / "a.idx")
    assert read.dtype == torch.int16 and read.tolist() == values.tolist()
    assert torch.equal(digits.read_idx(tmp_path / "b.idx.gz"), torch.from_numpy(floats))


def test_malformed_magic_raises_naming_the_file(tmp_path):
    _write_mnist(tmp_path)
    bad = tmp_path / digits.MNIST_FILES["train_images"]
    bad.write_bytes(b"\x12\x34\x08\x03" + bad.read_bytes()[4:])

    with pytest.raises(digits.IdxFormatError, match="magic number 0x12340803") as info:
        load_task("digits", data_dir=str(tmp_path))
    assert str(bad) in str(info.value)


def test_bad_type_code_and_truncated_payload_raise(tmp_path):
    unknown = tmp_path / "unknown.idx"
    unknown.write_bytes(bytes([0, 0, 0x07, 1]) + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(digits.IdxFormatError, match="type code 0x07"):
        digits.read_idx(unknown)

    short = tmp_path / "short.idx"
    short.write_bytes(bytes([0, 0, 0x08, 1]) + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(digits.IdxFormatError, match="holds 3 data bytes.*needs 5"):
        digits.read_idx(short)


def test_mnist_images_of_the_wrong_size_are_rejected(tmp_path):
    _write_mnist(tmp_path)
    _write_idx(
        tmp_path / digits.MNIST_FILES["test_images"], np.zeros((5, 8, 8), np.uint8)
    )
    with pytest.raises(digits.IdxFormatError, match=r"shape \(5, 8, 8\)"):
        digits.load_digit_images(data_dir=tmp_path)


def test_some_but_not_all_mnist_files_is_an_error(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / digits.MNIST_FILES["test_labels"]).unlink()

    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        digits.load_digit_images(data_dir=tmp_path)


def test_sklearn_fallback_when_data_dir_has_no_idx_files(tmp_path, caplog):
    (tmp_path / "notes.txt").write_text("no digits here")

    with caplog.at_level(logging.WARNING, logger="orchestrator.tasks.digits"):
        images = digits.load_digit_images(seed=0, data_dir=tmp_path)
    assert images.source == "sklearn" and len(images.train) == 1257
    assert "no MNIST IDX files" in caplog.text
    fallback = load_task("digit-lines", seed=0, data_dir=str(tmp_path))
    assert torch.equal(fallback.train.inputs, load_task("digit-lines").train.inputs)


def test_missing_data_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        digits.load_digit_images(data_dir=tmp_path / "absent")


# ---------------------------------------------------------------- strokes


def test_ten_distinct_templates_within_the_circle():
    resampled = strokes.resampled_templates(28)

    assert resampled.shape == (10, 28, 2) and resampled.dtype == torch.float32
    assert float(resampled.norm(dim=-1).max()) <= 10.0
    for d in range(10):
        assert float(strokes.template(d).norm(dim=-1).max()) <= strokes.FRAME_RADIUS
    flat = resampled.reshape(10, -1)
    distances = torch.cdist(flat, flat) + torch.eye(10) * 1e9
    assert float(distances.min()) > 1.0


def test_resample_is_even_along_arc_length():
    corner = torch.tensor([[0.0, 0.0], [3.0, 0.0], [3.0, 3.0]], dtype=torch.float64)
    expected = torch.tensor(
        [[0, 0], [1, 0], [2, 0], [3, 0], [3, 1], [3, 2], [3, 3]], dtype=torch.float64
    )
    assert torch.allclose(strokes.resample(corner, 7), expected)
    # A repeated vertex (a zero-length segment) changes nothing.
    doubled = torch.cat([corner[:2], corner[1:]])
    assert torch.allclose(strokes.resample(doubled, 7), expected)

    for d in range(10):
        points = strokes.template(d)
        resampled = strokes.resample(points, 28)
        total = float(strokes.arc_length(points)[-1])

        assert resampled.shape == (28, 2)
        assert torch.allclose(resampled[[0, -1]], points[[0, -1]])
        positions = _arc_positions(points, resampled)
        assert positions == pytest.approx([total * k / 27 for k in range(28)])


def test_resample_and_template_reject_bad_input():
    with pytest.raises(ValueError, match="got 10"):
        strokes.template(10)
    with pytest.raises(ValueError, match="zero length"):
        strokes.resample(torch.zeros(3, 2), 5)
    with pytest.raises(ValueError, match="at least 2, got 1"):
        strokes.resample(torch.eye(2), 1)


# ---------------------------------------------------------------- registry


def test_registry_names_and_unknown_task():
    assert set(TASKS) == {"line", "digit-lines", "digits", "patterns", "captions"}

    with pytest.raises(ValueError, match="unknown task 'lines'.*line, digit-lines"):
        load_task("lines")
    with pytest.raises(ValueError, match="n_train must be a positive integer.*0"):
        load_task("line", n_train=0)
