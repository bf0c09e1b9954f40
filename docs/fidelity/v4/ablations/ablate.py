"""Router ablations for #19's target 2 (learned routing vs random routing), on the v4 study's bases.

Each variant is a study directory whose data and per-seed bases are links to the v4 study's (no base is
retrained), with the v4 settings changed as the variant says; only the variant's arms run, on its seeds,
through `mllm_mod.study.Study` (the same extra training, scoring, measured TFLOPs and router recall as the
study). Then `--table` gathers every variant into ablations.md and results.json beside this file.

    python docs/fidelity/v4/ablations/ablate.py --study runs/study_v4 --out runs/ablate_v4 [--only NAME ...]
    python docs/fidelity/v4/ablations/ablate.py --study runs/study_v4 --out runs/ablate_v4 --table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from mllm_mod.study import Study, StudySettings
from mllm_mod.tables import markdown_table

BOTH = ("pmod", "random_routing")
LOW = {"schedule": "constant", "layers": [1, 2, 3]}  # pmod's MoD layers of the 4-layer decoder
ALL = {"schedule": "constant", "layers": [0, 1, 2, 3]}
# name: (changes to the v4 settings, arms, seeds); random routing has no router, so the router's own knobs
# (router_lr, tanh_alpha) run pmod alone and compare with the control's random routing
VARIANTS: dict[str, tuple[dict, tuple[str, ...], tuple[int, ...]]] = {
    "control": ({}, BOTH, (2,)),
    "router_lr_1e-3": ({"router_lr": 1e-3}, ("pmod",), (2,)),
    "router_lr_1e-1": ({"router_lr": 1e-1}, ("pmod",), (2,)),
    "tanh_alpha_0.5": ({"mod_overrides": {"tanh_alpha": 0.5}}, ("pmod",), (2,)),
    "warmup_0.3": ({"warmup_ratio": 0.3}, BOTH, (2,)),
    "epochs_3": ({"extra_epochs": 3.0}, BOTH, (2,)),
    "const_0.15": ({"mod_overrides": {**LOW, "ratio": 0.15}}, BOTH, (0, 1, 2)),
    "const_0.05": ({"mod_overrides": {**LOW, "ratio": 0.05}}, BOTH, (2,)),
    # layer 0 routed too: no layer sees every vision token, so the extra training cannot move the reading
    # into a dense first layer
    "all_layers_0.15": ({"mod_overrides": {**ALL, "ratio": 0.15}}, BOTH, (0, 1, 2)),
    "all_layers_0.05": ({"mod_overrides": {**ALL, "ratio": 0.05}}, BOTH, (2,)),
}


def variant_study(study: Path, out: Path, name: str) -> tuple[Study, tuple[int, ...]]:
    changes, arms, seeds = VARIANTS[name]
    saved = json.loads((study / "settings.json").read_text())
    settings = dataclasses.replace(StudySettings(**saved), arms=arms, **changes)
    root = out / name
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "data").exists():
        (root / "data").symlink_to((study / "data").resolve())
    for seed in seeds:
        seed_dir = root / f"seed{seed}"
        seed_dir.mkdir(exist_ok=True)
        if not (seed_dir / "base").exists():
            (seed_dir / "base").symlink_to((study / f"seed{seed}" / "base").resolve())
    return Study(root, settings), seeds


def run(study: Path, out: Path, names: list[str]) -> None:
    if not (study / "data" / "meta.json").is_file():
        raise FileNotFoundError(f"{study} holds no study data (data/meta.json); run the v4 study first")
    for name in names:
        variant, seeds = variant_study(study, out, name)
        variant.check_settings()
        meta = variant.data()
        for seed in seeds:
            print(f"\n=== ablation {name}, seed {seed}")
            variant.run_seed(seed, meta)
        variant.report(meta)


def recall_cell(layer: dict | None) -> str:
    """ "named recall:kept" of one layer of one seed; "-" where not recorded."""
    if not layer or layer["named_recall"] is None:
        return "-"
    return f"{layer['named_recall']:.2f}:{layer['kept']:.2f}"


def table(study: Path, out: Path) -> None:
    here = Path(__file__).parent
    rows = [("variant", "arm", "seeds", "accuracy per seed", "TFLOPs ratio per seed", "per MoD layer, per seed: named-colour recall:kept share")]
    results = {}
    for name in VARIANTS:
        variant, seeds = variant_study(study, out, name)
        for arm in variant.settings.arms:
            runs = [json.loads(variant.arm_path(s, arm).read_text()) for s in seeds if variant.done(s, arm)]
            if not runs:
                continue
            results.setdefault(name, {})[arm] = runs
            recall = "; ".join(
                f"L{layer} " + " / ".join(recall_cell(r.get("routing", {}).get(layer)) for r in runs)
                for layer in sorted({layer for r in runs for layer in r.get("routing", {})}, key=int)
            )
            rows.append((
                name, arm, ",".join(str(r["seed"]) for r in runs), " / ".join(f"{r['accuracy']:.3f}" for r in runs),
                " / ".join(f"{r['tflops_ratio']:.3f}" for r in runs), recall,
            ))  # fmt: skip
    settings = {name: {"changes": c, "arms": list(a), "seeds": list(s)} for name, (c, a, s) in VARIANTS.items()}
    (here / "results.json").write_text(json.dumps({"variants": settings, "runs": results}, indent=1) + "\n")
    (here / "ablations.md").write_text(markdown_table(rows) + "\n")
    print(markdown_table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--table", action="store_true", help="gather what ran into ablations.md and results.json")
    args = parser.parse_args()
    if args.table:
        table(args.study, args.out)
    else:
        run(args.study, args.out, args.only)


if __name__ == "__main__":
    main()
