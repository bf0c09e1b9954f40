"""Fabricated original-layout checkpoints and an independent reference forward of those layouts.

The checkpoints are written key by key in the layouts the original code bases save (LLaVA's
`LlavaLlamaForCausalLM`, p-MoD's `PmodLlavaLlamaForCausalLM`, LLaVA-NeXT's `LlavaQwenForCausalLM`), with
tiny sizes and random weights. The reference forward is written here from the published semantics
(batch 1), in plain torch, reading those original keys: it shares no code with mllm_mod or transformers'
model classes, so an importer that maps a key wrongly cannot agree with it.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

D, FF, HEADS, KV, VD, VFF, VHEADS = 32, 64, 4, 2, 32, 64, 4
IMAGE, PATCH = 30, 6
GRID = IMAGE // PATCH  # 5x5 patch tokens
WORDS = (
    "USER : ASSISTANT what is the a of in color shape how many objects there picture red green blue circle "
    "? . , object are"
).split()
PROMPTS = [
    "USER : <image> what color is the object ? ASSISTANT :",
    "USER : <image> how many objects are there in the picture ? ASSISTANT :",
    "USER : <image> is there a red circle ? ASSISTANT :",
]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


# -- fabrication ---------------------------------------------------------------------------------------
def source_tokenizer(qwen: bool = False, words: list[str] | None = None):
    """A word-level tokenizer as an original checkpoint ships it: no ``<image>`` token, no pad token
    for Llama (``<|endoftext|>`` is Qwen's pad); `words` replaces the default vocabulary's words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if qwen else ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*specials, *(words or WORDS), "<unk2>"]))}
    unk = "<|endoftext|>" if qwen else "<unk>"
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    if qwen:
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=unk)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _rand(gen: torch.Generator, *shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _norm_weight(gen: torch.Generator, n: int) -> torch.Tensor:
    return 1.0 + _rand(gen, n, scale=0.1)


def text_tensors(gen: torch.Generator, vocab: int, layers: int, qwen: bool = False, tied: bool = False) -> dict[str, torch.Tensor]:
    """A Llama/Qwen2 decoder in the original code bases' keys (``model.layers.{i}...``, ``lm_head``)."""
    hd = D // HEADS
    out = {"model.embed_tokens.weight": _rand(gen, vocab, D, scale=1.0), "model.norm.weight": _norm_weight(gen, D)}
    if not tied:
        out["lm_head.weight"] = _rand(gen, vocab, D)
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": _rand(gen, HEADS * hd, D),
            p + "self_attn.k_proj.weight": _rand(gen, KV * hd, D),
            p + "self_attn.v_proj.weight": _rand(gen, KV * hd, D),
            p + "self_attn.o_proj.weight": _rand(gen, D, HEADS * hd),
            p + "mlp.gate_proj.weight": _rand(gen, FF, D),
            p + "mlp.up_proj.weight": _rand(gen, FF, D),
            p + "mlp.down_proj.weight": _rand(gen, D, FF),
            p + "input_layernorm.weight": _norm_weight(gen, D),
            p + "post_attention_layernorm.weight": _norm_weight(gen, D),
            p + "self_attn.rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd)),
        }
        if qwen:
            out |= {p + f"self_attn.{n}_proj.bias": _rand(gen, (HEADS if n == "q" else KV) * hd) for n in "qkv"}
    return out


