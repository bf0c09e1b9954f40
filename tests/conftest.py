"""Shared fixtures: tiny random models of the real classes, with real processors and made-up images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mllm_mod.tiny import tiny_model

torch.set_num_threads(2)

PROMPTS = [
    "USER : <image> what color is the object ? ASSISTANT :",
    "USER : <image> how many objects are there in the picture ? ASSISTANT :",
    "USER : <image> is there a red circle ? ASSISTANT :",
]
# LLaVA-NeXT / OneVision tile by aspect ratio, so these sizes give different image-token counts
IMAGE_SIZES = [(30, 30), (40, 70), (70, 35)]


def make_images(seed: int = 0, sizes=IMAGE_SIZES) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def make_inputs(processor, n: int = 3, seed: int = 0, padding_side: str = "left"):
    processor.tokenizer.padding_side = padding_side
    return processor(images=make_images(seed)[:n], text=PROMPTS[:n], return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny steps: these tensors are too small to gain from intra-op threads, and on
    a shared machine extra threads only oversubscribe the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def models_cache():
    return {}


def build(family: str, attn: str = "sdpa", num_layers: int = 4, seed: int = 0):
    return tiny_model(family, num_layers=num_layers, attn=attn, seed=seed)


def randomize_routers(model, seed: int = 1, scale: float = 1.0) -> None:
    """Give routers non-trivial weights (trained-like), so selection is not decided by ties."""
    from mllm_mod.retrofit import mod_layer_map

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mod_layer_map(model).values():
            for p in layer.router.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def pytest_terminal_summary(terminalreporter) -> None:
    """The worst logit difference of each invariant check in this run, with the library versions."""
    import transformers
    from logits import LOGIT_ATOL, WORST

    if not WORST:
        return
    terminalreporter.section(f"worst logit differences (fp32, bound {LOGIT_ATOL:g})")
    terminalreporter.write_line(f"torch {torch.__version__}, transformers {transformers.__version__}")
    for check, diff in sorted(WORST.items()):
        terminalreporter.write_line(f"{diff:10.3g}  {check}")


def loss_grads(model, batch: dict) -> dict:
    """Gradients of the batch's loss, by parameter name (those that get one), from zeroed gradients."""
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
