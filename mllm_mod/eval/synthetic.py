"""Synthetic local lmms-eval tasks: small pictures from the synthetic families (`mllm_mod.data.synth`),
saved with `datasets.save_to_disk`, and task YAMLs that include the shipped templates
(`mllm_mod/eval/tasks/_generation.yaml`, `_multiple_choice.yaml`).

    root = write_tasks("eval_tasks/", n=16)        # root/data/<family>/, root/tasks/<task>.yaml
    lmms-eval --model mllm_mod --model_args pretrained=ckpt/ --include_path eval_tasks/tasks \
        --tasks mllm_mod_synthetic

Every task name starts with ``mllm_mod_``: lmms-eval silently prefers a built-in task over an included
one of the same name, so included tasks must never reuse a built-in name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TEMPLATES = Path(__file__).parent / "tasks"
TAG = "mllm_mod_synthetic"
UTILS_MODULE = "mllm_mod.eval.tasks.utils"


@dataclass(frozen=True)
class SyntheticTask:
    name: str
    family: str  # a family of `mllm_mod.data.synth.families(video=True)`
    kind: str  # "generation" (exact match) or "multiple_choice" (loglikelihood, acc)
    blank: bool = False  # the blank-image control: same questions, grey pictures

    @property
    def metric(self) -> str:
        return "exact_match" if self.kind == "generation" else "acc"


SYNTHETIC_TASKS: tuple[SyntheticTask, ...] = (
    SyntheticTask("mllm_mod_color", "color", "generation"),
    SyntheticTask("mllm_mod_count", "count", "generation"),
    SyntheticTask("mllm_mod_presence", "presence", "generation"),
    SyntheticTask("mllm_mod_color_mc", "color", "multiple_choice"),
    SyntheticTask("mllm_mod_color_blank", "color", "generation", blank=True),
    SyntheticTask("mllm_mod_color_mc_blank", "color", "multiple_choice", blank=True),
)
# clips (mp4 files the plugin samples frames from), for video-capable models such as LLaVA-OneVision
SYNTHETIC_VIDEO_TASKS: tuple[SyntheticTask, ...] = (
    SyntheticTask("mllm_mod_motion", "motion", "generation"),
    SyntheticTask("mllm_mod_motion_mc", "motion", "multiple_choice"),
)

SYNTHETIC_SUITES = {"synthetic": SYNTHETIC_TASKS, "synthetic_video": SYNTHETIC_VIDEO_TASKS}


def family_records(family: str, n: int, seed: int, size: int, media_dir: Path) -> list[dict[str, Any]]:
    """`n` samples of one synthetic family; sample i depends only on (seed, i). A picture is stored in
    the record, a clip as an mp4 file under `media_dir` (the record holds its path)."""
    from PIL import Image

    from ..data.synth import families, write_video

    registry = families(size, video=True)
    if family not in registry:
        raise ValueError(f"unknown synthetic family {family!r}; available: {sorted(registry)}")
    fam = registry[family]
    records = []
    for i in range(n):
        sample = fam.make(np.random.default_rng([seed, i]), size)
        choices = list(fam.answers)
        record = {"id": f"{family}-{i:05d}", "question": sample.question, "answer": sample.answer}
        if fam.video:
            media_dir.mkdir(parents=True, exist_ok=True)
            record["video"] = str(media_dir / f"{record['id']}.mp4")
            write_video(record["video"], sample.media)
        else:
            record["image"] = Image.fromarray(sample.media[0])
        records.append({**record, "choices": choices, "label": choices.index(sample.answer)})
    return records


def write_tasks(
    root: str | os.PathLike,
    n: int = 16,
    seed: int = 1234,
    size: int = 30,
    tasks: tuple[SyntheticTask, ...] = SYNTHETIC_TASKS,
) -> Path:
    """Write the datasets (``root/data/<family>``, clips under ``root/media/<family>``) and task YAMLs
    (``root/tasks``); returns the tasks directory, to pass to lmms-eval as ``--include_path``."""
    import datasets

    root = Path(root).absolute()
    task_dir = root / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    videos = set()
    for family in sorted({t.family for t in tasks}):
        records = family_records(family, n, seed, size, root / "media" / family)
        data = datasets.Dataset.from_list(records)
        if "image" in data.column_names:
            data = data.cast_column("image", datasets.Image())
        else:
            videos.add(family)
        datasets.DatasetDict({"test": data}).save_to_disk(str(root / "data" / family))
    for task in tasks:
        lines = [
            f"include: {TEMPLATES / ('_' + task.kind + '.yaml')}",
            f"task: {task.name}",
            f"tag: {TAG}",
            f"dataset_path: {root / 'data' / task.family}",
        ]
        if task.blank:
            lines.append(f"doc_to_visual: !function {UTILS_MODULE}.doc_to_blank_visual")
        elif task.family in videos:
            lines.append(f"doc_to_visual: !function {UTILS_MODULE}.doc_to_video")
        (task_dir / f"{task.name}.yaml").write_text("\n".join(lines) + "\n")
    return task_dir


def vocabulary() -> list[str]:
    """Words the synthetic questions and answers use (for ``mllm_mod.tiny.tiny_model(words=...)``)."""
    from ..data.synth import vocabulary as synth_vocabulary

    return synth_vocabulary(video=True)
