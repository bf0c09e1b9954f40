"""The lmms-eval (0.7.x) model plugin: ``lmms-eval --model mllm_mod --model_args pretrained=ckpt/``.

Registered through the ``lmms_eval.models`` entry point (`mllm_mod.eval.manifests`), so lmms-eval is not edited.
Model id ``mllm_mod`` has two classes: `MoDLMM` (simple: generation, loglikelihood / multiple choice,
multi-round) and `MoDLMMChat` (chat: tasks as ``doc_to_messages``). lmms-eval 0.7.3 resolves an id with
both to the chat class, and chat tasks cannot make loglikelihood requests, so run multiple-choice tasks
with ``--force_simple`` (the Python API and ``mllm-mod eval`` use the simple class).

Model args (``--model_args k=v,...``; every value may arrive as a string):
    pretrained  a full MoD checkpoint (``model.save_pretrained`` of a retrofitted model) or a plain base
                model directory / hub id (its ``config.json`` names the transformers architecture)
    mod         a MoD adapter directory (``mllm_mod.save_mod``) loaded onto the base model
    preset      retrofit on the fly: a MoD preset (``pmod``, ``gmod``, ``videomod``; initial routers) or a
                training-free baseline (``fastv``, ``random``; see `mllm_mod.eval.baselines`)
    prune_layer, prune_ratio  the baselines' K (default 2) and R, the fraction of vision tokens pruned
                (FastV's names; default 0.5). ``keep_ratio`` is refused (it meant the fraction kept).
                ``preset`` may also be a method of the training-free zoo (`mllm_mod.eval.zoo`), with its
                budget as its paper names it (each defaults to the paper's):
    layer_list, lam  ``pdrop``: stage boundaries (``8;16;24``; default: 8, 16, 24 of 32 layers, scaled)
                and lambda, the fraction of the image tokens each boundary keeps (0.5)
    withdraw_layer  ``vtw``: K, the first layer without vision tokens (default: 15 of 32 layers, scaled)
    subset_ratio  ``divprune``: the fraction of the vision tokens retained (0.098)
    pruned_layer, reduction_ratio, pivot_image_token, pivot_text_token  ``dart``: K (2), the fraction of
                image tokens pruned (0.778), the image and text pivots (4, 4)
    dominant, contextual  ``visionzip``: dominant tokens per image, CLS included (54), and contextual
                (merged) tokens per image (10)
    dense       ``true``: the same code path without MoD (a full checkpoint is unloaded, mod/preset ignored)
    dtype, attn_implementation, device, batch_size, max_new_tokens
    num_frames  frames sampled uniformly from each clip a task gives as a video file (default 8)
    efficiency_out  a JSON file the plugin writes its measured efficiency to when lmms-eval is done
                (``FILE.rank{i}.json`` per process under ``accelerate launch -m lmms_eval``)

Known lmms-eval 0.7.3 behaviours this plugin works with (pinned by tests/test_eval_plugin.py):
    * results are passed through ``unwrap_generation_output``, which stringifies a ``(float, bool)``
      tuple: loglikelihood results are returned wrapped as ``GenerationResult(text=(nll, is_greedy))``;
    * multiple choice picks ``argmin`` of the returned values: we return the negative log-likelihood;
    * ``lmms.clean()`` deletes every ``nn.Module`` attribute: overridden to free memory only, so a plugin
      object can be evaluated again and its meter read afterwards;
    * ``--batch_size`` arrives as a string (and ``auto`` is not supported here: it raises); giving
      ``batch_size`` in ``--model_args`` as well is a duplicate keyword (the CLI always passes it);
    * the CLI exits 0 when the evaluation fails unless ``--verbosity DEBUG``; included tasks named like
      built-ins are silently shadowed (both handled outside the plugin: docs/EVALUATION.md).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from PIL import Image
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ..cache import kv_entries
from ..compat import output_cache
from ..data.conversation import template_text_kwargs
from ..data.media import video_processor_kwargs
from .baselines import BASELINES, RENAMED, DropSpec, ranking_at
from .meter import FirstStepTimer, Meter, prefill_flops, prompt_kv_bytes, prompt_tokens_per_layer, synchronize, windowed
from .zoo import ZOO, ZooSpec, zoo_spec

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_NUM_FRAMES = 8
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "none", "")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")
Visual = Image.Image | np.ndarray  # a picture, or the [F, H, W, 3] uint8 frames of a clip


# -- model args ------------------------------------------------------------------------------------
def as_bool(value: bool | str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE or text in FALSE:
        return text in TRUE
    raise ValueError(f"{name} must be true or false, got {value!r}")


def as_batch_size(value: int | str) -> int:
    """lmms-eval passes ``--batch_size`` through as the string the user typed."""
    text = str(value).strip()
    if text.startswith("auto"):
        raise ValueError("batch_size='auto' is not supported by the mllm_mod plugin; pass an integer")
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"batch_size must be a positive integer, got {value!r}") from None
    if size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {value!r}")
    return size


def as_dtype(value: str | torch.dtype | None) -> torch.dtype | str | None:
    if value is None or isinstance(value, torch.dtype) or value == "auto":
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be auto or a torch dtype name (bfloat16, float16, float32), got {value!r}")
    return dtype


def load_model(
    pretrained: str,
    mod: str | None = None,
    preset: str | None = None,
    dense: bool = False,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    baseline: DropSpec | ZooSpec | None = None,
) -> tuple[torch.nn.Module, Any]:
    """(model, processor) as the model args describe, on the CPU; see the module docstring. `preset` is
    a MoD preset; a token-dropping baseline comes as `baseline` (a `DropSpec`) and applies to a base model
    or to a full MoD checkpoint's weights with its MoD layers taken out."""
    import transformers

    import mllm_mod
    from mllm_mod.retrofit import CONFIG_KEY, model_class

    from .baselines import apply_baseline

    if sum(x is not None and x != "" for x in (mod, preset, baseline)) > 1:
        raise ValueError("give one of mod= (a trained adapter) and preset= (retrofit on the fly), not both")
    hf_kwargs: dict[str, Any] = {}
    if dtype is not None:
        hf_kwargs["dtype"] = dtype
    if attn_implementation:
        hf_kwargs["attn_implementation"] = attn_implementation
    config_path = os.path.join(pretrained, "config.json")
    raw: dict[str, Any] = {}
    if os.path.isfile(config_path):
        with open(config_path) as f:
            raw = json.load(f)
    if CONFIG_KEY in raw:
        if mod or preset:
            raise ValueError(f"{pretrained} is already a MoD checkpoint; mod=/preset= apply to a base model only")
        model = mllm_mod.from_pretrained(pretrained, **hf_kwargs)
        if dense or baseline is not None:  # the checkpoint's own weights, without its MoD layers
            mllm_mod.unload(model)
    else:
        cls = model_class(pretrained, default=transformers.AutoModelForImageTextToText)
        model = cls.from_pretrained(pretrained, **hf_kwargs)
        if not dense and mod:
            mllm_mod.load_mod(model, mod)
        elif not dense and preset:
            mllm_mod.retrofit(model, preset)
            warn_if_untrained(model)
    if not dense and baseline is not None:
        apply_baseline(model, baseline)
    processor = transformers.AutoProcessor.from_pretrained(pretrained)
    return model.eval(), processor


