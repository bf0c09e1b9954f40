"""The speed benchmark: dense vs MoD vs the ideal, measured in one run on one device.

The ideal is each layer run on only the tokens its schedule keeps, with zero routing cost, computed
from a per-layer cost table measured in the same run (one stock decoder layer timed at every token
count the schedule produces). Every number is a median over repeats after warm-up (CUDA events on a
GPU), and every ratio is to the dense model measured in the same run with the same weights.

    results = run_benchmark(BenchOptions(shape="llava-1.5-7b", device="cuda"))
    print(markdown(results))
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .cache import kv_bytes
from .compat import disable_checkpointing, enable_checkpointing, output_cache, rotary_embeddings
from .efficiency import dense
from .flops import DecoderShape, prefill_cost
from .reference_shapes import REFERENCE_SHAPES

TINY = "tiny"  # a tiny random LLaVA for smoke runs on the CPU


@dataclass
class BenchOptions:
    shape: str = "llava-1.5-7b"  # one of REFERENCE_SHAPES, or "tiny"
    preset: str = "pmod"
    device: str = "cuda"
    dtype: str = "bfloat16"
    n_vision: int | None = None  # default: the shape's typical count
    n_text: int = 64
    prefill_batches: tuple[int, ...] = (1, 8, 16)
    train_batch: int = 8
    decode_batches: tuple[int, ...] = (1, 16)
    new_tokens: int = 64
    warmup: int = 3
    repeats: int = 10
    sections: tuple[str, ...] = ("correctness", "prefill", "train", "decode", "kv")
    compile: bool = False  # torch.compile the stock decoder layers (dense and MoD alike; see mllm_mod.compiled)
    num_layers: int = 8  # decoder depth of the "tiny" shape
    overrides: dict[str, Any] = field(default_factory=dict)  # MoDConfig fields over the preset


@dataclass
class BenchResults:
    options: dict[str, Any]
    device_name: str
    layer_ratios: list[float]
    prefill: list[dict[str, Any]] = field(default_factory=list)
    train: list[dict[str, Any]] = field(default_factory=list)
    decode: list[dict[str, Any]] = field(default_factory=list)
    kv: dict[str, Any] = field(default_factory=dict)
    correctness: dict[str, Any] = field(default_factory=dict)
    layer_cost_ms: dict[int, dict[int, float]] = field(default_factory=dict)  # batch -> tokens -> ms
    ops: list[dict[str, Any]] = field(default_factory=list)  # op counts (`bench_ops`)


# -- timing ----------------------------------------------------------------------------------------
class Timer:
    """Median wall time of a callable in ms, after warm-up; CUDA events on a GPU."""

    def __init__(self, device: torch.device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, fn: Callable[[], Any]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


# -- the model ---------------------------------------------------------------------------------------
def build_model(options: BenchOptions) -> tuple[nn.Module, int]:
    """A random-weight model of the requested shape on the device, retrofitted; and its vision count."""
    import transformers as tf

    from .retrofit import retrofit

    dtype = getattr(torch, options.dtype)
    if options.shape == TINY:
        from .tiny import tiny_model

        model, _ = tiny_model("llava", num_layers=options.num_layers, device=options.device)
        model, n_vision = model.to(dtype), 25
    elif options.shape in REFERENCE_SHAPES:
        ref = REFERENCE_SHAPES[options.shape]
        config = ref.config()
        config.text_config._attn_implementation = "sdpa"
        with torch.device(options.device):
            model = tf.AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
        n_vision = ref.n_vision
    else:
        raise ValueError(f"unknown shape {options.shape!r}; choose from {[TINY, *REFERENCE_SHAPES]}")
    model.eval()
    retrofit(model, options.preset, **options.overrides)
    with torch.no_grad():  # trained-like routers, so the kept sets are scattered, not a prefix
        gen = torch.Generator(device="cpu").manual_seed(0)
        for name, p in model.named_parameters():
            if ".router." in name or "shared_router" in name:
                p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.02)
    if options.compile:  # after retrofit: the stock layers inside the MoD layers are compiled too
        from .compiled import compile_layers

        compile_layers(model)
    return model, options.n_vision or n_vision


def placeholder_batch(model: nn.Module, batch: int, n_vision: int, n_text: int, seed: int = 0) -> torch.Tensor:
    """input_ids [B, T]: half the text, the image placeholders, the other half (features not needed:
    the vision tower costs the same with and without MoD, so only the decoder is timed)."""
    from .adapters import adapter_for

    adapter = adapter_for(model)
    image_id = adapter.vision_token_ids(model.config)[0]
    vocab = adapter.text_config(model.config).vocab_size
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(10, min(vocab, 1000), (batch, n_text), generator=gen)
    vision = torch.full((batch, n_vision), image_id)
    ids = torch.cat([text[:, : n_text // 2], vision, text[:, n_text // 2 :]], dim=1)  # [B, T]
    return ids.to(next(model.parameters()).device)


@contextlib.contextmanager
def mode(model: nn.Module, label: str) -> Iterator[None]:
    """``"dense"``: the stock layers with the same weights; ``"mod"``: as retrofitted."""
    with dense(model) if label == "dense" else contextlib.nullcontext():
        yield


# -- sections ----------------------------------------------------------------------------------------
def layer_cost_table(model: nn.Module, batch: int, token_counts: list[int], timer: Timer) -> dict[int, float]:
    """ms of one stock decoder layer (sdpa, causal) on [batch, t] tokens, for each t."""
    from .adapters import adapter_for
    from .layer import MoDLayer

    adapter = adapter_for(model)
    decoder = adapter.decoder(model)
    layer = adapter.layers(model)[-1]
    layer = layer.base_layer if isinstance(layer, MoDLayer) else layer
    layer_type = getattr(layer.self_attn, "layer_type", None)  # per-type RoPE (Gemma 3)
    dim = adapter.text_config(model.config).hidden_size
    param = next(layer.parameters())
    table = {}
    for t in sorted(set(token_counts)):
        x = torch.randn(batch, t, dim, device=param.device, dtype=param.dtype)  # [B, t, D]
        positions = torch.arange(t, device=param.device)[None]  # [1, t]
        rope = rotary_embeddings(decoder.rotary_emb, x, positions, layer_type)
        with torch.no_grad():
            table[t] = timer(lambda: layer(x, attention_mask=None, position_ids=positions, position_embeddings=rope))
    return table


def bench_prefill(model: nn.Module, options: BenchOptions, n_vision: int, timer: Timer, results: BenchResults) -> None:
    from .adapters import adapter_for
    from .retrofit import layer_ratios

    shape = DecoderShape.from_config(adapter_for(model).text_config(model.config))
    total = n_vision + options.n_text
    kept = prefill_cost(shape, layer_ratios(model), options.n_text, n_vision).tokens_per_layer
    for b in options.prefill_batches:
        ids = placeholder_batch(model, b, n_vision, options.n_text)
        row: dict[str, Any] = {"batch": b}
        for label in ("dense", "mod"):
            with mode(model, label), torch.no_grad():
                row[f"{label}_ms"] = timer(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
        costs = layer_cost_table(model, b, [total, *kept], timer)
        results.layer_cost_ms[b] = costs
        # embeddings, final norm, head (never below 0: timing noise could make the difference negative)
        outside_layers = max(0.0, row["dense_ms"] - shape.layers * costs[total])
        row["outside_layers_ms"] = outside_layers
        row["ideal_ms"] = outside_layers + sum(costs[t] for t in kept)
        results.prefill.append(row)


def bench_train(model: nn.Module, options: BenchOptions, n_vision: int, timer: Timer, results: BenchResults) -> None:
    """Forward + backward of the LM loss (no optimizer step), with and without gradient checkpointing."""
    ids = placeholder_batch(model, options.train_batch, n_vision, options.n_text)
    labels = ids.masked_fill(ids == ids[0, options.n_text // 2], -100)  # no loss on the placeholders
    cuda = ids.device.type == "cuda"
    model.train()
    try:
        for checkpointing in (False, True):
            if checkpointing:
                enable_checkpointing(model, {"use_reentrant": False})
            row: dict[str, Any] = {"batch": options.train_batch, "checkpointing": checkpointing}
            for label in ("dense", "mod"):

                def step() -> None:
                    model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
                    model.zero_grad(set_to_none=True)

                with mode(model, label):
                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    try:
                        row[f"{label}_ms"] = timer(step)
                        row[f"{label}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
                    except torch.OutOfMemoryError:  # reported, not fatal: the other rows still run
                        model.zero_grad(set_to_none=True)
                        row[f"{label}_ms"] = row[f"{label}_peak_gib"] = None
            results.train.append(row)
            if checkpointing:
                disable_checkpointing(model)
    finally:
        model.eval()


def bench_decode(model: nn.Module, options: BenchOptions, n_vision: int, timer: Timer, results: BenchResults) -> None:
    """Decoding tokens/s: (time of N+1 new tokens - time of 1) / N steps, greedy, with the cache."""
    n = options.new_tokens
    for b in options.decode_batches:
        ids = placeholder_batch(model, b, n_vision, options.n_text)
        mask = torch.ones_like(ids)
        row: dict[str, Any] = {"batch": b, "new_tokens": n}
        for label in ("dense", "mod"):

            def generate(k: int) -> Callable[[], Any]:
                args = dict(max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
                return lambda: model.generate(input_ids=ids, attention_mask=mask, **args)

            with mode(model, label), torch.no_grad():
                step_ms = (timer(generate(n + 1)) - timer(generate(1))) / n
            row[f"{label}_tok_s"] = b * 1e3 / step_ms
        results.decode.append(row)


def bench_kv(model: nn.Module, options: BenchOptions, n_vision: int, results: BenchResults) -> None:
    from .adapters import adapter_for
    from .retrofit import layer_ratios

    b = max(options.decode_batches)
    ids = placeholder_batch(model, b, n_vision, options.n_text)
    shape = DecoderShape.from_config(adapter_for(model).text_config(model.config))
    element = next(model.parameters()).element_size()
    for label in ("dense", "mod"):
        with mode(model, label), torch.no_grad():
            cache = output_cache(model(input_ids=ids, use_cache=True, logits_to_keep=1))
        ratios = [1.0] * shape.layers if label == "dense" else layer_ratios(model)
        results.kv[f"{label}_measured_bytes"] = kv_bytes(cache)
        results.kv[f"{label}_accounted_bytes"] = b * prefill_cost(shape, ratios, options.n_text, n_vision, element).kv_bytes
    results.kv["batch"] = b


def bench_correctness(model: nn.Module, options: BenchOptions, n_vision: int, results: BenchResults) -> None:
    """In the benchmark's dtype: ratio-1 MoD vs dense logits, and cached vs uncached greedy tokens
    (for the dense model too: its own disagreement is the numerical floor of this dtype)."""
    from .retrofit import get_state, retrofit, unload

    config = get_state(model).config
    routers = {k: v.clone() for k, v in model.state_dict().items() if "router" in k}
    ids = placeholder_batch(model, 2, n_vision, options.n_text)
    with torch.no_grad():
        with mode(model, "dense"):
            reference = model(input_ids=ids).logits.float()  # [B, T, V]
        unload(model)
        retrofit(model, config.replace(schedule="constant", ratio=1.0, layers=None, skip_layers=None))
        ratio_one = model(input_ids=ids).logits.float()
        unload(model)
        retrofit(model, config)
        model.load_state_dict(routers, strict=False)
    scale = reference.abs().max().item()
    results.correctness["ratio1_max_abs_logit_diff"] = (ratio_one - reference).abs().max().item()
    results.correctness["logit_scale"] = scale
    args = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    for label in ("dense", "mod"):
        with mode(model, label), torch.no_grad():
            cached = model.generate(input_ids=ids, use_cache=True, **args)
            uncached = model.generate(input_ids=ids, use_cache=False, **args)
        same = (cached == uncached).all(dim=1)  # [B]
        results.correctness[f"{label}_cached_equals_uncached"] = f"{int(same.sum())}/{len(same)} samples"


# -- op counts (kernel launches) ----------------------------------------------------------------------
# What is counted: the aten ops a forward dispatches, at the leaves of the call tree, leaving out
# - views, metadata and allocations (`NOT_LAUNCHES`): they launch nothing;
# - a conversion that returns its input (`PASS_THROUGH` with nothing under it) *inside* another op
#   (`gather` checks its index dtype with a `to`): nothing happens there.
# So `aten::linear` counts as its `addmm`, `aten::to` with a copy as its `copy_`, `sort` as the copies
# and the `arange` under it. A conversion that returns its input and is called by the model code itself
# (`x.to(dtype)` already of that dtype) counts: it launches nothing but still costs a dispatcher round
# trip on the host, and is dropped the same way. On a GPU each counted op is about one kernel launch
# (~5 us of host time), which is what decides batch-1 latency and decoding speed while the device waits
# for the host; `_local_scalar_dense` (`.item()`, `bool(t)`, `.cpu()` of a scalar) is a host sync.
NOT_LAUNCHES = frozenset(
    "aten::" + name
    for name in (
        "view", "_unsafe_view", "view_as", "reshape", "_reshape_alias", "expand", "expand_as", "as_strided",
        "slice", "select", "unsqueeze", "squeeze", "permute", "transpose", "t", "alias", "detach", "detach_",
        "unbind", "split", "split_with_sizes", "chunk", "narrow", "unflatten", "flatten", "movedim",
        "diagonal", "empty", "empty_strided", "empty_like", "resize_", "resolve_conj", "resolve_neg",
        "lift_fresh", "size", "stride", "sym_size", "dim", "is_same_size", "result_type",
        "_has_compatible_shallow_copy_type",
    )
)
PASS_THROUGH = frozenset({"aten::to", "aten::contiguous", "aten::type_as"})


def count_ops(fn: Callable[[], Any]) -> Counter[str]:
    """The ops `fn` dispatches on this thread, by name, counted as above. The count is exact and
    repeatable (no timing involved), so it is measured on the CPU for what it costs on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: Counter[str] = Counter()

    def visit(event: Any, inside: bool) -> bool:  # True when `event` or one of its descendants counted
        below = False
        for child in event.cpu_children:
            below |= visit(child, inside or event.name.startswith("aten::"))
        name = event.name
        if below or not name.startswith("aten::") or name in NOT_LAUNCHES:
            return below
        if inside and name in PASS_THROUGH and not event.cpu_children:
            return False
        counts[name] += 1
        return True

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event, False)
    return counts


