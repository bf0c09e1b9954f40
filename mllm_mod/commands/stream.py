"""`mllm-mod stream`: live narration of a video, streaming metrics on a data JSON, the synthetic
streaming set, and a short tiny-model training run. Thin over `mllm_mod.streaming`."""

from __future__ import annotations

import argparse
import json
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "stream",
        help="streaming video LLM: narrate a video, streaming metrics, synthetic data, tiny training",
        description=(
            "mllm-mod stream --model DIR --video X.mp4 [--fps 2]   timestamped narration, frame by frame\n"
            "mllm-mod stream --model DIR --data narration.json     LM-PPL, LM-Correctness, TimeDiff, Fluency\n"
            "mllm-mod stream --make-synthetic DIR                  synthetic clips + streaming JSON\n"
            "mllm-mod stream --train-tiny OUT --data train.json    a tiny streaming model trained on the CPU"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--video", help="narrate this video (needs --model)")
    mode.add_argument("--make-synthetic", metavar="DIR", help="write the synthetic streaming set into DIR")
    mode.add_argument("--train-tiny", metavar="OUT", help="train a tiny streaming model on --data, save to OUT")
    p.add_argument("--model", help="a streaming model directory (model + tokenizer, optionally retrofitted)")
    p.add_argument("--data", help="a streaming JSON: with --model, compute the streaming metrics on it")
    p.add_argument("--video-folder", help="resolve the JSON's relative video paths here")
    p.add_argument("--fps", type=float, help="frame rate (default: the model's); must match the model's")
    p.add_argument(
        "--threshold",
        type=float,
        help="a frame replies where its argmax is not ',' or P(',') < this (default: 0.725 narrating, as "
        "VideoLLM-online's demo; 0 for the metrics, as its evaluation)",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--ask", nargs="*", default=[], metavar="SECONDS:TEXT", help="user turns, e.g. 3:what color is it ?")
    p.add_argument("--budget", type=int, help="bound the KV cache to this many tokens (oldest frames go first)")
    p.add_argument("--budget-policy", choices=("drop", "pool"), default="drop")
    p.add_argument("--max-samples", type=int, help="evaluate on the first N videos only")
    p.add_argument("--json", help="also write the metrics / narration to this JSON file")
    p.add_argument("--num-videos", type=int, default=32, help="--make-synthetic: number of clips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", help="--train-tiny: retrofit with this MoD preset before training (e.g. videomod)")
    p.add_argument("--eval-data", help="--train-tiny: streaming metrics on this JSON before and after training")
    p.add_argument("--frame-loss-weight", type=float, default=1.0, help="--train-tiny: loss weight of frame decisions")
    recipe = p.add_argument_group("--train-tiny recipe (defaults: VideoLLM-online's, see mllm_mod/streaming/train.py)")
    recipe.add_argument("--steps", type=int, default=-1, help="optimizer steps (default: --epochs)")
    recipe.add_argument("--epochs", type=float, default=2.0)
    recipe.add_argument("--lr", type=float, default=2e-4)
    recipe.add_argument("--batch-size", type=int, default=1)
    recipe.add_argument("--grad-accum", type=int, default=8)
    recipe.add_argument("--lora-r", type=int, default=128, help="LoRA rank (alpha = 2 r); 0: full fine-tuning")
    recipe.add_argument("--max-frames", type=int, default=1200, help="clip longer videos to this many frames")
    p.add_argument("--random-baseline", action="store_true", help="with --data: also the TimeDiff of random replies")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_stream)


def run_stream(args: argparse.Namespace) -> int:
    if args.make_synthetic:
        return _synthetic(args)
    if args.train_tiny:
        return _train_tiny(args)
    if not args.model or not (args.video or args.data):
        raise ValueError(
            "give --model with --video (narration) or --data (metrics), or --make-synthetic / --train-tiny"
        )
    from ..streaming import load_stream_model

    model, tokenizer = load_stream_model(args.model)
    model.to(args.device)
    if args.fps is not None and abs(args.fps - model.config.fps) > 1e-6:
        raise ValueError(
            f"--fps {args.fps:g} differs from the model's {model.config.fps:g} fps (it was trained at that rate)"
        )
    if args.data:
        return _metrics(args, model, tokenizer)
    return _narrate(args, model, tokenizer)


def _narrate(args: argparse.Namespace, model, tokenizer) -> int:
    from ..streaming import CacheBudget, StreamSession, Turn, narrate, read_frames
    from ..streaming.data import preprocess
    from ..streaming.inference import DEMO_THRESHOLD

    turns = [_parse_ask(a) for a in args.ask]
    frames, times = read_frames(args.video, model.config.fps)
    vision = model.config.vision_config
    pixels = preprocess(frames, vision.image_size, model.config.image_mean, model.config.image_std)
    budget = CacheBudget(args.budget, args.budget_policy) if args.budget else None
    threshold = DEMO_THRESHOLD if args.threshold is None else args.threshold
    session = StreamSession(model, tokenizer, threshold, args.max_new_tokens, budget)
    said = []
    for turn in turns:
        print(f"[{turn.time:7.2f}s] USER: {turn.text}")
    for reply in narrate(session, pixels, times, [Turn("user", t.time, t.text) for t in turns]):
        print(f"[{reply.time:7.2f}s] {reply.text}", flush=True)
        said.append({"time": reply.time, "frame": reply.frame, "text": reply.text, "silence_prob": reply.silence_prob})
    print(
        f"{len(frames)} frames at {model.config.fps:g} fps, {len(said)} replies, {session.cached_tokens} tokens cached"
    )
    _write_json(args.json, {"video": args.video, "replies": said})
    return 0


def _metrics(args: argparse.Namespace, model, tokenizer) -> int:
    from ..streaming import evaluate_streaming, load_records
    from ..streaming.metrics import random_timing_baseline

    records = load_records(args.data, args.video_folder)[: args.max_samples]
    result = evaluate_streaming(model, records, tokenizer, _eval_threshold(args))
    print(_table(result))
    if args.random_baseline:
        result["random_time_diff"] = random_timing_baseline(records, tokenizer, model.config, args.seed)["time_diff"]
        print(f"TimeDiff of a responder replying at random frames (same rate): {result['random_time_diff']:.3f} s")
    _write_json(args.json, result)
    return 0


def _synthetic(args: argparse.Namespace) -> int:
    from ..streaming import SynthSpec, make_synthetic_stream

    spec = SynthSpec(num_videos=args.num_videos, seed=args.seed, fps=args.fps or 2.0)
    path = make_synthetic_stream(args.make_synthetic, spec)
    print(f"wrote {args.num_videos} clips and {path}")
    return 0


def _train_tiny(args: argparse.Namespace) -> int:
    import time

    from .. import retrofit
    from ..streaming import evaluate_streaming, load_records, tiny_stream_model
    from ..streaming.train import StreamTrainSpec, train_stream

    spec = StreamTrainSpec(
        num_epochs=args.epochs,
        max_steps=args.steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        max_frames=args.max_frames,
        seed=args.seed,
    )

    if not args.data:
        raise ValueError("--train-tiny needs --data (a streaming JSON, e.g. from --make-synthetic)")
    records = load_records(args.data, args.video_folder)
    held_out = load_records(args.eval_data, args.video_folder) if args.eval_data else None
    model, tokenizer = tiny_stream_model(
        hidden_size=64, fps=args.fps or 2.0, frame_loss_weight=args.frame_loss_weight, seed=args.seed
    )
    if args.preset:
        retrofit(model, args.preset)
    result: dict = {"preset": args.preset, "recipe": vars(spec), "videos": len(records)}
    threshold = _eval_threshold(args)
    if held_out:
        result["before"] = evaluate_streaming(model, held_out, tokenizer, threshold)
        print("before training\n" + _table(result["before"]))
    start = time.perf_counter()
    model, losses = train_stream(model, tokenizer, records, args.train_tiny, spec)
    result.update(train_seconds=time.perf_counter() - start, losses=losses)
    model.save_pretrained(args.train_tiny)
    tokenizer.save_pretrained(args.train_tiny)
    print(
        f"loss {losses[0][1]:.3f} (step {losses[0][0]}) -> {losses[-1][1]:.3f} (step {losses[-1][0]}) "
        f"in {result['train_seconds']:.0f} s; saved to {args.train_tiny}"
    )
    if held_out:
        result["after"] = evaluate_streaming(model, held_out, tokenizer, threshold)
        print("after training\n" + _table(result["after"]))
    _write_json(args.json, result)
    return 0


def _eval_threshold(args: argparse.Namespace) -> float:
    from ..streaming.inference import EVAL_THRESHOLD

    return EVAL_THRESHOLD if args.threshold is None else args.threshold


def _parse_ask(text: str):
    from ..streaming import Turn

    seconds, _sep, question = text.partition(":")
    try:
        return Turn("user", float(seconds), question.strip())
    except ValueError:
        raise ValueError(f"--ask {text!r} is not SECONDS:TEXT") from None


def _table(result: dict) -> str:
    rows = [
        ("LM-PPL", "lm_ppl", ".3f"),
        ("LM-Correctness", "lm_correctness", ".3f"),
        ("TimeDiff (s)", "time_diff", ".3f"),
        ("Fluency", "fluency", ".3f"),
    ]
    lines = ["| metric | value |", "|---|---:|"] + [f"| {name} | {result[key]:{fmt}} |" for name, key, fmt in rows]
    return "\n".join(lines + [f"({result['num_turns']} turns in {result['num_samples']} videos)"])


def _write_json(path: str | None, data: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