def warn_if_untrained(model: torch.nn.Module) -> None:
    """A preset retrofitted on the fly has fresh routers: say so where they change the outputs (w != 1)."""
    from ..retrofit import get_state
    from ..router import fresh_weight

    config = get_state(model).config
    w = fresh_weight(config)
    if w != 1.0:
        logger.warning(
            "preset %r retrofitted on the fly: its fresh routers give every routed token the weight w = %g "
            "(%s weighting), so the model is not the dense one and not a trained MoD model either; fine-tune it "
            "(mllm-mod train) before evaluating, or evaluate a trained checkpoint",
            config.preset, w, config.weighting,
        )


def as_visual(visual: Any, task: str, num_frames: int) -> Visual:
    """A task's visual as an RGB picture, or as the [F, H, W, 3] frames of a clip (`num_frames` sampled
    uniformly with `mllm_mod.data.load_video`). Audio and other kinds are refused."""
    if isinstance(visual, Image.Image):
        return visual.convert("RGB")
    suffix = os.path.splitext(str(visual))[1].lower() if isinstance(visual, (str, os.PathLike)) else ""
    if suffix in IMAGE_SUFFIXES:
        return Image.open(visual).convert("RGB")
    if suffix in VIDEO_SUFFIXES:
        from mllm_mod.data import load_video

        return load_video(visual, sample_id=task, num_frames=num_frames)  # [F, H, W, 3] uint8
    raise NotImplementedError(
        f"task {task!r} gives a {type(visual).__name__} visual ({str(visual)[:80]!r}); the mllm_mod plugin "
        f"reads pictures (PIL or {'/'.join(IMAGE_SUFFIXES)}) and clips ({'/'.join(VIDEO_SUFFIXES)})"
    )


