"""The ``captions`` task: describe an image in words, one word per step.

The cortical LSTM is the decoder. At step ``t`` it sees the image's features and the
one-hot of the previous word (``<start>`` at step 0; teacher forcing in training)
and names the next word (``<end>`` after the last), with cross-entropy at each
word of the caption and nothing after it. A sequence is one (image, caption) pair;
its label is the image's index in the split, so the references of an image are
the targets of every sequence with its label.

Images come from one of two places:

- generated scenes (:mod:`orchestrator.tasks.scenes`), rendered at 32x32 and
  encoded by a frozen convolutional network whose weights come from
  :data:`ENCODER_SEED` (the same "pre-trained" encoder for every run), or
- ``--data-dir`` holding COCO-format caption files (``captions_*.json``) and
  precomputed image features keyed by image id (``features.pt`` or
  ``features.npz``), see :func:`load_coco_captions`.

Features are standardised with the training split's mean and deviation.

Evaluation (:class:`CaptionEvaluator`) decodes greedily (the arg-max word is fed
back), scores BLEU-1..4 with sacrebleu against every reference of each image, and
reports the cross-entropy at each word position (late-caption errors, the
"ataxia" of language), BLEU-4 on held-out scenes with and without unseen
colour-shape pairs, with the images shuffled (a control: what the words alone
earn), and the unigram baseline's BLEU-4.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.tasks import scenes as scene_lib
from orchestrator.tasks.base import SequenceData, TaskData

logger = logging.getLogger(__name__)

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
ENCODER_SEED = 1234
# Generated scenes per split; each has scenes.CAPTIONS_PER_SCENE captions.
N_TRAIN_SCENES = 1000
N_HELD_OUT_SCENES = 200  # each of validation and test; half with unseen pairs
MAX_WORDS = scene_lib.MAX_WORDS
# COCO: keep captions' first MAX_WORDS words; rarer words become <unk>.
COCO_MIN_COUNT = 2
COCO_VALIDATION_FRACTION = 0.1
COCO_TEST_FRACTION = 0.1
FEATURE_FILES = ("features.pt", "features.npz")


# Vocabulary --------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    """Words by index; the four specials come first (``<pad>`` is 0)."""

    words: tuple[str, ...]
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.words[: len(SPECIALS)] != SPECIALS:
            raise ValueError(
                f"a vocabulary starts with {SPECIALS}, got {self.words[:4]}"
            )
        object.__setattr__(self, "index", {w: i for i, w in enumerate(self.words)})

    @classmethod
    def from_captions(cls, captions: Sequence[str], min_count: int = 1) -> Vocabulary:
        """Every word seen at least ``min_count`` times, most frequent first."""
        counts = Counter(w for c in captions for w in c.split())
        kept = sorted(
            (w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
            key=lambda w: (-counts[w], w),
        )
        return cls((*SPECIALS, *kept))

    def __len__(self) -> int:
        return len(self.words)

    @property
    def pad(self) -> int:
        return self.index[PAD]

    @property
    def start(self) -> int:
        return self.index[START]

    @property
    def end(self) -> int:
        return self.index[END]

    def encode(self, caption: str) -> list[int]:
        unk = self.index[UNK]
        return [self.index.get(w, unk) for w in caption.split()]

    def decode(self, ids: Sequence[int]) -> str:
        """Words up to the first ``<end>``, specials other than ``<unk>`` dropped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i in (self.pad, self.start):
                continue
            words.append(self.words[i])
        return " ".join(words)


# Image encoder -----------------------------------------------------------------------


