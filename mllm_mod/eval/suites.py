"""Benchmark suites as data, and an offline reachability check that answers in seconds.

A suite is a list of (lmms-eval task, the metric and filter it reports, its full scale). Before anything runs, `check` finds each
task's dataset: in a ``--data-root`` of ``datasets.save_to_disk`` mirrors (``<root>/<leaf task>/``), or
in the local Hugging Face caches. Mirrors are wired through lmms-eval's ``include:`` as new task names
(``mllm_mod_mirror_<task>``), because lmms-eval silently prefers a built-in task over an included one of
the same name. Missing datasets are reported with the command that fetches them, instead of lmms-eval
retrying downloads for minutes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

MIRROR_PREFIX = "mllm_mod_mirror_"


@dataclass(frozen=True)
class SuiteTask:
    """One benchmark of a suite: the lmms-eval task, the metric it reports and how to put it on 0-100.

    lmms-eval stores each result under ``"<metric>,<filter>"``: the filter is ``none`` for a task without a
    ``filter_list`` and the filter's ``name`` otherwise (AI2D: ``exact_match,flexible-extract``).
    `full_scale` is the raw value of a perfect score (1 for accuracies, 100 for scores lmms-eval already
    reports in percent, 2000 for MME perception), so every benchmark averages on the same 0-100 scale.
    """

    task: str  # lmms-eval task or group name
    metric: str  # the metric name of the task's ``metric_list``
    filter: str = "none"  # the filter name of the task's ``filter_list`` (``none`` without one)
    full_scale: float = 1.0  # raw value of a perfect score

    @property
    def key(self) -> str:
        """The key of this metric in lmms-eval's results of the task."""
        return f"{self.metric},{self.filter}"

    def to_percent(self, value: float) -> float:
        """The raw metric on the 0-100 scale."""
        return value * 100.0 / self.full_scale

    @property
    def rule(self) -> str:
        """How the raw metric becomes 0-100, in words."""
        if self.full_scale == 100.0:
            return "as reported (0-100)"
        if self.full_scale == 1.0:
            return "x 100 (reported 0-1)"
        return f"/ {self.full_scale / 100.0:g} (reported 0-{self.full_scale:g})"


ACCURACY, PERCENT, MME = 1.0, 100.0, 2000.0  # full scales: 0-1, 0-100 and MME's 0-2000 (sum of 10 x 0-200)


def _suite(*rows: tuple) -> tuple[SuiteTask, ...]:
    return tuple(SuiteTask(*row) for row in rows)


SUITES: dict[str, tuple[SuiteTask, ...]] = {  # (task, metric, filter, full scale), from lmms-eval 0.7.x
    # p-MoD's 14 image benchmarks
    "pmod14": _suite(
        ("ok_vqa", "exact_match", "none", ACCURACY),
        ("scienceqa_img", "exact_match", "none", ACCURACY),
        ("mme", "mme_perception_score", "none", MME),
        ("seedbench", "seed_image", "none", ACCURACY),
        ("pope_full", "pope_f1_score", "none", ACCURACY),
        ("realworldqa", "exact_match", "none", ACCURACY),
        ("gqa", "exact_match", "none", ACCURACY),
        ("ai2d", "exact_match", "flexible-extract", ACCURACY),
        ("textvqa_val", "exact_match", "none", ACCURACY),
        ("chartqa", "relaxed_overall", "none", ACCURACY),
        ("docvqa_val", "anls", "none", ACCURACY),
        ("infovqa_val", "anls", "none", ACCURACY),
        ("mmbench_en_dev", "gpt_eval_score", "none", PERCENT),
        ("mmmu_val", "mmmu_acc", "none", ACCURACY),
    ),
    # gamma-MoD's 9 benchmarks
    "gmod9": _suite(
        ("textvqa_val", "exact_match", "none", ACCURACY),
        ("vqav2_val", "exact_match", "none", ACCURACY),
        ("gqa", "exact_match", "none", ACCURACY),
        ("scienceqa_img", "exact_match", "none", ACCURACY),
        ("pope", "pope_f1_score", "none", ACCURACY),
        ("mme", "mme_perception_score", "none", MME),
        ("mmbench_en_dev", "gpt_eval_score", "none", PERCENT),
        ("mmmu_val", "mmmu_acc", "none", ACCURACY),
        ("mmvet", "gpt_eval_score", "none", PERCENT),
    ),
    "video": _suite(
        ("videomme", "videomme_perception_score", "none", PERCENT),
        ("mvbench", "mvbench_accuracy", "none", PERCENT),
        ("egoschema_subset", "score", "none", ACCURACY),
        ("nextqa_mc_test", "exact_match", "none", ACCURACY),
        ("perceptiontest_val_mc", "accuracy", "none", ACCURACY),
        ("longvideobench_val_v", "lvb_acc", "none", ACCURACY),
        ("mlvu_dev", "mlvu_percetion_score", "none", PERCENT),  # sic: lmms-eval's spelling
    ),
}


