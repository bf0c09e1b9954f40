"""A streaming video LLM from stock parts (VideoLLM-online layout): vision tower + MLP connector + decoder.

Each frame becomes ``1 + grid**2`` tokens (default 10), as VideoLLM-online's ``models/vision_live.py``
makes them: token 0 is the tower's summary of the frame (SigLIP's attention-pooled ``pooler_output``,
CLIP's CLS token), then a ``grid x grid`` average-pooled patch grid, projected by a two-layer MLP into
the decoder's embedding space. Frames arrive at a fixed fps and are interleaved with text in one causal
sequence (`objective.py` lays it out); in `input_ids` every frame token is the `frame_token_id`
placeholder, and the features of the frames passed as `pixel_values` fill the placeholders in order.

The attribute layout is LLaVA's (``model.model.vision_tower``, ``model.model.multi_modal_projector``,
``model.model.language_model.layers``, ``model.lm_head``), so `mllm_mod.retrofit` finds the decoder
layers and ``save_pretrained``/``from_pretrained`` work as for any transformers model. Importing this
module registers the config and models with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`.

The loss, as ``models/live_llama/modeling_live_llama.py`` computes it: ``sum(w * ce) / n_labels``,
text labels weighing 1 and labels at frame tokens (each frame's silence / reply-start decision)
``config.frame_loss_weight``, unless the caller passes explicit `label_weights`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import compat

MODEL_TYPE = "mllm_mod_stream"


class StreamConfig(PreTrainedConfig):
    """Config of `StreamForCausalLM`.

    vision_config / text_config: a transformers vision model (SigLIP, CLIP) and a decoder (Llama, Qwen2).
    frame_token_id: the placeholder id standing for one frame token in `input_ids`.
    silence_token_id: the frame separator (',' in VideoLLM-online): it sits between the frames of a run
        in the input, and a frame's last token predicts it when the assistant stays silent.
    frame_grid: side of the pooled patch grid (3 -> 1 + 9 = 10 tokens per frame).
    fps: the frame rate the model is trained and run at.
    frame_loss_weight: loss weight of frame-token labels (silence / reply-start decisions); text 1.
    image_mean / image_std: pixel normalisation of the vision tower.
    """

    model_type = MODEL_TYPE
    DEFAULT_SUB_CONFIGS = {"vision_config": "siglip_vision_model", "text_config": "llama"}
    vars().update(compat.sub_config_declaration(**DEFAULT_SUB_CONFIGS))  # this release's declaration

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    frame_token_id: int = 0
    silence_token_id: int = 0
    frame_grid: int = 3
    fps: float = 2.0
    frame_loss_weight: float = 1.0
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        for name, model_type in self.DEFAULT_SUB_CONFIGS.items():
            setattr(self, name, compat.resolve_sub_config(getattr(self, name), model_type))
        super().__post_init__(**kwargs)
        if self.image_mean is None:
            self.image_mean = [0.5, 0.5, 0.5]
        if self.image_std is None:
            self.image_std = [0.5, 0.5, 0.5]
        if self.frame_grid < 1:
            raise ValueError(f"frame_grid must be >= 1, got {self.frame_grid}")
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")

    @property
    def tokens_per_frame(self) -> int:
        return 1 + self.frame_grid**2


class StreamProjector(nn.Module):
    """Two-layer MLP from vision features to decoder embeddings."""

    def __init__(self, config: StreamConfig):
        super().__init__()
        vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision, text)
        self.act = nn.GELU() if config.projector_hidden_act == "gelu" else nn.SiLU()
        self.linear_2 = nn.Linear(text, text)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class StreamPreTrainedModel(PreTrainedModel):
    config_class = StreamConfig
    config: StreamConfig
    base_model_prefix = "model"
    input_modalities = ("video", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = [compat.CACHE_KWARG]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True


class StreamModel(StreamPreTrainedModel):
    """Vision tower + projector + text decoder (no LM head)."""

    def __init__(self, config: StreamConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = StreamProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def frame_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frames [F, 3, H, W] -> frame tokens [F, 1 + g*g, D] in the decoder's embedding space.

        A frozen tower (no trainable parameter) runs without autograd, as if its features were
        pre-extracted (VideoLLM-online trains on saved features)."""
        tower = self.vision_tower
        frozen = not any(p.requires_grad for p in tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            out = tower(pixel_values=pixel_values)
        hidden = out.last_hidden_state  # [F, P(+1), Dv]
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        patches = hidden[:, -side * side :]  # [F, P, Dv]: drops a CLS token (CLIP); SigLIP has none
        n, _, dim = patches.shape
        grid = patches.transpose(1, 2).reshape(n, dim, side, side)  # [F, Dv, s, s]
        pooled = F.adaptive_avg_pool2d(grid, self.config.frame_grid).flatten(2).transpose(1, 2)  # [F, g*g, Dv]
        tokens = torch.cat([self.summary_token(out)[:, None], pooled], dim=1)  # [F, 1 + g*g, Dv]
        return self.multi_modal_projector(tokens)  # [F, 1 + g*g, D]

    def summary_token(self, out: Any) -> torch.Tensor:
        """Frame token 0 [F, Dv], as ``vision_live.py`` takes it: SigLIP's attention-pooled
        ``pooler_output`` (the tower needs ``vision_use_head=True``), CLIP's CLS token (the first entry of
        ``last_hidden_state``, before the post-layernorm)."""
        hidden = out.last_hidden_state  # [F, P(+1), Dv]
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        if hidden.shape[1] == side * side + 1:  # a CLS token in front (CLIP)
            return hidden[:, 0]
        if getattr(out, "pooler_output", None) is None:
            raise ValueError(
                "frame token 0 is the vision tower's pooled summary: a SigLIP tower needs vision_use_head=True"
            )
        return out.pooler_output  # [F, Dv]

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings [B, T, D] with the frame placeholders filled by the frames' features, in order."""
        embeds = self.get_input_embeddings()(input_ids)  # [B, T, D]
        placeholders = input_ids == self.config.frame_token_id  # [B, T]
        n_slots = int(placeholders.sum())
        n_frames = 0 if pixel_values is None else pixel_values.shape[0]
        if n_slots != n_frames * self.config.tokens_per_frame:
            raise ValueError(
                f"{n_slots} frame placeholders in input_ids but {n_frames} frames x "
                f"{self.config.tokens_per_frame} tokens given"
            )
        if n_frames == 0:
            return embeds
        features = self.frame_features(pixel_values.to(self.vision_tower.dtype))  # [F, N, D]
        features = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)  # [F*N, D]
        return embeds.masked_scatter(placeholders[..., None], features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ):
        """The KV cache comes in `kwargs` under this transformers release's name (`compat.CACHE_KWARG`)."""
        cache = compat.pop_cache(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        elif pixel_values is not None:
            raise ValueError("pixel_values need input_ids (the frame placeholders say where the frames go)")
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **compat.cache_kwargs(cache),
            **kwargs,
        )


