"""InternVL (`InternVLForConditionalGeneration`, Qwen2 or Llama decoder): each image is cut into tiles (a
grid chosen by aspect ratio, plus a thumbnail tile when there is more than one); each tile's patch grid is
pixel-shuffled by ``downsample_ratio`` and the image becomes one run ``<img> <IMG_CONTEXT> * (tiles *
tile_tokens) </img>``, so the number of placeholders varies per image. Only the ``<IMG_CONTEXT>``
placeholders (the positions that receive vision features) are routable; ``<img>`` / ``</img>`` are ordinary
token embeddings and stay with the text. A video is one such run per frame, with ``FrameN:`` text between.

Groups (``selection="group"``): one per run of placeholders, i.e. per image (per frame for videos).
"""

from .base import Adapter, register

INTERNVL = register(Adapter(name="InternVL", model_types=("internvl",), vision_token_attrs=("image_token_id",)))
