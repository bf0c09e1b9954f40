"""The processor of an imported checkpoint: the source's tokenizer with the placeholder tokens
transformers' LLaVA classes expect, the image preprocessing the original code base used, and the
chat template of its conversation mode.

Original code bases splice image features in at a sentinel id (-200) that is not in the vocabulary;
transformers expands an ``<image>`` token instead. The importer appends ``<image>`` (and ``<video>``
for OneVision) to the vocabulary, and ``<pad>`` where the tokenizer has no pad token, as llava-hf did
(Vicuna / Llama-2: ``<image>`` 32000, ``<pad>`` 32001; Qwen2: ``<image>`` 151646, ``<video>`` 151647).
"""

from __future__ import annotations

import logging

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .loader import CheckpointError

SYSTEM_VICUNA = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
# the conversation modes of the original code bases (llava/conversation.py): vicuna_v1 (LLaVA-1.5 and
# LLaVA-NeXT on Vicuna), mistral_instruct (LLaVA-NeXT-Mistral), qwen_1_5 (OneVision); an image becomes
# "<image>\n" before the text, as the original prompts put it.
_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'video' %}<video>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{% endif %}"
)
CHAT_TEMPLATES = {
    "vicuna_v1": (
        "{% if messages[0]['role'] != 'system' %}" + SYSTEM_VICUNA + " {% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }} "
        "{% elif message['role'] == 'user' %}USER: " + _CONTENT + " "
        "{% else %}ASSISTANT: " + _CONTENT + "</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    "mistral_instruct": (
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}[INST] " + _CONTENT + " [/INST]"
        "{% elif message['role'] == 'assistant' %}" + _CONTENT + "</s>{% endif %}{% endfor %}"
    ),
    "qwen_1_5": (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n" + _CONTENT + "<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}
TEMPLATE_FOR_DECODER = {"llama": "vicuna_v1", "mistral": "mistral_instruct", "qwen2": "qwen_1_5"}


def load_tokenizer(src: str, placeholders: tuple[str, ...]) -> tuple[PreTrainedTokenizerBase, dict[str, int]]:
    """The checkpoint's tokenizer with `placeholders` (``"<image>"``, ``"<video>"``) added as special
    tokens, and ``<pad>`` where it has no pad token; returns it with the placeholder ids."""
    log = logging.getLogger("transformers.configuration_utils")  # it warns that config.json is no known model
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)  # never trust_remote_code: a checkpoint is data
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{src}: no loadable tokenizer ({err.__class__.__name__}: {err})") from err
    finally:
        log.setLevel(level)
    new = [token for token in placeholders if token not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer, {token: tokenizer.convert_tokens_to_ids(token) for token in placeholders}


def chat_template(decoder: str) -> str:
    if decoder not in TEMPLATE_FOR_DECODER:
        raise CheckpointError(f"no conversation template known for a {decoder} decoder")
    return CHAT_TEMPLATES[TEMPLATE_FOR_DECODER[decoder]]

