"""Segmentation benchmark: ``lowlabel segment`` vs ANTs Atropos on the malf35 test subjects.

The model is the 3-label malf35 run of the foundation benchmark (``"low"`` in
``benchmarks/results/foundation.json``) or, when that is absent or unfinished, the run given with
``--run-dir``. It is exported to a bundle, and each test scan of that run's ``splits.json`` is
segmented by ``lowlabel segment`` in its own process (one brain incl. start-up, loading and saving,
the speed goal) and once more in a single process for all scans. Side by side, ANTs Atropos
(antspyx; k-means initialisation, 3 classes, inside the brain mask of dataset.json, Markov random
field [0.2,1x1x1], 5 iterations, intensities clipped at the 99.9th percentile inside the mask)
segments the same scans, one process per scan; its classes are mapped to CSF, GM and WM by mean
intensity. Dice per tissue is computed against the manual labels
on each scan's own grid. Seconds are wall-clock per scan, peak RSS is the largest of the per-scan
processes. Writes ``benchmarks/results/segment.json``; then ``benchmarks/segment_bids.py`` adds
its ``bids``, ``monai_bundle`` and ``skull_strip`` keys (skip with ``--no-pipeline``).

Setup (antspyx 0.6.3 pins older numpy and scipy, so it lives in its own virtual environment):
    python3 -m venv benchmarks/.venv-ants
    benchmarks/.venv-ants/bin/pip install antspyx==0.6.3

Usage (from the repository root, lowlabel's venv active):
    nice -n 10 python benchmarks/segment.py [--run-dir RUN] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "malf35" / "dataset.json"
ANTS_PYTHON = ROOT / "benchmarks" / ".venv-ants" / "bin" / "python"
TISSUES = ("csf", "gm", "wm")


def atropos_worker(image: str, mask: str, out: str) -> None:
    """Runs inside the antspyx venv: Atropos on one scan, classes sorted by mean intensity."""
    import ants
    import numpy as np

    img = ants.image_read(image, pixeltype="float")
    brain = ants.image_read(mask, pixeltype="float").threshold_image(0.5, 1e9)
    values = img.numpy()
    # a few very bright voxels (vessels) otherwise take a k-means class of their own, merging GM
    # and WM on some scans: clip at the 99.9th percentile inside the mask, as users do
    top = np.percentile(values[brain.numpy() > 0], 99.9)
    clipped = img.new_image_like(np.minimum(values, top).astype(np.float32))
    seg = ants.atropos(a=clipped, x=brain, i="kmeans[3]", m="[0.2,1x1x1]", c="[5,0]")
    labels = seg["segmentation"].numpy().astype(np.uint8)
    means = [values[labels == k].mean() if (labels == k).any() else np.inf for k in (1, 2, 3)]
    # T1: CSF darkest, then GM, then WM
    order = np.argsort(means)
    lut = np.zeros(4, np.uint8)
    for tissue, k in enumerate(order, start=1):
        lut[k + 1] = tissue
    ants.image_write(img.new_image_like(lut[labels].astype(np.float32)), out)


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command; its wall seconds, CPU seconds and peak RSS (MB) from the kernel's rusage."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    proc.stdout.close()
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    return {
        "seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024.0,
        "load_average_1min": round(load, 2),
    }


def dice(pred_path: Path, label_path: str, label_map) -> dict:
    """Dice per tissue on the label's own grid (the prediction must share it)."""
    import nibabel as nib
    import numpy as np

    from lowlabel.data.datasets import remap_labels
    from lowlabel.data.io import read_nifti

    pred_img = nib.load(str(pred_path))
    pred = np.asarray(pred_img.dataobj).astype(np.int16)
    truth, affine = read_nifti(label_path, kind="label")
    truth = remap_labels(truth, label_map, label_path)
    if pred.shape != truth.shape or not np.allclose(pred_img.affine, affine, atol=1e-3):
        raise RuntimeError(f"{pred_path}: not on the grid of {label_path}")
    row = {}
    for value, name in enumerate(TISSUES, start=1):
        p, t = pred == value, truth == value
        row[f"dice_{name}"] = float(2 * (p & t).sum() / max(p.sum() + t.sum(), 1))
    row["mean_dice"] = float(np.mean([row[f"dice_{n}"] for n in TISSUES]))
    return row