class StreamForCausalLM(StreamPreTrainedModel, GenerationMixin):
    """The streaming video LLM with its LM head and the streaming loss."""

    # the loss is a mean over each batch's labels: the Trainer must average it over gradient accumulation
    # itself rather than hand us a token count
    accepts_loss_kwargs = False
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: StreamConfig):
        super().__init__(config)
        self.model = StreamModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        label_weights: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """`labels` [B, T] are aligned with the inputs (the label at t is the token after t; -100 ignored).
        `label_weights` [B, T] (optional) weigh each label; by default text 1, frame tokens
        ``config.frame_loss_weight``. The loss is ``sum(w * ce) / n_labels`` (VideoLLM-online's)."""
        kwargs.pop("num_items_in_batch", None)  # a token count from a trainer: our loss normalises itself
        out = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state  # [B, T, D]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)  # [B, T, V]
        loss = None
        if labels is not None:
            if label_weights is None:
                label_weights = self.default_label_weights(input_ids)
            loss = weighted_lm_loss(logits, labels, label_weights)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **compat.output_fields(compat.output_cache(out)),
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    def default_label_weights(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T]: ``frame_loss_weight`` at frame placeholders, 1 elsewhere."""
        frames = input_ids == self.config.frame_token_id  # [B, T]
        weight = torch.tensor(self.config.frame_loss_weight, dtype=torch.float32, device=input_ids.device)
        return torch.where(frames, weight, torch.ones((), device=input_ids.device))


def weighted_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * ce) / n`` over the n tokens whose label is not -100 (``modeling_live_llama.py``: the
    weights scale the frame decisions' share; they do not renormalise). logits [B, T, V], labels/weights [B, T]."""
    labelled = labels != -100  # [B, T]
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels.masked_fill(~labelled, 0), reduction="none")  # [B, T]
    w = weights.to(ce.dtype) * labelled  # [B, T]
    return (w * ce).sum() / labelled.sum().clamp(min=1)


AutoConfig.register(MODEL_TYPE, StreamConfig)
AutoModel.register(StreamConfig, StreamModel)
AutoModelForCausalLM.register(StreamConfig, StreamForCausalLM)


def load_stream_model(directory: str, **hf_kwargs: Any) -> tuple[StreamForCausalLM, Any]:
    """(model, tokenizer) from a directory written by ``model.save_pretrained`` + ``tokenizer.save_pretrained``.

    A retrofitted model's checkpoint (its config.json records ``mod_config``) is loaded with
    `mllm_mod.from_pretrained`, so it comes back with its MoD layers and routers.
    """
    import json
    import os

    from transformers import AutoTokenizer

    from ..retrofit import CONFIG_KEY, from_pretrained

    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no config.json: not a saved streaming model")
    with open(path) as f:
        raw = json.load(f)
    if raw.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{directory} holds a {raw.get('model_type')!r} model, not a streaming model ({MODEL_TYPE})")
    model = (
        from_pretrained(directory, **hf_kwargs)
        if CONFIG_KEY in raw
        else StreamForCausalLM.from_pretrained(directory, **hf_kwargs)
    )
    return model.eval(), AutoTokenizer.from_pretrained(directory)
