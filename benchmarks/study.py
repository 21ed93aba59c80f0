"""Time the seed study: the ``quick`` profile on the demo cohort, the ``cpu`` profile on a dataset.

Each profile runs from an empty study folder (or, with ``--resume``, continues an interrupted one)
as ``lowlabel study seed --profile P`` in a child process; wall time, peak resident memory of the
whole process tree (sampled every 0.5 s) and CPU time are recorded in
``benchmarks/results/study.json`` (merged, so the profiles can be run separately). The ``cpu``
report's markdown is copied to ``benchmarks/results/study_cpu_report.md`` without its images (the
scans may be licensed).

    nice -n 10 python benchmarks/study.py --profile quick
    nice -n 10 python benchmarks/study.py --profile cpu --data ../shared/data/malf35/dataset.json

``--reference-runs N`` then retrains N of the study's runs 4x as long to check convergence.
``study.json`` records the runs to check with their configs, so ``--reference-only`` can run
that check alone later, also on another machine or after the study folder is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    mem = psutil.virtual_memory().total / 2**30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.node()}: {os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}; "
        f"load average at start {load}"
        + (" (cores shared with other jobs)" if os.getloadavg()[0] > 1.5 else "")
    )


CLOCK = "benchmark_clock.json"  # the benchmark's own record of each invocation on a study folder


def run_profile(
    profile: str,
    data: str | None,
    out: Path,
    jobs: int,
    timeout_min: float = 0.0,
    resume: bool = False,
) -> dict:
    finished = len(list((out / "runs").glob("*/result.json")))
    if finished and not resume:
        print(
            f"error: {out} already holds {finished} finished runs: pass --resume to continue "
            "that study, or delete the folder to start again",
            file=sys.stderr,
        )
        sys.exit(2)
    if out.exists() and not resume:
        shutil.rmtree(out)
    clock = json.loads((out / CLOCK).read_text()) if resume and (out / CLOCK).exists() else []
    clock.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": 0.0, "peak_rss_mb": 0})
    cmd = [
        sys.executable,
        "-m",
        "lowlabel.cli",
        "study",
        "seed",
        "--profile",
        profile,
        "--out",
        str(out),
        "--quiet",
    ]
    if data:
        cmd += ["--data", data]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    peak = [0.0]
    load = [round(x, 1) for x in os.getloadavg()]
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, start_new_session=True)
    stop = threading.Event()

    def sample() -> None:
        ticks = 0
        while not stop.is_set():
            try:
                procs = [proc, *proc.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs if p.is_running())
                peak[0] = max(peak[0], rss / 2**20)
            except psutil.Error:
                pass
            ticks += 1
            if ticks % 20 == 0:  # every 10 s: an invocation killed outright still counts
                write_clock(out, clock, time.perf_counter() - t0, peak[0])
            stop.wait(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        rc = proc.wait(timeout=timeout_min * 60 or None)
        stopped = False
    except psutil.TimeoutExpired:
        # out of time: interrupt the study like Ctrl-C; what finished stays finished
        os.killpg(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(timeout=60)
        except psutil.TimeoutExpired:  # SIGINT is ignored when launched in the background
            for child in proc.children(recursive=True):
                child.terminate()
            proc.terminate()
            rc = proc.wait()
        stopped = True
    wall = time.perf_counter() - t0
    stop.set()
    thread.join()
    write_clock(out, clock, wall, peak[0])
    if stopped and (out / "plan.json").exists():
        subprocess.run([sys.executable, "-m", "lowlabel.cli", "report", str(out)], check=False)
    usage = os.times()
    return {
        "wall_seconds": round(sum(c["seconds"] for c in clock), 1),
        **({"wall_seconds_by_invocation": [c["seconds"] for c in clock]} if len(clock) > 1 else {}),
        "peak_rss_mb": max(c["peak_rss_mb"] for c in clock),
        **folder_facts(out),
        "completed": not stopped and rc == 0,
        "stopped_after_minutes": timeout_min if stopped else None,
        "exit_code": rc,
        "cpu_seconds_children": round(usage.children_user + usage.children_system, 1),
        "load_average_at_start": load,
        "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
        "command": " ".join(["lowlabel", *cmd[3:]]),
    }


def write_clock(out: Path, clock: list[dict], seconds: float, peak_mb: float) -> None:
    """Record the current invocation's wall time and peak memory in the study folder."""
    if not out.exists():
        return
    clock[-1].update(seconds=round(seconds, 1), peak_rss_mb=round(peak_mb, 1))
    tmp = out / (CLOCK + ".tmp")
    tmp.write_text(json.dumps(clock, indent=1) + "\n")
    tmp.replace(out / CLOCK)


