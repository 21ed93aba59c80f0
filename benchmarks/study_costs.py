"""Where the ``cpu`` study's time goes, and what the levers to make it cheaper are worth.

Runs seed 0 of the shipped ``seed`` study at the ``cpu`` profile (every one of its 20 runs:
pretraining, scratch and transfer) with short budgets, ``--jobs`` at a time through
``run_study`` as the study runs them, and splits each run's time from its own files:

- preparation: ``prep_seconds`` (reading, resampling and caching the scans);
- training steps: steps / ``steps_per_s`` of ``provenance.json`` (batch waits included);
- validation: the rest of ``train_seconds`` (validations and the checkpoint saved with each);
- test evaluation: from ``last.safetensors`` (saved at the last validation) to
  ``evaluation.json`` (7 scans at native resolution: Dice, HD95, volumes);
- pretraining: ``seconds`` per step (its validations included).

These unit costs, times the steps each cell ran in the measured 5-seed study (the "Steps run"
column of ``study_cpu_report.md``), model one seed of the full profile; the model's total over 5
seeds and ``--jobs`` runs at a time is set against the study's measured ``wall_seconds``. Levers
are priced on that model: validating every 100 steps, leaving out the Models Genesis arms,
dropping HD95 from the test metrics (its share of evaluation from a profile of one run's
evaluation), and, measured side by side on synthetic batches, ``torch.compile`` and
channels-last for each network (step time and the first step's compile cost).

    nice -n 10 python benchmarks/study_costs.py --data ../shared/data/malf35/dataset.json

Writes ``benchmarks/results/study_costs.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from study import machine  # noqa: E402  (benchmarks/study.py: the same machine line)


def report_steps(report: Path) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{table: {((axis, level), ...): mean steps run}}`` from a study report's tables."""
    out: dict[str, dict] = {}
    table = None
    header: list[str] = []
    for line in report.read_text().splitlines():
        m = re.match(r"## Table (\S+?):", line)
        if m:
            table, header = m.group(1), []
            continue
        if table is not None and header and not line.startswith("|"):
            table = None  # only the first table under a heading: its Dice table
        if table is None or not line.startswith("|") or line.startswith("|---"):
            continue
        cols = [c.strip() for c in line.strip("|").split("|")]
        if not header:
            header = cols
            continue
        if "Steps run" not in header:
            continue
        axes = header[: header.index("Test loss")] if "Test loss" in header else []
        key = tuple((a.lower(), v) for a, v in zip(axes, cols, strict=False))
        steps = cols[header.index("Steps run")].split(" ±")[0]
        out.setdefault(table, {})[key] = float(steps)
    return out


def cell_mean_steps(labels: dict, steps: dict) -> float | None:
    """The mean steps the measured study ran for a cell, from the first of its tables listed."""
    for table, axes in labels.items():
        key = tuple(sorted(axes.items()))
        for row, n in steps.get(table, {}).items():
            if tuple(sorted(row)) == key:
                return n
    return None


def network(cfg) -> str:
    m, t = cfg.model, cfg.transfer
    name = f"L{m.levels}R{m.num_res_units}"
    return name + ("-frozen" if t.mode == "frozen" else "")


def split_run(run_dir: Path) -> dict:
    """The parts of one finished training run's time, in seconds."""
    result = json.loads((run_dir / "result.json").read_text())
    speed = json.loads((run_dir / "provenance.json").read_text())["speed"]
    steps = int(result["steps"])
    step_seconds = steps / float(speed["steps_per_s"])
    n_val = len((run_dir / "metrics.jsonl").read_text().splitlines())
    eval_s = (run_dir / "evaluation.json").stat().st_mtime - (
        run_dir / "last.safetensors"
    ).stat().st_mtime
    return {
        "steps": steps,
        "prepare": float(result["prep_seconds"]),
        "step": step_seconds / steps,
        "validation": (float(result["train_seconds"]) - step_seconds) / max(n_val, 1),
        "validations": n_val,
        "evaluation": eval_s,
    }


