"""Pipeline benchmark: ``lowlabel bids`` on malf35, the MONAI bundle's match, IXI skull stripping.

Called at the end of ``benchmarks/segment.py`` (and runnable alone); adds three keys to
``benchmarks/results/segment.json`` and keeps the others:

- ``bids``: the 7 malf35 test scans of the model's run copied into a temporary BIDS dataset
  (every participant has ``ses-1``; the first also has a ``ses-2``, holding the second test
  scan, so there are 6 participants), segmented with ``lowlabel bids ... participant``, one
  process per participant (start-up, model loading, QC snapshots and page included, as for
  ``segment``'s per-scan figure), then once more in one process, then ``group``; the BIDS
  validator's error and warning counts; the QC flags; Dice against the manual labels.
- ``monai_bundle``: the run exported with ``--format monai-bundle`` and run with
  ``python -m monai.bundle run`` on the same 7 scans, compared with lowlabel's label maps.
- ``skull_strip``: on IXI scans with their skull (``_T1``), deepbet's mask against the reference
  intracranial mask (``_brainmask``), the seconds deepbet takes per scan (model loaded once),
  and the tissue Dice (against the DLMUSE tissue labels) of the whole chain (raw T1, mask,
  segmentation) next to that of segmenting the reference-stripped ``_SS`` scan. Scans are taken
  in name order until ``--ixi-minutes`` run out; ``scans`` is the true count. brainextractor
  (a Python FSL BET) is measured on the first ``--bet-scans`` for the choice of method.

Usage (from the repository root, lowlabel's venv active, PYTHONPATH=src):
    nice -n 10 python benchmarks/segment_bids.py --run-dir RUN [--ixi-minutes 30]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from segment import dice, timed  # noqa: E402  (the sibling script's helpers)

ROOT = Path(__file__).resolve().parents[1]
IXI = ROOT.parent / "shared" / "data" / "ixi"
TISSUES = ("csf", "gm", "wm")


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def make_bids(subjects: list[dict], root: Path) -> list[tuple[str, str, dict]]:
    """Copy the test scans into a BIDS dataset; returns (participant, session, subject)."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "malf35 test scans", "BIDSVersion": "1.10.0"})
    )
    (root / "README").write_text("malf35 test scans, copied for the lowlabel benchmark.\n")
    layout = [("01", "1", subjects[0]), ("01", "2", subjects[1])] + [
        (f"{i:02d}", "1", s) for i, s in enumerate(subjects[2:], start=2)
    ]
    for sub, ses, subject in layout:
        anat = root / f"sub-{sub}" / f"ses-{ses}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        shutil.copy(subject["image"], anat / f"sub-{sub}_ses-{ses}_T1w.nii.gz")
    (root / "participants.tsv").write_text(
        "participant_id\n" + "".join(f"sub-{s}\n" for s in sorted({s for s, _, _ in layout}))
    )
    return layout


def validator(folder: Path) -> dict:
    exe = shutil.which("bids-validator-deno")
    if exe is None:
        return {"error": "bids-validator-deno not installed"}
    done = subprocess.run([exe, str(folder), "--format", "json"], capture_output=True, text=True)
    issues = json.loads(done.stdout)["issues"]["issues"]
    out = {"version": "bids-validator-deno 3.0.2"}
    for severity in ("error", "warning"):
        found = [i for i in issues if i["severity"] == severity]
        out[f"{severity}s"] = len(found)
        out[f"{severity}_codes"] = sorted({f"{i['code']} {i.get('location', '')}" for i in found})
    return out


