"""The evaluation report: per model every task's metric, the average, and the efficiency measured in the
same run; written as ``results.json``, ``report.md`` and ``report.png`` (accuracy vs prefill TFLOPs)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..tables import markdown_table

EFFICIENCY_COLUMNS = (  # (Meter.summary() key, column title, scale, format)
    ("prefill_tflops_per_sample", "prefill TFLOPs/sample", 1.0, "{:.4g}"),
    ("kv_bytes_per_sample", "KV MiB/sample", 2.0**-20, "{:.4g}"),
    ("prefill_latency_s_per_batch", "prefill ms/batch", 1e3, "{:.4g}"),
    ("decode_tokens_per_s", "gen tok/s", 1.0, "{:.1f}"),
)


@dataclass
class ModelResult:
    name: str
    scores: dict[str, float | None]  # task -> metric value (None: not produced)
    metrics: dict[str, str]  # task -> metric name
    efficiency: dict[str, Any] = field(default_factory=dict)  # `Meter.summary()`
    model_args: dict[str, Any] = field(default_factory=dict)

    @property
    def average(self) -> float | None:
        values = [v for v in self.scores.values() if v is not None]
        return sum(values) / len(values) if values and len(values) == len(self.scores) else None


def _fmt(value: Any, scale: float = 1.0, pattern: str = "{:.4g}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return pattern.format(value * scale)


def markdown(results: list[ModelResult], meta: dict[str, Any] | None = None) -> str:
    """One row per model: every task's metric, the average, the efficiency measured in the same run."""
    tasks = list(results[0].scores)
    head = ["model", *[f"{t} ({results[0].metrics[t]})" for t in tasks], "average", *[c[1] for c in EFFICIENCY_COLUMNS]]
    rows = [head]
    for r in results:
        cells = [r.name, *[_fmt(r.scores[t]) for t in tasks], _fmt(r.average)]
        cells += [_fmt(r.efficiency.get(key), scale, pattern) for key, _, scale, pattern in EFFICIENCY_COLUMNS]
        rows.append(cells)
    lines = [markdown_table(rows)]
    if meta:
        limit = f", limit {meta['limit']} per task" if meta.get("limit") else ""
        lines += [
            "",
            f"Suite `{meta.get('suite')}`{limit}; efficiency measured on the evaluated batches (decoder prefill).",
        ]
    return "\n".join(lines) + "\n"


def plot(results: list[ModelResult], path: str | os.PathLike) -> None:
    """Average score vs prefill TFLOPs per sample, one point per model (models lacking either are listed
    in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    skipped = []
    for r in results:
        x, y = r.efficiency.get("prefill_tflops_per_sample"), r.average
        if x is None or y is None:
            skipped.append(r.name)
            continue
        ax.scatter([x], [y])
        ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("prefill TFLOPs / sample")
    ax.set_ylabel("average score")
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
    payload = {"meta": meta or {}, "models": [{**asdict(r), "average": r.average} for r in results]}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md = out / "report.md"
    md.write_text(markdown(results, meta))
    plot(results, out / "report.png")
    return md
