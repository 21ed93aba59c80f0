"""The local backend against Ray on one machine, side by side in one script run.

Ray sets ``OMP_NUM_THREADS`` to a task's CPUs in its workers (and so in their data-loader
processes); lowlabel's local workers used to pin only torch's threads, leaving the OpenMP and BLAS
pools sized to every core, and were measured slower than Ray on a quiet 2-core machine (quick
study: 153 s local vs 88 s Ray). The local workers now start with those variables set
(``lowlabel.study.runner.worker_env``). This script runs the same study three ways, each from an
empty study folder and in turn (so they see similar load): local as it is now, local without the
thread variables (as before), and a local Ray (``ray.init`` with 2 CPUs inside the study process,
so nothing is left running after it). Wall times and ratios go to
``benchmarks/results/study_backends.json`` with the machine and load average; on a shared
machine the load moves between arms, so read the ratios with the load figures beside them.

    nice -n 10 python benchmarks/study_backends.py                   # table 1a of quick, 1 seed
    nice -n 10 python benchmarks/study_backends.py --set train.steps=100   # shorter runs
    nice -n 10 python benchmarks/study_backends.py --tables all --seeds 0 1   # the whole quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEED_YAML = Path(__file__).resolve().parents[1] / "src" / "lowlabel" / "studies" / "seed.yaml"

# the study command, optionally with the local workers' thread variables switched off
LAUNCH = """
import sys
import lowlabel.study.runner as runner
if sys.argv.pop(1) == "bare":
    runner.THREAD_ENV = ()
from lowlabel.cli import main
sys.argv[0] = "lowlabel"
main()
"""


def cut_study(tables: list[str], seeds: list[int], path: Path) -> Path:
    """The seed study cut to ``tables`` (with their comparisons and the pretraining they need)."""
    raw = yaml.safe_load(SEED_YAML.read_text())
    if tables != ["all"]:
        raw["tables"] = {t: v for t, v in raw["tables"].items() if t in tables}
        raw["comparisons"] = [c for c in raw["comparisons"] if str(c["table"]) in tables]
        used = {v.get("pretraining") for v in raw["tables"].values()}
        refs = {
            str(lv.get("transfer.init_from", "")).lstrip("@").split(":")[0]
            for t in raw["tables"].values()
            for a in t.get("axes") or []
            for lv in raw["axes"][a].values()
        }
        raw["pretraining"] = {k: v for k, v in raw["pretraining"].items() if k in used | refs}
    raw["name"] = "seed-cut"
    raw["profiles"]["quick"]["seeds"] = seeds
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_arm(arm: str, study: Path, out: Path, sets: list[str]) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-c", LAUNCH, "bare" if arm == "local, torch threads only" else "as-is"]
    cmd += ["study", str(study), "--profile", "quick", "--out", str(out), "--quiet"]
    for item in sets:
        cmd += ["--set", item]
    if arm == "ray (local, 2 CPUs)":
        cmd += ["--backend", "ray"]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    }
    load = [round(x, 1) for x in os.getloadavg()]
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=env, check=False).returncode
    wall = time.perf_counter() - t0
    result = out / "study_result.json"
    summary = json.loads(result.read_text()) if result.exists() else {}
    seconds = []
    for res in out.glob("runs/*/result.json"):
        data = json.loads(res.read_text())
        seconds.append(data.get("train_seconds", data.get("seconds", 0.0)))
    return {
        "arm": arm,
        "exit_code": rc,
        "wall_seconds": round(wall, 1),
        "runs": summary.get("runs"),
        "ran": summary.get("ran"),
        "mean_run_train_seconds": round(sum(seconds) / len(seconds), 2) if seconds else None,
        "load_average_before": load,
        "load_average_after": [round(x, 1) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", default=["1a"], help="tables to keep, or 'all'")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], help="config override for every run"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lowlabel-backends-"))
    study = cut_study(args.tables, args.seeds, work / "study.yaml")
    described = machine()
    arms = ["local (thread variables set)", "local, torch threads only", "ray (local, 2 CPUs)"]
    rows = [run_arm(arm, study, work / f"arm{i}", args.sets) for i, arm in enumerate(arms)]
    base = rows[0]["wall_seconds"]
    for row in rows:
        row["wall_vs_local"] = round(row["wall_seconds"] / base, 3) if base else None
    out = {
        "machine": described,
        "shared_machine": os.getloadavg()[0] > 1.5,
        "note": "arms run one after another on the same machine; other jobs' load moves "
        "between them (see load_average_before/after), so ratios near 1 are within that noise",
        "study": {
            "tables": args.tables,
            "seeds": args.seeds,
            "profile": "quick",
            "set": args.sets,
        },
        "benchmark_command": "nice -n 10 python benchmarks/study_backends.py "
        + " ".join(sys.argv[1:]),
        "arms": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "study_backends.json"
    earlier = json.loads(path.read_text()) if path.exists() else None
    if earlier:
        out["earlier_runs"] = [*earlier.pop("earlier_runs", []), earlier]
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
