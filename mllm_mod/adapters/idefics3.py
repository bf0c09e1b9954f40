"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`, Llama
decoder under ``model.text_model``): an image is split into a grid of sub-images plus a global view; each is
one vision-encoder pass, pixel-shuffled by ``scale_factor``, and lands in the prompt as its own run of
``<image>`` placeholders behind a tag::

    <fake_token_around_image><row_1_col_1><image>*n ... \\n\\n<fake_token_around_image><global-img><image>*n<fake_token_around_image>

Only the ``<image>`` placeholders are routable; the ``<fake_token_around_image>``, ``<row_i_col_j>``,
``<global-img>`` and newline tokens are ordinary token embeddings and stay with the text.

Groups (``selection="group"``): one per run, i.e. per sub-image and per global view (which runs form one
image is told only by the row/column tag ids, which live in the tokenizer, not in the model config).
"""

from __future__ import annotations

from .base import Adapter, register

IDEFICS3 = register(
    Adapter(
        name="Idefics3 / SmolVLM",
        model_types=("idefics3", "smolvlm"),
        vision_token_attrs=("image_token_id",),
        vision_tower_attr="vision_model",
        decoder_attr="text_model",
    )
)