class ImageEncoder(nn.Module):
    """A frozen convolutional network: ``(N, 3, 32, 32)`` images to ``(N, 288)``.

    Its weights are drawn from ``seed`` and never trained; the 3x3 average pool at
    the end keeps one feature vector per grid cell, so where an object sits stays
    readable from the features.
    """

    def __init__(self, seed: int = ENCODER_SEED, width: int = 32) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.layers = nn.Sequential(
            nn.Conv2d(3, width, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(scene_lib.GRID),
            nn.Flatten(),
        )
        with torch.no_grad():
            for module in self.layers:
                if isinstance(module, nn.Conv2d):
                    fan_in = module.in_channels * module.kernel_size[0] ** 2
                    bound = (6.0 / fan_in) ** 0.5  # He-uniform, for ReLU
                    module.weight.copy_(
                        (torch.rand(module.weight.shape, generator=generator) * 2 - 1)
                        * bound
                    )
                    module.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def standardise(
    features: list[torch.Tensor],
) -> list[torch.Tensor]:
    """Scale every split by the first (training) split's mean and deviation."""
    mean = features[0].mean(0)
    std = features[0].std(0).clamp_min(1e-6)
    return [(f - mean) / std for f in features]


# Sequences ---------------------------------------------------------------------------


def caption_sequences(
    features: torch.Tensor,
    captions: Sequence[Sequence[str]],
    vocab: Vocabulary,
    max_words: int = MAX_WORDS,
) -> SequenceData:
    """One sequence per (image, caption), ``max_words + 1`` steps long.

    Args:
        features: ``(M, F)`` features of the split's images.
        captions: for each image, its captions (space-separated words).
        vocab: the vocabulary (words outside it become ``<unk>``).
        max_words: captions are cut to this many words.

    Returns:
        inputs ``(N, S, F + V)``, targets ``(N, S)`` word indices, mask ``(N, S)``
        (True up to and including ``<end>``), labels ``(N,)`` image indices.
    """
    if features.shape[0] != len(captions):
        raise ValueError(
            f"{features.shape[0]} feature rows for {len(captions)} images' captions"
        )
    steps = max_words + 1
    rows = [
        (m, vocab.encode(c)[:max_words]) for m, cs in enumerate(captions) for c in cs
    ]
    n, size, v = len(rows), features.shape[1], len(vocab)

    targets = torch.full((n, steps), vocab.pad, dtype=torch.int64)
    previous = torch.full((n, steps), vocab.pad, dtype=torch.int64)
    mask = torch.zeros(n, steps, dtype=torch.bool)
    labels = torch.empty(n, dtype=torch.int64)
    for row, (image, words) in enumerate(rows):
        length = len(words)
        targets[row, :length] = torch.tensor(words, dtype=torch.int64)
        targets[row, length] = vocab.end
        previous[row, 0] = vocab.start
        previous[row, 1 : length + 1] = targets[row, :length]
        mask[row, : length + 1] = True
        labels[row] = image
    # (N, S, F + V): the image's features at every step, then the previous word
    inputs = torch.cat(
        [
            features[labels][:, None, :].expand(n, steps, size),
            F.one_hot(previous, v).float(),
        ],
        dim=-1,
    )
    return SequenceData(inputs, targets, mask, labels)


# BLEU and decoding -------------------------------------------------------------------


def bleu(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_order: int = 4
) -> float:
    """Corpus BLEU-``max_order`` (0-100) by sacrebleu, every reference of a segment.

    Words are compared as given (no tokenisation, no smoothing), the brevity
    penalty uses the closest reference length; segments may have different
    numbers of references.
    """
    from sacrebleu.metrics import BLEU

    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses for {len(references)} reference sets"
        )
    if any(not refs for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    most = max(len(refs) for refs in references)
    streams = [
        [refs[k] if k < len(refs) else None for refs in references] for k in range(most)
    ]
    metric = BLEU(max_ngram_order=max_order, tokenize="none", smooth_method="none")
    return float(metric.corpus_score(list(hypotheses), streams).score)


@torch.no_grad()
def greedy_decode(
    chunks: Sequence[nn.Module],
    features: torch.Tensor,
    vocab: Vocabulary,
    steps: int,
) -> torch.Tensor:
    """``(M, F)`` image features to ``(M, steps)`` word indices, arg-max fed back."""
    for chunk in chunks:
        chunk.eval()
    m = features.shape[0]
    states = [chunk.initial_state(m) for chunk in chunks]
    previous = torch.full((m,), vocab.start, dtype=torch.int64)
    words = []
    for _ in range(steps):
        hidden = torch.cat([features, F.one_hot(previous, len(vocab)).float()], -1)
        hidden = hidden[:, None, :]  # (M, 1, F + V)
        for index, chunk in enumerate(chunks):
            hidden, states[index] = chunk(hidden, states[index])
        previous = chunks[-1].read_out(hidden)[:, 0].argmax(-1)
        words.append(previous)
    return torch.stack(words, dim=1)


@torch.no_grad()
def loss_by_position(
    chunks: Sequence[nn.Module], split: SequenceData
) -> list[float | None]:
    """Mean cross-entropy at each word position (teacher forced); None where empty."""
    for chunk in chunks:
        chunk.eval()
    hidden = split.inputs
    for chunk in chunks:
        hidden, _ = chunk(hidden, chunk.initial_state(len(split)))
    logits = chunks[-1].read_out(hidden)
    per_step = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        split.targets.reshape(-1),
        reduction="none",
    ).reshape(split.mask.shape)
    counts = split.mask.sum(0)
    sums = (per_step * split.mask).sum(0)
    return [
        float(s / c) if int(c) else None for s, c in zip(sums.tolist(), counts.tolist())
    ]


