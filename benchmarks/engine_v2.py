"""Engine v2 check: the same seeded runs give the same metrics before and after the refactor.

Runs, on the demo cohort with one torch thread and no loader workers, a small foundation-style
supervised run, a mean-teacher run, and a Genesis pretraining run followed by a fine-tuning run
from its checkpoint. Prints (and with ``--json`` writes) every logged metric, the test summary
and a SHA-256 of each run's best weights (tensors only), so two code versions can be compared
to the last digit.

Usage (the "before" side with the old tree on PYTHONPATH):
    PYTHONPATH=src python benchmarks/engine_v2.py --out /tmp/ev2-after --json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from pathlib import Path

from lowlabel.config import load_config

BASE = {
    "data.spacing": [2.0, 2.0, 2.0],
    "data.patch_size": [32, 32, 32],
    "data.n_test": 2,
    "data.n_val": 2,
    "data.budget": 3,
    "model.levels": 3,
    "model.channels": 8,
    "train.steps": 40,
    "train.val_every": 10,
    "train.batch_size": 2,
    "train.threads": 1,
    "train.workers": 0,
}


def digest(path: Path) -> str:
    """SHA-256 of a checkpoint's tensors (not its metadata, which holds the output path)."""
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].tobytes())
    return h.hexdigest()[:16]


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds", None)  # wall clock
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--json")
    args = parser.parse_args()
    from lowlabel.engine.loop import fit
    from lowlabel.engine.pretrain import pretrain

    out = Path(args.out)
    t0 = time.perf_counter()
    runs = {}
    arms = {
        "foundation": {},
        "mean_teacher": {"semi.method": "mean_teacher", "semi.batch_size": 1},
    }
    for name, extra in arms.items():
        cfg = load_config(None, {**BASE, **extra, "name": name, "out": str(out)})
        res = fit(cfg, progress=False)
        run = Path(res.run_dir)
        runs[name] = {
            "metrics": metrics(run),
            "test_mean_dice": res.test["mean_dice"],
            "best_step": res.best_step,
            "best_weights": digest(run / "best.safetensors"),
        }
    pcfg = load_config(
        None,
        {
            **BASE,
            "name": "genesis",
            "out": str(out),
            "pretrain.method": "genesis",
            "pretrain.steps": 20,
        },
    )
    pres = pretrain(pcfg, progress=False)
    runs["genesis"] = {
        "metrics": metrics(Path(pres.run_dir)),
        "checkpoint": digest(Path(pres.checkpoints["20"])),
    }
    cfg = load_config(
        None,
        {
            **BASE,
            "name": "finetune",
            "out": str(out),
            "transfer.mode": "finetune",
            "transfer.init_from": pres.run_dir,
        },
    )
    res = fit(cfg, progress=False)
    runs["finetune"] = {
        "metrics": metrics(Path(res.run_dir)),
        "test_mean_dice": res.test["mean_dice"],
        "best_weights": digest(Path(res.run_dir) / "best.safetensors"),
    }
    report = {
        "machine": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "seconds": round(time.perf_counter() - t0, 1),
        "runs": runs,
    }
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
