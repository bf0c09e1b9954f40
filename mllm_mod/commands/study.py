"""`mllm-mod study --out DIR [--quick] [--seeds N] [--config study.yaml]`: the fidelity study
(`mllm_mod.study`): dense, p-MoD, gamma-MoD, random routing, FastV, random drop and every training-free
method of the zoo (`mllm_mod.eval.zoo.ZOO`) at equal training and matched compute on the vision-localised
synthetic suite; resumable."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "study",
        help="the fidelity study: MoD vs dense vs token dropping at equal training and compute (resumable)",
        description="Trains a tiny LLaVA per seed on the vision-localised synthetic suite, then every arm with the "
        "same extra training; writes results.json, study.md, pareto.png and patches.png to --out. Rerun the same "
        "command to resume an interrupted study.",
    )
    p.add_argument("--out", required=True, help="study directory (data, checkpoints, per-arm results, report)")
    p.add_argument("--quick", action="store_true", help="the smoke study: one seed, a few steps per arm")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3, --quick: 1)")
    p.add_argument(
        "--jobs", type=int, default=None,
        help="seeds run side by side, one process each, logging to DIR/seed*/log.txt (default: as many as the "
        "CPU cores allow, at most --seeds; the results do not depend on it)",
    )  # fmt: skip
    p.add_argument("--config", help="a YAML mapping of StudySettings fields (over the defaults or --quick)")
    p.add_argument(
        "--arms",
        nargs="+",
        default=None,
        help="a subset of the arms (dense is needed by the training-free arms: fastv, random_drop and the zoo's)",
    )
    p.add_argument(
        "--cross-check", type=int, metavar="N", default=0,
        help="afterwards, score seed 0's --cross-check-arm on the first N held-out questions per family through lmms-eval "
        "(the project's plugin and synthetic generation template) beside the study's own scorer",
    )  # fmt: skip
    p.add_argument(
        "--cross-check-arm", default="dense", metavar="ARM",
        help="the arm to cross-check: dense (default), fastv or a zoo method (dense weights, the seed's budget)",
    )  # fmt: skip
    p.set_defaults(func=run_study)


def run_study(args: argparse.Namespace) -> int:
    import dataclasses

    from ..study import StudySettings, check_cross_check_arm, default_jobs, run

    if args.cross_check_arm != "dense" and not args.cross_check:
        raise SystemExit("--cross-check-arm needs --cross-check N (the questions per family to score)")
    check_cross_check_arm(args.cross_check_arm)  # before the study runs, not hours later
    settings = StudySettings.quick() if args.quick else StudySettings()
    if args.config:
        settings = StudySettings.load(args.config, base=settings)
    changes = {k: v for k, v in (("seeds", args.seeds), ("arms", args.arms)) if v is not None}
    settings = dataclasses.replace(settings, **changes)
    results = run(args.out, settings, jobs=args.jobs if args.jobs is not None else default_jobs(settings))
    if args.cross_check:
        from ..study import cross_check

        check = cross_check(args.out, arm=args.cross_check_arm, per_family=args.cross_check)
        print(
            f"cross-check (seed 0, {args.cross_check_arm}, {args.cross_check} per family): study {check['study_scorer']}, "
            f"lmms-eval {check['lmms_eval']}; max |difference| {check['max_abs_difference']:.3f}"
        )
    print(f"wrote {args.out}/results.json, study.md, pareto.png" + (" (partial)" if not results["complete"] else ""))
    return 0