def left_padded(ids: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] with row i left-padded by ``i * pad`` tokens (its text cut; the
    first row is the longest), or a single row by `pad`."""
    mask = torch.ones_like(ids)
    for i in range(ids.shape[0]):
        mask[i, : (i if ids.shape[0] > 1 else 1) * pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def ops_row(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, phase: str) -> dict[str, Any]:
    """Ops of one whole-model forward, dense and MoD: ``"prefill"`` of `ids`, or ``"decode"`` (one greedy
    step after the prefill and one warm-up step, as `generate` calls it: explicit position ids, the cache),
    or ``"decode_static"`` (the same with a static cache: transformers' `StaticCache` for the dense model,
    `static_mod_cache` for MoD; the 2-D padding mask is passed, so the model builds its 4-D mask itself)."""
    from .cache import static_mod_cache
    from .compat import CACHE_KWARG
    from .retrofit import mod_layer_map

    row: dict[str, Any] = {"phase": phase, "batch": ids.shape[0], "padded": bool((mask == 0).any()), "mod_layers": len(mod_layer_map(model))}
    for label in ("dense", "mod"):
        with mode(model, label), torch.no_grad():
            if phase == "prefill":
                counts = count_ops(lambda: model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1))
            else:
                given = {CACHE_KWARG: static_mod_cache(model, ids.shape[1], 4)} if phase == "decode_static" else {}
                out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **given)
                cache, step_mask, token = output_cache(out), mask, out.logits[:, -1:].argmax(-1)  # [B, 1]
                for step in range(2):  # a warm-up step, then the counted one
                    step_mask = torch.cat([step_mask, torch.ones_like(token)], dim=1)  # [B, S + 1]
                    positions = step_mask.sum(dim=1, keepdim=True) - 1  # [B, 1]
                    kwargs = {"input_ids": token, "attention_mask": step_mask, "position_ids": positions, CACHE_KWARG: cache}
                    if step == 0:
                        token = model(**kwargs, use_cache=True, logits_to_keep=1).logits.argmax(-1)
                    else:
                        counts = count_ops(lambda kw=kwargs: model(**kw, use_cache=True, logits_to_keep=1))
        row[f"{label}_ops"] = sum(counts.values())
        row[f"{label}_by_op"] = dict(counts.most_common())
    row["per_mod_layer"] = (row["mod_ops"] - row["dense_ops"]) / max(row["mod_layers"], 1)
    return row


def bench_ops(model: nn.Module, options: BenchOptions, n_vision: int, results: BenchResults) -> None:
    """Whole-model op counts, dense vs MoD, prefill at each prefill batch (without padding, and left-padded)
    and one decoding step at each decode batch (left-padded), with the dynamic and with the static cache; the
    difference per MoD layer."""
    pad = max(1, options.n_text // 8)
    for b in options.prefill_batches:
        ids = placeholder_batch(model, b, n_vision, options.n_text)
        results.ops.append(ops_row(model, ids, torch.ones_like(ids), "prefill"))
        results.ops.append(ops_row(model, *left_padded(ids, pad), "prefill"))
    for b in options.decode_batches:
        ids = placeholder_batch(model, b, n_vision, options.n_text)
        results.ops.append(ops_row(model, *left_padded(ids, pad), "decode"))
        results.ops.append(ops_row(model, *left_padded(ids, pad), "decode_static"))


def run_benchmark(options: BenchOptions, progress: bool = True) -> BenchResults:
    from tqdm.auto import tqdm

    from .retrofit import layer_ratios

    model, n_vision = build_model(options)
    device = next(model.parameters()).device
    timer = Timer(device, options.warmup, options.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    results = BenchResults(options=asdict(options) | {"n_vision": n_vision}, device_name=name, layer_ratios=layer_ratios(model))
    sections = {
        "correctness": lambda: bench_correctness(model, options, n_vision, results),
        "prefill": lambda: bench_prefill(model, options, n_vision, timer, results),
        "train": lambda: bench_train(model, options, n_vision, timer, results),
        "decode": lambda: bench_decode(model, options, n_vision, timer, results),
        "kv": lambda: bench_kv(model, options, n_vision, results),
        "ops": lambda: bench_ops(model, options, n_vision, results),
    }
    unknown = set(options.sections) - set(sections)
    if unknown:
        raise ValueError(f"unknown benchmark sections {sorted(unknown)}; choose from {list(sections)}")
    for section in tqdm(options.sections, desc=f"benchmark {options.shape}", unit="section", disable=not progress):
        sections[section]()
    return results


# -- reporting ---------------------------------------------------------------------------------------
def markdown(results: BenchResults) -> str:
    o = results.options
    shape = f"{o['shape']} ({o['num_layers']} layers)" if o["shape"] == TINY else o["shape"]
    overrides = "".join(f", {k}={v}" for k, v in o.get("overrides", {}).items())
    lines = [
        (
            f"**{shape}**, preset `{o['preset']}`{overrides}, {o['n_vision']} vision + {o['n_text']} text tokens, "
            f"{o['dtype']}, {'stock layers compiled (torch.compile), ' if o.get('compile') else ''}on {results.device_name}"
        ),
        "",
    ]
    if results.prefill or results.train or results.decode or results.kv:
        lines += [
            "| measurement | dense | MoD | ideal | MoD / dense | ideal / dense | MoD / ideal |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
    for r in results.prefill:
        d, m, i = r["dense_ms"], r["mod_ms"], r["ideal_ms"]
        lines.append(f"| prefill ms, batch {r['batch']} | {d:.2f} | {m:.2f} | {i:.2f} | {m / d:.3f} | {i / d:.3f} | {m / i:.3f} |")
    for r in results.train:
        gc = "with" if r["checkpointing"] else "without"
        lines.append(f"| train step ms, batch {r['batch']}, {gc} checkpointing " + _pair(r["dense_ms"], r["mod_ms"], ".1f"))
        if results.device_name.startswith("CPU"):
            continue
        lines.append(f"| peak GiB, batch {r['batch']}, {gc} checkpointing " + _pair(r["dense_peak_gib"], r["mod_peak_gib"], ".2f"))
    for r in results.decode:
        d, m = r["dense_tok_s"], r["mod_tok_s"]
        lines.append(f"| decode tokens/s, batch {r['batch']} | {d:.1f} | {m:.1f} | | {m / d:.3f} | | |")
    if results.kv:
        kv = results.kv
        dm, mm, ma = kv["dense_measured_bytes"], kv["mod_measured_bytes"], kv["mod_accounted_bytes"]
        lines.append(
            f"| KV MiB after prefill, batch {kv['batch']} (MoD measured / accounted: {mm / ma:.4f}) "
            f"| {dm / 2**20:.2f} | {mm / 2**20:.2f} | | {mm / dm:.3f} | | |"
        )
    if results.ops:
        lines += ["", ops_markdown(results)] if lines[-1] else [ops_markdown(results)]
    if results.correctness:
        c = results.correctness
        lines += [
            "",
            f"Correctness in {o['dtype']}: ratio-1 MoD vs dense max |logit diff| "
            f"{c['ratio1_max_abs_logit_diff']:.3g} (logit scale {c['logit_scale']:.3g}); cached == uncached greedy "
            f"tokens: dense {c['dense_cached_equals_uncached']}, MoD {c['mod_cached_equals_uncached']}.",
        ]
    return "\n".join(lines)


def ops_markdown(results: BenchResults) -> str:
    """The op-count table: whole-model ops dense vs MoD, and the difference per MoD layer."""
    lines = [
        "| ops (aten, `bench.count_ops`) | dense, whole model | MoD, whole model | MoD layers | extra per MoD layer | most added |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in results.ops:
        what = {"prefill": "prefill", "decode": "one decode step", "decode_static": "one decode step, static cache"}[r["phase"]]
        padded = ", left-padded" if r["padded"] else ", no padding"
        added = Counter(r["mod_by_op"])
        added.subtract(r["dense_by_op"])
        top = ", ".join(f"{name.removeprefix('aten::')} {n:+d}" for name, n in added.most_common(4) if n > 0)
        lines.append(
            f"| {what}, batch {r['batch']}{padded} | {r['dense_ops']} | {r['mod_ops']} | {r['mod_layers']} "
            f"| {r['per_mod_layer']:+.1f} | {top} |"
        )
    return "\n".join(lines)


def _pair(dense_value: float | None, mod_value: float | None, fmt: str) -> str:
    """The rest of a table row for a dense/MoD pair; "OOM" where a run ran out of memory."""
    show = lambda v: "OOM" if v is None else format(v, fmt)  # noqa: E731
    ratio = f"{mod_value / dense_value:.3f}" if dense_value and mod_value else ""
    return f"| {show(dense_value)} | {show(mod_value)} | | {ratio} | | |"


def plot(results: list[BenchResults], path: str) -> None:
    """Prefill time relative to dense, per batch size: MoD and the ideal, one panel per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5), squeeze=False)
    for ax, res in zip(axes[0], results):
        batches = [r["batch"] for r in res.prefill]
        x = range(len(batches))
        ax.bar([i - 0.2 for i in x], [r["mod_ms"] / r["dense_ms"] for r in res.prefill], 0.4, label="MoD")
        ax.bar([i + 0.2 for i in x], [r["ideal_ms"] / r["dense_ms"] for r in res.prefill], 0.4, label="ideal")
        ax.axhline(1.0, color="grey", lw=1, ls="--", label="dense")
        ax.set_xticks(list(x), [f"batch {b}" for b in batches])
        ax.set_ylabel("prefill time / dense")
        ax.set_title(f"{res.options['shape']} ({res.options['preset']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
