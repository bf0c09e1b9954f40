"""The fidelity study: does skipping vision compute keep quality, at equal training and equal compute?

    mllm-mod study --out runs/study [--quick] [--seeds N] [--config study.yaml]

Per seed, one dense tiny LLaVA (`mllm_mod.tiny`) is trained from random init on the vision-localised
suite (`mllm_mod.data.localized`: 96-px pictures, 8-px patches, 144 vision tokens). Every trained arm
then starts from that base and gets the *same* extra training (`extra_training`: steps, data order,
learning rate, warm-up, frozen vision tower, router learning rate where there are routers):

- ``dense``: the base, continued (no routing);
- ``pmod``: p-MoD (PRD schedule, TanhNorm, STRing); ``pmod_c50`` / ``pmod_c30``: constant keep ratios
  0.5 / 0.3 on PRD's MoD layers;
- ``gmod``: gamma-MoD, layers from ARank calibrated on the base, shared router, routing loss;
- ``random_routing``: pmod's layers and ratios, but the top-k is a seeded random choice per sample
  (`SeededRandomRouter`): what the learned router adds over "skip the same number at random";
- ``fastv_ft``: FastV pruning (`mllm_mod.eval.baselines`) active during the extra training, at pmod's
  prefill TFLOPs;
- training-free ``fastv`` and ``random_drop`` on the ``dense`` arm's weights, at pmod's TFLOPs;
- every method of the training-free zoo (`mllm_mod.eval.zoo.ZOO`: PyramidDrop, VTW, DivPrune, DART, and any
  method added there later) on the ``dense`` arm's weights, at the budget whose prefill TFLOPs come closest
  to pmod's (`mllm_mod.eval.zoo.matching`); a method whose budgets cannot reach pmod's TFLOPs on this model
  runs at its closest budget and is reported as not matched, with its measured ratio.

Each arm answers the held-out questions (greedy first answer token) and the same questions on a blank
picture (the control: a model that reads the picture falls to chance there); prefill TFLOPs and KV
bytes are measured with `mllm_mod.efficiency` on held-out batches. Results per seed and arm are written
as soon as they exist (``seed{s}/arms/{arm}.json``), so an interrupted study resumes where it stopped.
Outputs: ``results.json``, ``study.md``, ``pareto.png`` and ``patches.png`` (which patches pmod and
random_routing keep at one deep layer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .eval.zoo import ZOO

TRAINED_ARMS = ("dense", "pmod", "pmod_c50", "pmod_c30", "gmod", "random_routing", "fastv_ft")
ZOO_ARMS = tuple(ZOO)  # the zoo's registry: a method added there becomes an arm
TRAINING_FREE_ARMS = ("fastv", "random_drop", *ZOO_ARMS)
ARMS = (*TRAINED_ARMS, *TRAINING_FREE_ARMS)
RESULTS_NAME, TABLE_NAME, PARETO_NAME, PATCHES_NAME = "results.json", "study.md", "pareto.png", "patches.png"
DEPTH_NAME = "depth.json"  # per seed: the dense arm's accuracy with vision withdrawn from layer K on
PICTURE_ARMS = ("pmod", "random_routing")
ROUTING_IMAGES = 128  # held-out pictures on which a routed arm's kept patches are scored (`mllm_mod.kept`)
ROUTED_ARMS = ("pmod", "pmod_c50", "pmod_c30", "gmod", "random_routing")  # arms whose MoD layers route
# settings added after studies were run, each with the value every older study had (what a resume assumes)
ADDED_SETTINGS: dict[str, Any] = {"mod_overrides": {}}
BASE_SAVE_STEPS = 100  # the base run's checkpoint interval (what an interrupted study resumes from)
MATCH_TOLERANCE = 0.01  # a training-free arm is "at pmod's TFLOPs" when its predicted ratio is within this of pmod's


@dataclass
class StudySettings:
    """Sizes of one study. The defaults are the full study (3 seeds, about 45 min on 2 CPU cores):
    the `count` family only, the one family a base learned within the budget (the other localised
    families stayed at chance: docs/FIDELITY.md, "Diagnosis"), with v3's base learning rate 5e-4 (at v2's
    2e-3 the base left the answer prior on one seed of three); `quick` is the smoke run over every family.
    Counts of questions are per family."""

    n_train: int = 1200  # training questions per family
    n_test: int = 500  # held-out questions per family
    n_blank: int = 100  # held-out questions per family asked again on a blank picture
    families: tuple[str, ...] | None = ("count",)  # None: every localised family (see docs/FIDELITY.md)
    data_seed: int = 0  # the data is the same for every seed; seeds change init, data order, routing
    seeds: int = 3
    num_layers: int = 4
    hidden_size: int = 64
    base_epochs: float = 8.0
    base_lr: float = 5e-4  # v3 (v2: 2e-3, which left the prior on seed 0 only: docs/FIDELITY.md, "Diagnosis")
    base_batch_size: int | None = 8  # the base run's batch (None: `batch_size`, the arms' batch)
    base_max_grad_norm: float = 1.0  # the base run's gradient clipping (0: unclipped)
    init_range: float = 0.02  # the decoder's initializer_range (std of its random init)
    extra_epochs: float = 1.5
    extra_lr: float = 5e-4  # v3: the base's peak (v2: 1e-3)
    router_lr: float = 1e-2
    warmup_ratio: float = 0.03
    batch_size: int = 32
    fastv_layer: int = 1  # FastV's K: layers 0 .. K-1 see every token, K - 1 ranks them
    arms: tuple[str, ...] = ARMS
    threads: int = 1
    num_workers: int = 1
    eval_batch_size: int = 64
    efficiency_batches: int = 2  # held-out batches measured by `mllm_mod.efficiency`
    picture_layer: int = 2  # the deep layer whose kept patches `patches.png` shows
    picture_images: int = 5
    logging_steps: int = 5
    # MoDConfig fields over the pmod preset, for pmod, pmod_c50/c30 and random_routing and for the TFLOPs
    # the other arms are matched to (an ablation knob: e.g. a constant ratio, tanh_alpha)
    mod_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def quick(cls) -> StudySettings:
        """The smoke study: every arm, one seed, a few steps each (a few minutes on 2 cores)."""
        return cls(n_train=48, n_test=16, n_blank=8, seeds=1, families=None, base_epochs=1.0, extra_epochs=0.5,
                   eval_batch_size=40, efficiency_batches=1, picture_images=3, logging_steps=1)  # fmt: skip

    def __post_init__(self) -> None:
        self.arms = tuple(self.arms)
        self.families = tuple(self.families) if self.families is not None else None
        unknown = sorted(set(self.arms) - set(ARMS))
        if unknown:
            raise ValueError(f"unknown study arms {unknown}; choose from {ARMS}")
        if set(TRAINING_FREE_ARMS) & set(self.arms) and "dense" not in self.arms:
            raise ValueError(
                f"the training-free arms {TRAINING_FREE_ARMS} run on the dense arm's weights: keep 'dense'"
            )
        if self.base_batch_size is not None and self.base_batch_size <= 0:
            raise ValueError(f"base_batch_size must be positive, got {self.base_batch_size}")
        for name in ("n_train", "n_test", "seeds", "batch_size", "num_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.n_blank <= self.n_test:
            raise ValueError(f"n_blank must be in [0, n_test], got {self.n_blank}")
        if not 1 <= self.fastv_layer < self.num_layers:
            raise ValueError(f"fastv_layer K must be in [1, {self.num_layers - 1}], got {self.fastv_layer}")
        if not isinstance(self.mod_overrides, dict):
            raise TypeError(f"mod_overrides is a mapping of MoDConfig fields, got {self.mod_overrides!r}")
        self.mod_overrides = dict(self.mod_overrides)
        pmod_ratios(self.num_layers, self.mod_overrides)  # an unknown field or a bad value fails here

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, path: str | os.PathLike, base: StudySettings | None = None) -> StudySettings:
        """`base` (default: the full study) with the fields of a YAML mapping."""
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise TypeError(f"{path}: a study config is a YAML mapping of StudySettings fields")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{path}: unknown study settings {unknown}; known: {sorted(names)}")
        return dataclasses.replace(base or cls(), **data)

    def comparable(self) -> dict[str, Any]:
        """What must not change when a study resumes (everything but `seeds`, `arms` and threads)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("seeds", "arms", "threads", "num_workers")}


