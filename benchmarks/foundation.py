"""Foundation benchmark: 3 labelled subjects vs all training subjects on malf35, on the CPU.

Trains one run with ``data.budget=3`` and one with every training subject (``data.budget=0``) on
the fixed malf35 split (7 test, 3 validation, 15 in the labelled pool), each within a wall-clock
training budget, evaluates both at each scan's native resolution and writes
``benchmarks/results/foundation.json``.

Usage:
    python benchmarks/foundation.py [--data ../shared/data/malf35/dataset.json] [--minutes 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from lowlabel.config import load_config, run_dir

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "malf35" / "dataset.json"

# The setting chosen by measurement (see the closing note of the foundation issue): 3D patches at
# the scans' native 1 mm, so nothing is lost to resampling before native-resolution evaluation.
SETTINGS = {
    "data.n_test": 7,
    "data.n_val": 3,
    "data.split_seed": 0,
    "data.spatial_dims": 3,
    "data.spacing": [1.0, 1.0, 1.0],
    "data.patch_size": [64, 64, 64],
    "model.levels": 4,
    "model.channels": 16,
    "model.num_res_units": 0,
    "train.batch_size": 2,
    "train.lr": 0.001,
    "train.val_every": 250,
    "train.patience": 6,
}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


ARMS = {
    "low": {"data.budget": 3},
    "full": {"data.budget": 0},
    "low_noaug": {"data.budget": 3, "augment.enabled": False},
}


def arm_settings(name: str, args: argparse.Namespace) -> dict:
    return dict(
        SETTINGS,
        **ARMS[name],
        **{
            "name": name,
            "train.threads": args.threads,
            "train.max_minutes": args.minutes,
            "train.steps": args.steps,
        },
    )


def launch(name: str, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "lowlabel.cli",
        "train",
        "--data",
        str(args.data),
        "--out",
        str(args.out),
        "--resume",
        "--quiet",
    ]
    for key, value in arm_settings(name, args).items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    return subprocess.Popen(cmd)


def collect(name: str, args: argparse.Namespace) -> dict:
    sets = arm_settings(name, args)
    cfg = load_config(None, dict(sets, **{"data.dataset": str(args.data), "out": str(args.out)}))
    folder = run_dir(cfg)
    result = json.loads((folder / "result.json").read_text())
    test = result["test"]
    return {
        "n_labelled": result["n_labelled"],
        "augmentation": cfg.augment.enabled,
        "mean_dice": round(test["mean_dice"], 4),
        "dice_csf": round(test["dice_csf"], 4),
        "dice_gm": round(test["dice_gm"], 4),
        "dice_wm": round(test["dice_wm"], 4),
        "mean_dice_sd_over_subjects": round(test["mean_dice_sd"], 4),
        "hd95_mean": round(test["hd95_mean"], 3),
        "test_loss": round(test["test_loss"], 4),
        "train_seconds": round(result["train_seconds"], 1),
        "steps": result["steps"],
        "best_step": result["best_step"],
        "stopped_early": result["stopped_early"],
        "peak_rss_mb": round(result["peak_rss_mb"]),
        "n_test": test["n"],
        "run_dir": str(folder),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "work" / "foundation")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument(
        "--steps",
        type=int,
        default=6000,
        help="step budget; the time budget usually ends training first",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    parser.add_argument("--arms", default="low,full", help="comma-separated: low, full, low_noaug")
    parser.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results" / "foundation.json"
    )
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data}: malf35 not found; pass --data")
    from lowlabel.atomic import write_json
    from lowlabel.provenance import machine

    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    results.update(
        {
            "machine": machine(),
            "command": "python benchmarks/foundation.py " + " ".join(sys.argv[1:]),
            "settings": SETTINGS,
            "minutes_budget": args.minutes,
            "threads": args.threads,
            "steps_budget": args.steps,
        }
    )
    names = args.arms.split(",")
    # The arms run side by side, one process per arm with `--threads` torch threads each
    # (on 2 cores, 2 processes x 1 thread beat 1 x 2), each within the same training budget.
    load_before = load_average()
    procs = {name: launch(name, args) for name in names}
    for name, proc in procs.items():
        if proc.wait() != 0:
            sys.exit(f"arm {name} failed with status {proc.returncode}")
    load_after = load_average()
    for name in names:
        results[name] = collect(name, args)
        # other jobs shared the machine when the load average exceeds the core count
        results[name]["load_average_before_after"] = [load_before, load_after]
        print(name, json.dumps(results[name]))
    write_json(args.results, results)


if __name__ == "__main__":
    main()