def bids_part(args, run: Path, subjects: list[dict], label_map, work: Path, env: dict) -> dict:
    lowlabel = [sys.executable, "-m", "lowlabel.cli"]
    model = work / "model"
    subprocess.run(lowlabel + ["export", str(run), "-o", str(model)], check=True)
    ds, out = work / "bids", work / "derivatives" / "lowlabel"
    layout = make_bids(subjects, ds)
    n = len(layout)
    participants = sorted({sub for sub, _, _ in layout})
    runs = []
    for sub in participants:
        t = timed(
            lowlabel
            + ["bids", str(ds), str(out), "participant", "--model", str(model)]
            + ["--participant-label", sub, "--quiet"],
            env,
        )
        runs.append({"participant": sub, **{k: round(v, 3) for k, v in t.items()}})
        print("bids", runs[-1], flush=True)
    batch_out = work / "derivatives_batch"
    batch = timed(
        lowlabel + ["bids", str(ds), str(batch_out), "participant", "--model", str(model), "-q"],
        env,
    )
    group = timed(lowlabel + ["bids", str(ds), str(out), "group"], env)
    check = validator(out)
    records = [json.loads(p.read_text()) for p in sorted((out / "qc").glob("*.json"))]
    scores = []
    for sub, ses, subject in layout:
        seg = out / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"sub-{sub}_ses-{ses}_dseg.nii.gz"
        scores.append({"id": subject["id"], **dice(seg, subject["label"], label_map)})
    return {
        "n_scans": n,
        "n_participants": len(participants),
        "s_per_scan": round(sum(r["seconds"] for r in runs) / n, 3),
        "cpu_s_per_scan": round(sum(r["cpu_seconds"] for r in runs) / n, 3),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        "s_per_scan_one_process": round(batch["seconds"] / n, 3),
        "group_seconds": round(group["seconds"], 3),
        "validator_errors": check.get("errors"),
        "validator_warnings": check.get("warnings"),
        "validator": check,
        "qc_flagged": [
            {"scan": r["key"], "flags": [f["code"] for f in r["flags"]]}
            for r in records
            if r["flags"]
        ],
        "qc_unsure_fraction": {r["key"]: r["unsure_fraction"] for r in records},
        "mean_dice": round(sum(s["mean_dice"] for s in scores) / n, 4),
        "per_participant_runs": runs,
        "per_scan_dice": scores,
        "layout": [
            {"participant": f"sub-{a}", "session": f"ses-{b}", "malf35": s["id"]}
            for a, b, s in layout
        ],
        "goal": {"s_per_scan": 10.0, "validator_errors": 0},
    }, out


def monai_part(run: Path, subjects: list[dict], derivatives: Path, work: Path, env: dict) -> dict:
    import nibabel as nib
    import numpy as np

    bundle = work / "monai_bundle"
    lowlabel = [sys.executable, "-m", "lowlabel.cli"]
    subprocess.run(
        lowlabel
        + ["export", str(run), "-o", str(bundle), "--format", "monai-bundle"]
        + ["--weights-license", "CC-BY-NC-4.0"],
        check=True,
    )
    scans = work / "monai_in"
    scans.mkdir()
    layout = [("01", "1"), ("01", "2")] + [(f"{i:02d}", "1") for i in range(2, len(subjects))]
    for (sub, ses), subject in zip(layout, subjects, strict=True):
        os.symlink(Path(subject["image"]).resolve(), scans / f"sub-{sub}_ses-{ses}_T1w.nii.gz")
    t = timed(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
        + [str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle)]
        + ["--dataset_dir", str(scans), "--output_dir", str(work / "monai_out")],
        env,
    )
    per_scan = []
    for sub, ses in layout:
        ours = nib.load(
            str(derivatives / f"sub-{sub}/ses-{ses}/anat/sub-{sub}_ses-{ses}_dseg.nii.gz")
        )
        theirs = nib.load(str(work / "monai_out" / f"sub-{sub}_ses-{ses}_T1w_seg.nii.gz"))
        a = np.asarray(ours.dataobj)
        b = np.asarray(theirs.dataobj).reshape(a.shape)
        row = {"scan": f"sub-{sub}_ses-{ses}", "identical_voxels": float((a == b).mean())}
        for value, name in enumerate(TISSUES, start=1):
            p, q = a == value, b == value
            row[f"dice_{name}"] = float(2 * (p & q).sum() / max(p.sum() + q.sum(), 1))
        row["same_affine"] = bool(np.allclose(ours.affine, theirs.affine, atol=1e-4))
        per_scan.append(row)
    min_dice = min(r[f"dice_{n}"] for r in per_scan for n in TISSUES)
    return {
        "matched": bool(min_dice >= 0.99 and all(r["same_affine"] for r in per_scan)),
        "min_class_dice": round(min_dice, 6),
        "identical": all(r["identical_voxels"] == 1.0 for r in per_scan),
        "n_scans": len(per_scan),
        "monai_bundle_run_seconds": round(t["seconds"], 2),
        "per_scan": per_scan,
        "compared_with": "the dseg maps of the bids participant run (same model, no stripping)",
    }