def tower_tensors(gen: torch.Generator, kind: str, layers: int, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP or SigLIP vision tower, keys under `prefix` (``vision_model.`` style)."""
    n = GRID * GRID + (kind == "clip")
    out = {
        prefix + "embeddings.patch_embedding.weight": _rand(gen, VD, 3, PATCH, PATCH),
        prefix + "embeddings.position_embedding.weight": _rand(gen, n, VD),
        prefix + "post_layernorm.weight": _norm_weight(gen, VD),
        prefix + "post_layernorm.bias": _rand(gen, VD),
    }
    if kind == "clip":
        out |= {
            prefix + "embeddings.class_embedding": _rand(gen, VD),
            prefix + "pre_layrnorm.weight": _norm_weight(gen, VD),
            prefix + "pre_layrnorm.bias": _rand(gen, VD),
        }
    else:
        out[prefix + "embeddings.patch_embedding.bias"] = _rand(gen, VD)
    for i in range(layers):
        p = f"{prefix}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out |= {p + f"self_attn.{name}.weight": _rand(gen, VD, VD), p + f"self_attn.{name}.bias": _rand(gen, VD)}
        out |= {
            p + "layer_norm1.weight": _norm_weight(gen, VD), p + "layer_norm1.bias": _rand(gen, VD),
            p + "layer_norm2.weight": _norm_weight(gen, VD), p + "layer_norm2.bias": _rand(gen, VD),
            p + "mlp.fc1.weight": _rand(gen, VFF, VD), p + "mlp.fc1.bias": _rand(gen, VFF),
            p + "mlp.fc2.weight": _rand(gen, VD, VFF), p + "mlp.fc2.bias": _rand(gen, VD),
        }  # fmt: skip
    return out


def projector_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "model.mm_projector.0.weight": _rand(gen, D, VD), "model.mm_projector.0.bias": _rand(gen, D),
        "model.mm_projector.2.weight": _rand(gen, D, D), "model.mm_projector.2.bias": _rand(gen, D),
    }  # fmt: skip


def write_tower_dir(directory: str, kind: str, layers: int, seed: int = 7) -> dict[str, torch.Tensor]:
    """A stock CLIP / SigLIP vision-model directory (config, safetensors with ``vision_model.`` keys,
    preprocessor config), as a user's local copy of the tower would be."""
    os.makedirs(directory, exist_ok=True)
    tensors = tower_tensors(torch.Generator().manual_seed(seed), kind, layers, "vision_model.")
    common = dict(hidden_size=VD, intermediate_size=VFF, num_hidden_layers=layers, num_attention_heads=VHEADS,
                  image_size=IMAGE, patch_size=PATCH)  # fmt: skip
    if kind == "clip":
        config = dict(model_type="clip_vision_model", hidden_act="quick_gelu", layer_norm_eps=1e-5, **common)
        norm = dict(image_mean=CLIP_MEAN, image_std=CLIP_STD)
    else:
        config = dict(model_type="siglip_vision_model", hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, **common)
        norm = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    _write_json(os.path.join(directory, "config.json"), config)
    _write_json(os.path.join(directory, "preprocessor_config.json"), dict(image_processor_type="CLIPImageProcessor", **norm))
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    return tensors


def llava_config(vocab: int, layers: int, tower: str, **extra) -> dict:
    """An original LLaVA-1.5 config.json (the Llama config plus mm_* fields)."""
    return dict(
        architectures=["LlavaLlamaForCausalLM"], model_type="llava", hidden_size=D, intermediate_size=FF,
        num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV, hidden_act="silu",
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, vocab_size=vocab, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, torch_dtype="float32", mm_vision_tower=tower,
        mm_hidden_size=VD, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        image_aspect_ratio="pad", mm_patch_merge_type="flat", mm_use_im_start_end=False, mm_use_im_patch_token=False,
        tune_mm_mlp_adapter=False, use_cache=True, **extra,
    )  # fmt: skip


def write_checkpoint(directory: str, config: dict, tensors: dict[str, torch.Tensor], tokenizer, shards: int = 2, fmt: str = "safetensors") -> None:
    """config.json, tokenizer files and the tensors in `shards` files with an index (or one file)."""
    os.makedirs(directory, exist_ok=True)
    _write_json(os.path.join(directory, "config.json"), config)
    tokenizer.save_pretrained(directory)
    keys = sorted(tensors)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    if shards == 1:
        _save({k: tensors[k] for k in keys}, os.path.join(directory, f"{stem}.{ext}"), fmt)
        return
    weight_map = {}
    for s in range(shards):
        name = f"{stem}-{s + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: tensors[k].contiguous() for k in keys[s::shards]}
        _save(part, os.path.join(directory, name), fmt)
        weight_map |= {k: name for k in part}
    _write_json(os.path.join(directory, f"{stem}.{ext}.index.json"), {"metadata": {}, "weight_map": weight_map})


def _save(tensors: dict[str, torch.Tensor], path: str, fmt: str) -> None:
    if fmt == "safetensors":
        save_file(tensors, path)
    else:
        torch.save(tensors, path)


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


# -- reference forward (batch 1) -----------------------------------------------------------------------
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def vit(sd: dict, p: str, pixels: torch.Tensor, kind: str, layers: int) -> list[torch.Tensor]:
    """Hidden states [N, VD] of a CLIP/SigLIP tower on one image [3, H, W]: the embeddings, then each layer."""
    eps = 1e-5 if kind == "clip" else 1e-6
    x = F.conv2d(pixels[None], sd[p + "embeddings.patch_embedding.weight"], sd.get(p + "embeddings.patch_embedding.bias"), stride=PATCH)
    x = x.flatten(2)[0].T  # [N, VD]
    if kind == "clip":
        x = torch.cat([sd[p + "embeddings.class_embedding"][None], x])
    x = x + sd[p + "embeddings.position_embedding.weight"]
    if kind == "clip":
        x = F.layer_norm(x, (VD,), sd[p + "pre_layrnorm.weight"], sd[p + "pre_layrnorm.bias"], eps)
    states = [x]
    act = quick_gelu if kind == "clip" else (lambda t: F.gelu(t, approximate="tanh"))
    hd = VD // VHEADS
    for i in range(layers):
        q = f"{p}encoder.layers.{i}."

        def lin(t: torch.Tensor, n: str, q: str = q) -> torch.Tensor:
            return t @ sd[q + n + ".weight"].T + sd[q + n + ".bias"]

        h = F.layer_norm(x, (VD,), sd[q + "layer_norm1.weight"], sd[q + "layer_norm1.bias"], eps)
        heads = [lin(h, f"self_attn.{n}_proj").view(-1, VHEADS, hd).transpose(0, 1) for n in "qkv"]  # [H, N, hd]
        att = torch.softmax(heads[0] @ heads[1].transpose(1, 2) / math.sqrt(hd), dim=-1) @ heads[2]
        x = x + lin(att.transpose(0, 1).reshape(-1, VD), "self_attn.out_proj")
        h = F.layer_norm(x, (VD,), sd[q + "layer_norm2.weight"], sd[q + "layer_norm2.bias"], eps)
        x = x + lin(act(lin(h, "mlp.fc1")), "mlp.fc2")
        states.append(x)
    return states


def rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [H, T, hd] rotated by positions `pos` [T] (rotate-half convention, theta 10000)."""
    hd = x.shape[-1]
    angles = pos.float()[:, None] / (10000 ** (torch.arange(0, hd, 2).float() / hd))[None]  # [T, hd/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    half = torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * cos + half * sin


def block_parts(sd: dict, p: str, x: torch.Tensor, pos: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One Llama/Qwen2 layer on tokens x [T, D] at positions pos [T], causal among them: (x + attn, mlp)."""
    hd = D // HEADS
    h = rms(x, sd[p + "input_layernorm.weight"], eps)
    proj = lambda n: h @ sd[p + f"self_attn.{n}_proj.weight"].T + sd.get(p + f"self_attn.{n}_proj.bias", 0)
    q = rope(proj("q").view(-1, HEADS, hd).transpose(0, 1), pos)
    k = rope(proj("k").view(-1, KV, hd).transpose(0, 1), pos).repeat_interleave(HEADS // KV, 0)
    v = proj("v").view(-1, KV, hd).transpose(0, 1).repeat_interleave(HEADS // KV, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(hd)  # [H, T, T]
    causal = torch.ones(len(pos), len(pos), dtype=torch.bool).tril()
    att = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v
    h = x + att.transpose(0, 1).reshape(-1, HEADS * hd) @ sd[p + "self_attn.o_proj.weight"].T
    g = rms(h, sd[p + "post_attention_layernorm.weight"], eps)
    m = (F.silu(g @ sd[p + "mlp.gate_proj.weight"].T) * (g @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
    return h, m


def pmod_ratio(i: int) -> float | None:
    """p-MoD's shifted cosine with pi/31 (32 layers): the keep ratio of layer i, None for a dense layer."""
    r = math.cos(i * math.pi / 31) / 2 + 0.5
    return max(r, 0.15) if r <= 0.85 else None


def pmod_layer(sd: dict, i: int, x: torch.Tensor, vision: torch.Tensor, ratio: float, eps: float) -> torch.Tensor:
    """A p-MoD layer (batch 1): the router reads the layer input, TanhNorm w = 0.2 tanh(z) + 1, the top
    trunc(n_vision * r) vision tokens and every text token go through the layer at their original
    positions (causal among the kept), STRing: kept vision h + w * mlp, skipped vision w * x, text h + mlp."""
    p = f"model.layers.{i}."
    z = x @ sd[p + "router.router.weight"][0] + sd[p + "router.router.bias"][0]  # [T]
    w = 0.2 * torch.tanh(z) + 1.0
    n = int(vision.sum())
    k = int(torch.trunc(torch.tensor(n, dtype=torch.float32) * torch.tensor(ratio, dtype=torch.float32)))
    top = torch.topk(w.masked_fill(~vision, float("-inf")), k).indices
    kept = ~vision
    kept[top] = True
    idx = kept.nonzero()[:, 0]  # original order
    h, m = block_parts(sd, p + "decoder_layer.", x[idx], idx, eps)
    out = w[:, None] * x  # skipped vision tokens (text rows are overwritten below)
    wk = torch.where(vision[idx], w[idx], torch.ones_like(w[idx]))[:, None]
    out[idx] = h + wk * m
    return out


def project(sd: dict, feats: torch.Tensor) -> torch.Tensor:
    """The ``mlp2x_gelu`` projector: Linear, GELU, Linear."""
    feats = F.gelu(feats @ sd["model.mm_projector.0.weight"].T + sd["model.mm_projector.0.bias"])
    return feats @ sd["model.mm_projector.2.weight"].T + sd["model.mm_projector.2.bias"]


def tile_features(
    sd: dict, pixels: torch.Tensor, tower: str = "clip", tower_layers: int = 2, select_layer: int = -2, keep_cls: bool = False
) -> torch.Tensor:
    """Projected features [N, D] of one image or tile [3, H, W]: the tower's selected layer (CLS dropped
    for CLIP's ``patch`` selection), then the projector."""
    feats = vit(sd, "model.vision_tower.vision_tower.vision_model.", pixels, tower, tower_layers)[select_layer]
    if tower == "clip" and not keep_cls:
        feats = feats[1:]
    return project(sd, feats)


def reference_logits(
    sd: dict, input_ids: torch.Tensor, image_id: int, pixels: torch.Tensor, layers: int, tower: str = "clip",
    tower_layers: int = 2, select_layer: int = -2, keep_cls: bool = False, eps: float = 1e-5, pmod: bool = False,
) -> torch.Tensor:
    """Logits [T, V] of the original model on one prompt whose image placeholder run (`image_id`, as the
    processor expands it) is replaced by the projected patch features of `pixels` [3, H, W]."""
    feats = tile_features(sd, pixels, tower, tower_layers, select_layer, keep_cls)
    return decoder_logits(sd, input_ids, image_id, feats, layers, eps, pmod)


def decoder_logits(
    sd: dict, input_ids: torch.Tensor, image_id: int, feats: torch.Tensor, layers: int, eps: float = 1e-5, pmod: bool = False
) -> torch.Tensor:
    """Logits [T, V] of the original decoder on one prompt whose placeholder run is replaced by `feats` [N, D]."""
    vision = input_ids == image_id  # [T]
    assert int(vision.sum()) == feats.shape[0], "the processor's placeholder count differs from the original's features"
    x = sd["model.embed_tokens.weight"][input_ids.clamp(max=sd["model.embed_tokens.weight"].shape[0] - 1)]
    x = x.clone()
    x[vision] = feats
    pos = torch.arange(len(input_ids))
    for i in range(layers):
        ratio = pmod_ratio(i) if pmod else None
        if ratio is None:
            prefix = f"model.layers.{i}." + ("decoder_layer." if pmod and f"model.layers.{i}.decoder_layer.input_layernorm.weight" in sd else "")
            h, m = block_parts(sd, prefix, x, pos, eps)
            x = h + m
        else:
            x = pmod_layer(sd, i, x, vision, ratio, eps)
    x = rms(x, sd["model.norm.weight"], eps)
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return x @ head.T


# -- the original anyres path (LLaVA-NeXT's anyres, OneVision's anyres_max_N) --------------------------
# From the original code bases' llava/mm_utils.py and llava_arch.py: image sizes are PIL's (width, height),
# and so are the pairs of image_grid_pinpoints there.
def best_resolution(size_wh: tuple[int, int], pinpoints_wh: list) -> tuple[int, int]:
    """select_best_resolution: the grid that keeps the most of the picture, then wastes the least."""
    width, height = size_wh
    best, best_kept, best_waste = None, 0, float("inf")
    for w, h in pinpoints_wh:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        if kept > best_kept or (kept == best_kept and w * h - kept < best_waste):
            best, best_kept, best_waste = (w, h), kept, w * h - kept
    return best


def anyres_tiles(image, pinpoints_wh: list, tile: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """process_anyres_image: [1 + n, 3, tile, tile], the whole picture resized to a square first, then
    the tiles (row by row) of the picture resized into the best grid keeping its aspect, padded black."""
    import numpy as np
    from PIL import Image

    w0, h0 = image.size
    tw, th = best_resolution(image.size, pinpoints_wh)
    if tw / w0 < th / h0:
        nw, nh = tw, min(math.ceil(h0 * (tw / w0)), th)
    else:
        nw, nh = min(math.ceil(w0 * (th / h0)), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), Image.BICUBIC), ((tw - nw) // 2, (th - nh) // 2))
    tiles = [image.resize((tile, tile), Image.BICUBIC)]
    tiles += [canvas.crop((j, i, j + tile, i + tile)) for i in range(0, th, tile) for j in range(0, tw, tile)]
    mean_, std_ = np.array(mean, dtype=np.float32), np.array(std, dtype=np.float32)
    return torch.stack([torch.from_numpy((np.asarray(t, dtype=np.float32) / 255.0 - mean_) / std_).permute(2, 0, 1) for t in tiles])


def unpad(x: torch.Tensor, size_wh: tuple[int, int]) -> torch.Tensor:
    """unpad_image: drop the feature rows (or columns) that cover the padding of x [C, H, W]."""
    width, height = size_wh
    cur_h, cur_w = x.shape[1:]
    if width / height > cur_w / cur_h:
        pad = (cur_h - int(height * (cur_w / width))) // 2
        return x[:, pad : cur_h - pad, :]
    pad = (cur_w - int(width * (cur_h / height))) // 2
    return x[:, :, pad : cur_w - pad]


def anyres_features(
    sd: dict, tiles: torch.Tensor, size_wh: tuple[int, int], pinpoints_wh: list, tile: int,
    max_patches: int | None = None, **tower,
) -> torch.Tensor:
    """The packed features [N, D] of one picture (``spatial_unpad``): the base tile's, then the grid's as one
    feature map, unpadded, (anyres_max_N: bilinearly shrunk when over N tiles' worth by more than 1.1x),
    the image-newline vector after each row."""
    feats = torch.stack([tile_features(sd, t, **tower) for t in tiles])  # [1 + n, side * side, D]
    base, grid = feats[0], feats[1:]
    side = math.isqrt(base.shape[0])
    gw, gh = (x // tile for x in best_resolution(size_wh, pinpoints_wh))
    x = grid.view(gh, gw, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # [D, gh*side, gw*side]
    x = unpad(x, size_wh)
    if max_patches is not None:
        h, w = x.shape[1:]
        times = math.sqrt(h * w / (max_patches * side**2))
        if times > 1.1:
            x = F.interpolate(x[None], [int(h // times), int(w // times)], mode="bilinear")[0]
    x = torch.cat([x, sd["model.image_newline"][:, None, None].expand(*x.shape[:-1], 1)], dim=-1)
    return torch.cat([base, x.flatten(1, 2).T])


def test_reference_prd_ratios_are_the_published_ones():
    """The reference's own p-MoD schedule (pi/31) gives the layers and ratios DESIGN.md lists."""
    ratios = {i: pmod_ratio(i) for i in range(32) if pmod_ratio(i) is not None}
    assert sorted(ratios) == list(range(8, 32))
    assert abs(ratios[8] - 0.844483) < 1e-6 and abs(ratios[23] - 0.155517) < 1e-6
    assert all(ratios[i] == 0.15 for i in range(24, 32))