def eval_parts(run_dir: Path) -> dict:
    """Profile one evaluation of a run's test scans: total and the share of its parts."""
    import torch

    from lowlabel.data.datasets import load_dataset
    from lowlabel.engine.evaluate import evaluate
    from lowlabel.engine.runs import _test_split, load_run

    torch.set_num_threads(1)
    cfg, model = load_run(run_dir)
    source, test = _test_split(run_dir)
    subjects = load_dataset(source).by_id(test)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    evaluate(model, cfg, subjects, None, progress=False)
    prof.disable()
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    parts = {
        "HD95 (MONAI compute_hausdorff_distance)": "compute_hausdorff_distance",
        "back to native resolution (Invertd)": "to_native",
        "network (predict_logits)": "predict_logits",
        "preprocessing": "unwrap",
        "reading scans and labels": "read_nifti",
        "brain region": "brain_region",
    }
    out = {"scans": len(subjects), "seconds": round(total, 2)}
    for label, fn in parts.items():
        sec = max((v[3] for k, v in stats.items() if k[2] == fn), default=0.0)
        out[label] = round(sec / total, 3)
    return out


LEVERS = [
    ("eager", 1, {}),
    ("channels_last", 1, {"train.channels_last": True}),
    ("compile", 1, {"train.compile": True}),
]
LEVER_CODE = (
    "import json, sys; sys.path.insert(0, sys.argv[1]); from train_speed import lever_times; "
    "from lowlabel.config import from_dict; "
    "print(json.dumps(lever_times(from_dict(json.loads(sys.argv[2])), json.loads(sys.argv[3]))))"
)


