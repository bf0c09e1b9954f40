"""`mllm-mod retrofit`, `mllm-mod profile` and `mllm-mod demo`: thin programs over the library."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from ..config import PRESETS, MoDConfig, as_config
from ..reference_shapes import REFERENCE_SHAPES
from ..tables import markdown_table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("retrofit", help="add MoD layers to a model directory and save the adapter")
    p.add_argument("model", help="a transformers model directory (LLaVA-1.5 / LLaVA-NeXT / LLaVA-OneVision)")
    p.add_argument("--preset", default="pmod", choices=sorted(PRESETS))
    p.add_argument("--config", help="a mod_config.json to use instead of a preset")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override MoDConfig fields")
    p.add_argument("--arank", help="an ARank report (mllm-mod arank): its highest-ARank layers stay dense")
    p.add_argument("--dense-layers", type=int, help="with --arank: how many layers stay dense (default 4 of 32, scaled)")
    p.add_argument("--arank-threshold", type=float, help="with --arank: keep dense every layer with ARank >= this")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--full", action="store_true", help="save the whole model (save_pretrained), not only the adapter")
    p.set_defaults(func=run_retrofit)

    p = subparsers.add_parser("profile", help="dense vs MoD: TFLOPs, KV bytes, prefill latency/throughput")
    p.add_argument("model", help=f"a model directory, or with --config-only one of {sorted(REFERENCE_SHAPES)}")
    p.add_argument("--preset", default="pmod", choices=sorted(PRESETS))
    p.add_argument("--config-only", action="store_true", help="accounting only, model built on the meta device")
    p.add_argument("--n-vision", type=int, help="vision tokens per sample (default: the family's typical count)")
    p.add_argument("--n-text", type=int, default=64, help="text tokens per sample")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes to time")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.set_defaults(func=run_profile)

    p = subparsers.add_parser("demo", help="the embedded end-to-end demo (tiny model, no downloads)")
    p.add_argument("--out", default="runs/demo", help="where plots and results go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="pmod", choices=sorted(PRESETS), help="the MoD recipe to retrofit and fine-tune")
    p.set_defaults(func=run_demo)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings typed by `MoDConfig`'s field defaults (JSON for lists/numbers/bools)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"override {pair!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_model(path: str, dtype: str = "float32", device: str = "cpu", **kwargs: Any):
    """A model directory: a full MoD checkpoint (via mllm_mod.from_pretrained) or a stock one."""
    from ..retrofit import CONFIG_KEY, from_pretrained, model_class

    with open(os.path.join(path, "config.json")) as f:
        is_mod = CONFIG_KEY in json.load(f)
    load = from_pretrained if is_mod else model_class(path).from_pretrained
    return load(path, dtype=getattr(torch, dtype), **kwargs).to(device).eval()


def run_retrofit(args: argparse.Namespace) -> int:
    from .. import retrofit, save_mod

    config = MoDConfig.load(os.path.dirname(args.config) or ".") if args.config else args.preset
    config = as_config(config, **parse_overrides(args.set))  # bad overrides fail before the model loads
    # an absolute path is what the adapter records as its base, so `mllm-mod train --model ADAPTER` finds it
    model = load_model(os.path.abspath(args.model) if os.path.isdir(args.model) else args.model)
    model = retrofit(model, config, arank=args.arank, arank_dense=args.dense_layers, arank_threshold=args.arank_threshold)
    if args.full:
        model.save_pretrained(args.out)
        _copy_processor(args.model, args.out)
    else:
        save_mod(model, args.out)
    from .. import layer_ratios

    ratios = layer_ratios(model)
    print(f"retrofitted {sum(r < 1 for r in ratios)}/{len(ratios)} layers ({model.mod_state.config.preset}); saved to {args.out}")
    print("keep ratios: " + " ".join(f"{r:.3f}" for r in ratios))
    return 0


def _copy_processor(src: str, dst: str) -> None:
    from transformers import AutoProcessor

    try:
        AutoProcessor.from_pretrained(src).save_pretrained(dst)
    except (OSError, ValueError) as err:  # a model dir without processor files is still a model
        print(f"note: no processor copied from {src} ({err.__class__.__name__})")


def run_profile(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .. import layer_ratios, retrofit
    from ..adapters import adapter_for
    from ..compat import attention_window
    from ..flops import DecoderShape, prefill_cost
    from ..retrofit import is_retrofitted

    if args.config_only:
        model, n_vision_default = _meta_model(args.model)
    else:
        model = load_model(args.model, args.dtype, args.device)
        n_vision_default = 576
    if not is_retrofitted(model):
        retrofit(model, args.preset)
    n_vision = args.n_vision or n_vision_default
    adapter = adapter_for(model)
    shape = DecoderShape.from_config(adapter.text_config(model.config))
    ratios = layer_ratios(model)
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    per_frame = model.mod_state.config.selection == "group" and adapter.frame_tokens is not None
    frame = adapter.frame_tokens(model.config) if per_frame else None  # per-frame top-k counts
    # sliding-window layers hold only the last window - 1 entries, dense and MoD alike (MoD: an estimate, its
    # kept vision tokens spread evenly; `mllm_mod.efficiency` measures them on real inputs)
    windows = [attention_window(getattr(layer, "base_layer", layer).self_attn) for layer in adapter.layers(model)]
    dense = prefill_cost(shape, [1.0] * shape.layers, args.n_text, n_vision, element, windows=windows)
    mod = prefill_cost(shape, ratios, args.n_text, n_vision, element, tokens_per_frame=frame, windows=windows)
    cut = [w for w in windows if w is not None and args.n_text + n_vision > w - 1]
    # text entries every layer holds (the text after the vision: the window's last positions)
    text_held = sum(args.n_text if w is None or w not in cut else min(args.n_text, w - 1) for w in windows)
    if cut:
        print(f"note: {len(cut)} of {shape.layers} layers have a sliding window shorter than the prompt "
              f"({min(cut)} tokens): their KV is the last window - 1 entries; MoD's there is an estimate")
    result: dict[str, Any] = {
        "model": args.model,
        "preset": model.mod_state.config.preset,
        "n_vision": n_vision,
        "n_text": args.n_text,
        "layer_ratios": ratios,
        "dense_tflops": dense.tflops,
        "mod_tflops": mod.tflops,
        "dense_kv_bytes": dense.kv_bytes,
        "mod_kv_bytes": mod.kv_bytes,
        "vision_kv_fraction": (sum(mod.kv_entries_per_layer) - text_held) / (sum(dense.kv_entries_per_layer) - text_held),
    }
    rows = [
        ("prefill TFLOPs / sample", f"{dense.tflops:.3f}", f"{mod.tflops:.3f}", f"{mod.tflops / dense.tflops:.3f}"),
        ("KV cache MiB / sample", f"{dense.kv_bytes / 2**20:.1f}", f"{mod.kv_bytes / 2**20:.1f}", f"{mod.kv_bytes / dense.kv_bytes:.3f}"),
    ]
    if not args.config_only:
        timings = _time_prefill(model, n_vision, args.n_text, args.batch_sizes, args.repeats, tqdm)
        result["timings"] = timings
        for t in timings:
            b = t["batch"]
            rows.append((f"prefill ms, batch {b}", f"{t['dense_ms']:.2f}", f"{t['mod_ms']:.2f}", f"{t['mod_ms'] / t['dense_ms']:.3f}"))
            rows.append((f"samples/s, batch {b}", f"{b * 1e3 / t['dense_ms']:.1f}", f"{b * 1e3 / t['mod_ms']:.1f}", f"{t['dense_ms'] / t['mod_ms']:.3f}"))
    print(f"{args.model}: {shape.layers} layers, {n_vision} vision + {args.n_text} text tokens, preset {result['preset']}")
    print(f"MoD layers: {sum(r < 1 for r in ratios)}, vision KV fraction {result['vision_kv_fraction']:.4f}")
    print(markdown_table([("quantity", "dense", "MoD", "MoD / dense"), *rows]))
    if not args.config_only:
        print(f"(timed on {args.device}, {args.dtype}; the decoder only: the vision tower costs the same in both)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _meta_model(name: str):
    import transformers as tf

    if name in REFERENCE_SHAPES:
        ref = REFERENCE_SHAPES[name]
        config, n_vision = ref.config(), ref.n_vision
    elif os.path.isfile(os.path.join(name, "config.json")):
        config, n_vision = tf.AutoConfig.from_pretrained(name), 576
    else:
        raise ValueError(f"{name!r} is neither a model directory nor one of {sorted(REFERENCE_SHAPES)}")
    with torch.device("meta"):
        model = tf.AutoModelForImageTextToText.from_config(config)
    return model, n_vision


def _time_prefill(model, n_vision: int, n_text: int, batch_sizes: str, repeats: int, tqdm) -> list[dict[str, Any]]:
    """Median prefill ms per batch size, dense (the stock layers, same weights) and MoD, after one
    warm-up run: the benchmark's placeholder batch and timer (`mllm_mod.bench`)."""
    from ..bench import Timer, mode, placeholder_batch

    timer = Timer(next(model.parameters()).device, warmup=1, repeats=repeats)
    sizes = [int(b) for b in batch_sizes.split(",")]
    out = []
    bar = tqdm(total=len(sizes) * 2, desc="profiling prefill", unit="model")
    for b in sizes:
        ids = placeholder_batch(model, b, n_vision, n_text)  # [B, T]
        row: dict[str, Any] = {"batch": b}
        for label in ("dense", "mod"):
            with mode(model, label), torch.no_grad():
                row[f"{label}_ms"] = timer(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
            bar.update()
        out.append(row)
    bar.close()
    return out


def run_demo(args: argparse.Namespace) -> int:
    from ..demo import run

    return run(out=args.out, seed=args.seed, preset=args.preset)