# -- random routing ----------------------------------------------------------------------------------
class SampleKeys:
    """A forward pre-hook on the model: notes each forward's per-sample content keys (a digest of the
    sample's real token ids and its pixels) and attention mask, for `SeededRandomRouter`."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.keys: list[int] | None = None
        self.real: torch.Tensor | None = None  # [B, T] bool

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)  # [B, T]
        if not torch.is_tensor(ids):
            raise ValueError("random routing seeds each sample from its content: call the model with input_ids")
        mask = kwargs.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()  # [B, T]
        pixels = kwargs.get("pixel_values")  # [B, 3, H, W] or None
        self.real, self.keys = real, []
        for b in range(ids.shape[0]):
            digest = hashlib.blake2b(digest_size=8, key=int(self.seed).to_bytes(8, "little"))
            digest.update(ids[b][real[b]].to("cpu", torch.int64).numpy().tobytes())
            if torch.is_tensor(pixels) and pixels.shape[0] == ids.shape[0]:
                digest.update(pixels[b].detach().to("cpu", torch.float32).numpy().tobytes())
            self.keys.append(int.from_bytes(digest.digest(), "little") & (2**63 - 1))


class SeededRandomRouter(nn.Module):
    """Stands in for a MoD layer's router: uniform random scores per sample, drawn from a generator
    seeded by (the sample's content, the layer), so a sample gets the same choice in any batch.

    The logits are tiny (``scale * (u - 0.5)``), so TanhNorm's weights stay within ``1 +- 1e-4``: the
    layer keeps a random subset of pmod's size and otherwise runs as pmod with routers at init (w = 1).
    """

    def __init__(self, keys: SampleKeys, layer_idx: int, scale: float = 1e-3) -> None:
        super().__init__()
        self.keys, self.layer_idx, self.scale = keys, layer_idx, scale

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden_states.shape  # [B, T, D]
        keys, real = self.keys.keys, self.keys.real
        if keys is None or real is None or real.shape != (batch, length):
            raise RuntimeError("random routing: no per-sample keys for this forward (prefill only, with input_ids)")
        logits = torch.zeros(batch, length, dtype=torch.float32)  # [B, T]
        for b, key in enumerate(keys):
            generator = torch.Generator().manual_seed((key + 1_000_003 * self.layer_idx) & (2**63 - 1))
            n = int(real[b].sum())
            logits[b, real[b].cpu()] = self.scale * (torch.rand(n, generator=generator) - 0.5)
        return logits.to(hidden_states.device)[..., None]  # [B, T, 1]


def apply_random_routing(model: nn.Module, seed: int, **overrides: Any) -> nn.Module:
    """Retrofit pmod (with `overrides`, MoDConfig fields) and replace every MoD layer's router by a
    `SeededRandomRouter` (in place)."""
    from .retrofit import mod_layer_map, retrofit

    retrofit(model, "pmod", **overrides)
    keys = SampleKeys(seed)
    for idx, layer in mod_layer_map(model).items():
        layer.router = SeededRandomRouter(keys, idx)
    model.mod_state.hooks.append(model.register_forward_pre_hook(keys, with_kwargs=True))
    return model


# -- compute matching --------------------------------------------------------------------------------
def pmod_ratios(num_layers: int, overrides: dict[str, Any] | None = None) -> list[float]:
    """Per layer, the keep ratio of the pmod preset (with `overrides`, MoDConfig fields); 1.0 where dense."""
    from .config import preset
    from .schedule import mod_layers

    chosen = mod_layers(preset("pmod", **(overrides or {})), num_layers)
    return [chosen.get(i, 1.0) for i in range(num_layers)]


@dataclass(frozen=True)
class FastVBudget:
    """FastV's budget in the zoo's spec interface (`stages`, `kept_vision`), so that its cost is priced by
    the same `mllm_mod.eval.zoo.matching.spec_cost` as every zoo method: layers ``0 .. prune_layer - 1``
    see every vision token, the later ones `kept` of them."""

    prune_layer: int
    kept: int
    method: str = "fastv"

    def stages(self, num_layers: int) -> list[Any]:
        from .eval.zoo.staged import Stage

        return [Stage(self.prune_layer, float("nan"))]  # the nominal ratio is not used for pricing

    def kept_vision(self, num_layers: int, n_vision: int) -> list[int]:
        return [n_vision if i < self.prune_layer else self.kept for i in range(num_layers)]

    def prune_ratio(self, n_vision: int) -> float:
        """FastV's R: keep ``(kept + 0.5) / n``, so that ``trunc(keep * n) = kept`` exactly in float32."""
        return 1.0 - (self.kept + 0.5) / n_vision

    def label(self) -> str:
        return f"K={self.prune_layer}, kept={self.kept}"

    def budget(self) -> dict[str, object]:
        return {"prune_layer": self.prune_layer, "kept": self.kept}


def tflops_target(shape, n_text: float, n_vision: int, target_ratios: Sequence[float]) -> tuple[int, int]:
    """(decoder FLOPs at `target_ratios`, dense decoder FLOPs) of one sample, `mllm_mod.flops.prefill_cost`."""
    from .flops import prefill_cost

    text = round(n_text)
    layers = len(target_ratios)
    return (prefill_cost(shape, list(target_ratios), text, n_vision).decoder_flops,
            prefill_cost(shape, [1.0] * layers, text, n_vision).decoder_flops)  # fmt: skip


def matched_fastv(shape, n_text: float, n_vision: int, layer: int, target_ratios: Sequence[float]) -> FastVBudget:
    """FastV's budget at pruning layer `layer` whose prefill cost is closest to the cost at `target_ratios`
    (pmod's). The cost is the zoo's (`matching.spec_cost`), so FastV and the zoo's arms are matched to pmod
    by one accounting; `matching.matched_spec` itself searches only the zoo's methods, so the study passes
    FastV's candidates (every kept count 1 .. n - 1) to the same cost here."""
    from .eval.zoo.matching import spec_cost

    target, _ = tflops_target(shape, n_text, n_vision, target_ratios)
    text = round(n_text)
    options = [FastVBudget(layer, k) for k in range(1, n_vision)]
    return min(options, key=lambda spec: abs(spec_cost(shape, spec, text, n_vision) - target))


def matched_prune_ratio(shape, n_text: float, n_vision: int, layer: int, target_ratios: Sequence[float]) -> float:
    """FastV's R (the fraction of vision tokens pruned from layer K on) at pmod's prefill cost (`matched_fastv`)."""
    return matched_fastv(shape, n_text, n_vision, layer, target_ratios).prune_ratio(n_vision)


def budget_match(shape, spec: Any, n_text: float, n_vision: int, target_ratios: Sequence[float]) -> dict[str, Any]:
    """How close `spec`'s predicted prefill cost comes to pmod's: both as ratios of the dense cost, and
    whether they agree within `MATCH_TOLERANCE` (a method whose budgets cannot reach pmod's cost on this
    model is reported as not matched, never dropped)."""
    from .eval.zoo.matching import spec_cost

    target, dense = tflops_target(shape, n_text, n_vision, target_ratios)
    predicted = spec_cost(shape, spec, round(n_text), n_vision) / dense
    return {
        "method": spec.method, "label": spec.label(),
        "budget": spec.budget() if hasattr(spec, "budget") else dataclasses.asdict(spec),
        "predicted_tflops_ratio": predicted, "target_tflops_ratio": target / dense,
        "matched": abs(predicted - target / dense) <= MATCH_TOLERANCE,
    }  # fmt: skip


# -- data and evaluation -----------------------------------------------------------------------------
@dataclass
class EvalSet:
    """Held-out prompt batches (built once, shared by every arm) and their records."""

    batches: list[tuple[list[dict[str, Any]], dict[str, torch.Tensor]]]
    blank: list[tuple[list[dict[str, Any]], dict[str, torch.Tensor]]]
    n_text: float  # mean text tokens per prompt (for compute matching)
    n_vision: int


def prompt_batch(processor, records: Sequence[dict[str, Any]], images: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Left-padded prompts (the chat template up to the assistant turn) for `records` and `images`."""
    processor.tokenizer.padding_side = "left"
    texts = []
    for record in records:
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return processor(images=list(images), text=texts, return_tensors="pt", padding=True)


def interleave(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records reordered round-robin over families, so every batch mixes them."""
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_family[record["family"]].append(record)
    lists = list(by_family.values())
    return [r for group in zip(*lists) for r in group] + [r for lst in lists for r in lst[min(map(len, lists)) :]]


def build_eval_set(processor, test: list[dict[str, Any]], image_folder: str, settings: StudySettings) -> EvalSet:
    from PIL import Image
    from tqdm.auto import tqdm

    from .data.localized import blank_image

    ordered = interleave(test)
    batches = []
    size = settings.eval_batch_size
    for start in tqdm(range(0, len(ordered), size), desc="encode held-out", unit="batch"):
        chunk = ordered[start : start + size]
        images = []
        for record in chunk:
            with Image.open(os.path.join(image_folder, record["image"])) as image:
                images.append(image.convert("RGB"))
        batches.append((chunk, prompt_batch(processor, chunk, images)))
    seen: dict[str, int] = defaultdict(int)
    blank_records = []
    for record in ordered:
        if seen[record["family"]] < settings.n_blank:
            seen[record["family"]] += 1
            blank_records.append(record)
    blank = [
        (
            blank_records[s : s + size],
            prompt_batch(processor, blank_records[s : s + size], [blank_image()] * len(blank_records[s : s + size])),
        )
        for s in range(0, len(blank_records), size)
    ]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    first = batches[0][1]
    real, vision = first["attention_mask"].bool(), first["input_ids"] == image_id  # [B, T]
    n_vision = int(vision[0].sum())
    n_text = float((real & ~vision).sum()) / real.shape[0]
    return EvalSet(batches, blank, n_text, n_vision)


@torch.no_grad()
def accuracy(model: nn.Module, processor, batches, desc: str) -> dict[str, float]:
    """Accuracy per family of the greedy first answer token (every answer is one word)."""
    from tqdm.auto import tqdm

    model.eval()
    tokenizer = processor.tokenizer
    hits: dict[str, list[int]] = defaultdict(list)
    for chunk, batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        predicted = model(**batch, logits_to_keep=1).logits[:, -1].argmax(-1)  # [B]
        for record, token in zip(chunk, predicted.tolist()):
            hits[record["family"]].append(int(token == tokenizer.convert_tokens_to_ids(record["answer"])))
    return {family: sum(v) / len(v) for family, v in sorted(hits.items())}


def measure(model: nn.Module, eval_set: EvalSet, n_batches: int) -> dict[str, Any]:
    """Prefill TFLOPs and KV bytes per sample, measured (`mllm_mod.efficiency`) on held-out batches."""
    from .efficiency import efficiency
    from .retrofit import is_retrofitted

    if not is_retrofitted(model):
        return {"tflops_ratio": 1.0, "kv_ratio": 1.0, "accounting_matches": True}
    reports = [efficiency(model, batch) for _, batch in eval_set.batches[:n_batches]]
    mod_tflops = sum(sum(r.mod_tflops) for r in reports)
    dense_tflops = sum(sum(r.dense_tflops) for r in reports)
    mod_kv = sum(sum(r.mod_kv_bytes) for r in reports)
    dense_kv = sum(sum(r.dense_kv_bytes) for r in reports)
    samples = sum(len(r.mod_tflops) for r in reports)
    return {
        "tflops_ratio": mod_tflops / dense_tflops,
        "kv_ratio": mod_kv / dense_kv,
        "tflops_per_sample": mod_tflops / samples,
        "dense_tflops_per_sample": dense_tflops / samples,
        "kv_bytes_per_sample": mod_kv / samples,
        "dense_kv_bytes_per_sample": dense_kv / samples,
        "layer_ratios": reports[0].layer_ratios,
        "accounting_matches": all(r.accounting_matches for r in reports),
    }


def kept_patches(model: nn.Module, processor, batch: dict[str, torch.Tensor], layer_idx: int) -> list[list[int]]:
    """Per sample, the vision tokens (in picture order) that MoD layer `layer_idx` keeps: 1 kept, 0 skipped."""
    from .kept import kept_vision

    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    return kept_vision(model, batch, image_id)[layer_idx].int().tolist()


# -- training ----------------------------------------------------------------------------------------
def train_config(
    settings: StudySettings, model_dir: str, data: str, image_folder: str, output_dir: str, seed: int, **fields
):
    from .train import load_config

    common = {
        "model": model_dir, "data": data, "image_folder": image_folder, "output_dir": output_dir,
        "batch_size": settings.batch_size, "num_workers": settings.num_workers, "gradient_checkpointing": False,
        "save_steps": 10**6, "logging_steps": settings.logging_steps, "seed": seed, "bf16": False,
        "warmup_ratio": settings.warmup_ratio, "max_length": 512,
    }  # fmt: skip
    return load_config(**{**common, **fields})


def extra_training(model: nn.Module, processor, config) -> dict[str, Any]:
    """The arms' shared extra training of an in-memory `model` (retrofitted or not), with exactly the
    pieces `mllm_mod.train.train` uses: `TrainingArguments` from the config, `set_trainable` (vision
    tower frozen), `ConversationDataset` + `Collator`, `MoDTrainer` (router learning rate)."""
    from .data import Collator, ConversationDataset
    from .train.params import set_trainable
    from .train.recipe import training_arguments
    from .train.trainer import MoDTrainer

    start = time.perf_counter()
    args = training_arguments(config)
    trainable = set_trainable(model, config.freeze_vision_tower, config.routers_only)
    dataset = ConversationDataset(config.data, processor, config.data_options())
    trainer = MoDTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=Collator(processor.tokenizer.pad_token_id),
        processing_class=processor, router_lr=config.router_lr,
    )  # fmt: skip
    output = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "global_step": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_loss": float(output.training_loss),
        "trainable": trainable,
        "seconds": time.perf_counter() - start,
    }


