"""The synthetic visual-instruction data: deterministic by seed, LLaVA format on disk, every family in
both splits with its chance level, answers that the picture decides, and a video family written as
mp4 and read back with decord."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mllm_mod.data import ConversationDataset, DataOptions, load_video
from mllm_mod.data.synth import COLORS, families, generate, vocabulary
from mllm_mod.tiny import build_tokenizer, tiny_model

IMAGE_FAMILIES = ["color", "shape", "count", "spatial", "presence", "ocr", "chart", "choice"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    meta = generate(root / "a", 36, seed=3, video=True, test_fraction=0.25, progress=False)
    return root, meta


def read(root, split="train"):
    return json.loads((root / f"{split}.json").read_text())


def test_deterministic_by_seed_and_prefix_stable(synth, tmp_path):
    root, _ = synth
    generate(tmp_path / "b", 36, seed=3, video=True, test_fraction=0.25, progress=False)
    generate(tmp_path / "c", 18, seed=3, video=True, test_fraction=0.25, progress=False)
    generate(tmp_path / "d", 36, seed=4, video=True, test_fraction=0.25, progress=False)
    assert read(root / "a") == read(tmp_path / "b")
    a, c, d = read(root / "a"), read(tmp_path / "c"), read(tmp_path / "d")
    assert a[: len(c)] == c  # asking for more samples never changes the first ones
    for record in a:
        if "image" in record:
            same = np.asarray(Image.open(root / "a" / record["image"]))
            assert np.array_equal(same, np.asarray(Image.open(tmp_path / "b" / record["image"])))
    assert [r["answer"] for r in a] != [r["answer"] for r in d]  # another seed, other samples


def test_families_chance_levels_and_splits(synth):
    root, meta = synth
    assert list(meta["families"]) == [*IMAGE_FAMILIES, "motion"]
    for name, info in meta["families"].items():
        expected = 1 / len(info["answers"]) if name != "motion" else 0.5 / 6 + 0.5 / 2
        assert info["chance"] == pytest.approx(expected)
    train, test = read(root / "a"), read(root / "a", "test")
    assert {r["family"] for r in train} == {r["family"] for r in test} == set(meta["families"])
    assert meta["counts"] == {"train": len(train), "test": len(test)} and len(test) == 9  # 1 in 4 per family
    registry = families(video=True)
    for record in train + test:
        assert record["answer"] in registry[record["family"]].answers
        assert record["conversations"][1]["value"] == record["answer"]
        placeholder = "<video>" if record["family"] == "motion" else "<image>"
        assert record["conversations"][0]["value"].startswith(placeholder)


def test_vocabulary_covers_every_question_and_answer(synth):
    root, _ = synth
    tokenizer = build_tokenizer(vocabulary())
    unk = tokenizer.unk_token_id
    for record in read(root / "a") + read(root / "a", "test"):
        for turn in record["conversations"]:
            ids = tokenizer(turn["value"].replace("<image>", "").replace("<video>", ""))["input_ids"]
            assert unk not in ids, turn["value"]


def test_the_picture_decides_the_answer(synth):
    """Colour family: the object's pixels are the answer's colour; count family: the answer is the
    number of quadrants with ink (one object per quadrant)."""
    root, _ = synth
    for record in read(root / "a") + read(root / "a", "test"):
        pixels = np.asarray(Image.open(root / "a" / record["image"])).astype(int) if "image" in record else None
        if record["family"] == "color":
            ink = pixels[(pixels != 255).any(-1)]
            nearest = min(COLORS, key=lambda c: np.abs(ink.mean(0) - COLORS[c]).sum())
            assert nearest == record["answer"]
        elif record["family"] == "count":
            ink = (pixels != 255).any(-1)  # [H, W]
            h, w = ink.shape[0] // 2, ink.shape[1] // 2
            quadrants = [ink[:h, :w], ink[:h, w:], ink[h:, :w], ink[h:, w:]]
            assert sum(bool(q.any()) for q in quadrants) == int(record["answer"])


def test_video_family_read_back_with_decord(synth):
    """The mp4 decodes with decord; the mover's square changes position during the clip, the other
    one stays in place."""
    root, _ = synth
    motion = [r for r in read(root / "a") if r["family"] == "motion"]
    assert motion and all(r["video"].endswith(".mp4") for r in motion)
    for record in motion:
        frames = load_video(root / "a" / record["video"], record["id"], num_frames=8)
        assert frames.shape == (8, 30, 30, 3)
        moving = np.abs(frames[-1].astype(int) - frames[0].astype(int)).sum(-1) > 60  # [H, W]
        assert moving.any()
        rows = np.nonzero(moving.any(1))[0]
        assert rows.max() - rows.min() < 15  # only one of the two squares (top or bottom half) moved


def test_synthetic_data_loads_for_onevision_with_video(synth):
    root, _ = synth
    _, processor = tiny_model("llava_onevision", num_layers=2, words=vocabulary())
    options = DataOptions(image_folder=str(root / "a"), video_folder=str(root / "a"), num_frames=4)
    dataset = ConversationDataset(str(root / "a" / "train.json"), processor, options)
    kinds = {("pixel_values_videos" in item, "pixel_values" in item) for item in (dataset[i] for i in range(len(dataset)))}
    assert kinds == {(True, False), (False, True)}


def test_cli_data_synth(tmp_path, capsys):
    from mllm_mod.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--n", "16", "--families", "color,count"]) == 0
    out = capsys.readouterr().out
    assert "color      chance 0.167" in out and "count      chance 0.250" in out
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["n"] == 16 and list(meta["families"]) == ["color", "count"]