@dataclass(frozen=True)
class SplitImages:
    """What a split's sequences say about its images: features and references."""

    features: torch.Tensor  # (M, F)
    references: list[list[str]]


def split_images(
    split: SequenceData, vocab: Vocabulary, feature_size: int
) -> SplitImages:
    """Each image's features and reference captions, recovered from the sequences."""
    images = int(split.labels.max()) + 1 if len(split) else 0
    first = torch.full((images,), -1, dtype=torch.int64)
    references: list[list[str]] = [[] for _ in range(images)]
    for row, label in enumerate(split.labels.tolist()):
        if first[label] < 0:
            first[label] = row
        references[label].append(vocab.decode(split.targets[row][split.mask[row]]))
    if bool((first < 0).any()):
        raise ValueError("image labels of a caption split must be 0..M-1 without gaps")
    return SplitImages(split.inputs[first, 0, :feature_size], references)


class CaptionEvaluator:
    """BLEU of greedy decoding and the loss per word position, for one task.

    Called as ``evaluator(chunks, split)`` by the trainer (``TaskData.evaluator``).

    Args:
        vocab: the task's vocabulary.
        feature_size: width of the image features at the start of each input.
        max_words: longest caption the decoder may write.
        unigram: the unigram baseline's caption (its BLEU-4 is reported).
        held_out: colour-shape pairs never seen in training (generated scenes);
            BLEU-4 is then also split by whether an image holds one.
        examples: how many decoded captions to return with their references.
    """

    def __init__(
        self,
        vocab: Vocabulary,
        feature_size: int,
        max_words: int = MAX_WORDS,
        unigram: str = "",
        held_out: Sequence[scene_lib.Pair] = (),
        examples: int = 4,
    ) -> None:
        self.vocab = vocab
        self.feature_size = feature_size
        self.max_words = max_words
        self.unigram = unigram
        self.held_out = set(held_out)
        self.examples = examples

    def images(self, split: SequenceData) -> SplitImages:
        return split_images(split, self.vocab, self.feature_size)

    def captions(
        self, chunks: Sequence[nn.Module], features: torch.Tensor
    ) -> list[str]:
        ids = greedy_decode(chunks, features, self.vocab, self.max_words + 1)
        return [self.vocab.decode(row) for row in ids.tolist()]

    def __call__(
        self, chunks: Sequence[nn.Module], split: SequenceData
    ) -> dict[str, Any]:
        images = self.images(split)
        hypotheses = self.captions(chunks, images.features)
        refs = images.references
        result: dict[str, Any] = {
            f"bleu{n}": bleu(hypotheses, refs, n) for n in (1, 2, 3, 4)
        }
        result["metric"] = result["bleu4"]
        result["metric_name"] = "bleu4"

        # Control: the same decoder given another image's features.
        order = torch.roll(torch.arange(len(refs)), 1)
        result["bleu4_shuffled"] = bleu(
            self.captions(chunks, images.features[order]), refs, 4
        )
        if self.unigram:
            result["unigram_bleu4"] = bleu([self.unigram] * len(refs), refs, 4)
        if self.held_out:
            novel = [bool(scene_lib.references_pairs(r) & self.held_out) for r in refs]
            for name, want in (("novel", True), ("familiar", False)):
                keep = [i for i, flag in enumerate(novel) if flag == want]
                if keep:
                    result[f"bleu4_{name}"] = bleu(
                        [hypotheses[i] for i in keep], [refs[i] for i in keep], 4
                    )
        result["loss_by_position"] = loss_by_position(chunks, split)
        result["mean_length"] = float(np.mean([len(h.split()) for h in hypotheses]))
        result["examples"] = [
            {"caption": hypotheses[i], "references": refs[i]}
            for i in range(min(self.examples, len(refs)))
        ]
        return result


def unigram_caption(captions: Sequence[str], vocab: Vocabulary) -> str:
    """The unigram baseline: the most frequent training words, in order of frequency.

    A unigram model knows how often words occur, not where, so its best guess of a
    caption is its most frequent words; it has the training captions' median length.
    """
    counts = Counter(w for c in captions for w in c.split() if w in vocab.index)
    length = int(np.median([len(c.split()) for c in captions]))
    return " ".join(w for w, _ in counts.most_common(length))


