"""Screen the accuracy levers with 3 labels: the ``levers`` study on malf35, then test-time
augmentation on the default cell's runs, into ``benchmarks/results/levers.json``.

The study (``src/lowlabel/studies/levers.yaml``, profile ``cpu``: 2 mm, 3 seeds, 13 levers and the
default) trains every cell; each lever's paired difference against the default (test Dice on the
fixed malf35 test split, paired by seed: mean, 95% CI, seeds) comes from the study's comparisons.
TTA changes prediction only, so it is measured by re-evaluating the default cell's runs with flips
(paired with their own plain evaluation), with its time per scan. A rerun skips the runs that
finished (the study folder is kept).

    nice -n 10 python benchmarks/levers.py [--data ../shared/data/malf35/dataset.json]
    python benchmarks/levers.py --dry-run   # the quick profile on the demo cohort, 2 seeds, 4
                                            # steps a run, into /tmp: proves the script only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "malf35" / "dataset.json"
RESULTS = ROOT / "benchmarks" / "results" / "levers.json"


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def number(value: float, digits: int = 4) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def difference(diff) -> dict:
    """A :class:`lowlabel.study.stats.Difference` as JSON."""
    return {
        "name": diff.name,
        "metric": diff.metric,
        "lever_mean": number(diff.a.mean),
        "default_mean": number(diff.b.mean),
        "difference_mean": number(diff.diff.mean),
        "ci95": [number(diff.diff.ci_low), number(diff.diff.ci_high)],
        "seeds": [int(s) for s in diff.pairs],
        "verdict": diff.verdict,
    }


def tta_arm(runs: list, lever: str = "default") -> dict:
    """Re-evaluate the finished runs of one lever with test-time augmentation, paired by seed
    with their plain test evaluation."""
    from lowlabel.engine.runs import evaluate_run
    from lowlabel.study.stats import paired

    chosen = [
        r for r in runs if r.result is not None and r.labels.get("levers", {}).get("lever") == lever
    ]
    plain, flipped, plain_csf, flipped_csf = {}, {}, {}, {}
    seconds, scans = 0.0, 0
    for run in chosen:
        t0 = time.perf_counter()
        summary = evaluate_run(run.folder, progress=False, tta=True)
        seconds += time.perf_counter() - t0
        scans += summary["n"]
        plain[str(run.seed)], flipped[str(run.seed)] = run.value("mean_dice"), summary["mean_dice"]
        plain_csf[str(run.seed)] = run.value("dice_csf")
        flipped_csf[str(run.seed)] = summary["dice_csf"]
    return {
        "runs": f"the '{lever}' cell of the study, one run per seed",
        "mean_dice": difference(paired("TTA (flips) vs none", "mean_dice", flipped, plain)),
        "dice_csf": difference(paired("TTA (flips) vs none", "dice_csf", flipped_csf, plain_csf)),
        "evaluation_seconds_per_scan_with_tta": number(seconds / max(scans, 1), 2),
        "note": "evaluation time includes reading, preprocessing and native-resolution metrics",
    }


def default_cell_config(runs: list) -> dict | None:
    """The model, loss and train sections of a finished run of the 'default' lever."""
    import yaml

    for run in runs:
        if run.result is not None and run.labels.get("levers", {}).get("lever") == "default":
            config = yaml.safe_load((run.folder / "config.yaml").read_text())
            return {k: config[k] for k in ("model", "loss", "train")}
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--profile", default="cpu", choices=["quick", "cpu", "paper"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "work" / "levers")
    parser.add_argument("--jobs", type=int, default=0, help="runs at once (0: one per core)")
    parser.add_argument(
        "--seeds", default="", help="comma-separated seeds (default: the profile's)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--collect-only",
        action="store_true",
        help="train nothing: the figures of the runs finished in --out (a study cut short)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="quick profile on the demo cohort into /tmp: checks the script, measures nothing",
    )
    args = parser.parse_args()
    data: str | None = str(args.data)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or None
    overrides: dict = {}
    if args.dry_run:
        data, args.profile = None, "quick"
        overrides = {"train.val_every": 2}
        args.out = Path("/tmp/lowlabel-levers-dry-run")
        if args.results == RESULTS:
            args.results = args.out / "levers.json"
    elif not args.data.exists():
        sys.exit(f"{args.data}: malf35 not found; pass --data")

    from lowlabel.atomic import write_json
    from lowlabel.provenance import machine
    from lowlabel.study.report.runs import load_runs
    from lowlabel.study.report.tables import comparisons
    from lowlabel.study.runner import run_study
    from lowlabel.study.spec import load_study
    from lowlabel.study.stats import summarize

    described, load_start = machine(), load_average()
    t0 = time.perf_counter()
    study = load_study("levers")
    if args.dry_run:  # a few steps per run, rescaled so that "twice the steps" stays twice
        quick = dict(study.profiles["quick"], scale=0.002, min_train_steps=4)
        study = dataclasses.replace(study, profiles={**study.profiles, "quick": quick})
    outcome = None
    try:
        if not args.collect_only:
            outcome = run_study(
                study,
                args.profile,
                data,
                args.out,
                jobs=args.jobs,
                seeds=seeds,
                overrides=overrides,
                progress=False,
            )
    except KeyboardInterrupt:
        print(
            f"interrupted: the finished runs in {args.out} are kept; rerun the same command to "
            "go on",
            file=sys.stderr,
        )
        sys.exit(130)
    study_seconds = time.perf_counter() - t0
    plan, runs = load_runs(args.out)
    finished = sum(r.result is not None for r in runs)
    levels = list(study.axes["lever"])
    per_lever: dict[str, dict] = {}
    for run in runs:
        lever = run.labels.get("levers", {}).get("lever")
        if lever is not None and run.result is not None:
            per_lever.setdefault(lever, {})[str(run.seed)] = run
    lever_rows = {}
    for lever, by_seed in per_lever.items():
        row = {"seeds": sorted(int(s) for s in by_seed)}
        for metric in ("mean_dice", "dice_csf", "dice_gm", "dice_wm"):
            s = summarize(r.value(metric) for r in by_seed.values())
            row[metric] = {"mean": number(s.mean), "ci95": [number(s.ci_low), number(s.ci_high)]}
        row["train_seconds_mean"] = number(
            sum(r.result["train_seconds"] for r in by_seed.values()) / len(by_seed), 1
        )
        row["steps_mean"] = number(sum(r.value("steps") for r in by_seed.values()) / len(by_seed))
        lever_rows[lever] = row
    t1 = time.perf_counter()
    tta = tta_arm(runs)
    results = {
        "dry_run": args.dry_run,
        "what": (
            "DRY RUN on the synthetic demo cohort at 4 mm, a few steps per run: proves the "
            "script, measures nothing"
            if args.dry_run
            else "levers screening on malf35 with 3 labelled subjects, test Dice on the fixed "
            "test split, each lever against the default, paired by seed"
        ),
        "machine": described,
        "load_average_at_start": load_start,
        "load_average_at_end": load_average(),
        "command": "python benchmarks/levers.py " + " ".join(sys.argv[1:]),
        "study": "levers",
        "profile": args.profile,
        "data": data or "demo cohort",
        "study_dir": str(args.out),
        "overrides": overrides,
        "profile_scale": study.profiles[args.profile].get("scale"),
        "runs": len(runs),
        "finished_runs": finished,
        "ran_now": outcome.ran if outcome else 0,
        "skipped_finished": outcome.skipped if outcome else finished,
        "failed": outcome.failed if outcome else None,
        "study_wall_seconds": round(study_seconds, 1) if outcome else None,
        "study_wall_seconds_covers": (
            "nothing: --collect-only read the runs finished earlier"
            if outcome is None
            else "every run"
            if not outcome.skipped
            else f"the {outcome.ran} runs this invocation ran; {outcome.skipped} had finished in "
            "earlier invocations (train_seconds_all_runs covers them all)"
        ),
        "train_seconds_all_runs": round(
            sum(r.result["train_seconds"] for r in runs if r.result is not None), 1
        ),
        "tta_wall_seconds": round(time.perf_counter() - t1, 1),
        "levels": levels,
        # what the 'default' cell trained: lowlabel train's defaults when the screen ran, with
        # the profile's settings on top (a later change of defaults leaves these figures alone)
        "default_cell_config": default_cell_config(runs),
        "comparisons": [difference(d) for d in comparisons(plan, runs)],
        "tta": tta,
        "per_lever": lever_rows,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.results, results)
    print(json.dumps({k: results[k] for k in ("study_wall_seconds", "runs", "finished_runs")}))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
