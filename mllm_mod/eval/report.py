"""The evaluation report: per model every task's metric, the average, and the efficiency measured in the
same run; written as ``results.json``, ``report.md`` and ``report.png`` (accuracy vs prefill TFLOPs).

Benchmarks report on different scales (accuracies 0-1, GPT scores 0-100, MME perception 0-2000), so the
table, the average and the plot put every metric on 0-100 first, as the papers do (`SuiteTask.to_percent`);
``results.json`` keeps the raw values beside them."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..tables import markdown_table
from .suites import SuiteTask

EFFICIENCY_COLUMNS = (  # (Meter.summary() key, column title, scale, format)
    ("prefill_tflops_per_sample", "prefill TFLOPs/sample", 1.0, "{:.4g}"),
    ("kv_bytes_per_sample", "KV MiB/sample", 2.0**-20, "{:.4g}"),
    ("prefill_latency_s_per_batch", "prefill ms/batch", 1e3, "{:.4g}"),
    ("decode_tokens_per_s", "gen tok/s", 1.0, "{:.1f}"),
    ("side_tflops_per_sample", "side TFLOPs/sample", 1.0, "{:.3g}"),  # a method's own selection, outside the decoder
)


@dataclass
class ModelResult:
    name: str
    tasks: tuple[SuiteTask, ...]  # the suite's entries, in report order
    scores: dict[str, float | None]  # task -> raw metric value as lmms-eval reports it (None: not produced)
    efficiency: dict[str, Any] = field(default_factory=dict)  # `Meter.summary()`
    model_args: dict[str, Any] = field(default_factory=dict)

    @property
    def percent(self) -> dict[str, float | None]:
        """Each task's metric on the 0-100 scale."""
        return {
            t.task: None if self.scores.get(t.task) is None else t.to_percent(self.scores[t.task]) for t in self.tasks
        }

    @property
    def average(self) -> float | None:
        """Mean of the 0-100 scores; None unless every task produced one."""
        values = [v for v in self.percent.values() if v is not None]
        return sum(values) / len(values) if values and len(values) == len(self.tasks) else None

    @property
    def label(self) -> str:
        """The name, with a token-dropping baseline's K and R (FastV's names: R is the fraction pruned)."""
        from .zoo import budget_label

        args = self.model_args
        zoo = budget_label(str(args.get("preset")), args)
        if zoo is not None:  # a zoo method: its budget as its paper names it
            return zoo if self.name == args.get("preset") else f"{self.name}: {zoo}"
        if "prune_layer" in args and "prune_ratio" in args:
            return f"{self.name} (K={args['prune_layer']}, R={float(args['prune_ratio']):g})"
        return self.name


def _fmt(value: Any, scale: float = 1.0, pattern: str = "{:.4g}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return pattern.format(value * scale)


def scale_rule(tasks: tuple[SuiteTask, ...]) -> str:
    """One sentence: how each metric was put on 0-100."""
    rules: dict[str, list[str]] = {}
    for t in tasks:
        names = rules.setdefault(t.rule, [])
        if f"`{t.metric}`" not in names:
            names.append(f"`{t.metric}`")
    parts = [f"{', '.join(names)} {rule}" for rule, names in rules.items()]
    return "Scores on a 0-100 scale (average = their mean): " + "; ".join(parts) + ". Raw values in results.json."


def markdown(results: list[ModelResult], meta: dict[str, Any] | None = None) -> str:
    """One row per model: every task's metric on 0-100, the average, the efficiency measured in the same run;
    the scaling rule and the run under the table."""
    tasks = results[0].tasks
    head = ["model", *[f"{t.task} ({t.metric})" for t in tasks], "average", *[c[1] for c in EFFICIENCY_COLUMNS]]
    rows = [head]
    for r in results:
        percent = r.percent
        cells = [r.label, *[_fmt(percent[t.task], pattern="{:.1f}") for t in tasks], _fmt(r.average, pattern="{:.1f}")]
        cells += [_fmt(r.efficiency.get(key), scale, pattern) for key, _, scale, pattern in EFFICIENCY_COLUMNS]
        rows.append(cells)
    lines = [markdown_table(rows), "", scale_rule(tasks)]
    if meta:
        limit = f", limit {meta['limit']} per task" if meta.get("limit") else ""
        lines += [
            "",
            (
                f"Suite `{meta.get('suite')}`{limit}; efficiency measured on the evaluated batches (decoder prefill). "
                "Side TFLOPs: what a training-free method computes outside the decoder layers to choose its tokens "
                "(ranking rows, distances, similarities, VisionZip's vision-side attention row and merge), reported "
                "apart from the prefill TFLOPs, not in them."
            ),
        ]
    return "\n".join(lines) + "\n"


def plot(results: list[ModelResult], path: str | os.PathLike) -> None:
    """Average 0-100 score vs prefill TFLOPs per sample, one point per model (models lacking either are
    listed in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    skipped = []
    for r in results:
        x, y = r.efficiency.get("prefill_tflops_per_sample"), r.average
        if x is None or y is None:
            skipped.append(r.label)
            continue
        ax.scatter([x], [y])
        ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("prefill TFLOPs / sample")
    ax.set_ylabel("average score (0-100)")
    ax.set_title("accuracy vs compute" + (f" (no data: {', '.join(skipped)})" if skipped else ""), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: list[ModelResult], out: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write results.json, report.md and report.png under `out`; returns the Markdown path."""
    if not results:
        raise ValueError("no model results to report")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = [{**asdict(r), "scores_0_100": r.percent, "average": r.average, "label": r.label} for r in results]
    payload = {"meta": meta or {}, "scale_rule": scale_rule(results[0].tasks), "models": models}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md = out / "report.md"
    md.write_text(markdown(results, meta))
    plot(results, out / "report.png")
    return md