def folder_facts(out: Path) -> dict:
    """What a study folder says of itself: runs planned, finished, run by its last invocation
    and failed, and its seeds."""
    summary = (
        json.loads((out / "study_result.json").read_text())
        if (out / "study_result.json").exists()
        else {}
    )
    plan = json.loads((out / "plan.json").read_text()) if (out / "plan.json").exists() else {}
    return {
        "runs": summary.get("runs", len(plan.get("cells", []))),
        "finished_runs": len(list((out / "runs").glob("*/result.json"))),
        "ran": summary.get("ran"),
        "failed": len(summary.get("failed", {})),
        "seeds": len({c["seed"] for c in plan.get("cells", [])}),
        "study_dir": str(out),
    }


def measured_in_place(out: Path) -> dict:
    """A finished study folder measured where it is, without running it again: its wall time is
    the study's own clock (``study_result.json``), which covers its last invocation only."""
    summary = json.loads((out / "study_result.json").read_text())
    return {
        "wall_seconds": summary["seconds"],
        "wall_seconds_covers": "the study's last invocation, by its own clock "
        f"({summary['ran']} runs ran in it, {summary['skipped']} were already finished)",
        "peak_rss_mb": None,
        "peak_rss_note": "not sampled: the study was measured in place (--existing)",
        **folder_facts(out),
        "completed": not summary["failed"],
    }


def quality(out: Path) -> dict:
    """What the study's runs reached, from what they wrote: the median test mean Dice over its
    training runs, how many look converged (best step before the last), and its comparisons'
    decisions and widest CI half-width."""
    import csv
    import statistics

    from lowlabel.study.report.runs import load_runs
    from lowlabel.study.report.tables import comparisons

    if not (out / "runs.csv").exists() or not (out / "plan.json").exists():
        return {}
    with open(out / "runs.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["kind"] == "train" and r["mean_dice"]]
    dice = [float(r["mean_dice"]) for r in rows]
    plateau = [r for r in rows if r["best_step"] and int(r["best_step"]) < int(r["steps"])]
    plan, runs = load_runs(out)
    diffs = comparisons(plan, runs)
    widths = [d.diff.half_width for d in diffs if d.diff.n >= 2]
    return {
        "median_mean_dice": round(statistics.median(dice), 4) if dice else None,
        "train_runs": len(rows),
        "converged": {
            "share": round(len(plateau) / len(rows), 3) if rows else None,
            "how": "best validation step before the last step (a plateau, or early stopping); "
            "the check against runs 4x as long, where run, is converged_reference",
        },
        "decided": {
            "decided": sum(d.decided for d in diffs),
            "total": len(diffs),
            "by_decision": {
                k: sum(d.decision == k for d in diffs) for k in sorted({d.decision for d in diffs})
            },
        },
        "ci_halfwidth_max": round(max(widths), 4) if widths else None,
    }


def reference_candidates(out: Path, runs: int = 4) -> list[dict]:
    """The study's finished training runs to check against longer training: ``runs`` of seed 0,
    one per table where it can, scratch first, each with its config and what it reached, so that
    the check can also run later, from ``study.json`` alone, once the study folder is gone."""
    import csv

    import yaml

    with open(out / "runs.csv") as fh:
        rows = [
            r
            for r in csv.DictReader(fh)
            if r["kind"] == "train" and r["status"] == "finished" and r["mean_dice"]
        ]
    rows.sort(key=lambda r: (r["seed"] != "0", "scratch" not in r["run_dir"]))
    chosen: list[dict] = []
    for r in rows:  # one per table first, then any
        table = r["tables"].split(":")[0]
        if table not in {c["tables"].split(":")[0] for c in chosen}:
            chosen.append(r)
    chosen += [r for r in rows if r not in chosen]
    return [
        {
            "run": Path(r["run_dir"]).name,
            "table": r["tables"].split(":")[0],
            "steps": int(r["steps"]),
            "best_step": int(r["best_step"]) if r["best_step"] else None,
            "mean_dice": round(float(r["mean_dice"]), 4),
            "config": yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text()),
        }
        for r in chosen[:runs]
    ]