# -- the study ---------------------------------------------------------------------------------------
class Study:
    """One study directory: data, per-seed bases and per-arm results; `run` does what is missing."""

    def __init__(self, out: str | os.PathLike, settings: StudySettings) -> None:
        self.out = Path(out)
        self.settings = settings
        self.data_dir = self.out / "data"

    # layout
    def seed_dir(self, seed: int) -> Path:
        return self.out / f"seed{seed}"

    def arm_path(self, seed: int, arm: str) -> Path:
        return self.seed_dir(seed) / "arms" / f"{arm}.json"

    def done(self, seed: int, arm: str) -> bool:
        return self.arm_path(seed, arm).is_file()

    def depth_path(self, seed: int) -> Path:
        return self.seed_dir(seed) / DEPTH_NAME

    def missing(self, seed: int) -> bool:
        """Whether the seed has an arm (or, with the dense arm, its depth profile) still to run."""
        depth = "dense" in self.settings.arms and not self.depth_path(seed).is_file()
        return depth or not all(self.done(seed, arm) for arm in self.settings.arms)

    def check_settings(self) -> None:
        """Record the settings; refuse to resume a directory made with different ones."""
        path = self.out / "settings.json"
        now = json.loads(json.dumps(self.settings.comparable()))  # as saved: tuples become lists
        if path.is_file():
            # a setting added after the directory was made has there the value older studies had
            saved = {**json.loads(json.dumps(ADDED_SETTINGS)), **json.loads(path.read_text())}
            diffs = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
            if diffs:
                raise ValueError(
                    f"{self.out} holds a study with other settings {diffs} (saved, now); use another --out"
                )
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(path, self.settings.to_dict())

    def data(self) -> dict[str, Any]:
        from .data import localized

        meta = self.data_dir / "meta.json"
        if meta.is_file():
            return json.loads(meta.read_text())
        s = self.settings
        return localized.generate(self.data_dir, s.n_train, s.n_test, seed=s.data_seed, only=s.families)

    def run(self, jobs: int = 1) -> dict[str, Any]:
        """Do what is missing and write the report. `jobs` > 1 runs that many seeds side by side, each in
        its own process (``settings.threads`` threads each) that logs to ``seed{s}/log.txt``; the seeds are
        independent, so the results are the same as one process running them in turn."""
        from tqdm.auto import tqdm

        s = self.settings
        if jobs < 1:
            raise ValueError(f"jobs must be positive, got {jobs}")
        torch.set_num_threads(s.threads)
        self.check_settings()
        meta = self.data()
        seeds = [seed for seed in range(s.seeds) if self.missing(seed)]
        total = sum(not self.done(seed, arm) for seed in seeds for arm in s.arms)
        with tqdm(total=total, desc="study (seed, arm)", unit="arm") as bar:
            if jobs > 1 and len(seeds) > 1:
                self._run_parallel(seeds, jobs, bar)
            else:
                for seed in seeds:
                    self.run_seed(seed, meta, bar)
        return self.report(meta)

    def run_seed(self, seed: int, meta: dict[str, Any], bar: Any = None) -> None:
        """The seed's base (once), then each of its arms not done yet, each result written atomically."""
        from transformers import AutoProcessor

        base = self.base(seed, meta)
        processor = AutoProcessor.from_pretrained(base)  # the same vocabulary for every seed (`meta`)
        test = json.loads((self.data_dir / "test.json").read_text())
        eval_set = build_eval_set(processor, test, str(self.data_dir), self.settings)
        todo = {arm for arm in self.settings.arms if not self.done(seed, arm)}  # what the bar counted
        for arm in self.settings.arms:
            if bar is not None:
                bar.set_postfix_str(f"seed {seed} {arm}")
            if self.done(seed, arm):  # written meanwhile (e.g. by another process running this seed)
                if bar is not None and arm in todo:
                    bar.update(1)
                continue
            write_json(self.arm_path(seed, arm), self.run_arm(seed, arm, processor, eval_set))
            if bar is not None:
                bar.update(1)
        if "dense" in self.settings.arms and not self.depth_path(seed).is_file():
            write_json(self.depth_path(seed), self.depth_profile(seed, processor, eval_set))

    def depth_profile(self, seed: int, processor, eval_set: EvalSet) -> dict[str, Any]:
        """How deep the dense arm still reads the picture: its held-out accuracy with every vision token
        withdrawn from layer K on (VTW's rule, `mllm_mod.eval.zoo.vtw`), for K = 1 .. L-1. Where this stays
        at the dense accuracy from K = 1, the answer is read by layer 0, and no method that keeps layer 0
        dense (pmod, random routing, FastV with K >= 1, ...) can be told apart from another on this task."""
        from transformers import AutoModelForImageTextToText

        from .eval.zoo import apply_zoo
        from .retrofit import unload

        model = AutoModelForImageTextToText.from_pretrained(self.seed_dir(seed) / "dense_model")
        withdrawn: dict[str, dict[str, float]] = {}
        for k in range(1, self.settings.num_layers):
            apply_zoo(model, "vtw", withdraw_layer=k)
            withdrawn[str(k)] = accuracy(model, processor, eval_set.batches, f"vision withdrawn from layer {k}")
            unload(model)
        return {"seed": seed, "withdrawn_from_layer": withdrawn}

    def _run_parallel(self, seeds: list[int], jobs: int, bar: Any) -> None:
        """`run_seed` for each of `seeds`, `jobs` spawned processes at a time (`mllm_mod.jobs`), each logging
        to ``seed{s}/log.txt``; the bar follows the arm files as they appear."""
        from .jobs import Task, run_side_by_side

        def done_now() -> int:
            return sum(self.done(seed, arm) for seed in seeds for arm in self.settings.arms)

        start = done_now()

        def poll() -> None:
            bar.update(done_now() - start - bar.n)

        bar.set_postfix_str(f"{min(jobs, len(seeds))} processes, logs in seed*/log.txt")
        tasks = [
            Task(f"study seed {seed}", run_seed_in_process, (str(self.out), self.settings, seed), self.seed_dir(seed) / "log.txt")
            for seed in seeds
        ]
        run_side_by_side(tasks, jobs, poll)
        poll()

    def base(self, seed: int, meta: dict[str, Any]) -> Path:
        """Train (once) the seed's dense base from random init; returns its directory."""
        from .tiny import tiny_model
        from .train import train
        from .train.recipe import SUMMARY_NAME

        s = self.settings
        base_dir = self.seed_dir(seed) / "base"
        if (base_dir / SUMMARY_NAME).is_file():
            return base_dir
        init_dir = self.seed_dir(seed) / "init"
        checkpoints = sorted(base_dir.glob("checkpoint-*")) if base_dir.is_dir() else []
        if checkpoints and (init_dir / "config.json").is_file():  # an interrupted base run: continue it
            print(f"\n== seed {seed}: dense base, resumed from {checkpoints[-1].name}")
            train(self._base_config(seed, init_dir, base_dir, resume="last"))
            return base_dir
        model, processor = tiny_model(
            "llava", num_layers=s.num_layers, words=meta["vocabulary"], seed=seed, image_size=96, patch_size=8,
            hidden_size=s.hidden_size, intermediate_size=2 * s.hidden_size, initializer_range=s.init_range,
        )  # fmt: skip
        model.save_pretrained(init_dir)
        processor.save_pretrained(init_dir)
        print(f"\n== seed {seed}: dense base, {s.base_epochs} epochs from random init")
        train(self._base_config(seed, init_dir, base_dir))
        return base_dir

    def _base_config(self, seed: int, init_dir: Path, base_dir: Path, resume: str | None = None):
        """The base run: from random init everything trains, unclipped (the demo's recipe); a checkpoint
        every `BASE_SAVE_STEPS` steps so that an interrupted base run resumes."""
        s = self.settings
        return train_config(
            s, str(init_dir), str(self.data_dir / "train.json"), str(self.data_dir), str(base_dir), seed,
            epochs=s.base_epochs, lr=s.base_lr, freeze_vision_tower=False, max_grad_norm=s.base_max_grad_norm,
            batch_size=s.base_batch_size or s.batch_size,
            save_steps=BASE_SAVE_STEPS, save_total_limit=1, resume=resume,
        )  # fmt: skip

    def shape(self, model: nn.Module):
        from .adapters import adapter_for
        from .flops import DecoderShape

        return DecoderShape.from_config(adapter_for(model).text_config(model.config))

    def run_arm(self, seed: int, arm: str, processor, eval_set: EvalSet) -> dict[str, Any]:
        from transformers import AutoModelForImageTextToText, set_seed

        from .eval.baselines import DropSpec, apply_baseline
        from .retrofit import retrofit

        s = self.settings
        print(f"\n== seed {seed}, arm {arm}")
        # what an arm draws before its Trainer seeds (gmod's router init) must not depend on the arms that
        # ran before it in this process: a resumed or parallel study then gives the same arm
        set_seed(seed)
        base_dir = self.seed_dir(seed) / "base"
        dense_dir = self.seed_dir(seed) / "dense_model"
        source = dense_dir if arm in TRAINING_FREE_ARMS else base_dir
        if arm in TRAINING_FREE_ARMS and not dense_dir.is_dir():
            raise FileNotFoundError(
                f"{arm} runs on the dense arm's weights; {dense_dir} is missing (run the dense arm)"
            )
        model = AutoModelForImageTextToText.from_pretrained(source)
        info: dict[str, Any] = {"arm": arm, "seed": seed}
        shape, ratios = self.shape(model), pmod_ratios(s.num_layers, s.mod_overrides)
        fastv_budget = matched_fastv(shape, eval_set.n_text, eval_set.n_vision, s.fastv_layer, ratios)
        fastv = {"prune_layer": s.fastv_layer, "prune_ratio": fastv_budget.prune_ratio(eval_set.n_vision), "seed": seed}
        if arm in ("fastv_ft", "fastv", "random_drop"):
            info["budget"] = budget_match(shape, fastv_budget, eval_set.n_text, eval_set.n_vision, ratios)
        if arm in ("pmod", "pmod_c50", "pmod_c30"):
            layers = [i for i, r in enumerate(ratios) if r < 1.0]
            overrides = (
                {}
                if arm == "pmod"
                else {"schedule": "constant", "layers": layers, "ratio": {"pmod_c50": 0.5, "pmod_c30": 0.3}[arm]}
            )
            retrofit(model, "pmod", **{**s.mod_overrides, **overrides})
        elif arm == "gmod":
            from .arank import arank

            train_records = json.loads((self.data_dir / "train.json").read_text())[:32]
            calib = self._calibration_batches(processor, train_records)
            report = arank(model, calib, max_samples=len(train_records), progress=False)
            report.save(self.seed_dir(seed) / "arank", plot=False)
            from .demo import (
                GMOD_SHORT_RUN,  # prefill judged at 0.5: the reference's 0.005 skips nothing on a short run
            )

            retrofit(model, "gmod", arank=report, **GMOD_SHORT_RUN)
            info["arank_mod_layers"] = report.mod_layers()
        elif arm == "random_routing":
            apply_random_routing(model, seed, **s.mod_overrides)
        elif arm in ("fastv_ft", "fastv"):
            apply_baseline(model, DropSpec.from_fields("fastv", **fastv))
            info["fastv"] = fastv
        elif arm == "random_drop":
            apply_baseline(model, DropSpec.from_fields("random", **fastv))
            info["fastv"] = fastv
        elif arm in ZOO_ARMS:
            from .eval.zoo import apply_zoo
            from .eval.zoo.matching import matched_spec

            spec = matched_spec(arm, shape, eval_set.n_text, eval_set.n_vision, ratios)
            info["budget"] = budget_match(shape, spec, eval_set.n_text, eval_set.n_vision, ratios)
            apply_zoo(model, spec)
        if arm in TRAINED_ARMS:
            config = train_config(
                s, str(base_dir), str(self.data_dir / "train.json"), str(self.data_dir), str(self.seed_dir(seed) / "runs" / arm),
                seed, epochs=s.extra_epochs, lr=s.extra_lr, router_lr=s.router_lr, freeze_vision_tower=True,
            )  # fmt: skip
            info["train"] = extra_training(model, processor, config)
        if arm == "dense":
            model.save_pretrained(dense_dir)
            processor.save_pretrained(dense_dir)
        start = time.perf_counter()
        per_family = accuracy(model, processor, eval_set.batches, f"eval {arm}")
        blank = accuracy(model, processor, eval_set.blank, f"blank {arm}") if eval_set.blank else {}
        info["eval_seconds"] = time.perf_counter() - start
        info.update(
            per_family=per_family,
            accuracy=sum(per_family.values()) / len(per_family),
            blank_per_family=blank,
            blank_control=sum(blank.values()) / len(blank) if blank else None,
            **measure(model, eval_set, s.efficiency_batches),
        )
        if arm in ROUTED_ARMS:
            from .kept import routing_recall

            image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
            info["routing"] = routing_recall(model, eval_set.batches, str(self.data_dir), image_id, ROUTING_IMAGES)
        if arm in PICTURE_ARMS and seed == 0:
            chunk, batch = self._picture_batch(processor, eval_set)
            info["kept_patches"] = {
                "layer": s.picture_layer,
                "ids": [r["id"] for r in chunk],
                "questions": [r["conversations"][0]["value"].replace("<image>", "").strip() for r in chunk],
                "images": [r["image"] for r in chunk],
                "masks": kept_patches(model, processor, batch, s.picture_layer),
            }
        print(
            f"seed {seed} {arm}: accuracy {info['accuracy']:.3f}, blank {info['blank_control']}, TFLOPs x{info['tflops_ratio']:.3f}"
        )
        return info

    def _calibration_batches(self, processor, records: list[dict[str, Any]]) -> Iterator[dict[str, torch.Tensor]]:
        from PIL import Image

        for start in range(0, len(records), 8):
            chunk = records[start : start + 8]
            images = []
            for record in chunk:
                with Image.open(self.data_dir / record["image"]) as image:
                    images.append(image.convert("RGB"))
            yield prompt_batch(processor, chunk, images)

    def _picture_batch(self, processor, eval_set: EvalSet):
        from PIL import Image

        chunk = [r for records, _ in eval_set.batches for r in records][: self.settings.picture_images]
        images = []
        for record in chunk:
            with Image.open(self.data_dir / record["image"]) as image:
                images.append(image.convert("RGB"))
        return chunk, prompt_batch(processor, chunk, images)

    # -- aggregation ---------------------------------------------------------------------------------
    def report(self, meta: dict[str, Any]) -> dict[str, Any]:
        from . import __version__

        s = self.settings
        arms: dict[str, Any] = {}
        for arm in s.arms:
            runs = [json.loads(self.arm_path(seed, arm).read_text()) for seed in range(s.seeds) if self.done(seed, arm)]
            if runs:
                arms[arm] = aggregate(runs)
        chance = {f: info["chance"] for f, info in meta["families"].items()}
        import transformers

        profiles = [json.loads(self.depth_path(seed).read_text()) for seed in range(s.seeds) if self.depth_path(seed).is_file()]
        results = {
            "arms": arms,
            "depth": depth_summary(profiles) if profiles else {},
            "settings": {
                **s.to_dict(),
                "chance": chance,
                "mean_chance": sum(chance.values()) / len(chance),
                "counts": meta["counts"],
            },
            "versions": {
                "mllm_mod": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "git_commit": git_commit(),
            },
            "complete": all(len(a["seeds"]) == s.seeds for a in arms.values()) and len(arms) == len(s.arms),
        }
        write_json(self.out / RESULTS_NAME, results)
        table = study_table(results)
        (self.out / TABLE_NAME).write_text(table + "\n")
        print(table)
        pareto_plot(results, str(self.out / PARETO_NAME))
        pictures = {
            arm: json.loads(self.arm_path(0, arm).read_text()).get("kept_patches")
            for arm in PICTURE_ARMS
            if self.done(0, arm)
        }
        if pictures:
            patches_plot(pictures, str(self.data_dir), str(self.out / PATCHES_NAME))
        return results