def suite_tasks(name: str) -> tuple[SuiteTask, ...]:
    from .synthetic import SYNTHETIC_SUITES

    if name in SYNTHETIC_SUITES:
        return tuple(SuiteTask(t.name, t.metric, "none", ACCURACY) for t in SYNTHETIC_SUITES[name])
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; available: {', '.join([*SYNTHETIC_SUITES, *SUITES])}")
    return SUITES[name]


# -- the built-in lmms-eval task index (a text scan: lmms-eval's TaskManager takes ~15 s) --------------
_NAME = re.compile(r"^(task|group)\s*:\s*[\"']?([\w\-.]+)", re.MULTILINE)


def lmms_eval_tasks_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("lmms-eval is not installed: pip install 'mllm-mod[eval]'")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


@cache
def builtin_index() -> dict[str, Path]:
    """Built-in task/group name -> its YAML file."""
    index: dict[str, Path] = {}
    for path in sorted(lmms_eval_tasks_dir().rglob("*.yaml")):
        match = _NAME.search(path.read_text(errors="replace"))
        if match:
            index.setdefault(match.group(2), path)
    return index


def builtin_task_names() -> set[str]:
    return set(builtin_index())


def load_config(name: str) -> dict:
    from lmms_eval.utils import load_yaml_config

    index = builtin_index()
    if name not in index:
        raise ValueError(f"{name!r} is not a built-in lmms-eval task or group")
    return load_yaml_config(str(index[name]), mode="simple")


def leaf_tasks(name: str) -> list[str]:
    """The tasks a group runs (recursively); a task is its own leaf."""
    config = load_config(name)
    subtasks = config.get("task")
    if "group" in config and isinstance(subtasks, list):
        out: list[str] = []
        for sub in subtasks:
            sub_name = sub if isinstance(sub, str) else sub.get("task")
            out += leaf_tasks(sub_name) if sub_name in builtin_index() else [sub_name]
        return out
    return [name]


# -- reachability --------------------------------------------------------------------------------------
@dataclass
class Missing:
    task: str  # leaf task
    dataset: str
    subset: str | None

    def how(self, data_root: str | None) -> str:
        root = data_root or "DATA_ROOT"
        args = f"{self.dataset!r}" + (f", {self.subset!r}" if self.subset else "")
        return (
            f"{self.task}: dataset {self.dataset}{f' ({self.subset})' if self.subset else ''} is in neither the HF "
            f"cache nor {root}/{self.task}. Online, run\n"
            f"    python -c \"import datasets; datasets.load_dataset({args}).save_to_disk('{root}/{self.task}')\"\n"
            f"  (or `huggingface-cli download --repo-type dataset {self.dataset}`), then pass --data-root {root}"
        )


@dataclass
class Reachability:
    cached: list[str] = field(default_factory=list)  # leaf tasks lmms-eval can load from the HF cache
    mirrored: dict[str, str] = field(default_factory=dict)  # leaf task -> save_to_disk mirror dir
    missing: list[Missing] = field(default_factory=list)

    def message(self, data_root: str | None) -> str:
        lines = [f"{len(self.missing)} dataset(s) are not available offline:"]
        return "\n".join(lines + ["  " + m.how(data_root) for m in self.missing])


def hf_cached(dataset: str) -> bool:
    """Whether `dataset` (a hub id) is in the hub cache or the datasets cache (no network)."""
    from datasets import config as ds_config
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}" / "snapshots"
    processed = Path(ds_config.HF_DATASETS_CACHE) / dataset.replace("/", "___")
    return (hub.is_dir() and any(hub.iterdir())) or processed.is_dir()


def check(suite: str, data_root: str | os.PathLike | None = None) -> Reachability:
    """Where each leaf task of `suite` can load its data from, without touching the network."""
    out = Reachability()
    for entry in suite_tasks(suite):
        for leaf in leaf_tasks(entry.task):
            mirror = Path(data_root) / leaf if data_root is not None else None
            config = load_config(leaf)
            dataset = config.get("dataset_path")
            if mirror is not None and (mirror / "dataset_dict.json").is_file():
                out.mirrored[leaf] = str(mirror.absolute())
            elif dataset and hf_cached(dataset):
                out.cached.append(leaf)
            else:
                out.missing.append(Missing(leaf, str(dataset), config.get("dataset_name")))
    return out


def write_mirror_tasks(mirrored: dict[str, str], out_dir: str | os.PathLike) -> dict[str, str]:
    """A task YAML per mirrored leaf (``mllm_mod_mirror_<leaf>``, including the built-in one and loading
    the mirror with ``load_from_disk``); returns leaf -> new task name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {}
    for leaf, path in mirrored.items():
        name = MIRROR_PREFIX + leaf
        lines = [
            f"include: {builtin_index()[leaf]}",
            f"task: {name}",
            f"dataset_path: {path}",
            "dataset_kwargs:",
            "  load_from_disk: true",
        ]
        (out_dir / f"{name}.yaml").write_text("\n".join(lines) + "\n")
        names[leaf] = name
    return names
