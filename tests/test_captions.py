"""Tests of the captions task: scenes, captions, splits, BLEU, decoding, COCO files."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from orchestrator.config import for_task
from orchestrator.tasks import captions as cap
from orchestrator.tasks import scenes
from orchestrator.tasks.registry import TASKS, load_task
from orchestrator.trainer import Trainer

# ---------------------------------------------------------------- scenes


@pytest.fixture(scope="module")
def splits():
    return cap.generated_scenes(seed=3, n_train_scenes=120)


@pytest.fixture(scope="module")
def small_task():
    return load_task("captions", seed=0, n_train=60)


def test_every_caption_has_11_to_15_words(splits):
    lengths = [
        len(c.split())
        for name in ("train", "validation", "test")
        for s in splits[name]
        for c in s.captions
    ]
    assert min(lengths) >= 11 and max(lengths) <= 15
    assert len(set(lengths)) >= 3  # not one template length


def test_each_scene_has_distinct_captions_that_name_exactly_its_objects(splits):
    for s in splits["train"] + splits["validation"]:
        assert len(s.captions) == scenes.CAPTIONS_PER_SCENE
        assert len(set(s.captions)) == len(s.captions)
        assert 2 <= len(s.objects) <= 3
        assert len({(o.row, o.col) for o in s.objects}) == len(s.objects)
        for caption in s.captions:
            assert scenes.caption_pairs(caption) <= s.pairs()
        assert scenes.references_pairs(s.captions) == s.pairs()


def test_relations_follow_the_grid():
    def at(row, col):
        return scenes.SceneObject("circle", "red", "small", row, col)

    assert scenes.relation(at(1, 0), at(1, 2)) == "left of"
    assert scenes.relation(at(0, 2), at(1, 1)) == "right of"  # ties go horizontal
    assert scenes.relation(at(0, 1), at(2, 1)) == "above"
    assert scenes.relation(at(2, 0), at(0, 1)) == "below"
    with pytest.raises(ValueError, match="share the cell"):
        scenes.relation(at(1, 1), at(1, 1))


def _named_object(words: list[str]):
    """The (colour, shape) of the first colour word in ``words`` and the next word."""
    for a, b in zip(words, words[1:]):
        if a in scenes.COLOURS and b in scenes.SHAPES:
            return a, b
    return None


def test_captions_state_true_relations(splits):
    checked = 0
    for s in splits["train"]:
        by_pair = {o.pair: o for o in s.objects}
        if len(by_pair) < len(s.objects):
            continue  # two objects of one kind: which is meant is ambiguous
        for caption in s.captions:
            for rel in ("left of", "right of", "above", "below"):
                if f" {rel} " not in caption:
                    continue
                before, after = caption.split(f" {rel} ")
                subject = _named_object(before.split()[-3:])
                other = _named_object(after.split()[:4])
                assert subject and other
                assert scenes.relation(by_pair[subject], by_pair[other]) == rel
                checked += 1
    assert checked > 100


def test_render_paints_each_object_in_its_colour_at_its_cell():
    obj = scenes.SceneObject("square", "green", "large", 2, 0)
    image = scenes.render(scenes.Scene((obj,), ("",), ((0, 0),)))
    assert image.shape == (3, 32, 32) and image.dtype == np.float32
    centre = int(2.5 * 32 / 3), int(0.5 * 32 / 3)
    assert np.allclose(image[:, centre[0], centre[1]], scenes.COLOURS["green"])
    assert np.all(image[:, 2, 30] == 0)  # far corner stays black
    painted = (image.sum(0) > 0).sum()
    assert 60 <= painted <= 100  # a square of side about 2 * 0.85 * 5 + 1


def test_held_out_pairs_are_unseen_in_training_and_present_when_held_out(splits):
    held = set(splits["held_out"])
    assert len(held) == scenes.N_HELD_OUT_PAIRS
    assert len({c for c, _ in held}) == len(held) == len({s for _, s in held})
    assert all(not s.pairs() & held for s in splits["train"])
    train_text = " ".join(c for s in splits["train"] for c in s.captions)
    for colour, shape in held:
        assert f"{colour} {shape}" not in train_text
    for name in ("validation", "test"):
        novel = [bool(s.pairs() & held) for s in splits[name]]
        assert sum(novel) >= len(novel) // 2
        assert not all(novel)
    # Every colour and every shape is still seen in training.
    seen = set().union(*(s.pairs() for s in splits["train"]))
    assert {c for c, _ in seen} == set(scenes.COLOURS)
    assert {s for _, s in seen} == set(scenes.SHAPES)


def test_scenes_are_determined_by_the_seed():
    a = cap.generated_scenes(seed=5, n_train_scenes=30)
    b = cap.generated_scenes(seed=5, n_train_scenes=30)
    c = cap.generated_scenes(seed=6, n_train_scenes=30)
    assert a == b
    assert a["train"] != c["train"]
    assert scenes.held_out_pairs(0) != scenes.held_out_pairs(1)


# ---------------------------------------------------------------- the task


def test_captions_is_a_registered_task_and_deterministic(small_task):
    assert "captions" in TASKS
    again = load_task("captions", seed=0, n_train=60)
    for split in ("train", "validation", "test"):
        x, y = getattr(small_task, split), getattr(again, split)
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
    other = load_task("captions", seed=1, n_train=60)
    assert not torch.equal(other.train.targets[:5], small_task.train.targets[:5])


def test_sequences_are_teacher_forced_captions_with_end_and_mask(small_task):
    task = small_task
    vocab = task.evaluator.vocab
    size = task.evaluator.feature_size
    assert len(task.train) == 60  # 12 scenes x 5 captions
    assert task.seq_len == 16 and task.kind == "classification"
    assert task.input_size == size + len(vocab) and task.output_size == len(vocab)
    split = task.train
    for row in range(0, 60, 7):
        length = int(split.mask[row].sum())
        assert 12 <= length <= 16  # 11-15 words and <end>
        assert (
            bool(split.mask[row, :length].all()) and not split.mask[row, length:].any()
        )
        targets = split.targets[row]
        assert int(targets[length - 1]) == vocab.end
        previous = split.inputs[row, :, size:].argmax(-1)
        assert int(previous[0]) == vocab.start
        assert torch.equal(previous[1:length], targets[: length - 1])
        assert torch.equal(split.inputs[row, 0, :size], split.inputs[row, -1, :size])
        one_hot = split.inputs[row, :, size:]
        assert torch.equal(one_hot.sum(-1), torch.ones(16))
    # Rows of one scene share their features, other scenes differ.
    same = (split.labels == 0).nonzero().flatten()
    assert len(same) == 5
    assert torch.equal(split.inputs[same[0], 0, :size], split.inputs[same[4], 0, :size])
    other = (split.labels == 1).nonzero().flatten()[0]
    assert not torch.equal(
        split.inputs[same[0], 0, :size], split.inputs[other, 0, :size]
    )


def test_training_features_are_standardised(small_task):
    size = small_task.evaluator.feature_size
    features = cap.split_images(small_task.train, small_task.evaluator.vocab, size)
    f = features.features
    assert f.shape == (12, 288)
    live = f.std(0) > 0.5
    assert live.float().mean() > 0.5  # most features vary across scenes
    assert torch.allclose(f.mean(0), torch.zeros(288), atol=1e-4)


def test_vocabulary_round_trip_and_unknown_words():
    vocab = cap.Vocabulary.from_captions(["b a a", "a c"], min_count=2)
    assert vocab.words == (*cap.SPECIALS, "a")
    vocab = cap.Vocabulary.from_captions(["b a a", "a c"])
    assert vocab.words == (*cap.SPECIALS, "a", "b", "c")
    assert vocab.decode(vocab.encode("c a b")) == "c a b"
    assert vocab.encode("a zebra") == [vocab.index["a"], vocab.index[cap.UNK]]
    ids = [vocab.start, vocab.index["b"], vocab.end, vocab.index["a"]]
    assert vocab.decode(ids) == "b"
    with pytest.raises(ValueError, match="starts with"):
        cap.Vocabulary(("a", "b"))


def test_split_images_recovers_references(small_task):
    vocab = small_task.evaluator.vocab
    images = cap.split_images(
        small_task.train, vocab, small_task.evaluator.feature_size
    )
    expected = cap.generated_scenes(0, 12)["train"]
    assert images.references == [list(s.captions) for s in expected]


# ---------------------------------------------------------------- BLEU


def test_bleu_of_identical_and_disjoint_captions():
    refs = [["a red circle is left of a blue square"], ["there is a cross"]]
    hyps = [r[0] for r in refs]
    for n in (1, 2, 3, 4):
        assert cap.bleu(hyps, refs, n) == pytest.approx(100.0)
    assert cap.bleu(["one two three four five six seven"], [[hyps[0]]], 4) == 0.0
    assert cap.bleu(["one two three four five six seven"], [[hyps[0]]], 1) == 0.0


def test_bleu_matches_a_hand_computed_case():
    hyp = ["the cat sat on the mat"]
    refs = [["the cat sat on a mat"]]
    # clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, no penalty
    assert cap.bleu(hyp, refs, 1) == pytest.approx(100 * 5 / 6)
    assert cap.bleu(hyp, refs, 2) == pytest.approx(100 * math.sqrt(5 / 6 * 3 / 5))
    assert cap.bleu(hyp, refs, 4) == pytest.approx(100 * (1 / 12) ** 0.25)
    # A short hypothesis pays the brevity penalty exp(1 - 6 / 2).
    assert cap.bleu(["the cat"], refs, 1) == pytest.approx(100 * math.exp(-2))
    # With two references the closest length counts and n-grams match either.
    two = [["the cat sat on a mat", "the cat"]]
    assert cap.bleu(["the cat"], two, 2) == pytest.approx(100.0)


def test_bleu_takes_a_variable_number_of_references():
    refs = [["a b c d"], ["e f g h", "x y z w"]]
    assert cap.bleu(["a b c d", "x y z w"], refs, 4) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="hypotheses"):
        cap.bleu(["a"], refs)
    with pytest.raises(ValueError, match="at least one reference"):
        cap.bleu(["a"], [[]])


def test_unigram_baseline_is_the_most_frequent_words():
    captions = ["a b a c", "a b d e", "b a f g"]
    vocab = cap.Vocabulary.from_captions(captions)
    assert cap.unigram_caption(captions, vocab) == "a b c d"


def test_unigram_baseline_scores_low_on_scenes(small_task):
    assert isinstance(small_task.evaluator, cap.CaptionEvaluator)
    unigram = small_task.evaluator.unigram
    assert unigram.split()[0] == "a" and 11 <= len(unigram.split()) <= 15
    refs = cap.split_images(
        small_task.validation,
        small_task.evaluator.vocab,
        small_task.evaluator.feature_size,
    ).references
    assert cap.bleu([unigram] * len(refs), refs, 4) < 5.0


# ---------------------------------------------------------------- decoding


class BigramChunk(nn.Module):
    """A stand-in cortex that names the word after the previous one in a fixed table."""

    def __init__(self, feature_size: int, table: torch.Tensor) -> None:
        super().__init__()
        self.feature_size = feature_size
        self.table = table  # (V, V): row = previous word, column = next word

    def initial_state(self, batch: int):
        return torch.zeros(1, batch, 1), torch.zeros(1, batch, 1)

    def forward(self, x, state):
        return x[..., self.feature_size :], state

    def read_out(self, hidden):
        return hidden @ self.table


def test_greedy_decoding_feeds_back_the_arg_max_and_scores_100():
    vocab = cap.Vocabulary.from_captions(["red circle left of blue square"])
    chain = [vocab.start, *vocab.encode("red circle left of blue square"), vocab.end]
    table = torch.zeros(len(vocab), len(vocab))
    for a, b in zip(chain, chain[1:]):
        table[a, b] = 1.0
    table[vocab.end, vocab.end] = 1.0
    features = torch.randn(3, 2)
    ids = cap.greedy_decode([BigramChunk(2, table)], features, vocab, steps=9)
    assert ids.shape == (3, 9)
    assert vocab.decode(ids[0]) == "red circle left of blue square"

    split = cap.caption_sequences(
        features, [["red circle left of blue square"]] * 3, vocab
    )
    evaluator = cap.CaptionEvaluator(vocab, 2, unigram="of of of")
    result = evaluator([BigramChunk(2, table)], split)
    assert result["bleu4"] == pytest.approx(100.0) == result["metric"]
    assert result["metric_name"] == "bleu4"
    assert result["unigram_bleu4"] == 0.0
    assert result["mean_length"] == 6.0
    assert len(result["loss_by_position"]) == 16
    assert result["loss_by_position"][-1] is None  # no caption reaches step 16
    losses = result["loss_by_position"][:7]
    assert all(x is not None and x < 2.0 for x in losses)


# ---------------------------------------------------------------- trainer wiring


def test_training_records_bleu_and_losses_by_position(tmp_path, small_task):
    config = for_task(
        "captions",
        model="ccrnn",
        epochs=1,
        hidden_size=16,
        granule_width=32,
        batch_size=20,
    )
    summary = Trainer(config, small_task).fit(tmp_path, progress=False)
    assert summary["metric_name"] == "bleu4"
    metrics = summary["task_metrics"]
    for split in ("validation", "test"):
        assert {
            "bleu1",
            "bleu4",
            "bleu4_novel",
            "bleu4_familiar",
            "unigram_bleu4",
        } <= set(metrics[split])
    assert summary["validation_metric"] == metrics["validation"]["bleu4"]
    curve = [json.loads(x) for x in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert len(curve[0]["task_metrics"]["loss_by_position"]) == 16
    assert curve[0]["metric_name"] == "bleu4"


# ---------------------------------------------------------------- COCO files


def _coco(path, images, captions):
    record = {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in images],
        "annotations": [
            {"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(captions)
        ],
    }
    path.write_text(json.dumps(record))


def test_coco_loader_reads_train_and_val_files_with_features(tmp_path, caplog):
    _coco(
        tmp_path / "captions_train2014.json",
        [1, 2, 3],
        [
            (1, "A dog runs on the grass."),
            (1, "A brown dog, running!"),
            (2, "A cat sleeps on a mat"),
            (3, "Two dogs " + "and more dogs " * 10),
        ],
    )
    _coco(
        tmp_path / "captions_val2014.json",
        [10, 11, 12, 13],
        [(10, "a dog"), (11, "a cat on grass"), (12, "zebra"), (13, "no features")],
    )
    features = {i: torch.full((4,), float(i)) for i in (1, 2, 3, 10, 11, 12)}
    torch.save(features, tmp_path / "features.pt")

    with caplog.at_level(logging.WARNING):
        task = load_task("captions", data_dir=str(tmp_path))
    assert "1 images have no features" in caplog.text
    vocab = task.evaluator.vocab
    # min count 2 in training: a, dog, on, dogs, and ... survive; cat does not
    assert {"a", "dog", "on", "dogs", "and"} <= set(vocab.words)
    assert "cat" not in vocab.words and "brown" not in vocab.words
    assert len(task.train) == 4
    assert len(task.validation) + len(task.test) == 3
    assert task.input_size == 4 + len(vocab)
    long_row = int((task.train.labels == 2).nonzero()[0])
    assert int(task.train.mask[long_row].sum()) == cap.MAX_WORDS + 1  # cut to 15
    images = cap.split_images(task.train, vocab, 4)
    assert images.references[0] == ["a dog <unk> on <unk> <unk>", "a <unk> dog <unk>"]
    assert torch.allclose(images.features.mean(0), torch.zeros(4), atol=1e-5)


def test_coco_loader_pools_one_file_and_reads_npz(tmp_path):
    ids = list(range(20))
    _coco(
        tmp_path / "captions_all.json",
        ids,
        [(i, f"picture number {i % 3} of a dog") for i in ids],
    )
    rows = np.arange(40, dtype=np.float32).reshape(20, 2)
    np.savez(tmp_path / "features.npz", ids=np.array(ids), features=rows)
    task = cap.load_coco_captions(tmp_path, seed=1, min_count=1)
    assert (len(task.train), len(task.validation), len(task.test)) == (16, 2, 2)
    again = cap.load_coco_captions(tmp_path, seed=1, min_count=1)
    assert torch.equal(task.test.inputs, again.test.inputs)
    capped = cap.load_coco_captions(tmp_path, seed=1, n_train=5, min_count=1)
    assert len(capped.train) == 5


def test_coco_loader_errors_name_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions_"):
        cap.load_coco_captions(tmp_path)
    _coco(tmp_path / "captions_x.json", [1], [(1, "a dog")])
    with pytest.raises(FileNotFoundError, match="features.pt"):
        cap.load_coco_captions(tmp_path)
    (tmp_path / "captions_y.json").write_text(json.dumps({"images": []}))
    torch.save({1: torch.zeros(2)}, tmp_path / "features.pt")
    with pytest.raises(ValueError, match="annotations"):
        cap.load_coco_captions(tmp_path)
