"""`mllm-mod arank MODEL --data calib.json --image-folder imgs/ --out DIR`: gamma-MoD's layer-redundancy
calibration on the user's own samples (the report then drives `mllm-mod retrofit --arank`)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("arank", help="ARank of every decoder layer on calibration samples (gamma-MoD)")
    p.add_argument("model", help="a transformers model directory with its processor")
    p.add_argument("--data", required=True, help="LLaVA conversation JSON/JSONL of calibration samples")
    p.add_argument("--image-folder", help="folder the samples' image paths are relative to")
    p.add_argument("--video-folder", help="folder the samples' video paths are relative to")
    p.add_argument("--samples", type=int, default=64, help="samples to use (the reference uses a few dozen)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--dense-layers", type=int, help="layers to keep dense in the summary (default 4 of 32, scaled)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--out", required=True, help="directory for arank.json and arank.png")
    p.set_defaults(func=run_arank)


def calibration_batches(args: argparse.Namespace, processor, pad_token_id: int, device: str) -> Iterator[dict]:
    from torch.utils.data import DataLoader

    from ..data import Collator, ConversationDataset, DataOptions

    options = DataOptions(image_folder=args.image_folder, video_folder=args.video_folder, max_length=args.max_length)
    dataset = ConversationDataset(args.data, processor, options)
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=Collator(pad_token_id=pad_token_id))
    for batch in loader:
        batch.pop("labels", None)  # calibration only reads attention maps
        yield {k: v.to(device) for k, v in batch.items()}


def run_arank(args: argparse.Namespace) -> int:
    from transformers import AutoProcessor

    from ..arank import arank
    from .core import load_model

    model = load_model(args.model, args.dtype, args.device)
    processor = AutoProcessor.from_pretrained(args.model)
    pad = model.config.get_text_config(decoder=True).pad_token_id
    pad = processor.tokenizer.pad_token_id if pad is None else pad
    report = arank(model, calibration_batches(args, processor, pad, args.device), max_samples=args.samples)
    json_path = report.save(args.out)
    dense = report.dense_layers(keep_dense=args.dense_layers)
    print(f"ARank over {report.samples} samples, {report.num_layers} layers:")
    print("  " + " ".join(f"{i}:{a:.1f}" for i, a in enumerate(report.layer_arank)))
    print(f"highest-ARank layers (stay dense): {dense}; the other {report.num_layers - len(dense)} become MoD")
    print(f"wrote {json_path} and its plot; next: mllm-mod retrofit {args.model} --preset gmod --arank {json_path} --out DIR")
    return 0