def reference_check(
    candidates: list[dict], work: Path, jobs: int = 0, factor: int = 4, margin: float = 0.01
) -> dict:
    """Convergence against longer training: each candidate run (``reference_candidates``) is
    trained again from its own config with ``factor`` times the step budget, no early stopping and
    the learning rate annealed to zero over it (``poly``), ``jobs`` at a time (0: one per core),
    in ``work``; a run passes when its test mean Dice is within ``margin`` of (or above) its
    reference's."""
    from concurrent.futures import ThreadPoolExecutor

    import yaml

    def check(i: int, c: dict) -> dict:
        budget = int(c["config"]["train"]["steps"])
        ref_out = work / str(i)  # one folder per check: they run side by side
        ref_out.mkdir(parents=True, exist_ok=True)
        (ref_out / "study_run.yaml").write_text(yaml.safe_dump(c["config"], sort_keys=False))
        cmd = [sys.executable, "-m", "lowlabel.cli", "train", "-c", str(ref_out / "study_run.yaml")]
        cmd += ["--out", str(ref_out), "--resume", "--quiet"]
        cmd += ["--set", f"train.steps={factor * budget}", "--set", "train.patience=0"]
        cmd += ["--set", "train.schedule=poly"]  # annealed to zero over the longer budget
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        (ref_dir,) = {p.parent for p in ref_out.glob("*/result.json")}
        ref = json.loads((ref_dir / "result.json").read_text())
        dice, ref_dice = c["mean_dice"], float(ref["test"]["mean_dice"])
        return {
            "run": c["run"],
            "table": c["table"],
            "steps": c["steps"],
            "budget": budget,
            "mean_dice": dice,
            "reference_steps": ref["steps"],
            "reference_best_step": ref["best_step"],
            "reference_mean_dice": round(ref_dice, 4),
            "gap": round(ref_dice - dice, 4),
            "passed": ref_dice - dice <= margin,
            "reference_seconds": round(time.perf_counter() - t0, 1),
        }

    t0 = time.perf_counter()
    load = [round(x, 2) for x in os.getloadavg()]
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        checks = list(pool.map(check, range(len(candidates)), candidates))
    return {
        "share": round(sum(c["passed"] for c in checks) / len(checks), 3) if checks else None,
        "how": f"{len(checks)} runs of seed 0 (one per table) retrained from their own config "
        f"with {factor}x the step budget, no early stopping and a poly-annealed learning rate; "
        f"passed when the study's run is within {margin} test mean Dice of that reference (or "
        "above it)",
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine(),
        "load_average_before": load,
        "checks": checks,
    }


