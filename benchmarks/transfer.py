"""Does pretraining on the unlabelled training pool help segmentation with 1 or 3 labels?

Pretrains once per method on the training pool of malf35 (labels ignored; validation and test
subjects never seen), then trains segmentation networks from scratch and from each pretrained
encoder (frozen / fine-tuned) for label budgets 1 and 3 and several seeds (a seed changes both
the labelled draw ``data.draw`` and the initialisation ``seed``). Mean and per-class Dice on the
fixed test split; paired difference to scratch per seed with a 95% t-interval over seeds.

Writes ``benchmarks/results/transfer.json`` after every finished run, so an interrupted
benchmark leaves true partial figures; rerunning skips finished runs.

Usage:
    nice -n 10 python benchmarks/transfer.py --data ../shared/data/malf35/dataset.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

from lowlabel.atomic import write_json

GENESIS_FULL = {
    "settings": "pretrain defaults (nonlinear 0.9, shuffle 0.5, paint 0.9, in-paint share 0.2)",
    "steps": 1000,
    "batch_size": 4,
    "train_loss": 0.731,
    "val_mse": 0.373,
    "val_mae": 0.358,
    "outcome": "reconstructions flat grey: the network predicted the mean; not benchmarked",
}
# the consistency weight, chosen on validation Dice before the benchmark (1 label, seed 0, 300
# steps; scratch had 0.759): weight 10 pulled the student too hard towards a weak teacher
SEMI_WEIGHT_PILOT = {
    "budget": 1,
    "seed": 0,
    "val_dice": {"scratch": 0.759, "weight 1": 0.740, "weight 10": 0.697},
    "chosen": 1.0,
}
# the first pass of the mean-teacher arms, when only the teacher was validated and kept: in 300
# steps the moving average (ema 0.99) lagged the student, CSF above all (3 seeds, test mean Dice)
MEAN_TEACHER_TEACHER_ONLY = {
    "1": {
        "mean_teacher:scratch": {"mean_dice": 0.7628, "gain": -0.0092, "ci95": [-0.0179, -0.0006]},
        "genesis+mean_teacher:finetune": {
            "mean_dice": 0.7682,
            "gain": -0.0038,
            "ci95": [-0.0233, 0.0157],
        },
    },
    "3": {
        "mean_teacher:scratch": {"mean_dice": 0.7507, "gain": -0.029, "ci95": [-0.0787, 0.0206]},
        "genesis+mean_teacher:finetune": {
            "mean_dice": 0.7615,
            "gain": -0.0183,
            "ci95": [-0.0501, 0.0136],
        },
    },
}
ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "transfer.json"
GOAL = {"1": 0.02, "3": 0.01}
CLASSES = ("csf", "gm", "wm")

# Models Genesis' full corruption (non-linear intensity curves, out-painting) left the network
# predicting the mean at this scale (1000 steps: val MSE 0.37, flat reconstructions); local
# shuffling plus in-painting is learnable in that budget and still defeats the skip shortcut
METHOD_SETTINGS = {"genesis": {"pretrain.nonlinear_prob": 0.0, "pretrain.inpaint_prob": 1.0}}

# the transfer modes compared; gradual unfreezes a third of the way through the 300 steps
MODES = {
    "frozen": {"transfer.mode": "frozen"},
    "finetune": {"transfer.mode": "finetune"},
    "finetune-lr0.1": {"transfer.mode": "finetune", "transfer.encoder_lr_scale": 0.1},
    "gradual": {"transfer.mode": "gradual", "transfer.unfreeze_after": 100},
}

# mean teacher: the unlabelled pool joins fine-tuning (the same images pretraining uses)
SEMI = {"semi.method": "mean_teacher", "semi.weight": 1.0, "semi.rampup": 0.4, "semi.ema": 0.99}

# CPU scale: 2 mm voxels, 32^3 patches, a 3-level residual UNet, a few hundred steps
SCALE = {
    "data.spacing": [2.0, 2.0, 2.0],
    "data.patch_size": [32, 32, 32],
    "model.levels": 3,
    "model.channels": 16,
    "train.schedule": "poly",  # the defaults when these figures were measured
    "model.num_res_units": 2,
    "train.batch_size": 2,
    "train.val_every": 50,
    "train.patience": 5,
    "train.threads": 1,
}


def nested(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def finished(folder: Path, name: str) -> Path | None:
    """The newest finished run folder named ``name-<hash>``; looked up by name, not recomputed,
    so a config default added while the benchmark runs does not orphan finished runs."""
    done = sorted(folder.glob(f"{name}-*/result.json"), key=lambda p: p.stat().st_mtime)
    return done[-1].parent if done else None


def run(kind: str, flat: dict, folder: Path, log: Path, collect: bool = False) -> Path:
    """Run ``lowlabel train|pretrain`` on a config written to ``folder``; returns its run folder.

    With ``collect`` nothing is started: an unfinished run raises RuntimeError.
    """
    name = flat["name"]
    if collect and finished(folder, name) is None:
        raise RuntimeError(f"{name}: not finished (collect only)")
    cfg_file = folder / "configs" / f"{name}.yaml"
    cfg_file.parent.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(yaml.safe_dump(nested(flat), sort_keys=False))
    if finished(folder, name) is None:
        cmd = [
            "nice",
            "-n",
            "10",
            sys.executable,
            "-m",
            "lowlabel.cli",
            kind,
            "--config",
            str(cfg_file),
            "--resume",
            "--quiet",
        ]
        with open(log, "a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode:
            raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {log}")
    rdir = finished(folder, name)
    if rdir is None:
        raise RuntimeError(f"{name}: finished without result.json; see {log}")
    return rdir


def t_interval(diffs: list[float]) -> tuple[float, float | None, float | None]:
    """Mean and 95% t-interval; no interval from a single seed (None, so the JSON stays valid)."""
    d = np.asarray(diffs, dtype=float)
    mean = float(d.mean())
    if len(d) < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return mean, mean - half, mean + half


def summarise(rows: list[dict], arms: list[tuple[str, str]], budgets: list[int]) -> dict:
    """Table (mean, SD per arm and budget), paired differences to scratch and best gains."""
    table, diffs, best = [], [], {}
    for b in budgets:
        scratch = {r["seed"]: r for r in rows if r["budget"] == b and r["method"] == "none"}
        for method, mode in arms:
            cell = [
                r for r in rows if r["budget"] == b and r["method"] == method and r["mode"] == mode
            ]
            if not cell:
                continue
            entry = {"budget": b, "method": method, "mode": mode, "seeds": len(cell)}
            for key in ("mean_dice", *[f"dice_{c}" for c in CLASSES]):
                vals = np.array([r[key] for r in cell])
                entry[key] = float(vals.mean())
                entry[key + "_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else None
            table.append(entry)
            if method == "none":
                continue
            paired = [r for r in cell if r["seed"] in scratch]
            if not paired:
                continue
            d = {"budget": b, "method": method, "mode": mode, "seeds": len(paired)}
            for key in ("mean_dice", *[f"dice_{c}" for c in CLASSES]):
                mean, lo, hi = t_interval([r[key] - scratch[r["seed"]][key] for r in paired])
                d[key] = {"gain": mean, "ci95_low": lo, "ci95_high": hi}
            diffs.append(d)
        cands = [d for d in diffs if d["budget"] == b]
        if cands:
            top = max(cands, key=lambda d: d["mean_dice"]["gain"])
            best[str(b)] = {
                "method": top["method"],
                "mode": top["mode"],
                **top["mean_dice"],
                "seeds": top["seeds"],
            }
    goal_met = {
        b: bool(g["gain"] >= GOAL[b] and (g["ci95_low"] or 0) > 0)
        for b, g in best.items()
        if b in GOAL
    }
    return {
        "table": table,
        "differences": diffs,
        "best_gain": best,
        "goal": GOAL,
        "goal_met": goal_met,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", default=str(ROOT.parent / "shared" / "data" / "malf35" / "dataset.json")
    )
    ap.add_argument("--out", default="/tmp/lowlabel-bench/transfer")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--methods", nargs="+", default=["autoencoder", "genesis"])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument(
        "--semi",
        nargs="*",
        default=[],
        metavar="ARM",
        help="mean-teacher arms: 'scratch' (random init) and/or METHOD (fine-tuned from it)",
    )
    ap.add_argument("--semi-weight", type=float, default=SEMI["semi.weight"])
    ap.add_argument("--steps", type=int, default=300, help="segmentation steps per run")
    ap.add_argument("--pretrain-steps", type=int, default=1000)
    ap.add_argument("--pretrain-batch", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (1 thread each)")
    ap.add_argument("--result", default=str(RESULT))
    ap.add_argument(
        "--first",
        nargs="*",
        default=[],
        metavar="METHOD:MODE",
        help="run these arms (and scratch) for every seed before the others",
    )
    ap.add_argument(
        "--collect", action="store_true", help="start nothing: summarise the runs that finished"
    )
    args = ap.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"{args.data}: dataset not found")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "benchmark.log"
    t0 = time.time()
    load0 = [round(x, 1) for x in os.getloadavg()]
    base = {
        "out": str(out),
        "data.dataset": str(Path(args.data).resolve()),
        **SCALE,
        "train.steps": args.steps,
    }

    pre: dict = {}
    pre_cfgs = {
        m: {
            **base,
            "name": f"pretrain-{m}",
            "seed": 0,
            "pretrain.method": m,
            "pretrain.steps": args.pretrain_steps,
            "train.batch_size": args.pretrain_batch,
            "pretrain.save_steps": [args.pretrain_steps // 4, args.pretrain_steps // 2],
            **METHOD_SETTINGS.get(m, {}),
        }
        for m in args.methods
    }
    ready = {m for m in args.methods if finished(out, f"pretrain-{m}")}
    # one pool for everything: pretraining first, then the segmentation runs; runs that need a
    # checkpoint still being made go last, so the other slot keeps working meanwhile
    pool = ThreadPoolExecutor(args.jobs)
    pre_futures = {
        m: pool.submit(run, "pretrain", pre_cfgs[m], out, log, args.collect)
        for m in sorted(args.methods, key=lambda m: m in ready)
    }

    def pretrained(m: str) -> Path:
        d = pre_futures[m].result()
        r = json.loads((d / "result.json").read_text())
        pre[m] = {
            "run_dir": str(d),
            "steps": r["steps"],
            "train_loss": r["train_loss"],
            "val_mse": r["val_mse"],
            "val_mae": r["val_mae"],
            "seconds": r["seconds"],
            "checkpoint": r["checkpoints"][str(r["steps"])],
            "settings": METHOD_SETTINGS.get(m, {}),
        }
        return d

    arms = [("none", "scratch")] + [(m, mode) for m in args.methods for mode in args.modes]
    arms += [
        ("mean_teacher", "scratch") if a == "scratch" else (f"{a}+mean_teacher", "finetune")
        for a in args.semi
    ]
    semi = {**SEMI, "semi.weight": args.semi_weight}
    jobs = []
    for seed in range(args.seeds):  # seed-major, so partial results stay paired
        for b in args.budgets:
            for method, mode in arms:
                flat = {
                    **base,
                    "name": f"{method}-{mode}-b{b}-s{seed}",
                    "seed": seed,
                    "data.draw": seed,
                    "data.budget": b,
                    **MODES.get(mode, {"transfer.mode": mode}),
                    **(semi if method.endswith("mean_teacher") else {}),
                }
                jobs.append((seed, b, method, mode, flat))
    jobs.sort(key=lambda j: j[3] != "scratch" and j[2] not in ready)
    jobs.sort(key=lambda j: j[3] != "scratch" and f"{j[2]}:{j[3]}" not in args.first)

    rows: list[dict] = []
    lock = threading.Lock()
    command = " ".join([Path(sys.argv[0]).name, *(a for a in sys.argv[1:] if a != "--collect")])

    def write(done: bool) -> None:
        summary = summarise(rows, arms, args.budgets)
        write_json(
            args.result,
            {
                "benchmark": "transfer",
                "finished": done and len(rows) == len(jobs),
                "command": f"nice -n 10 python benchmarks/{command}",
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_average_at_start": load0,
                    "load_average_now": [round(x, 1) for x in os.getloadavg()],
                    "note": f"runs niced, 1 thread each, {args.jobs} at a time",
                },
                "dataset": "malf35 (25 subjects; fixed test split of 6, validation 3, pool 16)",
                "scale": {
                    **SCALE,
                    "train.steps": args.steps,
                    "pretrain.steps": args.pretrain_steps,
                    "pretrain.batch_size": args.pretrain_batch,
                    "pretrain network": "same as the segmentation network (3 levels)",
                    "note": "CPU scale, not the original 3D 96^3 / 5000-step setting",
                },
                "seeds": args.seeds,
                "budgets": args.budgets,
                "arms": [list(a) for a in arms],
                "pretrain": pre,
                "method_settings": METHOD_SETTINGS,
                "mode_settings": {m: MODES[m] for m in args.modes},
                "semi_settings": semi if args.semi else None,
                "semi_weight_pilot": SEMI_WEIGHT_PILOT if args.semi else None,
                "semi_teacher_only_first_pass": MEAN_TEACHER_TEACHER_ONLY if args.semi else None,
                "genesis_full_corruption_attempt": GENESIS_FULL,
                "wall_seconds": round(time.time() - t0, 1),
                **summary,
                "runs": rows,
            },
        )

    def one(job) -> None:
        seed, b, method, mode, flat = job
        try:
            if mode != "scratch":
                source = method.split("+")[0]
                flat = {**flat, "transfer.init_from": str(pretrained(source))}
            d = run("train", flat, out, log, args.collect)
        except RuntimeError as err:  # one failed run must not discard the others' figures
            print(err, flush=True)
            return
        r = json.loads((d / "result.json").read_text())
        row = {
            "seed": seed,
            "budget": b,
            "method": method,
            "mode": mode,
            "run_dir": str(d),
            "steps": r["steps"],
            "best_step": r["best_step"],
            "train_seconds": r["train_seconds"],
            **{k: r["test"][k] for k in ("mean_dice", *[f"dice_{c}" for c in CLASSES])},
        }
        with lock:
            rows.append(row)
            write(False)
            print(f"{len(rows)}/{len(jobs)} {flat['name']}: {row['mean_dice']:.4f}", flush=True)

    for future in [pool.submit(one, job) for job in jobs]:
        future.result()
    pool.shutdown()
    for m in args.methods:
        pretrained(m)
    write(True)
    print(json.dumps(summarise(rows, arms, args.budgets)["best_gain"], indent=1))


if __name__ == "__main__":
    main()