def git_commit() -> str | None:
    """The commit of the source tree the study ran from (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def write_json(path: Path, data: Any) -> None:
    """Atomically: an interrupted write leaves no file (what a resumed study trusts), and two processes
    writing the same file never share a temporary one."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        f.write(json.dumps(data, indent=2))
    os.replace(f.name, path)


def depth_summary(profiles: list[dict[str, Any]]) -> dict[str, Any]:
    """Per K: the mean over families of each seed's accuracy with vision withdrawn from layer K, as mean
    ± std over seeds, and per family."""
    out: dict[str, Any] = {}
    for k in profiles[0]["withdrawn_from_layer"]:
        runs = [p["withdrawn_from_layer"][k] for p in profiles]
        mean, std = mean_std([sum(r.values()) / len(r) for r in runs])
        out[k] = {"mean": mean, "std": std, "per_family": per_family_mean_std(runs), "seeds": [p["seed"] for p in profiles]}
    return out


def per_family_mean_std(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{family: {"mean", "std"}} over seeds, from each seed's {family: accuracy}."""
    return {f: dict(zip(("mean", "std"), mean_std([r[f] for r in runs]))) for f in sorted(runs[0])}


def pm(stat: dict[str, float]) -> str:
    """A table cell: "mean ± std" of a {"mean", "std"} pair."""
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of one arm's per-seed results."""
    mean, std = mean_std([r["accuracy"] for r in runs])
    blank = [r["blank_control"] for r in runs if r["blank_control"] is not None]
    out = {
        "accuracy_mean": mean,
        "accuracy_std": std,
        "per_family": per_family_mean_std([r["per_family"] for r in runs]),
        "blank_control": statistics.fmean(blank) if blank else None,
        "tflops_ratio": statistics.fmean(r["tflops_ratio"] for r in runs),
        "kv_ratio": statistics.fmean(r["kv_ratio"] for r in runs),
        "seeds": [
            {k: r.get(k) for k in ("seed", "accuracy", "per_family", "blank_control", "tflops_ratio", "kv_ratio", "accounting_matches", "fastv", "budget", "arank_mod_layers", "train", "routing")}
            for r in runs
        ],
    }  # fmt: skip
    routed = [r["routing"] for r in runs if r.get("routing")]
    if routed:  # per layer over the seeds that route it (gamma-MoD's ARank picks layers per seed)
        layers = sorted({layer for r in routed for layer in r}, key=int)
        out["routing"] = {
            layer: {
                **{key: mean_or_none([r[layer][key] for r in routed if layer in r]) for key in ("kept", "object_recall", "named_recall")},
                "seeds": sum(layer in r for r in routed),
            }
            for layer in layers
        }  # fmt: skip
    return out


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean of `values`, or None when any is None."""
    return None if any(v is None for v in values) else statistics.fmean(values)


def study_table(results: dict[str, Any]) -> str:
    from .tables import markdown_table

    arms = results["arms"]
    chance = results["settings"]["chance"]
    families = sorted(chance)
    header = (
        "arm",
        "seeds",
        "mean acc",
        *families,
        "blank control",
        "TFLOPs ratio",
        "KV ratio",
        "budget (training-free / FastV)",
    )
    rows = [
        header,
        (
            "chance",
            "",
            f"{results['settings']['mean_chance']:.3f}",
            *(f"{chance[f]:.3f}" for f in families),
            "",
            "",
            "",
            "",
        ),
    ]
    unmatched = []
    for name, arm in arms.items():
        fam = arm["per_family"]
        budget = arm["seeds"][0].get("budget") if arm["seeds"] else None
        note = ""
        if budget:
            note = budget["label"]
            if not budget["matched"]:
                note += f" (closest budget: cannot reach pmod's TFLOPs, x{budget['predicted_tflops_ratio']:.3f} vs x{budget['target_tflops_ratio']:.3f})"
                unmatched.append(name)
        rows.append((
            name, str(len(arm["seeds"])), pm({"mean": arm["accuracy_mean"], "std": arm["accuracy_std"]}),
            *(pm(fam[f]) for f in families),
            "" if arm["blank_control"] is None else f"{arm['blank_control']:.3f}",
            f"{arm['tflops_ratio']:.3f}", f"{arm['kv_ratio']:.3f}", note,
        ))  # fmt: skip
    status = "complete" if results.get("complete") else "PARTIAL (not every arm has every seed)"
    text = f"Study {status}; accuracy mean ± std over seeds.\n\n" + markdown_table(rows)
    if unmatched:
        text += f"\n\nNot at pmod's TFLOPs (no budget of the method reaches it on this model): {', '.join(unmatched)}."
    depth = results.get("depth") or {}
    if depth and "dense" in arms:
        dense = arms["dense"]
        rows = [
            ("vision tokens", "seeds", "mean acc", *families),
            ("all, every layer (dense)", str(len(dense["seeds"])),
             pm({"mean": dense["accuracy_mean"], "std": dense["accuracy_std"]}), *(pm(dense["per_family"][f]) for f in families)),
        ]  # fmt: skip
        for k, d in depth.items():
            rows.append((f"withdrawn from layer {k}", str(len(d["seeds"])), pm(d), *(pm(d["per_family"][f]) for f in families)))
        text += (
            "\n\nHow deep the dense arm reads the picture (every vision token withdrawn from layer K on, VTW's "
            "rule, no training). Where accuracy holds from K = 1, the answer is read by layer 0, and methods that "
            "keep layer 0 dense cannot be ranked on this task.\n\n" + markdown_table(rows)
        )
    routed = {name: arm["routing"] for name, arm in arms.items() if arm.get("routing")}
    if routed:

        def cell(value: float | None) -> str:
            return "" if value is None else f"{value:.3f}"

        rows = [("arm", "layer", "seeds", "kept", "object recall", "named-colour recall")]
        for name, layers in routed.items():
            rows += [
                (name, layer, str(r["seeds"]), cell(r["kept"]), cell(r["object_recall"]), cell(r["named_recall"]))
                for layer, r in layers.items()
            ]
        text += (
            "\n\nWhat the routers keep (`mllm_mod.kept`, mean over the seeds that route the layer, the first "
            f"{ROUTING_IMAGES} held-out pictures): the share of vision tokens kept, and of the patches holding an "
            "object, or the colour the question names, the share kept. A router no better than chance keeps "
            "them at the `kept` share.\n\n" + markdown_table(rows)
        )
    return text


def pareto_plot(results: dict[str, Any], path: str) -> None:
    """Mean accuracy (std bars over seeds) against the prefill TFLOPs ratio, one point per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    arms = sorted(results["arms"].items(), key=lambda item: item[1]["tflops_ratio"])
    markers = "osD^v<>pPX*hH8"
    groups: dict[tuple[float, float], list[str]] = {}  # arms on one spot share one label
    for i, (name, arm) in enumerate(arms):
        x, y, err = arm["tflops_ratio"], arm["accuracy_mean"], arm["accuracy_std"]
        ax.errorbar([x], [y], yerr=[err], fmt=markers[i % len(markers)], capsize=4, label=name, alpha=0.85)
        groups.setdefault((round(x, 2), round(y, 2)), []).append(name)
    spots = sorted(groups.items())
    for (x, y), names in spots:  # a label only where it cannot cover another spot's; the legend names all
        crowded = any(abs(x - x2) < 0.04 and abs(y - y2) < 0.06 for (x2, y2), _ in spots if (x2, y2) != (x, y))
        if not crowded:
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(6, 5), fontsize=7)
    ax.axhline(results["settings"]["mean_chance"], color="k", linestyle=":", label="chance")
    ax.set_xlabel("prefill TFLOPs / dense (measured)")
    ax.set_ylabel("held-out accuracy (mean over families)")
    seeds = max(len(arm["seeds"]) for _, arm in arms)
    status = "" if results.get("complete") else " — PARTIAL"
    ax.set_title(f"accuracy vs compute, mean ± std over {seeds} seed(s){status}", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def patches_plot(pictures: dict[str, dict[str, Any] | None], image_folder: str, path: str) -> None:
    """Held-out pictures with the patches each arm keeps at one deep layer (skipped patches dimmed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from .data.localized import CELL, GRID

    pictures = {k: v for k, v in pictures.items() if v}
    first = next(iter(pictures.values()))
    n = len(first["images"])
    fig, axes = plt.subplots(n, 1 + len(pictures), figsize=(2.6 * (1 + len(pictures)), 2.7 * n), squeeze=False)
    for i in range(n):
        image = np.asarray(Image.open(os.path.join(image_folder, first["images"][i])).convert("RGB"), dtype=np.float32)
        axes[i][0].imshow(image.astype(np.uint8))
        axes[i][0].set_title(first["questions"][i], fontsize=6)
        for j, (arm, info) in enumerate(pictures.items(), start=1):
            mask = np.asarray(info["masks"][i], dtype=np.float32).reshape(GRID, GRID)
            shade = np.kron(mask, np.ones((CELL, CELL)))[..., None]  # [H, W, 1]
            axes[i][j].imshow((image * (0.25 + 0.75 * shade)).astype(np.uint8))
            axes[i][j].set_title(f"{arm}: layer {info['layer']} keeps {int(mask.sum())}/{mask.size}", fontsize=7)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


CROSS_CHECK_NAME = "cross_check.json"


def cross_check(
    out: str | os.PathLike, seed: int = 0, arm: str = "dense", per_family: int = 100, batch_size: int = 16
) -> dict[str, Any]:
    """The study's accuracy of an arm of `seed`, recomputed on the first `per_family` held-out questions of
    every family two ways: the study's own scorer (greedy first answer token) and lmms-eval through the
    project's plugin (`mllm_mod.eval.lmms_plugin.MoDLMM`) with the synthetic tasks' generation template
    (exact match of the generated answer). `arm`: ``dense`` (the saved ``dense_model``), or a training-free
    arm the plugin can apply from its model args (``fastv`` and the zoo's methods) at the budget the study
    used for that seed, on the same weights. Written to ``cross_check.json`` (dense) or
    ``cross_check_{arm}.json``."""
    import datasets
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .eval.lmms_plugin import MoDLMM
    from .eval.synthetic import TEMPLATES

    root = Path(out)
    model_dir = root / f"seed{seed}" / "dense_model"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} is missing: run the study's dense arm for seed {seed} first")
    method = cross_check_method(root, seed, arm)  # (preset, model args) or None for dense
    test = json.loads((root / "data" / "test.json").read_text())
    seen: dict[str, int] = defaultdict(int)
    records = []
    for record in test:
        if seen[record["family"]] < per_family:
            seen[record["family"]] += 1
            records.append(record)
    work = root / "cross_check"
    task_dir = work / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    for family in sorted(seen):
        rows = []
        for r in records:
            if r["family"] == family:
                with Image.open(root / "data" / r["image"]) as image:
                    question = r["conversations"][0]["value"].replace("<image>", "").strip()
                    rows.append(
                        {"id": r["id"], "question": question, "answer": r["answer"], "image": image.convert("RGB")}
                    )
        data = datasets.Dataset.from_list(rows).cast_column("image", datasets.Image())
        datasets.DatasetDict({"test": data}).save_to_disk(str(work / "data" / family))
        name = f"mllm_mod_localized_{family}"
        lines = [
            f"include: {TEMPLATES / '_generation.yaml'}",
            f"task: {name}",
            f"dataset_path: {work / 'data' / family}",
        ]
        (task_dir / f"{name}.yaml").write_text("\n".join(lines) + "\n")
        tasks.append(name)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    if method is not None:
        from .eval.baselines import apply_baseline

        apply_baseline(model, method[0], **method[1])
    batches = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = [Image.open(root / "data" / r["image"]).convert("RGB") for r in chunk]
        batches.append((chunk, prompt_batch(processor, chunk, images)))
    own = accuracy(model, processor, batches, "cross-check: study scorer")
    del model
    manager = TaskManager("WARNING", include_path=[str(task_dir)], include_defaults=False)
    model_args = {} if method is None else {"preset": method[0], **method[1]}
    lm = MoDLMM(pretrained=str(model_dir), batch_size=batch_size, device="cpu", **model_args)
    res = evaluator.simple_evaluate(model=lm, tasks=tasks, task_manager=manager)
    lmms = {t[len("mllm_mod_localized_") :]: float(res["results"][t]["exact_match,none"]) for t in tasks}
    result = {
        "seed": seed, "arm": arm, "model_args": model_args, "per_family": per_family, "study_scorer": own,
        "lmms_eval": lmms, "max_abs_difference": max(abs(own[f] - lmms[f]) for f in own),
    }  # fmt: skip
    name = CROSS_CHECK_NAME if arm == "dense" else f"cross_check_{arm}.json"
    write_json(root / name, result)
    return result


def cross_check_method(root: Path, seed: int, arm: str) -> tuple[str, dict[str, Any]] | None:
    """The plugin's preset and model args for a training-free arm at the budget the study gave it on `seed`
    (None for ``dense``); other arms are refused with the reason."""
    check_cross_check_arm(arm)
    if arm == "dense":
        return None
    path = root / f"seed{seed}" / "arms" / f"{arm}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the study's {arm} arm for seed {seed} first")
    info = json.loads(path.read_text())
    if arm == "fastv":
        return "fastv", {"prune_layer": info["fastv"]["prune_layer"], "prune_ratio": info["fastv"]["prune_ratio"]}
    return arm, dict(info["budget"]["budget"])  # the budget() fields: the plugin's model args, as recorded


CROSS_CHECK_ARMS = ("dense", "fastv", *ZOO_ARMS)  # the arms on the dense weights the plugin applies from model args


def check_cross_check_arm(arm: str) -> None:
    if arm not in CROSS_CHECK_ARMS:
        raise ValueError(
            f"cross-check {arm!r}: the study keeps the weights of the dense arm only; the arms that run on them and "
            f"that the plugin applies from model args are {', '.join(CROSS_CHECK_ARMS)}"
        )


def run_seed_in_process(out: str, settings: StudySettings, seed: int) -> None:
    """One seed of the study (`Study.run_seed`), in a process of its own (`mllm_mod.jobs`)."""
    torch.set_num_threads(settings.threads)
    study = Study(out, settings)
    study.run_seed(seed, json.loads((study.data_dir / "meta.json").read_text()))


def default_jobs(settings: StudySettings) -> int:
    """Seeds side by side: as many as the CPU cores hold at ``settings.threads`` threads each."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(settings.seeds, cores // max(1, settings.threads)))


def run(out: str, settings: StudySettings | None = None, jobs: int = 1) -> dict[str, Any]:
    """Run (or resume) the study in `out` (`jobs` seeds side by side); returns the aggregated results."""
    return Study(out, settings or StudySettings()).run(jobs)


__all__ = [
    "ARMS", "ZOO_ARMS", "FastVBudget", "SeededRandomRouter", "Study", "StudySettings", "apply_random_routing",
    "budget_match", "default_jobs", "matched_fastv", "matched_prune_ratio", "pmod_ratios", "run",
]  # fmt: skip
