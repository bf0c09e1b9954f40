"""Run a suite for one or more model variants in one process and write the report."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .meter import Meter
from .report import ModelResult, write_report
from .suites import MIRROR_PREFIX, SuiteTask, check, leaf_tasks, suite_tasks, write_mirror_tasks

logger = logging.getLogger(__name__)


class SuiteUnavailable(RuntimeError):
    """Datasets of the suite cannot be loaded offline (the message says how to get them)."""


@dataclass
class ModelSpec:
    name: str
    model_args: dict[str, Any] = field(default_factory=dict)  # MoDLMM keyword arguments


@dataclass
class Plan:
    """What lmms-eval runs for a suite: task names (built-in or our generated ones), include paths, and
    for each suite entry the tasks whose metric it reports."""

    entries: tuple[SuiteTask, ...]
    tasks: list[str]
    include_paths: list[str]
    leaves: dict[str, list[str]]  # suite task -> run task names
    builtins: bool  # whether lmms-eval must index its built-in tasks


def plan(suite: str, work: str | os.PathLike, data_root: str | None = None, skip_missing: bool = False) -> Plan:
    from .synthetic import SYNTHETIC_SUITES, write_tasks

    entries = suite_tasks(suite)
    work = Path(work)
    if suite in SYNTHETIC_SUITES:
        task_dir = write_tasks(work / suite, tasks=SYNTHETIC_SUITES[suite])
        names = [e.task for e in entries]
        return Plan(entries, names, [str(task_dir)], {n: [n] for n in names}, builtins=False)
    reach = check(suite, data_root)
    if reach.missing and not skip_missing:
        raise SuiteUnavailable(reach.message(data_root))
    if reach.missing:
        logger.warning(reach.message(data_root))
    renamed = write_mirror_tasks(reach.mirrored, work / "mirror_tasks")
    available = set(reach.cached) | set(renamed)
    leaves = {}
    for entry in entries:
        run = [renamed.get(leaf, leaf) for leaf in leaf_tasks(entry.task) if leaf in available]
        if run:
            leaves[entry.task] = run
    if not leaves:
        raise SuiteUnavailable(reach.message(data_root))
    tasks = [t for run in leaves.values() for t in run]
    return Plan(entries, tasks, [str(work / "mirror_tasks")], leaves, builtins=True)


def metric_value(results: dict[str, dict[str, Any]], run: Sequence[str], entry: SuiteTask) -> float | None:
    """The raw metric of one suite entry (its ``metric,filter`` key): the task's own value, or the mean over
    the leaf tasks it ran; None unless every one of them reported it."""
    values = []
    for task in run:
        value = results.get(task, {}).get(entry.key)
        if value is None and task.startswith(MIRROR_PREFIX):
            value = results.get(task[len(MIRROR_PREFIX) :], {}).get(entry.key)
        if isinstance(value, (int, float)):
            values.append(float(value))
    return sum(values) / len(values) if len(values) == len(run) and values else None


def run_suite(
    specs: Sequence[ModelSpec],
    suite: str,
    out: str | os.PathLike,
    limit: float | None = None,
    data_root: str | None = None,
    skip_missing: bool = False,
) -> Path | None:
    """Evaluate every model on `suite` with lmms-eval's Python API; write the report under `out`.

    Under ``accelerate launch`` every process evaluates its shard; the meters of all ranks are summed and
    the main process writes the report (the others return None)."""
    from accelerate import PartialState

    rank = PartialState().process_index  # each process writes its own copy of the generated task files
    the_plan = plan(suite, Path(out) / "work" / f"rank{rank}", data_root, skip_missing)  # missing data fails fast

    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    from .lmms_plugin import MoDLMM

    manager = TaskManager("WARNING", include_path=the_plan.include_paths, include_defaults=the_plan.builtins)
    results = []
    for spec in specs:
        lm = MoDLMM(**spec.model_args)
        res = evaluator.simple_evaluate(model=lm, tasks=the_plan.tasks, task_manager=manager, limit=limit)
        meter = all_ranks(lm.meter)
        side = side_cost(lm.model)  # a training-free method's FLOPs outside the decoder, summed over the ranks
        release(lm)  # every rank frees its replica before the next variant loads
        del lm
        if res is None:  # not the main process
            continue
        scores = {e.task: metric_value(res["results"], the_plan.leaves.get(e.task, []), e) for e in the_plan.entries}
        efficiency = {**meter.summary(), **side}
        results.append(ModelResult(spec.name, the_plan.entries, scores, efficiency, dict(spec.model_args)))
    if not results:
        return None
    meta = {"suite": suite, "limit": limit, "data_root": data_root, "tasks": the_plan.tasks}
    return write_report(results, out, meta)


def release(lm: Any) -> None:
    """Drop the plugin's model and processor and return the accelerator memory they held (the caller then
    drops the plugin itself), so that two variants' replicas are never alive at once."""
    import gc

    import torch

    lm.model = lm.processor = lm.tokenizer = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def side_cost(model: Any) -> dict[str, float | None]:
    """``side_tflops_per_sample``: the mean FLOPs per decided sample a training-free method (FastV, the zoo)
    computed outside the decoder layers to choose its tokens (its ranking rows, distances, VisionZip's vision-side
    attention row and merge), summed over every rank; 0 for a model that computes none (dense, MoD)."""
    import torch.distributed as dist

    from .baselines import drop_decision

    decision = drop_decision(model)
    totals = (decision.side_flops, decision.side_samples) if decision is not None else (0.0, 0)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[tuple[float, int] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, totals)
        totals = (sum(g[0] for g in gathered), sum(g[1] for g in gathered))
    if decision is None:
        return {"side_tflops_per_sample": 0.0}
    return {"side_tflops_per_sample": totals[0] / totals[1] / 1e12 if totals[1] else None}


def all_ranks(meter: Meter) -> Meter:
    """The sum of every process's meter in a multi-process run (the meter itself otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return meter
    gathered: list[Meter | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, meter)
    return functools.reduce(Meter.merge, gathered)
