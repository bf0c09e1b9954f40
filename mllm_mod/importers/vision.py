"""The vision tower of an original LLaVA-family checkpoint: its config, and where its weights come from.

Original checkpoints name their tower (``mm_vision_tower``, e.g. ``openai/clip-vit-large-patch14-336``)
and often do not contain it. Its weights then come from ``--vision-tower DIR`` (a local CLIP or SigLIP
directory); its config comes from that directory, or, when the checkpoint holds the weights, from the
directory ``mm_vision_tower`` names if it is local, or from the few published towers listed below.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import transformers as tf

from .loader import CheckpointError, Rule, Source

TOWER_PREFIX = r"model\.vision_tower\.vision_tower\.vision_model\."  # where the original code base saves it
TOWER_TARGET = "model.vision_tower."
VISION_TYPES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip", "siglip_vision_model": "siglip"}
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SIGLIP_MEAN = SIGLIP_STD = [0.5, 0.5, 0.5]
# The configs of the published towers the original code bases name (from their config.json files), used
# only when the checkpoint holds the tower's weights and no directory gives its config.
KNOWN_TOWERS: dict[str, tuple[str, dict]] = {
    "openai/clip-vit-large-patch14-336": (
        "clip",
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
             image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    ),
    "openai/clip-vit-large-patch14": (
        "clip",
        dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
             image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    ),
    "google/siglip-so400m-patch14-384": (
        "siglip",
        dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
             image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    ),
}  # fmt: skip


@dataclass
class Tower:
    """What an importer needs to know about the tower: its config, the directory its weights may come
    from (None: from the checkpoint), and the image normalisation of its own processor."""

    config: tf.PretrainedConfig  # CLIPVisionConfig or SiglipVisionConfig
    kind: str  # "clip" or "siglip"
    directory: str | None
    image_mean: list[float]
    image_std: list[float]
    directory_layers: int = 0  # layers of the directory's tower (before an importer drops any)

    def source(self, drop_last_layer: bool = False) -> Source:
        """The tower directory as a second source (its weights under ``model.vision_tower.``)."""
        if self.directory is None:
            raise CheckpointError("no vision tower directory to read weights from")
        last = self.directory_layers - 1 if drop_last_layer else None
        return Source.open(self.directory, tower_dir_rules(last), label="vision tower")


def checkpoint_tower_rules(drop_head: bool) -> list[Rule]:
    """Key map of a tower saved inside an original checkpoint."""
    rules = [Rule(TOWER_PREFIX + r"(embeddings|encoder|pre_layrnorm|post_layernorm)\.(.*)", TOWER_TARGET + r"\1.\2")]
    if drop_head:
        rules.append(Rule(TOWER_PREFIX + r"head\..*", None, "the original code base replaces the SigLIP head by Identity"))
    return rules


def tower_dir_rules(drop_layer: int | None) -> list[Rule]:
    """Key map of a stock CLIP/SigLIP directory (``vision_model.`` prefixed or not); the text tower and
    the projections of a full CLIP/SigLIP model are not part of the vision tower."""
    rules = []
    if drop_layer is not None:
        reason = "the original code base removes the tower's last layer"
        rules.append(Rule(rf"(?:vision_model\.)?encoder\.layers\.{drop_layer}\..*", None, reason))
    return rules + [
        Rule(r"(?:vision_model\.)?(embeddings|encoder|pre_layrnorm|post_layernorm)\.(.*)", TOWER_TARGET + r"\1.\2"),
        Rule(r"(?:vision_model\.)?head\..*", None, "the vision head is not used by LLaVA-family models"),
        Rule(r"(text_model\..*|text_projection\..*|visual_projection\..*|logit_scale|logit_bias)", None, "not part of the vision tower"),
    ]


def checkpoint_tower_layers(source: Source) -> int:
    """How many tower layers the checkpoint holds (0: no tower weights in it)."""
    pattern = re.compile(TOWER_PREFIX + r"encoder\.layers\.(\d+)\.")
    found = {int(m.group(1)) for key in source.tensors if (m := pattern.match(key))}
    return max(found) + 1 if found else 0


def resolve_tower(raw: dict, src: str, has_weights: bool, vision_tower: str | None) -> Tower:
    """The tower config and weights' origin; refuses a checkpoint without tower weights and without
    ``--vision-tower``, naming ``mm_vision_tower`` and the flag."""
    named = raw.get("mm_vision_tower") or raw.get("vision_tower")
    directory = vision_tower
    if directory is None and isinstance(named, str) and os.path.isfile(os.path.join(named, "config.json")):
        directory = named  # the config names a local directory
    if directory is not None:
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise CheckpointError(f"--vision-tower {directory}: no config.json there (a CLIP or SigLIP model directory)")
        config = tf.AutoConfig.from_pretrained(directory)
        kind = VISION_TYPES.get(config.model_type)
        if kind is None:
            raise CheckpointError(
                f"--vision-tower {directory}: model_type {config.model_type!r} is not a CLIP or SigLIP vision model"
            )
        config = getattr(config, "vision_config", config)
        mean, std = _processor_norm(directory, kind)
        return Tower(config, kind, directory, mean, std, config.num_hidden_layers)
    if not has_weights:
        raise CheckpointError(
            f"{src}: the checkpoint holds no vision tower weights and config.json's mm_vision_tower is {named!r}: "
            f"pass --vision-tower DIR, a local copy of {named or 'the vision tower'}"
        )
    if named not in KNOWN_TOWERS:
        raise CheckpointError(
            f"{src}: the checkpoint holds the vision tower's weights but not its config (mm_vision_tower is {named!r}, "
            "not a local directory): pass --vision-tower DIR, a local copy of it, for its config"
        )
    kind, fields = KNOWN_TOWERS[named]
    config = (tf.CLIPVisionConfig if kind == "clip" else tf.SiglipVisionConfig)(**fields)
    return Tower(config, kind, None, *(CLIP_MEAN, CLIP_STD) if kind == "clip" else (SIGLIP_MEAN, SIGLIP_STD))


def _processor_norm(directory: str, kind: str) -> tuple[list[float], list[float]]:
    path = os.path.join(directory, "preprocessor_config.json")
    default = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (SIGLIP_MEAN, SIGLIP_STD)
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        data = json.load(f)
    return list(data.get("image_mean", default[0])), list(data.get("image_std", default[1]))