def skull_part(args, run: Path, work: Path) -> dict:
    import nibabel as nib
    import numpy as np
    import torch

    from lowlabel.bundle import load as load_bundle
    from lowlabel.data.transforms import preprocess
    from lowlabel.pipeline import plain_outputs, run_scan
    from lowlabel.skullstrip import METHOD, BrainExtractor

    torch.set_num_threads(args.threads)
    bundle = load_bundle(work / "model")
    pre = preprocess(bundle.cfg.data, keys=("image",))
    ids = sorted(p.name.removesuffix("_T1.nii.gz") for p in IXI.glob("*_T1.nii.gz"))
    bet = BrainExtractor()
    seconds: list[float] = []

    def timed_bet():
        class Timed:
            def mask(self, img):
                start = time.perf_counter()
                m = bet.mask(img)
                seconds.append(time.perf_counter() - start)
                return m

        return Timed()

    def tissue_dice(pred_path: Path, label_path: Path) -> dict:
        pred = np.asarray(nib.load(str(pred_path)).dataobj)
        truth = np.asarray(nib.load(str(label_path)).dataobj).astype(np.int16)
        out = {}
        for value, name in enumerate(TISSUES, start=1):
            p, t = pred == value, truth == value
            out[name] = float(2 * (p & t).sum() / max(p.sum() + t.sum(), 1))
        out["mean"] = float(np.mean([out[n] for n in TISSUES]))
        return out

    deadline = time.monotonic() + 60 * args.ixi_minutes
    rows = previous_rows(args)
    done = {r["id"] for r in rows}
    out = work / "ixi"
    for sid in ids:
        if sid in done:
            continue
        if time.monotonic() > deadline:
            break
        raw, ss = IXI / f"{sid}_T1.nii.gz", IXI / f"{sid}_SS.nii.gz"
        chain = plain_outputs(out / "chain", sid)
        run_scan(bundle, pre, raw, chain, skull_strip="yes", extractor=timed_bet, qc=False)
        ref = np.asarray(nib.load(str(IXI / f"{sid}_brainmask.nii.gz")).dataobj) > 0

        class Reference:
            def mask(self, img, ref=ref):
                return ref

        # the _SS scan through the same chain with the reference mask in deepbet's place: the
        # two differ only in the mask (labels are kept inside the mask in both)
        plain = plain_outputs(out / "ss", sid)
        run_scan(bundle, pre, ss, plain, skull_strip="yes", extractor=Reference, qc=False)
        mask = np.asarray(nib.load(str(chain.mask)).dataobj) > 0
        labels = IXI / f"{sid}_tissues.nii.gz"
        a, b = tissue_dice(chain.seg, labels), tissue_dice(plain.seg, labels)
        as_given = None
        if len(rows) < args.as_given_scans:
            given = plain_outputs(out / "given", sid)
            run_scan(bundle, pre, ss, given, skull_strip="no", qc=False)
            as_given = tissue_dice(given.seg, labels)
        pa = np.asarray(nib.load(str(chain.seg)).dataobj)
        pb = np.asarray(nib.load(str(plain.seg)).dataobj)
        agree = float(
            np.mean(
                [
                    2 * ((pa == v) & (pb == v)).sum() / max((pa == v).sum() + (pb == v).sum(), 1)
                    for v in (1, 2, 3)
                ]
            )
        )
        rows.append(
            {
                "id": sid,
                "mask_dice": float(2 * (mask & ref).sum() / (mask.sum() + ref.sum())),
                "extract_seconds": seconds[-1],
                "tissue_dice_raw_chain": a,
                "tissue_dice_ss": b,
                "chain_vs_ss_dice": agree,
                "tissue_dice_ss_as_given": as_given,
                "load_average_1min": load()[0],
            }
        )
        print(
            "ixi",
            sid,
            {k: rows[-1][k] for k in ("mask_dice", "extract_seconds")},
            round(a["mean"], 4),
            round(b["mean"], 4),
            flush=True,
        )
        for folder in (out / "chain", out / "ss", out / "given"):  # keep the disk use flat
            shutil.rmtree(folder, ignore_errors=True)
    old = previous(args).get("brainextractor")
    bet_rows = old if old and "error" not in old else brainextractor_check(ids[: args.bet_scans])
    given_rows = [r for r in rows if r["tissue_dice_ss_as_given"]]
    n = len(rows)
    mean = lambda xs: round(float(np.mean(xs)), 4)  # noqa: E731
    return {
        "method": METHOD,
        "scans": n,
        "scans_available": len(ids),
        "mask_dice": mean([r["mask_dice"] for r in rows]),
        "mask_dice_min": round(min(r["mask_dice"] for r in rows), 4),
        "s_per_scan": mean([r["extract_seconds"] for r in rows]),
        "tissue_dice_raw_chain": mean([r["tissue_dice_raw_chain"]["mean"] for r in rows]),
        "tissue_dice_ss": mean([r["tissue_dice_ss"]["mean"] for r in rows]),
        "tissue_dice_difference": mean(
            [r["tissue_dice_raw_chain"]["mean"] - r["tissue_dice_ss"]["mean"] for r in rows]
        ),
        "per_tissue": {
            f"{kind}_{t}": mean([r[kind][t] for r in rows])
            for kind in ("tissue_dice_raw_chain", "tissue_dice_ss")
            for t in TISSUES
        },
        "chain_vs_ss_dice": mean([r["chain_vs_ss_dice"] for r in rows]),
        "tissue_dice_ss_as_given": {
            "scans": len(given_rows),
            "mean": mean([r["tissue_dice_ss_as_given"]["mean"] for r in given_rows]),
            "same_scans_raw_chain": mean([r["tissue_dice_raw_chain"]["mean"] for r in given_rows]),
            "note": "the _SS scan segmented with --skull-strip no: the network also labels some "
            "of the zero background (this 300-step model), which the in-mask rule removes",
        },
        "goal": {"mask_dice": 0.95, "tissue_dice_within": 0.01},
        "brainextractor": bet_rows,
        "selection": f"IXI ids in name order until {args.ixi_minutes} minutes were used"
        + (" (continuing the scans of the previous result)" if args.ixi_continue else ""),
        "notes": (
            "Tissue Dice against the DLMUSE tissue labels (automatic, CSF = ventricles only), "
            "mean over CSF, GM and WM; the raw chain is deepbet's mask, then segmentation with "
            "labels kept inside the mask; tissue_dice_ss is the _SS scan through the same chain "
            "with the reference mask; s_per_scan is deepbet alone, its model loaded once."
        ),
        "per_scan": rows,
    }


