"""The embedded demo: everything on a tiny random LLaVA, no downloads, a few minutes on 2 CPU cores."""

from __future__ import annotations

import os

import torch

from . import layer_ratios, retrofit, unload
from .efficiency import efficiency
from .tiny import tiny_model


def _demo_batch(processor, seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)) for _ in range(4)]
    prompts = [
        "USER : <image> what color is the object ? ASSISTANT :",
        "USER : <image> how many objects are there ? ASSISTANT :",
        "USER : <image> is there a red circle in the picture ? ASSISTANT :",
        "USER : <image> which shape is left of the star ? ASSISTANT :",
    ]
    processor.tokenizer.padding_side = "left"
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def check_equivalence(seed: int = 0) -> float:
    """Max |logit difference| between the dense model and MoD at ratio 1 on every layer (should be ~0)."""
    model, processor = tiny_model("llava", num_layers=8, seed=seed)
    batch = _demo_batch(processor, seed)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        dense = model(**batch).logits[real]
        retrofit(model, "pmod", schedule="constant", ratio=1.0)
        mod = model(**batch).logits[real]
    unload(model)
    return float((dense - mod).abs().max())


def run(out: str = "runs/demo", seed: int = 0) -> int:
    os.makedirs(out, exist_ok=True)
    print("== 1. equivalence: MoD at ratio 1 on every layer vs the dense model (tiny LLaVA-1.5, 8 layers)")
    diff = check_equivalence(seed)
    print(f"max |logit difference| = {diff:.2e}  ->  {'OK' if diff < 1e-5 else 'MISMATCH'}")
    if diff >= 1e-5:
        return 1

    print("\n== 2. p-MoD retrofit (PRD schedule, TanhNorm, STRing) and what it saves on a batch of 4")
    model, processor = tiny_model("llava", num_layers=8, seed=seed)
    retrofit(model, "pmod")
    print("keep ratio per layer: " + " ".join(f"{r:.2f}" for r in layer_ratios(model)))
    report = efficiency(model, _demo_batch(processor, seed))
    print(report.table())
    return 0