def strip_images(markdown: str) -> str:
    return re.sub(r"^!\[.*\]\(.*\)\n*", "", markdown, flags=re.M)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["quick", "cpu", "both"], default="quick")
    parser.add_argument("--data", default=None, help="dataset for the cpu profile")
    parser.add_argument("--out", default="/tmp/lowlabel-bench-study")
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument(
        "--timeout-minutes",
        type=float,
        default=0.0,
        help="interrupt the study after this long and report what finished",
    )
    parser.add_argument(
        "--reference-runs",
        type=int,
        default=0,
        help="after the study, retrain this many of its runs 4x as long without early stopping "
        "and record whether each study run is within 0.01 mean Dice of it",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted study in --out/PROFILE (finished runs are kept); its "
        "wall time adds up every invocation of this benchmark on that folder",
    )
    parser.add_argument(
        "--existing",
        action="store_true",
        help="measure the finished study already in --out/PROFILE instead of running it again "
        "(wall time from the study's own clock; no memory sampling)",
    )
    parser.add_argument(
        "--reference-only",
        action="store_true",
        help="only run the --reference-runs check (default: all the recorded candidates) on the "
        "runs that study.json records for PROFILE, in --out/PROFILE/reference, and add it to "
        "that profile's entry; the study's own folder is not needed",
    )
    parser.add_argument(
        "--fresh-cache",
        action="store_true",
        help="start from an empty LOWLABEL_CACHE, as a new user does (the demo cohort is made "
        "and preprocessed inside the timed run)",
    )
    args = parser.parse_args()
    if args.fresh_cache:
        import tempfile

        os.environ["LOWLABEL_CACHE"] = tempfile.mkdtemp(prefix="lowlabel-cache-")
    path = RESULTS / "study.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("machine", machine())
    profiles = ["quick", "cpu"] if args.profile == "both" else [args.profile]
    for profile in profiles:
        data = args.data if profile == "cpu" else None
        out = Path(args.out) / profile
        if args.reference_only:  # the study's recorded candidates: its folder may be gone
            res = results.get(profile) or {}
            candidates = res.get("reference_candidates")
            if not candidates:
                sys.exit(f"error: study.json records no {profile} runs to check: measure the study")
            res["converged_reference"] = reference_check(
                candidates[: args.reference_runs or None], out / "reference", args.jobs
            )
            res["converged_reference"]["command"] = "nice -n 10 python benchmarks/study.py " + (
                " ".join(sys.argv[1:])
            )
            path.write_text(json.dumps(results, indent=2) + "\n")
            print(json.dumps({profile: res["converged_reference"]}, indent=1))
            continue
        described = machine()  # with the load average before the run
        if args.existing:
            res = measured_in_place(out)
        else:
            res = run_profile(
                profile, data, out, args.jobs, args.timeout_minutes, resume=args.resume
            )
        res.update(quality(out))
        if (out / "runs.csv").exists():
            res["reference_candidates"] = reference_candidates(out, max(4, args.reference_runs))
        res["benchmark_command"] = "nice -n 10 python benchmarks/study.py " + " ".join(sys.argv[1:])
        res["machine"] = described + (
            " (at measuring; the study ran before)" if args.existing else ""
        )
        res["fresh_cache"] = args.fresh_cache
        earlier = results.get(profile)
        if earlier and args.existing and earlier.get("study_dir") == res["study_dir"]:
            # the same study measured again in place: replace it, keep what came before it
            res["earlier_runs"] = earlier.get("earlier_runs", [])
        elif earlier:  # keep what earlier runs measured, on other machines or loads
            res["earlier_runs"] = [
                *earlier.pop("earlier_runs", []),
                {k: earlier[k] for k in sorted(earlier) if k != "previous_run_on_loaded_machine"},
                *(
                    [earlier["previous_run_on_loaded_machine"]]
                    if "previous_run_on_loaded_machine" in earlier
                    else []
                ),
            ]
        results[profile] = res
        if profile == "cpu" and (out / "report.md").exists():  # tables only: scans are licensed
            text = strip_images((out / "report.md").read_text())
            (RESULTS / "study_cpu_report.md").write_text(text)
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")  # kept if the check below fails
        if args.reference_runs and res.get("reference_candidates"):
            res["converged_reference"] = reference_check(
                res["reference_candidates"][: args.reference_runs], out / "reference", args.jobs
            )
            path.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({profile: res}, indent=1))


if __name__ == "__main__":
    main()
