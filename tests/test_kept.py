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


def named_by_pixels(picture: np.ndarray, rgb: tuple[int, int, int]) -> torch.Tensor:
    """[144] bool: patch r * 12 + c holds `rgb`, read pixel by pixel (independent of `patch_masks`)."""
    out = torch.zeros(144, dtype=torch.bool)
    for r in range(12):
        for c in range(12):
            cell = picture[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8]
            out[r * 12 + c] = bool((cell == np.asarray(rgb)).all(-1).any())
    return out


class OracleRouter(nn.Module):
    """Router logits set from outside per forward, one [B, T] tensor per call in the forward's order (the
    layers' order), so that a router shared by every layer still gives each layer its own logits."""

    def __init__(self) -> None:
        super().__init__()
        self.logits: list[torch.Tensor] = []
        self.calls = 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.logits[self.calls % len(self.logits)]  # [B, T]
        assert logits.shape == hidden_states.shape[:2]
        self.calls += 1
        return logits[..., None]  # [B, T, 1]


@pytest.mark.parametrize("rule", ["topk", "threshold_shared"])
def test_routing_recall_scores_the_layers_own_decision(tmp_path, rule):
    """Routers whose choice is known: +1 on the patches of the colour the question names, -1 elsewhere,
    with the sign flipped on layer 2. Top-k (one router per layer, ratio 0.3) keeps the named patches on
    layers 1 and 3 and none on layer 2; a threshold between the two weights (one router shared by the
    layers, as gamma-MoD) keeps exactly the named patches on layers 1 and 3 and the rest on layer 2."""
    from PIL import Image

    meta = localized.generate(tmp_path, 4, 12, seed=0, only=["colorcount"], progress=False)
    model, processor = tiny_model(
        "llava", num_layers=4, words=meta["vocabulary"], seed=0, image_size=96, patch_size=8, hidden_size=32
    )
    overrides = {"inference": "threshold", "threshold": 1.0} if rule == "threshold_shared" else {}
    retrofit(model, "pmod", schedule="constant", layers=[1, 2, 3], ratio=0.3, **overrides)
    records = json.loads((tmp_path / "test.json").read_text())
    pictures = {r["image"]: np.asarray(Image.open(tmp_path / r["image"]).convert("RGB")) for r in records}
    batches = []
    for start in (0, 6):
        chunk = records[start : start + 6]
        batch = prompt_batch(processor, chunk, [Image.fromarray(pictures[r["image"]]) for r in chunk])
        assert batch["pixel_values"].shape[-2:] == (96, 96)  # the picture reaches the tower uncropped
        batches.append((chunk, batch))
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    shared = OracleRouter()
    routers = {idx: shared if rule == "threshold_shared" else OracleRouter() for idx in mod_layer_map(model)}
    for idx, layer in mod_layer_map(model).items():
        layer.router = routers[idx]
    named_masks: dict[str, torch.Tensor] = {}

    def set_logits(chunk, batch) -> None:
        logits = torch.full(batch["input_ids"].shape, -1.0)  # [B, T]
        for b, record in enumerate(chunk):
            named = named_by_pixels(pictures[record["image"]], named_color(record["conversations"][0]["value"], COLORS))
            named_masks[record["id"]] = named
            positions = (batch["input_ids"][b] == image_id).nonzero().squeeze(-1)  # [144]
            logits[b, positions[named]] = 1.0
        per_layer = [logits, -logits, logits]  # layers 1, 2, 3
        if rule == "threshold_shared":
            shared.logits, shared.calls = per_layer, 0
        else:
            for (idx, router), layer_logits in zip(sorted(routers.items()), per_layer):
                router.logits, router.calls = [layer_logits], 0

    class Feed(list):
        """The batches, setting the oracle's logits as each is read."""

        def __iter__(self):
            for chunk, batch in super().__iter__():
                set_logits(chunk, batch)
                yield chunk, batch

    feed = Feed(batches)
    k = int(144 * 0.3)
    for chunk, batch in feed:
        kept = kept_vision(model, batch, image_id)
        assert sorted(kept) == [1, 2, 3] and all(mask.shape == (6, 144) for mask in kept.values())
        for b, record in enumerate(chunk):
            named = named_masks[record["id"]]
            if rule == "threshold_shared":
                assert torch.equal(kept[1][b], named) and torch.equal(kept[3][b], named)
                assert torch.equal(kept[2][b], ~named)
            else:
                assert all(int(mask[b].sum()) == k for mask in kept.values())
                assert bool(kept[1][b][named].all()) and bool(kept[3][b][named].all()) and not kept[2][b][named].any()
    result = routing_recall(model, feed, str(tmp_path), image_id, max_images=10)
    assert sorted(result) == ["1", "2", "3"] and all(layer["images"] == 10 for layer in result.values())
    assert result["1"]["named_recall"] == result["3"]["named_recall"] == 1.0 and result["2"]["named_recall"] == 0.0
    named_share = sum(int(named_masks[r["id"]].sum()) for r in records[:10]) / (10 * 144)
    if rule == "threshold_shared":
        assert result["1"]["kept"] == pytest.approx(named_share) and result["2"]["kept"] == pytest.approx(1 - named_share)
    else:
        assert all(layer["kept"] == pytest.approx(k / 144) for layer in result.values())
    assert all(0.0 < layer["object_recall"] < 1.0 for layer in result.values())
    dense, _ = tiny_model("llava", num_layers=4, seed=0, image_size=96, patch_size=8, hidden_size=32)
    assert routing_recall(dense, feed, str(tmp_path), image_id, max_images=10) == {}