def previous(args) -> dict:
    """The ``skull_strip`` result already in ``--out`` when continuing it with the same model."""
    if not args.ixi_continue or not args.out.is_file():
        return {}
    old = json.loads(args.out.read_text()).get("skull_strip") or {}
    same_model = (old.get("model") or {}).get("run_dir") == str(args.run_dir)
    return old if same_model else {}


def previous_rows(args) -> list[dict]:
    """Per-scan rows of the previous result (``--ixi-continue``), measured with the same model."""
    return list(previous(args).get("per_scan") or [])


def brainextractor_check(ids: list[str]) -> dict:
    """brainextractor 0.3.0 on a few scans, for the choice of method."""
    import nibabel as nib
    import numpy as np

    try:
        from brainextractor import BrainExtractor as BET
    except ImportError:
        return {"error": "brainextractor not installed"}
    rows = []
    for sid in ids:
        img = nib.load(str(IXI / f"{sid}_T1.nii.gz"))
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            bet = BET(img)
            bet.run()
            mask = bet.compute_mask() > 0
        seconds = time.perf_counter() - start
        ref = np.asarray(nib.load(str(IXI / f"{sid}_brainmask.nii.gz")).dataobj) > 0
        rows.append(
            {
                "id": sid,
                "mask_dice": float(2 * (mask & ref).sum() / (mask.sum() + ref.sum())),
                "seconds": seconds,
            }
        )
    return {
        "version": "brainextractor 0.3.0",
        "scans": len(rows),
        "mask_dice": round(float(np.mean([r["mask_dice"] for r in rows])), 4) if rows else None,
        "s_per_scan": round(float(np.mean([r["seconds"] for r in rows])), 2) if rows else None,
        "per_scan": rows,
        "note": "the first scan's time includes numba compilation",
    }