# Tasks -------------------------------------------------------------------------------


def _build_task(
    name: str,
    features: list[torch.Tensor],
    captions: list[list[list[str]]],
    vocab: Vocabulary,
    held_out: Sequence[scene_lib.Pair] = (),
) -> TaskData:
    features = standardise(features)
    splits = [caption_sequences(f, c, vocab) for f, c in zip(features, captions)]
    train_captions = [c for cs in captions[0] for c in cs]
    evaluator = CaptionEvaluator(
        vocab,
        features[0].shape[1],
        unigram=unigram_caption(train_captions, vocab),
        held_out=held_out,
    )
    return TaskData(
        name=name,
        kind="classification",
        input_size=features[0].shape[1] + len(vocab),
        output_size=len(vocab),
        seq_len=MAX_WORDS + 1,
        train=splits[0],
        validation=splits[1],
        test=splits[2],
        evaluator=evaluator,
    )


def generated_scenes(seed: int, n_train_scenes: int = N_TRAIN_SCENES) -> dict:
    """The three splits of generated scenes for ``seed``, and the held-out pairs."""
    held_out = scene_lib.held_out_pairs(seed)
    seen = [p for p in scene_lib.all_pairs() if p not in held_out]
    everything = scene_lib.all_pairs()
    half = N_HELD_OUT_SCENES // 2
    splits = {"held_out": held_out}
    splits["train"] = scene_lib.draw_scenes(
        np.random.default_rng([seed, 1]), n_train_scenes, seen
    )
    for index, split in ((2, "validation"), (3, "test")):
        rng = np.random.default_rng([seed, index])
        splits[split] = scene_lib.draw_scenes(
            rng, half, everything, must_include=held_out
        ) + scene_lib.draw_scenes(rng, N_HELD_OUT_SCENES - half, seen)
    return splits


