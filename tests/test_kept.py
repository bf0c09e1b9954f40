"""What the routers keep, against the picture (`mllm_mod.kept`): patch masks in raster order, and recall of
the named colour's patches for routers whose choice is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from mllm_mod import retrofit
from mllm_mod.data import localized
from mllm_mod.data.synth import BACKGROUND, COLORS, canvas
from mllm_mod.kept import kept_vision, named_color, patch_masks, routing_recall
from mllm_mod.retrofit import mod_layer_map
from mllm_mod.study import prompt_batch
from mllm_mod.tiny import tiny_model


def test_patch_masks_are_in_raster_order_and_match_colours_exactly():
    image, draw = canvas(96)
    draw.rectangle((3 * 8, 2 * 8, 3 * 8 + 7, 2 * 8 + 7), fill=COLORS["red"])  # row 2, column 3
    draw.rectangle((5 * 8 + 2, 9 * 8 + 2, 5 * 8 + 4, 9 * 8 + 4), fill=(128, 128, 128))  # row 9, column 5
    draw.point((11 * 8, 0), fill=(231, 30, 30))  # row 0, column 11: near red, not red
    objects, named = patch_masks(np.asarray(image), 144, BACKGROUND, COLORS["red"])
    assert np.flatnonzero(objects).tolist() == [11, 2 * 12 + 3, 9 * 12 + 5]
    assert np.flatnonzero(named).tolist() == [2 * 12 + 3]
    assert not patch_masks(np.asarray(image), 144, BACKGROUND, None)[1].any()
    with pytest.raises(ValueError, match="square patches"):
        patch_masks(np.asarray(image), 143, BACKGROUND, None)
    assert named_color("how many blue objects are there ?", COLORS) == COLORS["blue"]
    assert named_color("is the red one left of the blue one ?", COLORS) is None
    assert named_color("how many objects ?", COLORS) is None


class OracleRouter(nn.Module):
    """Router logits set from outside per forward: +sign on the named colour's patches, -sign elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.logits: torch.Tensor | None = None  # [B, T]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        assert self.logits is not None and self.logits.shape == hidden_states.shape[:2]
        return self.logits[..., None]  # [B, T, 1]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_routing_recall_scores_a_router_whose_choice_is_known(tmp_path, sign):
    from PIL import Image

    meta = localized.generate(tmp_path, 4, 12, seed=0, only=["colorcount"], progress=False)
    model, processor = tiny_model(
        "llava", num_layers=4, words=meta["vocabulary"], seed=0, image_size=96, patch_size=8, hidden_size=32
    )
    retrofit(model, "pmod", schedule="constant", layers=[1, 2, 3], ratio=0.3)
    records = json.loads((tmp_path / "test.json").read_text())
    batches = []
    for start in (0, 6):
        chunk = records[start : start + 6]
        images = [Image.open(tmp_path / r["image"]).convert("RGB") for r in chunk]
        batches.append((chunk, prompt_batch(processor, chunk, images)))
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    routers = {idx: OracleRouter() for idx in mod_layer_map(model)}
    for idx, layer in mod_layer_map(model).items():
        layer.router = routers[idx]

    def set_logits(chunk, batch) -> None:
        logits = torch.full(batch["input_ids"].shape, -sign)  # [B, T]
        for b, record in enumerate(chunk):
            picture = np.asarray(Image.open(tmp_path / record["image"]).convert("RGB"))
            rgb = named_color(record["conversations"][0]["value"], COLORS)
            _, named = patch_masks(picture, 144, BACKGROUND, rgb)
            row = logits[b]
            vision_positions = (batch["input_ids"][b] == image_id).nonzero().squeeze(-1)  # [144]
            row[vision_positions[torch.from_numpy(named)]] = sign
        for router in routers.values():
            router.logits = logits

    class Feed(list):
        """The batches, setting the oracle's logits as each is read."""

        def __iter__(self):
            for chunk, batch in super().__iter__():
                set_logits(chunk, batch)
                yield chunk, batch

    feed = Feed(batches)
    for chunk, batch in feed:
        kept = kept_vision(model, batch, image_id)
        assert sorted(kept) == [1, 2, 3] and all(k.shape == (6, 144) for k in kept.values())
        assert all((k.sum(dim=1) == int(144 * 0.3)).all() for k in kept.values())
    result = routing_recall(model, feed, str(tmp_path), image_id, max_images=10)
    assert sorted(result) == ["1", "2", "3"]
    for layer in result.values():
        assert layer["images"] == 10 and layer["kept"] == pytest.approx(int(144 * 0.3) / 144)
        assert layer["named_recall"] == (1.0 if sign > 0 else 0.0)
        assert 0.0 < layer["object_recall"] < 1.0
    dense, _ = tiny_model("llava", num_layers=4, seed=0, image_size=96, patch_size=8, hidden_size=32)
    assert routing_recall(dense, feed, str(tmp_path), image_id, max_images=10) == {}
