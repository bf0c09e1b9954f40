"""Instruction data: exact label masks, image-token counts, truncation, multi-image / text-only / video
samples, right-padding collation, and errors that name the sample and the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mllm_mod
from mllm_mod.data import (
    IGNORE_INDEX,
    Collator,
    ConversationDataset,
    DataError,
    DataOptions,
    frame_indices,
    load_records,
    load_video,
)
from mllm_mod.data.synth import write_video
from mllm_mod.tiny import tiny_model

WORDS = ["alpha", "beta", "gamma", "delta"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llava():
    return tiny_model("llava", num_layers=2, words=WORDS)


@pytest.fixture(scope="module")
def llava_next():
    return tiny_model("llava_next", num_layers=2, words=WORDS)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Pictures of three sizes, a corrupt picture, a clip, a corrupt clip, a clip with no frames."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (30, 30), "b.png": (40, 70), "c.png": (70, 35)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a picture")
    frames = [np.full((30, 30, 3), 20 * t, dtype=np.uint8) for t in range(12)]
    write_video(root / "clip.mp4", frames, fps=4)
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    write_video(root / "noframes.mp4", [], fps=4, size=(30, 30))  # a valid mp4 whose track is empty
    return root


def sample(sid: str, turns: list[tuple[str, str]], **media) -> dict:
    conversations = []
    for human, gpt in turns:
        conversations += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return {"id": sid, "conversations": conversations, **media}


def dataset(records, processor, root, **options) -> ConversationDataset:
    return ConversationDataset(records, processor, DataOptions(image_folder=str(root), video_folder=str(root), **options))


def labelled_words(item, tokenizer) -> list[str]:
    labels = item["labels"]
    return tokenizer.convert_ids_to_tokens(labels[labels != IGNORE_INDEX].tolist())


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_labels_exact_for_multi_turn(family, llava, llava_next, media):
    _, processor = llava if family == "llava" else llava_next
    record = sample("mt", [("<image>\nwhat color is alpha ?", "red beta"), ("and the shape ?", "circle"), ("yes ?", "no")], image="a.png")
    item = dataset([record], processor, media)[0]
    ids, labels = item["input_ids"], item["labels"]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    # every answer token and its end-of-turn token, nothing else, and each label is its own input id
    assert labelled_words(item, processor.tokenizer) == ["red", "beta", "</s>", "circle", "</s>", "no", "</s>"]
    mask = labels != IGNORE_INDEX
    assert torch.equal(labels[mask], ids[mask])
    # labelled positions are exactly the tokens that follow each "ASSISTANT :" up to and including </s>
    expected = torch.zeros_like(mask)
    i = 0
    while i < len(tokens):
        if tokens[i] == "ASSISTANT" and tokens[i + 1] == ":":
            j = i + 2
            while tokens[j] != "</s>":
                expected[j] = True
                j += 1
            expected[j] = True
            i = j
        i += 1
    assert torch.equal(mask, expected)


def test_image_token_counts_match_processor_and_model(llava, llava_next, media):
    """LLaVA-1.5: (30 / 6)^2 = 25 tokens per picture; LLaVA-NeXT: anyres counts that vary with the
    picture's shape. The model's own check (features vs placeholders) must pass on every sample."""
    for (model, processor), per_image in ((llava, {"a.png": 25, "b.png": 25}), (llava_next, None)):
        image_id = model.config.image_token_index
        counts = {}
        for name in ("a.png", "b.png", "c.png"):
            item = dataset([sample(name, [("<image>\nwhat ?", "red")], image=name)], processor, media)[0]
            counts[name] = int((item["input_ids"] == image_id).sum())
            expected = processor(images=[Image.open(media / name).convert("RGB")], text=["<image>"], return_tensors="pt")
            assert counts[name] == int((expected["input_ids"] == image_id).sum())
            batch = Collator(processor.tokenizer.pad_token_id)([item])
            with torch.no_grad():
                model(**batch)  # raises if image features and image tokens disagree
        if per_image:
            assert all(counts[k] == v for k, v in per_image.items())
        else:
            assert len(set(counts.values())) > 1, counts  # anyres: the count depends on the picture


def test_multi_image_text_only_and_implicit_placeholder(llava, media):
    model, processor = llava
    image_id = model.config.image_token_index
    records = [
        sample("two", [("<image> <image>\nwhich is alpha ?", "left")], image=["a.png", "b.png"]),
        sample("text", [("what is alpha ?", "beta")]),
        sample("implicit", [("what color ?", "red")], image="a.png"),  # LLaVA convention: picture first
    ]
    ds = dataset(records, processor, media)
    two, text, implicit = ds[0], ds[1], ds[2]
    assert two["pixel_values"].shape[0] == 2 and int((two["input_ids"] == image_id).sum()) == 50
    assert "pixel_values" not in text and int((text["input_ids"] == image_id).sum()) == 0
    assert labelled_words(text, processor.tokenizer) == ["beta", "</s>"]
    tokens = processor.tokenizer.convert_ids_to_tokens(implicit["input_ids"].tolist())
    assert tokens[tokens.index("USER") + 2] == "<image>" and int((implicit["input_ids"] == image_id).sum()) == 25
    batch = Collator(processor.tokenizer.pad_token_id)([two, text, implicit])
    assert batch["pixel_values"].shape[0] == 3
    with torch.no_grad():
        model(**batch)


def test_truncation_never_splits_image_tokens(llava, media):
    model, processor = llava
    image_id = model.config.image_token_index
    record = sample("long", [("<image>\nalpha ? <image>\nbeta ?", "gamma delta")], image=["a.png", "b.png"])
    full = dataset([record], processor, media)[0]
    runs = torch.nonzero(full["input_ids"] == image_id).flatten()
    second_start = int(runs[25])
    # a cut inside the second image drops that image whole (tokens and pixels), keeps the first
    cut = dataset([sample("long", [("<image>\nalpha ? <image>\nbeta ?", "gamma delta")], image=["a.png", "b.png"])], processor, media)
    cut.options.max_length = second_start + 10
    with pytest.raises(DataError, match="'long'.*no answer tokens left after truncation"):
        cut[0]
    short = dataset([sample("s", [("<image>\nalpha ?", "gamma"), ("<image>\nbeta ?", "delta")], image=["a.png", "b.png"])], processor, media)
    whole = short[0]
    second = int(torch.nonzero(whole["input_ids"] == image_id).flatten()[25])
    short.options.max_length = second + 5
    item = short[0]
    assert item["input_ids"].shape[0] == second  # cut moved back to the start of the image it would split
    assert int((item["input_ids"] == image_id).sum()) == 25 and item["pixel_values"].shape[0] == 1
    assert labelled_words(item, processor.tokenizer) == ["gamma", "</s>"]
    batch = Collator(processor.tokenizer.pad_token_id)([item])
    with torch.no_grad():
        model(**batch)
    # a cut in text only trims text
    short.options.max_length = whole["input_ids"].shape[0] - 1
    assert short[0]["input_ids"].shape[0] == whole["input_ids"].shape[0] - 1


def test_collator_right_pads_and_batching_changes_nothing(llava_next, media):
    """Right padding: each sample's logits in the batch equal the sample alone (LLaVA-NeXT, varied
    image-token counts, a text-only sample in the batch)."""
    model, processor = llava_next
    records = [
        sample("a", [("<image>\nwhat ?", "red")], image="a.png"),
        sample("b", [("<image>\nwhat is alpha ?", "blue beta")], image="b.png"),
        sample("t", [("alpha ?", "beta")]),
        sample("c", [("<image>\nwhat ?", "green")], image="c.png"),
    ]
    items = [dataset(records, processor, media)[i] for i in range(4)]
    collate = Collator(processor.tokenizer.pad_token_id)
    batch = collate(items)
    lengths = [it["input_ids"].shape[0] for it in items]
    assert batch["input_ids"].shape == (4, max(lengths))
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    def same_alone_and_together():
        with torch.no_grad():
            together = model(**batch).logits
            for row, item in enumerate(items):
                alone = model(**collate([item])).logits[0]
                torch.testing.assert_close(together[row, : lengths[row]], alone, atol=1e-5, rtol=1e-4)

    same_alone_and_together()
    # the same with p-MoD layers and non-trivial routers: padding never competes for the top-k
    mllm_mod.retrofit(model, "pmod")
    try:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, mllm_mod.MoDLayer):
                    for p in layer.router.parameters():
                        p.copy_(torch.randn(p.shape, generator=gen))
        assert min(mllm_mod.layer_ratios(model)) < 1
        same_alone_and_together()
    finally:
        mllm_mod.unload(model)


def test_jsonl_and_json_read_the_same(tmp_path, llava, media):
    _, processor = llava
    records = [sample(f"s{i}", [("<image>\nwhat ?", "red")], image="a.png") for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert load_records(tmp_path / "d.json") == load_records(tmp_path / "d.jsonl") == records
    a = dataset(str(tmp_path / "d.jsonl"), processor, media)[2]
    b = dataset(records, processor, media)[2]
    assert torch.equal(a["input_ids"], b["input_ids"])


def test_frame_indices_uniform_and_fps():
    assert frame_indices(100, 25.0, 4).tolist() == [12, 37, 62, 87]  # bin centres
    assert frame_indices(3, 25.0, 8).tolist() == [0, 1, 2]  # fewer frames than asked: all of them
    assert frame_indices(100, 25.0, 100, fps=5.0).tolist() == list(range(0, 100, 5))  # every 5th at 5 of 25 fps
    assert frame_indices(100, 25.0, 4, fps=5.0).tolist() == [10, 35, 60, 85]


def test_video_read_back_with_decord(media):
    frames = load_video(media / "clip.mp4", "v", num_frames=4)
    assert frames.shape == (4, 30, 30, 3) and frames.dtype == np.uint8
    # the clip's frame t is grey level 20 t; uniform sampling of 12 frames at 4 picks 1, 4, 7, 10
    np.testing.assert_allclose(frames.reshape(4, -1).mean(1), [20, 80, 140, 200], atol=6)


def test_onevision_video_sample(media):
    model, processor = tiny_model("llava_onevision", num_layers=2, words=WORDS)
    item = dataset([sample("v", [("<video>\nwhat moved ?", "red")], video="clip.mp4")], processor, media, num_frames=4)[0]
    assert item["pixel_values_videos"].shape[:2] == (1, 4)
    assert int((item["input_ids"] == model.config.video_token_index).sum()) > 0
    assert labelled_words(item, processor.tokenizer) == ["red", "</s>"]
    with torch.no_grad():
        model(**Collator(processor.tokenizer.pad_token_id)([item]))


BAD = [
    ("missing image", sample("m1", [("<image>\nq ?", "a")], image="nope.png"), "nope.png", "image file not found"),
    ("corrupt image", sample("c1", [("<image>\nq ?", "a")], image="corrupt.png"), "corrupt.png", "corrupt image"),
    ("missing video", sample("m2", [("<video>\nq ?", "a")], video="nope.mp4"), "nope.mp4", "video file not found"),
    ("corrupt video", sample("c2", [("<video>\nq ?", "a")], video="corrupt.mp4"), "corrupt.mp4", "corrupt video"),
    ("zero frames", sample("z1", [("<video>\nq ?", "a")], video="noframes.mp4"), "noframes.mp4", "no frames"),
    ("placeholders", sample("p1", [("<image> <image>\nq ?", "a")], image="a.png"), "a.png", r"more <image> placeholders \(2\) than images \(1\)"),
    ("empty", {"id": "e1", "conversations": [], "image": "a.png"}, "data.json", "empty conversation"),
]


@pytest.mark.parametrize("name,record,file,reason", BAD, ids=[b[0] for b in BAD])
def test_bad_sample_errors_name_sample_and_file(name, record, file, reason, llava, media, tmp_path):
    _, processor = llava
    path = tmp_path / "data.json"
    path.write_text(json.dumps([record]))
    ds_options = DataOptions(image_folder=str(media), video_folder=str(media))
    with pytest.raises(DataError, match=reason) as info:
        ds = ConversationDataset(str(path), processor, ds_options)
        ds[0]  # media are decoded when read
    assert f"'{record['id']}'" in str(info.value) and file in str(info.value)


def test_skip_bad_samples_counts_every_skip(llava, media, tmp_path):
    _, processor = llava
    good = [sample(f"g{i}", [("<image>\nq ?", "red")], image="a.png") for i in range(2)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(good + [b[1] for b in BAD]))
    options = DataOptions(image_folder=str(media), video_folder=str(media), skip_bad_samples=True, verify_media=True)
    ds = ConversationDataset(str(path), processor, options)
    assert len(ds) == 2 and {s.sample_id for s in ds.skipped} == {b[1]["id"] for b in BAD}
    summary = ds.summary()
    assert f"{len(good) + len(BAD)} samples, {len(BAD)} skipped" in summary
    assert "image file not found" in summary and "corrupt video" in summary
    # without verification a corrupt picture is found when read, replaced by the next sample, counted
    lazy = ConversationDataset(
        [sample("bad", [("<image>\nq ?", "a")], image="corrupt.png"), *good], processor,
        DataOptions(image_folder=str(media), skip_bad_samples=True),
    )
    assert len(lazy) == 3 and not lazy.skipped
    item = lazy[0]
    assert torch.equal(item["input_ids"], lazy[1]["input_ids"]) and [s.sample_id for s in lazy.skipped] == ["bad"]
    lazy[0]  # seen again (a later epoch): still one skip
    assert len(lazy.skipped) == 1 and "1 skipped" in lazy.summary()