def make_captions_task(
    *, seed: int = 0, data_dir: str | Path | None = None, n_train: int | None = None
) -> TaskData:
    """The ``captions`` task: generated scenes, or COCO files from ``data_dir``.

    Args:
        seed: seeds the scenes, the held-out colour-shape pairs and the splits.
        data_dir: COCO caption files and features (see :func:`load_coco_captions`);
            ``None`` generates scenes.
        n_train: keep at most this many training sequences (whole images: an
            image's captions stay together).
    """
    if data_dir is not None:
        return load_coco_captions(data_dir, seed=seed, n_train=n_train)
    per_scene = scene_lib.CAPTIONS_PER_SCENE
    n_scenes = N_TRAIN_SCENES if n_train is None else max(1, n_train // per_scene)
    splits = generated_scenes(seed, n_scenes)
    encoder = ImageEncoder()
    features, captions = [], []
    for name in ("train", "validation", "test"):
        images = np.stack([scene_lib.render(s) for s in splits[name]])
        features.append(encoder(torch.from_numpy(images)))
        captions.append([list(s.captions) for s in splits[name]])
    vocab = Vocabulary.from_captions([c for cs in captions[0] for c in cs])
    task = _build_task("captions", features, captions, vocab, splits["held_out"])
    logger.debug(
        "captions, seed %d: %d/%d/%d scenes, %d words, held-out pairs %s",
        seed,
        *(len(splits[k]) for k in ("train", "validation", "test")),
        len(vocab),
        splits["held_out"],
    )
    return task


# COCO --------------------------------------------------------------------------------


def tokenise(caption: str) -> list[str]:
    """Lower-case words and numbers; punctuation dropped."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", caption.lower())


def read_features(data_dir: Path) -> dict[int, torch.Tensor]:
    """Image features by image id from ``features.pt`` or ``features.npz``.

    ``features.pt`` holds a dict ``{image_id: (F,) tensor}``; ``features.npz``
    holds arrays ``ids`` ``(M,)`` and ``features`` ``(M, F)``.
    """
    pt, npz = (data_dir / name for name in FEATURE_FILES)
    if pt.exists():
        table = torch.load(pt, map_location="cpu", weights_only=True)
        if not isinstance(table, dict):
            raise ValueError(f"{pt}: expected a dict of image id to tensor")
        features = {
            int(k): torch.as_tensor(v).float().flatten() for k, v in table.items()
        }
    elif npz.exists():
        with np.load(npz) as arrays:
            if "ids" not in arrays or "features" not in arrays:
                raise ValueError(f"{npz}: expected arrays 'ids' and 'features'")
            ids, rows = arrays["ids"], arrays["features"]
        if rows.ndim != 2 or len(ids) != len(rows):
            raise ValueError(
                f"{npz}: 'features' must be (M, F) with M = len(ids); got "
                f"{rows.shape} for {len(ids)} ids"
            )
        features = {int(i): torch.from_numpy(r).float() for i, r in zip(ids, rows)}
    else:
        raise FileNotFoundError(
            f"{data_dir}: no image features; write {FEATURE_FILES[0]} (dict of "
            f"image id to tensor) or {FEATURE_FILES[1]} (arrays ids, features)"
        )
    widths = {v.numel() for v in features.values()}
    if len(widths) != 1:
        raise ValueError(f"image features have different widths: {sorted(widths)}")
    return features


def read_coco_file(path: Path) -> dict[int, list[str]]:
    """Captions by image id from one COCO ``captions_*.json`` file."""
    record = json.loads(path.read_text())
    if "annotations" not in record or "images" not in record:
        raise ValueError(f"{path}: a COCO caption file has 'images' and 'annotations'")
    captions: dict[int, list[str]] = {int(i["id"]): [] for i in record["images"]}
    for note in record["annotations"]:
        image = int(note["image_id"])
        if image not in captions:
            raise ValueError(
                f"{path}: annotation {note.get('id')} names unknown image {image}"
            )
        words = tokenise(note["caption"])[:MAX_WORDS]
        if words:
            captions[image].append(" ".join(words))
    return {k: v for k, v in captions.items() if v}


def load_coco_captions(
    data_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int | None = None,
    min_count: int = COCO_MIN_COUNT,
) -> TaskData:
    """A caption task from COCO-format files and precomputed features.

    ``data_dir`` holds one or more ``captions_*.json`` files and the features
    (:func:`read_features`). Files whose name contains ``train`` give the training
    images, the others are split by ``seed`` into validation and test halves; with
    no such names, every image is pooled and split 80/10/10 by ``seed``. Images
    without features are dropped (with a warning). Captions keep their first
    :data:`MAX_WORDS` words; words seen fewer than ``min_count`` times in training
    become ``<unk>``.

    Raises:
        FileNotFoundError: no caption file or no feature file.
        ValueError: a malformed file, or a split left without images.
    """
    folder = Path(data_dir)
    files = sorted(folder.glob("captions_*.json"))
    if not files:
        raise FileNotFoundError(f"{folder}: no captions_*.json (COCO format) found")
    features = read_features(folder)

    training = [f for f in files if "train" in f.stem]
    held = [f for f in files if "train" not in f.stem]
    by_file = {f: read_coco_file(f) for f in files}
    missing = sum(1 for c in by_file.values() for i in c if i not in features)
    if missing:
        logger.warning(
            "%s: %d images have no features and are left out", folder, missing
        )

    def ids_of(group: list[Path]) -> list[int]:
        return sorted({i for f in group for i in by_file[f] if i in features})

    rng = np.random.default_rng([seed, 4])
    if training and held:
        train_ids = ids_of(training)
        rest = list(rng.permutation(ids_of(held)))
        cut = len(rest) // 2
        val_ids, test_ids = rest[:cut], rest[cut:]
    else:
        pool = list(rng.permutation(ids_of(files)))
        n_val = max(1, round(len(pool) * COCO_VALIDATION_FRACTION))
        n_test = max(1, round(len(pool) * COCO_TEST_FRACTION))
        val_ids, test_ids = pool[:n_val], pool[n_val : n_val + n_test]
        train_ids = pool[n_val + n_test :]
    captions_of: dict[int, list[str]] = {}
    for table in by_file.values():
        for image, caps in table.items():
            captions_of.setdefault(image, []).extend(caps)
    if n_train is not None:
        kept, total = [], 0
        for image in train_ids:
            if kept and total + len(captions_of[image]) > n_train:
                break
            kept.append(image)
            total += len(captions_of[image])
        train_ids = kept
    for split, ids in (
        ("train", train_ids),
        ("validation", val_ids),
        ("test", test_ids),
    ):
        if not ids:
            raise ValueError(f"{folder}: the {split} split has no images with features")

    groups = [train_ids, val_ids, test_ids]
    vocab = Vocabulary.from_captions(
        [c for i in train_ids for c in captions_of[i]], min_count=min_count
    )
    split_features = [torch.stack([features[int(i)] for i in ids]) for ids in groups]
    split_captions = [[captions_of[int(i)] for i in ids] for ids in groups]
    return _build_task("captions", split_features, split_captions, vocab)
