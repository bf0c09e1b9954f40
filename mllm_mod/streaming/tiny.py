"""A tiny random-weight streaming model and its tokenizer, for tests, the demo and offline runs."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PreTrainedTokenizerBase, SiglipVisionConfig

from ..tiny import build_tokenizer, check_attention, tiny_text_config
from .model import StreamConfig, StreamForCausalLM

FRAME_TOKEN = "<v>"  # VideoLLM-online's placeholder
# the template's words (objective.py) and those of the synthetic narration (mllm_mod.streaming.synthetic)
# beyond the tiny base vocabulary
STREAM_WORDS = (
    "User", "Assistant", "appears", "disappears", "moves", "up", "down", "narrate", "shapes", "events", "where", "it"
)


def add_stream_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """Add the frame placeholder (a special token); returns its id and that of the frame separator ','
    (the silence token, an ordinary token of the vocabulary, as in VideoLLM-online's
    ``tokenization_live.py``). A real decoder then needs ``model.resize_token_embeddings(len(tokenizer))``."""
    from .objective import SEPARATOR, text_ids

    tokenizer.add_tokens([FRAME_TOKEN], special_tokens=True)
    (separator,) = text_ids(tokenizer, SEPARATOR)
    return tokenizer.convert_tokens_to_ids(FRAME_TOKEN), separator


def tiny_stream_model(
    num_layers: int = 4,
    hidden_size: int = 32,
    attn: str = "sdpa",
    decoder: str = "llama",
    image_size: int = 32,
    patch_size: int = 8,
    frame_grid: int = 3,
    fps: float = 2.0,
    frame_loss_weight: float = 1.0,
    words: Iterable[str] = STREAM_WORDS,
    seed: int = 0,
) -> tuple[StreamForCausalLM, PreTrainedTokenizerBase]:
    """(model, tokenizer): a SigLIP tower (2 layers, pooling head) + MLP + a Llama or Qwen2 decoder, random weights."""
    tokenizer = build_tokenizer(words)
    frame_id, silence_id = add_stream_tokens(tokenizer)
    text = tiny_text_config(
        "llava", len(tokenizer), num_layers, attn, decoder, hidden_size=hidden_size, intermediate_size=2 * hidden_size
    )
    vision = SiglipVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=True,  # the attention-pooling head gives frame token 0 (pooler_output)
        attn_implementation=attn,
    )
    config = StreamConfig(
        vision_config=vision,
        text_config=text,
        frame_token_id=frame_id,
        silence_token_id=silence_id,
        frame_grid=frame_grid,
        fps=fps,
        frame_loss_weight=frame_loss_weight,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = StreamForCausalLM._from_config(config, attn_implementation=attn).eval()
    check_attention(model, attn)
    return model, tokenizer