def step_levers(configs: dict[str, dict]) -> dict:
    """Training-step time per network on synthetic batches at 1 thread (``train_speed``'s
    ``lever_times``): the profile's step, channels-last and ``torch.compile``, each network in a
    fresh process with a fresh compile cache, so the first compiled step pays the whole compile."""
    import subprocess

    here = str(Path(__file__).resolve().parent)
    out: dict[str, dict] = {}
    for name, cfg in configs.items():
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor-"))
        cmd = [sys.executable, "-c", LEVER_CODE, here, json.dumps(cfg), json.dumps(LEVERS)]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        times = json.loads(res.stdout.strip().splitlines()[-1])
        base = times["eager"]["s_per_step"]
        for mode in ("channels_last", "compile"):
            times[mode]["speedup"] = round(base / times[mode]["s_per_step"], 2)
        out[name] = times
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True, help="malf35 dataset.json")
    ap.add_argument("--out", default=None, help="study folder (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=200, help="training steps per run")
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--report", default=str(RESULTS / "study_cpu_report.md"))
    ap.add_argument("--study-json", default=str(RESULTS / "study.json"))
    ap.add_argument("--results", default=str(RESULTS / "study_costs.json"))
    args = ap.parse_args()

    from lowlabel.study.runner import run_study
    from lowlabel.study.spec import expand, load_study, profile_of

    study = load_study("seed")
    prof = profile_of(study, "cpu")
    measured = json.loads(Path(args.study_json).read_text())["cpu"]
    seeds_measured = int(measured["seeds"])
    out = Path(args.out or tempfile.mkdtemp(prefix="lowlabel-study-costs-"))
    load_before = [round(x, 2) for x in os.getloadavg()]
    overrides = {"train.steps": args.steps}  # patience as in the profile: it names the runs
    overrides["pretrain.steps"] = args.pretrain_steps
    t0 = time.perf_counter()
    short = run_study(
        study,
        "cpu",
        args.data,
        out,
        jobs=args.jobs,
        seeds=[0],
        overrides=overrides,
        progress=False,
        report=False,
    )
    short_wall = time.perf_counter() - t0

    # each run of the short study, with the tables it fills; the full profile's pretraining steps
    from lowlabel.config import from_dict
    from lowlabel.study.report.runs import load_runs

    full_pre = {
        c.cfg.name: c.cfg.pretrain.steps
        for c in expand(study, "cpu", args.data, out, seeds=[0])
        if c.kind == "pretrain"
    }
    _, runs = load_runs(out)
    steps_run = report_steps(Path(args.report))
    val_every = int(prof["set"]["train.val_every"])
    units: dict[str, list[dict]] = {}
    pre_units: list[dict] = []
    rows = []
    configs = {}
    for run in runs:
        cfg = from_dict(run.config)
        if run.kind == "pretrain":
            per_step = float(run.result["seconds"]) / int(run.result["steps"])
            steps = full_pre[cfg.name]
            pre_units.append({"run": cfg.name, "per_step": per_step})
            rows.append(
                {
                    "run": cfg.name,
                    "tables": ["2a"],
                    "kind": "pretrain",
                    "steps": steps,
                    "pretraining": per_step * steps,
                }
            )
            continue
        parts = split_run(run.folder)
        net = network(cfg)
        units.setdefault(net, []).append(parts)
        configs.setdefault(net.replace("-frozen", ""), run.config)
        steps = cell_mean_steps(run.labels, steps_run)
        if steps is None:
            raise SystemExit(f"{args.report}: no 'Steps run' for {cfg.name} {run.labels}")
        rows.append(
            {
                "run": cfg.name,
                "tables": sorted(run.labels),
                "kind": "train",
                "network": net,
                "init": cfg.transfer.init_from or "scratch",
                "steps": steps,
                "preparation": parts["prepare"],
                "training": parts["step"] * steps,
                "validation": parts["validation"] * (steps / val_every),
                "test evaluation": parts["evaluation"],
            }
        )
    parts_names = ["preparation", "training", "validation", "test evaluation", "pretraining"]
    per_seed = {p: round(sum(r.get(p, 0.0) for r in rows), 1) for p in parts_names}
    seed_total = sum(per_seed.values())
    model_wall = seed_total * seeds_measured / args.jobs
    by_table: dict[str, float] = {}
    for r in rows:
        by_table[r["tables"][0]] = by_table.get(r["tables"][0], 0.0) + sum(
            r.get(p, 0.0) for p in parts_names
        )

    # levers priced on the model
    genesis = sum(
        sum(r.get(p, 0.0) for p in parts_names)
        for r in rows
        if "genesis" in r["run"] or "pre-genesis" in str(r.get("init"))
    )
    evaluation = eval_parts(Path(next(Path(out, "runs").glob("seg-L3R0P5-N3-scratch-s0-*"))))
    hd95_share = evaluation["HD95 (MONAI compute_hausdorff_distance)"]
    lever_seconds = {
        "validate every 100 steps instead of 50 (patience counted in validations would double "
        "in steps)": per_seed["validation"] / 2,
        "leave out the Models Genesis arms (1 pretraining and 2 transfer runs per seed)": genesis,
        "no HD95 in the test metrics": per_seed["test evaluation"] * hd95_share,
    }
    steps_levers = step_levers(configs)

    result = {
        "what": "where one seed of the cpu study's time goes (model from short runs of its 20 "
        "runs, times the steps each cell ran in the measured study), and levers priced on it",
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "command": "nice -n 10 python benchmarks/study_costs.py " + " ".join(sys.argv[1:]),
        "short_runs": {
            "train_steps": args.steps,
            "pretrain_steps": args.pretrain_steps,
            "jobs": args.jobs,
            "wall_seconds_this_invocation": round(short_wall, 1),
            "ran_now": short.ran,
            "reused_from_an_earlier_invocation": short.skipped,
        },
        "unit_seconds": {
            net: {
                k: round(statistics.median(p[k] for p in ps), 4)
                for k in ("prepare", "step", "validation", "evaluation")
            }
            for net, ps in sorted(units.items())
        },
        "pretrain_seconds_per_step": {u["run"]: round(u["per_step"], 4) for u in pre_units},
        "per_seed_seconds": per_seed,
        "per_seed_share": {p: round(v / seed_total, 3) for p, v in per_seed.items()},
        "per_seed_by_table_seconds": {t: round(v, 1) for t, v in sorted(by_table.items())},
        "model_wall_seconds": round(model_wall, 1),
        "measured_wall_seconds": measured["wall_seconds"],
        "model_over_measured": round(model_wall / float(measured["wall_seconds"]), 3),
        "evaluation_profile": evaluation,
        "levers_share_of_study": {k: round(v / seed_total, 3) for k, v in lever_seconds.items()},
        "step_levers": steps_levers,
        "runs": [
            {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in rows
        ],
    }
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("per_seed_share", "model_over_measured", "levers_share_of_study")
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