def is_video(visual: Visual) -> bool:
    return isinstance(visual, np.ndarray)


def generation_kwargs(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> tuple[dict[str, Any], list[str]]:
    """(kwargs HF ``generate`` knows, the task's ``until`` strings). Other keys (``image_aspect_ratio``,
    ...) are dropped; temperature 0 means greedy."""
    gen = dict(gen_kwargs)
    until = gen.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    known = set(GenerationConfig().to_dict())
    dropped = sorted(k for k in gen if k not in known)
    if dropped:
        logger.debug("ignoring generation kwargs HF generate does not know: %s", dropped)
    gen = {k: v for k, v in gen.items() if k in known and v is not None}
    temperature = float(gen.get("temperature", 0.0) or 0.0)
    if "do_sample" not in gen:
        gen["do_sample"] = temperature > 0
    if not gen["do_sample"]:
        for key in ("temperature", "top_p", "top_k"):
            gen.pop(key, None)
    gen.setdefault("max_new_tokens", default_max_new_tokens)
    gen["max_new_tokens"] = int(gen["max_new_tokens"])
    return gen, until


def cut_at(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


def special_tokens(tokenizer) -> list[str]:
    """Every special token's text (BOS/EOS/PAD, chat markers such as ``<|im_end|>``, image placeholders)."""
    added = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    return sorted(set(tokenizer.all_special_tokens) | set(added), key=len, reverse=True)


def decode_until(tokenizer, ids: torch.Tensor, until: Sequence[str]) -> list[str]:
    """Texts of generated ids [B, N], each cut at its first stop string. A stop string that is a special
    token (``<|im_end|>``, ``</s>``) is one atomic token, so it is matched on the ids and the row is cut
    there; the rest is decoded without special tokens (padding, markers) and cut at the other stop
    strings. (Decoding without special tokens first would never see them: the text ran on.)"""
    specials = set(special_tokens(tokenizer))
    stop_ids = {tokenizer.convert_tokens_to_ids(s) for s in until if s in specials}
    out = []
    for row in ids.tolist():
        end = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
        out.append(cut_at(tokenizer.decode(row[:end], skip_special_tokens=True), until))
    return out


class StopOnStrings(StoppingCriteria):
    """Per-row stop once the generated text, special tokens included, contains one of `until`."""

    def __init__(self, tokenizer, until: Sequence[str], prompt_len: int) -> None:
        self.tokenizer, self.until, self.prompt_len = tokenizer, [s for s in until if s], prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=False)  # B strings
        done = [any(s in text for s in self.until) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # [B]


def continuation_lengths(tokenizer, contexts: Sequence[str], continuations: Sequence[str]) -> list[int]:
    """Tokens of each continuation, counted as lm-eval / lmms-eval do: trailing whitespace of the context
    moves to the continuation, context + continuation is tokenized as one text, and the continuation is
    the tokens after the context's own. (Tokenizing the continuation alone is wrong with BPE and
    SentencePiece: merges cross the boundary, e.g. ``": "`` + ``"A"`` -> ``":"``, ``" A"``.) Images expand
    inside the context, so the plain tokenizer gives the continuation's length."""
    out = []
    for context, continuation in zip(contexts, continuations):
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        n = len(tokenizer(context + continuation).input_ids) - len(tokenizer(context).input_ids)
        if n < 1:
            raise ValueError(f"continuation {continuation!r} adds no tokens to its context")
        out.append(n)
    return out


# -- the model -------------------------------------------------------------------------------------
class MoDLMM(lmms):
    """An HF LLaVA-family model with (or without) MoD layers, as an lmms-eval model."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        mod: str | None = None,
        preset: str | None = None,
        prune_layer: int | str = 2,
        prune_ratio: float | str = 0.5,
        layer_list: str | None = None,
        lam: float | str | None = None,
        withdraw_layer: int | str | None = None,
        subset_ratio: float | str | None = None,
        pruned_layer: int | str | None = None,
        reduction_ratio: float | str | None = None,
        pivot_image_token: int | str | None = None,
        pivot_text_token: int | str | None = None,
        dominant: int | str | None = None,
        contextual: int | str | None = None,
        dense: bool | str = False,
        dtype: str | torch.dtype | None = "auto",
        attn_implementation: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | str | None = None,  # passed by lmms-eval; batches are fixed-size here
        max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
        num_frames: int | str = DEFAULT_NUM_FRAMES,
        efficiency_out: str | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        for name in unknown:
            if name in RENAMED:
                raise TypeError(f"model arg {name}= is not accepted (it was ambiguous); use {RENAMED[name]}")
        if unknown:
            raise TypeError(f"unknown mllm_mod model args: {sorted(unknown)}")
        from accelerate import Accelerator

        accelerator = Accelerator()
        if device is None or device == "":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        if accelerator.num_processes > 1:  # `accelerate launch -m lmms_eval`: one model replica per process
            if self._device.type == "cuda":
                self._device = torch.device("cuda", accelerator.local_process_index)
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        self.accelerator = accelerator
        self.batch_size_per_gpu = as_batch_size(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.num_frames = int(num_frames)
        self.dense = as_bool(dense, "dense")
        baseline = None
        if preset in BASELINES:
            baseline, preset = DropSpec(str(preset), int(prune_layer), float(prune_ratio)), None
        budget = {
            "layer_list": layer_list,
            "lam": lam,
            "withdraw_layer": withdraw_layer,
            "subset_ratio": subset_ratio,
            "pruned_layer": pruned_layer,
            "reduction_ratio": reduction_ratio,
            "pivot_image_token": pivot_image_token,
            "pivot_text_token": pivot_text_token,
            "dominant": dominant,
            "contextual": contextual,
        }
        if preset in ZOO:
            baseline, preset = zoo_spec(str(preset), **budget), None
        elif any(v is not None and v != "" for v in budget.values()):
            raise TypeError(f"model args {[k for k, v in budget.items() if v]} are the budgets of preset={'|'.join(ZOO)}")
        self.model, self.processor = load_model(
            str(pretrained),
            mod or None,
            preset or None,
            self.dense,
            as_dtype(dtype),
            attn_implementation or None,
            baseline,
        )
        self.model.to(self._device)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # batched generation; loglikelihood scores the right end
        self.pretrained = pretrained
        self.meter = Meter()
        self.warmed: set[str] = set()  # kinds of timed call ("generate", "score") already warmed up
        self.efficiency_out = efficiency_out

    # lmms-eval reads these
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def clean(self) -> None:
        """lmms-eval calls this after the last request; the base class deletes the model here."""
        self.write_efficiency()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def write_efficiency(self) -> None:
        if not self.efficiency_out:
            return
        path = self.efficiency_out
        if self.world_size > 1:
            root, ext = os.path.splitext(path)
            path = f"{root}.rank{self.rank}{ext or '.json'}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"meter": self.meter.to_dict(), "summary": self.meter.summary()}, f, indent=2)

    # -- inputs ------------------------------------------------------------------------------------
    def prompt(self, context: str, visuals: Sequence[Visual]) -> str:
        """The model's chat prompt for one user turn: the visuals (pictures, clips) before the text."""
        tokens = [getattr(self.processor, name, None) for name in ("image_token", "video_token")]
        if any(t and t in context for t in tokens):  # the task placed the visuals itself
            visuals = []
        parts = [{"type": "video" if is_video(v) else "image"} for v in visuals]
        if getattr(self.processor, "chat_template", None):
            return self.chat_prompt([{"role": "user", "content": [*parts, {"type": "text", "text": context}]}])
        placeholders = [tokens[1] if p["type"] == "video" else tokens[0] for p in parts]
        return "\n".join([*(t or "<image>" for t in placeholders), context])

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def visuals(self, doc_to_visual: Callable | None, task: str, split: str, doc_id: int) -> list[Visual]:
        if doc_to_visual is None:
            return []
        raw = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        return [as_visual(v, task, self.num_frames) for v in raw]

    def encode(self, texts: list[str], visuals: list[list[Visual]]) -> dict[str, torch.Tensor]:
        """Processor output for a batch, left padded, on the device (floating tensors in the model dtype).
        `visuals`: each prompt's pictures and clips. Pictures go to the processor as one list per prompt (a
        flat list is one sample's pictures to SmolVLM / Idefics3); clips too, with their timing
        (`mllm_mod.data.media.video_processor_kwargs`)."""
        per_prompt = [[v for v in vs if not is_video(v)] for vs in visuals]
        images = per_prompt if any(per_prompt) else None
        videos = [[v for v in vs if is_video(v)] for vs in visuals]
        if any(videos) and getattr(self.processor, "video_processor", None) is None:
            raise NotImplementedError(f"{type(self.processor).__name__} takes no videos; use a video-capable model")
        inputs = self.processor(
            text=texts, images=images, padding=True, return_tensors="pt", **video_processor_kwargs(videos),
            **template_text_kwargs(self.tokenizer, texts),  # no second BOS after the template's
        )
        dtype = self.model.dtype
        return {k: v.to(self._device, dtype=dtype if v.is_floating_point() else None) for k, v in inputs.items()}

    def progress(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=self.rank != 0, unit="request")

    # -- requests ----------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """args: (context, gen_kwargs, doc_to_visual, doc_id, task, split)."""
        items = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            images = self.visuals(doc_to_visual, task, split, doc_id)
            items.append((self.prompt(context, images), images, gen_kwargs))
        return self.generate_items(items, "mllm_mod generate")

    def generate_items(
        self, items: list[tuple[str, list[Visual], dict[str, Any]]], desc: str | None = None
    ) -> list[str]:
        """Batched generation of (prompt, images, gen_kwargs) items, results in input order."""
        groups: dict[str, list[int]] = defaultdict(list)  # same generation kwargs in one batch
        for i, (_, _, gen_kwargs) in enumerate(items):
            groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append(i)
        out: list[str] = [""] * len(items)
        bar = self.progress(len(items), desc) if desc else None
        for indices in groups.values():
            indices.sort(key=lambda i: -len(items[i][0]))  # similar lengths together: less padding
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                texts = self.generate_batch(
                    [items[i][0] for i in chunk], [items[i][1] for i in chunk], items[chunk[0]][2]
                )
                for i, text in zip(chunk, texts):
                    out[i] = text
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return out

    def warm_up(self, kind: str, call: Callable[[], Any]) -> None:
        """Run `call` once, untimed, before the first timed call of `kind`: every variant pays its warm-up
        (kernel selection, allocator growth, lazy initialisation) outside the measurement, not only the
        first variant of a run."""
        if kind in self.warmed:
            return
        call()
        synchronize(self._device)
        self.warmed.add(kind)

    @torch.inference_mode()
    def generate_batch(self, prompts: list[str], images: list[list[Visual]], gen_kwargs: dict[str, Any]) -> list[str]:
        """One left-padded batch through ``generate``; each text is cut at the first `until` string."""
        gen, until = generation_kwargs(gen_kwargs, self.max_new_tokens)
        inputs = self.encode(prompts, images)
        prompt_len = inputs["input_ids"].shape[1]
        pad = self.tokenizer.pad_token_id
        steps = min(2, gen["max_new_tokens"])  # the warm-up runs a prefill and a decoding step
        short = {**gen, "max_new_tokens": steps, "min_new_tokens": steps}
        self.warm_up("generate", lambda: self.model.generate(**inputs, **short, pad_token_id=pad))
        timer = FirstStepTimer(self._device)
        stops = StoppingCriteriaList([StopOnStrings(self.tokenizer, until, prompt_len)] if until else [])
        synchronize(self._device)
        start = time.perf_counter()
        out = self.model.generate(
            **inputs,
            **gen,
            logits_processor=LogitsProcessorList([timer]),
            stopping_criteria=stops,
            pad_token_id=pad,
            return_dict_in_generate=True,
        )
        synchronize(self._device)
        end = time.perf_counter()
        new = out.sequences[:, prompt_len:]  # [B, N]
        first = timer.first if timer.first is not None else end
        generated = (new != pad).sum(dim=1).tolist()  # [B]
        self.meter.add_prefill(len(prompts), first - start)
        self.meter.add_decode(end - first, generated)
        self.add_prompt_costs(inputs, output_cache(out))
        return decode_until(self.tokenizer, new, until)

    def add_prompt_costs(self, inputs: dict[str, torch.Tensor], cache: Any) -> None:
        """Prompt KV bytes and prefill FLOPs of a batch, from the cache its timed forward filled (read after
        the timing); without one (``use_cache=False`` in a task's generation kwargs), or where a sliding window
        dropped entries while decoding, an untimed prefill fills one. The KV bytes are what the prompt holds
        after its prefill (a sliding layer: the entries inside its window)."""
        if cache is None or windowed(cache):
            cache = output_cache(self.model(**inputs, use_cache=True))
        tokens = prompt_tokens_per_layer(cache, inputs["attention_mask"])  # [L] x [B]
        held = kv_entries(cache, inputs["attention_mask"]) if windowed(cache) else tokens  # [L] x [B]
        self.meter.add_kv(prompt_kv_bytes(cache, held))
        self.meter.add_flops(prefill_flops(self.model, inputs, tokens))

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """args: (context, continuation, doc_to_visual, doc_id, task, split). Returns, per request, the
        negative log-likelihood of the continuation and whether it is the greedy continuation, wrapped
        so that lmms-eval keeps the tuple (it stringifies bare tuples)."""
        items = []
        for req in requests:
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            if not isinstance(continuation, str):
                continuation = continuation(self.task_dict[task][split][doc_id])
            images = self.visuals(doc_to_visual, task, split, doc_id)
            items.append((self.prompt(context, images), continuation, images))
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]) - len(items[i][1]))
        out: list[GenerationResult | None] = [None] * len(items)
        bar = self.progress(len(items), "mllm_mod loglikelihood")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            scores = self.score_batch(
                [items[i][0] for i in chunk], [items[i][1] for i in chunk], [items[i][2] for i in chunk]
            )
            for i, score in zip(chunk, scores):
                out[i] = GenerationResult(text=score)
            bar.update(len(chunk))
        bar.close()
        return out

    @torch.inference_mode()
    def score_batch(
        self, prompts: list[str], continuations: list[str], images: list[list[Visual]]
    ) -> list[tuple[float, bool]]:
        """(NLL, is_greedy) of each continuation after its prompt. A token-dropping baseline ranks the vision
        tokens by each row's last prompt token, so every option of a question sees the same kept set."""
        lengths = continuation_lengths(self.tokenizer, prompts, continuations)  # [B]
        inputs = self.encode([p + c for p, c in zip(prompts, continuations)], images)
        length = inputs["input_ids"].shape[1]
        last_prompt = [length - 1 - n for n in lengths]  # [B] left padding: the continuation ends every row
        with ranking_at(self.model, last_prompt):
            self.warm_up("score", lambda: self.model(**inputs, use_cache=True))
            synchronize(self._device)
            start = time.perf_counter()
            out = self.model(**inputs, use_cache=True)  # the cache tells which tokens each layer processed
            synchronize(self._device)
        self.meter.add_prefill(len(prompts), time.perf_counter() - start)
        self.add_prompt_costs(inputs, output_cache(out))
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)  # [B, T-1, V]: predicts tokens 1..T-1
        targets = inputs["input_ids"][:, 1:]  # [B, T-1]
        scores = []
        for b, n in enumerate(lengths):  # left padding: the continuation is the last n tokens of every row
            tok_logp = logp[b, -n:].gather(1, targets[b, -n:, None])[:, 0]  # [n]
            greedy = bool((logp[b, -n:].argmax(dim=-1) == targets[b, -n:]).all())
            scores.append((float(-tok_logp.sum()), greedy))
        return scores

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """args: (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split). After each round
        ``doc_to_text(doc, previous_output=..., round_idx=..., previous_round_info=...)`` returns
        (visuals, context, terminal, round_results, info); the request's result is the final round_results."""
        results: list[list[str]] = []
        bar = self.progress(len(requests), "mllm_mod multi-round")
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            images = self.visuals(doc_to_visual, task, split, doc_id)
            outputs: list[str] = []
            info = None
            while True:
                outputs.append(self.generate_items([(self.prompt(context, images), images, gen_kwargs)])[0])
                visuals, context, terminal, round_results, info = doc_to_text(
                    doc, previous_output=list(outputs), round_idx=len(outputs), previous_round_info=info
                )
                if terminal:
                    results.append(list(round_results))
                    break
                images = [as_visual(v, task, self.num_frames) for v in visuals or []]
            bar.update()
        bar.close()
        return results


