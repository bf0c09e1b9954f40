"""The vision-localised suite: every answer is where the question says it is, in a few small patches;
answers are uniform (so a constant guess scores the chance level); the split is exact and deterministic."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from mllm_mod.data import localized
from mllm_mod.data.localized import CELL, GRID, QUADRANTS, REGIONS, SIZE
from mllm_mod.data.synth import COLORS

N = 300  # samples per family checked


def samples(name: str, n: int = N):
    family = localized.families()[name]
    return [family.make(np.random.default_rng([7, i]), SIZE) for i in range(n)]


def color_mask(picture: np.ndarray, color: str) -> np.ndarray:
    return np.all(picture == np.array(COLORS[color], dtype=np.uint8), axis=-1)  # [H, W]


def cells_of(mask: np.ndarray) -> set[tuple[int, int]]:
    ys, xs = np.nonzero(mask)
    return {(int(y) // CELL, int(x) // CELL) for y, x in zip(ys, xs)}


def test_pictures_are_a_144_patch_lattice_of_small_objects():
    assert SIZE // CELL == GRID and GRID * GRID == 144
    for name in localized.families():
        for sample in samples(name, 20):
            picture = sample.media[0]  # [H, W, 3]
            assert picture.shape == (SIZE, SIZE, 3) and picture.dtype == np.uint8
            ink = np.any(picture != 255, axis=-1)  # [H, W]
            # every object sits inside one cell: no ink on a cell's border rows/columns
            assert not ink[::CELL].any() and not ink[:, ::CELL].any()
            assert ink.mean() < 0.12, f"{name}: objects should be small, ink covers {ink.mean():.2f}"


@pytest.mark.parametrize("name", ["count", "count9"])
def test_count_answer_is_the_number_of_red_cells(name):
    for sample in samples(name):
        assert len(cells_of(color_mask(sample.media[0], "red"))) == int(sample.answer)


def test_colorcount_answer_is_the_number_of_cells_of_the_named_colour():
    """The picture holds both colours, so the count to read depends on the question."""
    named_seen, differs = Counter(), 0
    for sample in samples("colorcount"):
        named = sample.question.split()[2]
        other = {"red": "blue", "blue": "red"}[named]
        assert len(cells_of(color_mask(sample.media[0], named))) == int(sample.answer)
        differs += len(cells_of(color_mask(sample.media[0], other))) != int(sample.answer)
        named_seen[named] += 1
    assert set(named_seen) == {"red", "blue"} and differs > 0.7 * N


def test_presence_answer_says_whether_the_named_colour_is_drawn():
    for sample in samples("presence"):
        asked = sample.question.split()[3]
        assert asked in COLORS
        assert color_mask(sample.media[0], asked).any() == (sample.answer == "yes")


def test_oddquad_answer_is_the_quadrant_of_the_minority_colour():
    half = SIZE // 2
    for sample in samples("oddquad"):
        picture = sample.media[0]
        counts = {c: len(cells_of(color_mask(picture, c))) for c in COLORS}
        odd = next(c for c, n in counts.items() if n == 1)
        assert sorted(n for n in counts.values() if n) == [1, 11]
        ys, xs = np.nonzero(color_mask(picture, odd))
        assert QUADRANTS[2 * int(ys[0] >= half) + int(xs[0] >= half)] == sample.answer


def test_where_answer_is_the_colour_drawn_in_the_named_region():
    span = SIZE // REGIONS
    for sample in samples("where"):
        words = sample.question.split()
        row, col = int(words[words.index("row") + 1]) - 1, int(words[words.index("column") + 1]) - 1
        region = sample.media[0][row * span : (row + 1) * span, col * span : (col + 1) * span]
        drawn = [c for c in COLORS if color_mask(region, c).any()]
        assert drawn == [sample.answer]


def test_relpos_answer_compares_the_two_named_objects():
    for sample in samples("relpos"):
        words = sample.question.split()
        first, second = words[2], words[-3]
        x_first = np.nonzero(color_mask(sample.media[0], first))[1].mean()
        x_second = np.nonzero(color_mask(sample.media[0], second))[1].mean()
        assert (x_first < x_second) == (sample.answer == "left")


@pytest.mark.parametrize("name", list(localized.families()))
def test_answers_are_uniform_so_a_constant_guess_scores_chance(name):
    family = localized.families()[name]
    counts = Counter(s.answer for s in samples(name, 1200))
    assert set(counts) == set(family.answers)
    expected = 1200 / len(family.answers)
    assert all(abs(n - expected) < 0.25 * expected for n in counts.values()), counts
    assert family.chance == pytest.approx(1 / len(family.answers))


def test_samples_depend_only_on_seed_and_index():
    family = localized.families()["where"]
    a = family.make(np.random.default_rng([3, 11]), SIZE)
    b = family.make(np.random.default_rng([3, 11]), SIZE)
    c = family.make(np.random.default_rng([3, 12]), SIZE)
    assert np.array_equal(a.media[0], b.media[0]) and a.question == b.question
    assert not np.array_equal(a.media[0], c.media[0])


@pytest.mark.parametrize("n_train,n_test", [(7, 3), (12, 5), (1, 1)])
def test_held_out_takes_exactly_n_test_of_each_family(n_train, n_test):
    picks = [localized.held_out(i, n_train, n_test) for i in range(n_train + n_test)]
    assert sum(picks) == n_test


def test_generate_writes_llava_records_with_exact_counts(tmp_path):
    meta = localized.generate(tmp_path, n_train=6, n_test=2, seed=1, only=["count", "where"], progress=False)
    train = json.loads((tmp_path / "train.json").read_text())
    test = json.loads((tmp_path / "test.json").read_text())
    assert meta["counts"] == {"train": 12, "test": 4}
    assert Counter(r["family"] for r in test) == {"count": 2, "where": 2}
    record = test[0]
    assert record["conversations"][0]["value"].startswith("<image>\n") and record["conversations"][1]["value"] == record["answer"]
    assert (tmp_path / record["image"]).is_file()
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in test})
    assert set(meta["vocabulary"]) >= {"quadrant", "row", "column", "topleft"}
    with pytest.raises(ValueError, match="unknown localised families"):
        localized.generate(tmp_path, 2, 1, only=["nope"], progress=False)


def test_tiny_llava_sees_144_vision_tokens_per_picture():
    from PIL import Image

    from mllm_mod.tiny import tiny_model

    _, processor = tiny_model("llava", num_layers=2, words=localized.vocabulary(), image_size=SIZE, patch_size=CELL)
    batch = processor(images=[localized.blank_image()], text=["USER : <image> which quadrant is different ? ASSISTANT :"], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == 144
    assert processor.tokenizer.convert_tokens_to_ids("topleft") != processor.tokenizer.unk_token_id
    assert isinstance(localized.blank_image(), Image.Image)