def summarise(rows: list[dict]) -> dict:
    import numpy as np

    keys = ["seconds", "cpu_seconds", "mean_dice"] + [f"dice_{n}" for n in TISSUES]
    out = {
        (
            "seconds_per_scan"
            if k == "seconds"
            else "cpu_seconds_per_scan"
            if k == "cpu_seconds"
            else k
        ): round(float(np.mean([r[k] for r in rows])), 4)
        for k in keys
    }
    out["max_seconds"] = round(max(r["seconds"] for r in rows), 3)
    out["peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in rows), 1)
    return out


def speed_check(args: argparse.Namespace) -> None:
    """Time single-scan runs of the last full run's bundle on its first test scan."""
    from lowlabel.atomic import write_json

    result = json.loads(args.out.read_text())
    model = args.work / "model"
    run = Path(result["model"]["run_dir"])
    split = json.loads((run / "splits.json").read_text())
    from lowlabel.data.datasets import load_dataset

    image = load_dataset(split["source"]).by_id(split["test"][:1])[0]["image"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    runs = []
    for i in range(args.speed_check):
        out = args.work / "speed" / str(i)
        t = timed(
            [
                sys.executable,
                "-m",
                "lowlabel.cli",
                "segment",
                str(model),
                image,
                "-o",
                str(out),
                "--quiet",
            ],
            env,
        )
        runs.append({k: round(v, 3) for k, v in t.items()})
        print(runs[-1], flush=True)
    result["speed_check"] = {
        "scan": image,
        "nice": os.nice(0),
        "runs": runs,
        "best_seconds": min(r["seconds"] for r in runs),
        "command": " ".join(["python", Path(__file__).relative_to(ROOT).as_posix()] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(args.out, result)


def choose_run(foundation: Path, run_dir: Path | None) -> tuple[Path, str]:
    if foundation.is_file():
        low = (json.loads(foundation.read_text()).get("low") or {}).get("run_dir")
        if low and (Path(low) / "result.json").is_file():
            return Path(low), f"foundation benchmark 3-label run ({foundation.name})"
    if run_dir is None:
        raise SystemExit(f"{foundation}: no finished 'low' run; pass --run-dir")
    return run_dir, "a run trained for this benchmark (foundation run not available)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--atropos", nargs=3, metavar=("IMAGE", "MASK", "OUT"), help=argparse.SUPPRESS
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument(
        "--foundation", type=Path, default=ROOT / "benchmarks" / "results" / "foundation.json"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "segment")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "segment.json"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ants-python", type=Path, default=ANTS_PYTHON)
    parser.add_argument(
        "--speed-check",
        type=int,
        default=0,
        metavar="N",
        help="only time N more single-scan runs of the bundle made by the last "
        "full run (meant without nice) and add them to the JSON",
    )
    parser.add_argument(
        "--no-pipeline",
        action="store_true",
        help="skip the BIDS / MONAI bundle / skull-stripping part (benchmarks/segment_bids.py)",
    )
    args = parser.parse_args()
    if args.atropos:
        atropos_worker(*args.atropos)
        return
    if args.speed_check:
        speed_check(args)
        return

    from lowlabel.atomic import write_json
    from lowlabel.config import load_config
    from lowlabel.data.datasets import load_dataset
    from lowlabel.provenance import machine

    if not args.ants_python.is_file():
        raise SystemExit(
            f"{args.ants_python}: missing; set up the antspyx venv (see the top of this script)"
        )
    run, run_source = choose_run(args.foundation, args.run_dir)
    split = json.loads((run / "splits.json").read_text())
    ds = load_dataset(split["source"])
    subjects = ds.by_id(split["test"])
    raw = json.loads(Path(split["source"]).read_text())
    base = Path(split["source"]).parent
    masks = {
        str((base / e["image"]).resolve()): str((base / e["mask"]).resolve())
        for e in raw["training"]
        if "mask" in e
    }
    label_map = load_config(run / "config.yaml").data.label_map

    if args.work.exists():
        shutil.rmtree(args.work)
    model = args.work / "model"
    lowlabel = [sys.executable, "-m", "lowlabel.cli"]
    subprocess.run(
        lowlabel + ["export", str(run), "-o", str(model)], check=True, capture_output=True
    )
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads),
    )
    load_before = [round(v, 2) for v in os.getloadavg()]
    rows = {"lowlabel": [], "atropos": []}
    for subject in subjects:
        image = str(Path(subject["image"]).resolve())
        name = Path(image).name.removesuffix(".gz").removesuffix(".nii")
        out = args.work / "lowlabel" / subject["id"]
        t = timed(lowlabel + ["segment", str(model), image, "-o", str(out), "--quiet"], env)
        rows["lowlabel"].append(
            {
                "id": subject["id"],
                **t,
                **dice(out / f"{name}_seg.nii.gz", subject["label"], label_map),
            }
        )
        seg = args.work / "atropos" / f"{subject['id']}_seg.nii.gz"
        seg.parent.mkdir(parents=True, exist_ok=True)
        worker = [str(args.ants_python), __file__, "--atropos", image, masks[image], str(seg)]
        t = timed(worker, env)
        rows["atropos"].append({"id": subject["id"], **t, **dice(seg, subject["label"], label_map)})
        print(
            subject["id"],
            {k: {m: round(v[-1][m], 3) for m in ("seconds", "mean_dice")} for k, v in rows.items()},
            flush=True,
        )
    batch = timed(
        lowlabel
        + ["segment", str(model)]
        + [s["image"] for s in subjects]
        + ["-o", str(args.work / "batch"), "--quiet"],
        env,
    )
    load_after = [round(v, 2) for v in os.getloadavg()]

    result = {
        "machine": machine(),
        "n_scans": len(subjects),
        "lowlabel": summarise(rows["lowlabel"]),
        "atropos": summarise(rows["atropos"]),
        "lowlabel_batch": {
            "seconds_per_scan": round(batch["seconds"] / len(subjects), 3),
            "cpu_seconds_per_scan": round(batch["cpu_seconds"] / len(subjects), 3),
            "peak_rss_mb": round(batch["peak_rss_mb"], 1),
        },
        "goal": {"seconds_per_scan": 10.0, "peak_rss_mb": 2048},
        "model": {
            "run_dir": str(run),
            "source": run_source,
            "labelled_subjects": split.get("train"),
            "steps": json.loads((run / "result.json").read_text()).get("steps"),
            "test_dice_at_training": json.loads((run / "result.json").read_text())
            .get("test", {})
            .get("mean_dice"),
        },
        "test_subjects": split["test"],
        "threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "notes": (
            "seconds_per_scan: wall time of one process per scan (start-up, loading the bundle "
            "or antspyx, reading, segmenting and writing the label map); lowlabel_batch: one "
            "process for all scans. Dice per tissue against the manual labels on each scan's own "
            "grid. malf35's manual CSF is mostly ventricular (about 10-30 mL), whereas "
            "Atropos's darkest class also takes sulcal CSF and partial-volume GM inside the mask "
            "(hundreds of mL), hence its low CSF and GM Dice. The machine's 2 cores were shared "
            "with other jobs (see the load averages, also per scan), so wall times are upper "
            "bounds; cpu_seconds are summed over threads."
        ),
        "command": " ".join(["python", Path(__file__).relative_to(ROOT).as_posix()] + sys.argv[1:]),
        "nice": os.nice(0),
        "per_scan": rows,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(args.out, result)
    print(
        json.dumps(
            {k: result[k] for k in ("n_scans", "lowlabel", "atropos", "lowlabel_batch")}, indent=1
        )
    )
    if not args.no_pipeline:
        # BIDS app, MONAI bundle and IXI skull stripping add their keys (segment_bids.py)
        import segment_bids

        sub = segment_bids.parser().parse_args(
            ["--run-dir", str(run), "--out", str(args.out), "--threads", str(args.threads)]
            + ["--model-note", run_source]
        )
        segment_bids.merge_into(args.out, segment_bids.run(sub))


if __name__ == "__main__":
    main()