class MoDLMMChat(MoDLMM):
    """The chat class: requests carry ``doc_to_messages`` (lmms-eval's structured chat messages)."""

    is_simple = False

    def messages_item(self, raw_messages: list[dict[str, Any]], gen_kwargs: dict[str, Any], task: str):
        """(prompt, images, gen_kwargs) of a conversation given as lmms-eval chat messages."""
        from lmms_eval.protocol import ChatMessages

        chat = ChatMessages(messages=raw_messages)
        images, videos, audios = chat.extract_media()
        if audios:
            raise NotImplementedError(f"task {task!r} has audio messages; the mllm_mod plugin reads pictures and clips")
        visuals = [as_visual(v, task, self.num_frames) for v in [*images, *videos]]
        return self.chat_prompt(chat.to_hf_messages()), visuals, gen_kwargs

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """args: (context, doc_to_messages, gen_kwargs, doc_id, task, split)."""
        items = []
        for req in requests:
            _, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            items.append(self.messages_item(doc_to_messages(self.task_dict[task][split][doc_id]), gen_kwargs, task))
        return self.generate_items(items, "mllm_mod chat generate")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """args as `generate_until`; rounds after the first come from ``doc_to_messages(doc, round_idx=...,
        previous_output=..., previous_round_info=...)`` -> (messages, terminal, outputs, info). Returns
        each request's outputs, one per round."""
        results: list[list[str]] = []
        bar = self.progress(len(requests), "mllm_mod chat multi-round")
        for req in requests:
            _, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            outputs: list[str] = []
            messages, info = doc_to_messages(doc), None
            while True:
                outputs.append(self.generate_items([self.messages_item(messages, gen_kwargs, task)])[0])
                payload = doc_to_messages(
                    doc, round_idx=len(outputs), previous_output=list(outputs), previous_round_info=info
                )
                if not (isinstance(payload, tuple) and len(payload) == 4):
                    raise TypeError(f"task {task!r}: doc_to_messages for a later round must return 4 values")
                messages, terminal, _, info = payload
                if terminal:
                    break
            results.append(outputs)
            bar.update()
        bar.close()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        raise NotImplementedError(
            "lmms-eval builds chat tasks without loglikelihood requests; run multiple-choice tasks with --force_simple"
        )
