"""The embedded demo: everything on a tiny random LLaVA, no downloads, a few minutes on 2 CPU cores.

1. ratio-1 equivalence: MoD with every layer at ratio 1 and fresh routers is the dense model;
2. what p-MoD saves on a batch (measured kept tokens and KV entries beside the accounting);
3. synthetic visual-instruction data (`mllm_mod.data.synth`), written as LLaVA JSON + PNGs;
4. train the tiny LLaVA dense on it (`mllm_mod.train.train`, the same recipe as `mllm-mod train`);
5. two arms from that checkpoint with the same extra training (epochs, learning rate, warm-up, frozen
   vision tower, data order): the dense model continued, and p-MoD retrofitted and fine-tuned;
6. evaluate the base and both arms on the held-out split: accuracy per family against its chance level,
   TFLOPs and KV-cache bytes per sample, wall time; one table, ``results.json`` and ``demo.png``.
   The fair comparison is MoD against the continued dense arm (both saw the same number of epochs).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from . import layer_ratios, retrofit, unload
from .efficiency import efficiency
from .tables import markdown_table
from .tiny import tiny_model

DEMO_LAYERS = 8  # the equivalence and savings steps
TRAIN_LAYERS = 4  # the trained model: PRD gives layer ratios 1, 0.75, 0.25, 0.15


@dataclass
class DemoSettings:
    """Sizes chosen so the whole demo takes a few minutes on 2 CPU cores.

    Families: the ones a model this small learns in a few hundred steps (spatial relations, OCR,
    charts and multiple choice need more capacity and steps; ``families=None`` takes every image family).
    Threads: one compute thread (these tensors are too small to gain from intra-op threads, and on a
    busy machine oversubscribed threads are many times slower) and one data-loading worker.
    """

    n_samples: int = 2000  # synthetic samples (90% train, 10% held out)
    families: tuple[str, ...] | None = ("color", "shape", "count", "presence")
    hidden_size: int = 64
    dense_epochs: float = 3.5
    mod_epochs: float = 1.0
    batch_size: int = 16
    dense_lr: float = 2e-3
    mod_lr: float = 1e-3
    router_lr: float = 1e-2
    threads: int = 1
    num_workers: int = 1


@dataclass
class PhaseLog:
    seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, name: str, start: float) -> None:
        self.seconds[name] = time.perf_counter() - start


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
    model, processor = tiny_model("llava", num_layers=DEMO_LAYERS, seed=seed)
    batch = _demo_batch(processor, seed)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        dense = model(**batch).logits[real]
        retrofit(model, "pmod", schedule="constant", ratio=1.0)
        mod = model(**batch).logits[real]
    unload(model)
    return float((dense - mod).abs().max())


# -- evaluation on the held-out split ------------------------------------------------------------
def prompt_batches(processor, records: list[dict[str, Any]], image_folder: str, batch_size: int):
    """Left-padded prompt batches (the chat template up to the assistant turn) and their records."""
    from PIL import Image

    processor.tokenizer.padding_side = "left"
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        texts, images = [], []
        for record in chunk:
            question = record["conversations"][0]["value"].replace("<image>", "").strip()
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            with Image.open(os.path.join(image_folder, record["image"])) as image:
                images.append(image.convert("RGB"))
        yield chunk, processor(images=images, text=texts, return_tensors="pt", padding=True)


@torch.no_grad()
def answer_accuracy(model, processor, records: list[dict[str, Any]], image_folder: str, desc: str) -> dict[str, float]:
    """Accuracy per family of the greedy first answer token (every synthetic answer is one word)."""
    from tqdm.auto import tqdm

    model.eval()
    tokenizer = processor.tokenizer
    hits: dict[str, list[int]] = defaultdict(list)
    batches = prompt_batches(processor, records, image_folder, batch_size=32)
    for chunk, batch in tqdm(batches, total=-(-len(records) // 32), desc=desc, unit="batch"):
        predicted = model(**batch, logits_to_keep=1).logits[:, -1].argmax(-1)  # [B]
        for record, token in zip(chunk, predicted.tolist()):
            answer = tokenizer.convert_tokens_to_ids(record["answer"])
            hits[record["family"]].append(int(token == answer))
    return {family: sum(v) / len(v) for family, v in sorted(hits.items())}


# -- the run ---------------------------------------------------------------------------------------
# MoD settings for the demo's 4-layer model: gamma-MoD's default placement (all but the first three and
# the last layer) would leave nothing to route at this depth, so every layer after the first routes; and
# its reference prefill threshold p > 0.005 keeps every token of a router trained for one short epoch
# (measured: 1.002x the dense TFLOPs), so the demo judges prefill tokens at the decode threshold 0.5
GMOD_SHORT_RUN = {"threshold": 0.5}
DEMO_PRESET_SETTINGS: dict[str, dict[str, Any]] = {"gmod": {"skip_layers": None, "layers": [1, 2, 3], **GMOD_SHORT_RUN}}


def run(out: str = "runs/demo", seed: int = 0, settings: DemoSettings | None = None, preset: str = "pmod") -> int:
    from .data import synth
    from .train import load_config, train

    settings = settings or DemoSettings()
    torch.set_num_threads(settings.threads)
    os.makedirs(out, exist_ok=True)
    log = PhaseLog()
    begin = time.perf_counter()

    print("== 1. equivalence: MoD at ratio 1 on every layer vs the dense model (tiny LLaVA-1.5, 8 layers)")
    diff = check_equivalence(seed)
    print(f"max |logit difference| = {diff:.2e}  ->  {'OK' if diff < 1e-5 else 'MISMATCH'}")
    if diff >= 1e-5:
        return 1

    print("\n== 2. p-MoD retrofit (PRD schedule, TanhNorm, STRing) and what it saves on a batch of 4")
    model, processor = tiny_model("llava", num_layers=DEMO_LAYERS, seed=seed)
    retrofit(model, "pmod")
    print("keep ratio per layer: " + " ".join(f"{r:.2f}" for r in layer_ratios(model)))
    print(efficiency(model, _demo_batch(processor, seed)).table())

    print(f"\n== 3. synthetic visual-instruction data: {settings.n_samples} samples")
    start = time.perf_counter()
    data_dir = os.path.join(out, "data")
    meta = synth.generate(data_dir, settings.n_samples, seed=seed, only=settings.families)
    log.timed("data", start)
    with open(os.path.join(data_dir, "test.json")) as f:
        test = json.load(f)

    print(f"\n== 4. dense training of a tiny LLaVA ({TRAIN_LAYERS} layers, hidden {settings.hidden_size}), from random init")
    start = time.perf_counter()
    base_dir, dense_dir, cont_dir, mod_dir = (os.path.join(out, n) for n in ("base", "dense", "dense_cont", "mod"))
    model, processor = tiny_model(
        "llava", num_layers=TRAIN_LAYERS, words=meta["vocabulary"], seed=seed,
        hidden_size=settings.hidden_size, intermediate_size=2 * settings.hidden_size,
    )
    model.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    common = {
        "data": os.path.join(data_dir, "train.json"), "image_folder": data_dir, "batch_size": settings.batch_size,
        "num_workers": settings.num_workers, "gradient_checkpointing": False, "save_steps": 10**6, "logging_steps": 5, "seed": seed, "bf16": False,
        "warmup_ratio": 0.03, "max_length": 256,
    }
    dense = train(load_config(
        model=base_dir, output_dir=dense_dir, epochs=settings.dense_epochs, lr=settings.dense_lr,
        freeze_vision_tower=False, max_grad_norm=0.0, **common,  # from random init everything learns, unclipped
    ))
    log.timed("train dense", start)

    print(f"\n== 5. two arms, the same extra {settings.mod_epochs} epoch(s) each (vision tower frozen, lr {settings.mod_lr})")
    print("5a. the dense model, continued")
    start = time.perf_counter()
    extra = {"epochs": settings.mod_epochs, "lr": settings.mod_lr, "freeze_vision_tower": True, **common}
    cont = train(load_config(model=dense_dir, output_dir=cont_dir, **extra))
    log.timed("train dense +", start)
    print(f"5b. retrofit {preset} onto the trained model and fine-tune (routers at their own lr)")
    start = time.perf_counter()
    mod = train(load_config(
        model=dense_dir, output_dir=mod_dir, preset=preset, router_lr=settings.router_lr,
        mod=DEMO_PRESET_SETTINGS.get(preset, {}), **extra,
    ))
    log.timed("train MoD", start)

    print("\n== 6. held-out evaluation")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .retrofit import from_pretrained

    processor = AutoProcessor.from_pretrained(dense_dir)
    results: dict[str, Any] = {
        "families": {}, "train": {"dense_base": dense.to_dict(), "dense": cont.to_dict(), "mod": mod.to_dict()},
    }
    acc: dict[str, dict[str, float]] = {}
    for key, directory, label in (("dense_base", dense_dir, "base"), ("dense", cont_dir, "dense +"), ("mod", mod_dir, "MoD")):
        start = time.perf_counter()
        loaded = from_pretrained(directory) if key == "mod" else AutoModelForImageTextToText.from_pretrained(directory)
        acc[key] = answer_accuracy(loaded, processor, test, data_dir, f"eval {label}")
        log.timed(f"eval {label}", start)
    mod_model = loaded
    _, batch = next(prompt_batches(processor, test, data_dir, batch_size=32))
    report = efficiency(mod_model, batch)

    epochs = f"{settings.dense_epochs:g} + {settings.mod_epochs:g} ep"
    rows = [("family", "chance", f"dense ({settings.dense_epochs:g} ep)", f"dense ({epochs})", f"MoD {preset} ({epochs})")]
    for family in acc["dense"]:
        chance = meta["families"][family]["chance"]
        results["families"][family] = {"chance": chance, **{k: acc[k][family] for k in acc}}
        rows.append((family, f"{chance:.3f}", *(f"{acc[k][family]:.3f}" for k in acc)))
    mean = {k: sum(a.values()) / len(a) for k, a in acc.items()}
    mean_chance = sum(meta["families"][f]["chance"] for f in acc["dense"]) / len(acc["dense"])
    rows.append(("mean", f"{mean_chance:.3f}", *(f"{mean[k]:.3f}" for k in acc)))
    dense_tflops, mod_tflops = report.mean(report.dense_tflops), report.mean(report.mod_tflops)
    dense_kv, mod_kv = report.mean(report.dense_kv_bytes), report.mean(report.mod_kv_bytes)
    rows.append(("prefill TFLOPs / sample", "", f"{dense_tflops:.3e}", f"{dense_tflops:.3e}", f"{mod_tflops:.3e}"))
    rows.append(("KV cache bytes / sample", "", f"{dense_kv:.0f}", f"{dense_kv:.0f}", f"{mod_kv:.0f}"))
    rows.append(("train loss first -> last", "", _loss_range(dense), _loss_range(cont), _loss_range(mod)))
    seconds = log.seconds
    rows.append(("train wall time s", "", f"{seconds['train dense']:.0f}", f"+{seconds['train dense +']:.0f}", f"+{seconds['train MoD']:.0f}"))
    rows.append(("eval wall time s", "", *(f"{seconds['eval ' + n]:.1f}" for n in ("base", "dense +", "MoD"))))
    table = markdown_table(rows)
    print(f"held-out split: {len(test)} samples; MoD keeps {report.tflops_ratio:.3f} of the TFLOPs, {report.kv_ratio:.3f} of the KV cache")
    print(table)
    log.timed("total", begin)
    results.update(
        preset=preset, mean=mean, mean_chance=mean_chance, tflops_ratio=report.tflops_ratio, kv_ratio=report.kv_ratio,
        layer_ratios=layer_ratios(mod_model), seconds=log.seconds, table=table,
    )
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(results, dense_dir, cont_dir, mod_dir, os.path.join(out, "demo.png"))
    print(f"total {log.seconds['total']:.0f} s; results.json and demo.png in {out}")
    return 0


def _loss_range(result) -> str:
    if result.first_loss is None:
        return "not logged"
    return f"{result.first_loss:.2f} -> {result.last_loss:.2f}"


def plot(results: dict[str, Any], dense_dir: str, cont_dir: str, mod_dir: str, path: str) -> None:
    """Accuracy per family (base, dense continued, MoD, chance) and the training-loss curves (the base
    run, then the two arms from where it ended)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .train.trainer import LOG_NAME

    families = list(results["families"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(families))
    bars = (("dense_base", "dense (base)"), ("dense", "dense, continued"), ("mod", "p-MoD fine-tune"))
    for j, (key, label) in enumerate(bars):
        left.bar([x + (j - 1) * 0.27 for x in xs], [results["families"][f][key] for f in families], width=0.27, label=label)
    left.scatter(list(xs), [results["families"][f]["chance"] for f in families], color="k", marker="_", s=400, label="chance")
    left.set_xticks(list(xs), families, rotation=30)
    left.set_ylabel("held-out accuracy")
    left.legend(fontsize=8)

    def losses(directory: str) -> list[dict[str, Any]]:
        with open(os.path.join(directory, LOG_NAME)) as f:
            return [json.loads(line) for line in f if '"loss"' in line]

    base = losses(dense_dir)
    right.plot([e["step"] for e in base], [e["loss"] for e in base], label="dense (base)")
    offset = base[-1]["step"] if base else 0
    for directory, label in ((cont_dir, "dense, continued"), (mod_dir, "p-MoD fine-tune")):
        entries = losses(directory)
        right.plot([offset + e["step"] for e in entries], [e["loss"] for e in entries], label=label)
    right.set_xlabel("step")
    right.set_ylabel("training loss")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