def run(args) -> dict:
    from lowlabel.config import load_config
    from lowlabel.data.datasets import load_dataset
    from lowlabel.provenance import machine

    run_dir = args.run_dir
    split = json.loads((run_dir / "splits.json").read_text())
    subjects = load_dataset(split["source"]).by_id(split["test"])
    label_map = load_config(run_dir / "config.yaml").data.label_map
    result_json = json.loads((run_dir / "result.json").read_text())
    work = args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    before = load()
    if args.only_ixi:  # the BIDS and MONAI-bundle keys stay as they are in --out
        from lowlabel.bundle import export

        export(run_dir, work / "model")
        bids = monai = None
    else:
        bids, derivatives = bids_part(args, run_dir, subjects, label_map, work, env)
    after_bids = load()
    if not args.only_ixi:
        monai = monai_part(run_dir, subjects, derivatives, work, env)
    skull = skull_part(args, run_dir, work) if args.ixi_minutes > 0 else None
    common = {
        "machine": machine(),
        "shared_machine": (
            f"2 cores shared with other work (load average {before[0]} at the start)"
            if before[0] > 1.5
            else f"quiet: load average {before[0]} at the start"
        ),
        "load_average_before": before,
        "load_average_after_bids": after_bids,
        "load_average_after": load(),
        "threads": args.threads,
        "nice": os.nice(0),
        "model": {
            "run_dir": str(run_dir),
            "source": args.model_note,
            "steps": result_json.get("steps"),
            "test_dice_at_training": (result_json.get("test") or {}).get("mean_dice"),
        },
        "command": " ".join(["python", Path(__file__).relative_to(ROOT).as_posix()] + sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out = (
        {}
        if args.only_ixi
        else {"bids": dict(bids, **common), "monai_bundle": dict(monai, **common)}
    )
    if skull is not None:
        out["skull_strip"] = dict(skull, **common)
        if previous(args):
            earlier = previous(args)
            out["skull_strip"]["earlier_command"] = earlier.get("command")
            out["skull_strip"]["earlier_scans"] = earlier.get("scans")
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return out


def merge_into(path: Path, new: dict) -> None:
    """Add the keys to segment.json, keeping every other key."""
    from lowlabel.atomic import write_json

    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update(new)
    write_json(path, old)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument(
        "--model-note",
        default="a 300-step run with the foundation benchmark's 1 mm settings (3 labels), "
        "trained for this benchmark; speed does not depend on training length",
    )
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "work" / "segment_bids")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "segment.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ixi-minutes", type=float, default=30.0)
    p.add_argument("--bet-scans", type=int, default=3)
    p.add_argument("--as-given-scans", type=int, default=10)
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--only-ixi", action="store_true", help="Measure only the IXI skull-strip part.")
    p.add_argument(
        "--ixi-continue",
        action="store_true",
        help="Keep the per-scan IXI rows already in --out (same model) and measure the rest.",
    )
    return p


def main() -> None:
    args = parser().parse_args()
    result = run(args)
    merge_into(args.out, result)
    print(json.dumps({k: {m: v[m] for m in list(v)[:8]} for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
