"""GPU benchmark: training speed against the plain MONAI loop, segmentation, the paper-scale
study's cost, and determinism, in one process of at most 8 minutes on one H200.

``train`` compares, on the same device in one run, the way the MONAI tutorials train
(``CacheDataset`` of the preprocessed scans, ``DataLoader`` worker processes doing the random
crop and the augmentations on the CPU, float32, batches copied with ``.to(device)``) with
lowlabel's training path (cached volumes and foreground indices, batch ``i`` a pure function of
``(seed, i)`` prepared by loader workers into pinned memory, non-blocking copies, the precision
``auto`` picks: bf16 autocast on a GPU that has it). Same network (3-level MONAI UNet,
``num_res_units`` 5, 16 channels), batch 16, patches 96^3 at 1 mm, the same augmentations. A
third path, cached volumes and augmentation on the device in the main process
(``device_augment``), is measured as an experiment: lowlabel does not train that way (yet).
``data_share`` is the share of step time spent waiting for the next batch.
``achieved_tflop_per_s`` counts the FLOPs of one training step (forward and backward, torch's
FLOP counter) times lowlabel's steps per second.

``segment``: a bundle exported from the paper-scale run below segments test scans of malf35 at
1 mm: ``s_first_scan_with_startup`` is ``lowlabel segment`` for one scan in a fresh process
(interpreter, imports, CUDA start, bundle, one scan, written), ``s_per_scan_warm`` the mean over
further scans in one warm process (reading and writing overlapped with inference).

``paper_profile``: the first training cell of the built-in seed study at the ``paper`` profile
runs for a few steps with a few validations (``fit``, its preparation and test evaluation
included); seconds per full run (5000 steps, a validation every 50) and the whole study at 3
seeds are ESTIMATED from the measured times (every run at full length: early stopping would only
shorten it; pretraining steps priced as training steps). ``runs_per_gpu`` is how many such runs
fit in the GPU's memory at once; the study estimate assumes no speed-up from sharing a GPU.

``determinism``: two runs of a few steps with ``train.deterministic: true`` from the same seed
give identical losses.

Preparation (once, on a machine with pip, in the repository root; nothing here is tracked:
.gitignore lists both folders, the exclude lines keep them out of a checkout that predates it):
    echo /.whl/ >> .git/info/exclude && echo /.gpudata/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .whl monai==1.6.1 nibabel==5.4.2
    PYTHONPATH=src python benchmarks/gpu.py --prepare-data   # 12 malf35 subjects -> .gpudata/

The GPU machine has torch, numpy, scipy, matplotlib, safetensors, tqdm, typer, pyyaml, psutil
and pytest; MONAI and nibabel travel as the wheels above (nilearn only makes the demo cohort,
not used here). The one device call (carry .whl and .gpudata; a fresh machine takes a minute or
more to start, then the CUDA tests and this script run; timeout_s 600):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src || exit; \
    nvidia-smi; export PYTHONUNBUFFERED=1; \
    timeout 120 python3 -m pytest -p no:cacheprovider -o addopts= -q -rs -m cuda \
      tests/test_device.py 2>&1 | tee $OUT/cuda_tests.log; \
    timeout 450 python3 benchmarks/gpu.py --device cuda --out $OUT/gpu.json 2>&1 | tee $OUT/gpu.log
then copy the returned gpu.json to benchmarks/results/gpu.json.

The CPU dry run (tiny sizes, 3 mm, a few steps; proves the script runs, measures nothing useful):
    PYTHONPATH=src nice -n 10 python benchmarks/gpu.py --device cpu --quick
writes benchmarks/results/gpu_cpu_dryrun.json.
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

# cuBLAS reads this when it starts: set before any CUDA work, so the determinism check below
# runs under the setting lowlabel's deterministic runs use
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "malf35" / "dataset.json"
LOCAL = ROOT / ".gpudata" / "malf35" / "dataset.json"
RESULTS = ROOT / "benchmarks" / "results"
PREPARED_SUBJECTS = 12  # paper split: 6 test, 3 validation, 3 labelled


def prepare_data(source: Path = SHARED, dest: Path = LOCAL, n: int = PREPARED_SUBJECTS) -> Path:
    """Copy the first ``n`` subjects' image and label (not the masks) into the git-ignored
    ``.gpudata/`` folder that travels to the GPU machine."""
    index = json.loads(source.read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    training = []
    for entry in index["training"][:n]:
        row = {}
        for key in ("image", "label"):
            name = Path(entry[key]).name
            shutil.copy2(source.parent / entry[key], dest.parent / name)
            row[key] = f"./{name}"
        training.append(row)
    dest.write_text(
        json.dumps(
            {
                **{k: v for k, v in index.items() if k != "training"},
                "numTraining": len(training),
                "training": training,
            },
            indent=1,
        )
    )
    return dest


def sizes(quick: bool) -> dict:
    if quick:
        return {
            "spacing": [3.0, 3.0, 3.0],
            "patch": 32,
            "batch": 2,
            "warmup": 1,
            "steps": 3,
            "workers": 1,
            "fit_steps": 4,
            "fit_val_every": 2,
            "det_steps": 2,
            "scans": 2,
        }
    return {
        "spacing": [1.0, 1.0, 1.0],
        "patch": 96,
        "batch": 16,
        "warmup": 5,
        "steps": 30,
        "workers": 12,
        "fit_steps": 60,
        "fit_val_every": 20,
        "det_steps": 5,
        "scans": 4,
    }


def base_overrides(data: str, device: str, size: dict, out: str) -> dict:
    return {
        "out": out,
        "data.dataset": data,
        "data.spacing": size["spacing"],
        "data.patch_size": [size["patch"]] * 3,
        "data.n_test": 6,
        "data.n_val": 3,
        "data.budget": 3,
        "model.levels": 3,
        "model.num_res_units": 5,
        "model.channels": 16,
        "train.batch_size": size["batch"],
        "train.workers": size["workers"],
        "train.device": device,
        "train.precision": "auto",
    }


def timed_steps(next_batch, step, warmup: int, steps: int, sync) -> dict:
    """Steps per second and the share of step time spent waiting for batches."""
    for _ in range(warmup):
        step(*next_batch())
    sync()
    data = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        ready = time.perf_counter()
        batch = next_batch()
        data += time.perf_counter() - ready
        step(*batch)
    sync()
    total = time.perf_counter() - start
    return {"steps_per_s": round(steps / total, 3), "data_share": round(data / total, 4)}


def plain_monai(cfg, files: list[dict], device, size: dict, sync) -> dict:
    """The MONAI tutorials' loop: CacheDataset, DataLoader workers augmenting on the CPU, fp32."""
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        NormalizeIntensityd,
        Orientationd,
        RandCropByPosNegLabeld,
        Spacingd,
        SpatialPadd,
    )

    from lowlabel.data.transforms import augment

    keys = ["image", "label"]
    per_volume = min(4, size["batch"])  # tutorials: num_samples patches per loaded volume
    patch = [size["patch"]] * 3
    chain = [
        LoadImaged(keys),
        EnsureChannelFirstd(keys),
        Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=size["spacing"], mode=("bilinear", "nearest")),
        CropForegroundd(keys, source_key="image", margin=2, allow_smaller=True),
        NormalizeIntensityd("image", nonzero=True),
        SpatialPadd(keys, spatial_size=patch),
        RandCropByPosNegLabeld(
            keys, "label", spatial_size=patch, pos=9, neg=1, num_samples=per_volume
        ),
        *augment(cfg.data, cfg.augment).transforms[1:],  # lowlabel's augmentations, same order
    ]
    t0 = time.perf_counter()
    ds = CacheDataset(files, Compose(chain), cache_rate=1.0, num_workers=os.cpu_count())
    cache_s = time.perf_counter() - t0
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**6)
    loader = DataLoader(
        ds,
        batch_size=max(1, size["batch"] // per_volume),
        sampler=sampler,
        num_workers=size["workers"],
    )
    batches = iter(loader)
    torch.manual_seed(0)
    model = UNet(3, 1, 4, channels=(16, 32, 64), strides=(2, 2), num_res_units=5).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def next_batch():
        b = next(batches)
        return b["image"].to(device), b["label"].to(device)

    def step(image, label):
        model.train()
        optimizer.zero_grad()
        loss = loss_fn(model(image), label)
        loss.backward()
        optimizer.step()
        return loss.item()

    out = timed_steps(next_batch, step, size["warmup"], size["steps"], sync)
    out["cache_seconds"] = round(cache_s, 2)
    out["patches_per_batch"] = max(1, size["batch"] // per_volume) * per_volume
    return out


def lowlabel_step(cfg):
    """lowlabel's optimizer update as ``train_steps`` makes it: the run's ``Runtime`` (device,
    precision, gradient scaler), the ``Supervised`` objective's loss, ``Runtime.update``.

    Returns ``(runtime, step)`` with ``step(image, label) -> loss``.
    """
    import torch

    from lowlabel.engine.objectives import Supervised
    from lowlabel.engine.runtime import runtime, seed_everything
    from lowlabel.models.unet import build_model

    rt = runtime(cfg)
    seed_everything(cfg.seed)
    model = rt.place(build_model(cfg.model, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
    objective = Supervised(cfg, model, rt, None, [])  # no folder, no validation: steps only
    objective.net = rt.prepare(model)
    state: dict = {}

    def step(image, label) -> float:
        objective.train_mode(0, optimizer)
        loss = objective.loss((image, label), 0)
        optimizer.zero_grad(set_to_none=True)
        rt.update(loss, optimizer, state)
        return loss.item()

    return rt, step


def lowlabel_train(cfg, items: list[dict], size: dict, sync, on_device_augment: bool) -> dict:
    """lowlabel's path: ``train_loader`` (workers, pinned memory), the run's ``Runtime``, the
    loop's update; or, with ``on_device_augment``, the cached items on the device, augmented
    there in the main process (an experiment)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lowlabel.data.batches import Batches, train_loader
    from lowlabel.data.transforms import augment

    rt, step = lowlabel_step(cfg)
    if on_device_augment:
        moved = [
            {k: rt.to_device(v) if isinstance(v, torch.Tensor) else v for k, v in item.items()}
            for item in items
        ]
        batches = Batches(
            moved, augment(cfg.data, cfg.augment), cfg.train.batch_size, cfg.seed, False
        )
        counter = iter(range(10**9))

        def next_batch():
            return batches[next(counter)]
    else:
        loader = iter(train_loader(cfg, items, 0, None, rt.pin_memory))

        def next_batch():
            return rt.to_device(next(loader))

    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    out = timed_steps(next_batch, step, size["warmup"], size["steps"], sync)
    out["precision"] = rt.placement.precision
    if not on_device_augment:
        image, label = next_batch()
        with FlopCounterMode(display=False) as flops:
            step(image, label)
        out["gflop_per_step"] = round(flops.get_total_flops() / 1e9, 1)
        out["achieved_tflop_per_s"] = round(flops.get_total_flops() * out["steps_per_s"] / 1e12, 4)
        if rt.device.type == "cuda":
            out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(rt.device) / 2**20)
    return out


def determinism(cfg, items: list[dict], steps: int) -> dict:
    """Two runs with ``train.deterministic: true`` from one seed: the same losses?"""
    from lowlabel.device import deterministic_setup

    det = cfg.replace(**{"train.deterministic": True, "train.workers": 1})
    losses = [_losses(det, items, steps) for _ in range(2)]
    deterministic_setup(False)
    return {"identical_loss_two_runs": losses[0] == losses[1], "losses": losses, "steps": steps}


def _losses(cfg, items: list[dict], steps: int) -> list[float]:
    from lowlabel.data.batches import train_loader

    rt, step = lowlabel_step(cfg)
    loader = train_loader(cfg.replace(**{"train.steps": steps}), items, 0, None, rt.pin_memory)
    return [step(*rt.to_device(batch)) for batch in loader]


def paper_run(data: str, device: str, size: dict, quick: bool, work: Path) -> tuple[dict, Path]:
    """A shortened paper-scale run of the seed study's first training cell, and estimates."""
    from lowlabel.config import from_dict, to_dict
    from lowlabel.data.cohort import resolve_dataset
    from lowlabel.device import Placement
    from lowlabel.engine.evaluate import evaluate
    from lowlabel.engine.loop import fit
    from lowlabel.engine.runs import load_run
    from lowlabel.study.spec import expand, load_study

    study = load_study("seed")
    cells = expand(study, "paper", data, work / "study")
    train_cells = [c for c in cells if c.kind == "train" and c.needs is None]
    cfg = train_cells[0].cfg
    full_steps, full_val_every = cfg.train.steps, cfg.train.val_every
    short = {
        "train.steps": size["fit_steps"],
        "train.val_every": size["fit_val_every"],
        "train.patience": 0,
        "train.device": device,
        "train.workers": size["workers"],
        "out": str(work / "paper"),
    }
    if quick:
        short.update(
            {
                "data.spacing": size["spacing"],
                "data.patch_size": [size["patch"]] * 3,
                "train.batch_size": size["batch"],
                "model.levels": 3,
            }
        )
    cfg = from_dict(to_dict(cfg.replace(**short)))
    t0 = time.perf_counter()
    # the test evaluation (native grid, HD95 on the CPU) is timed on one subject below
    result = fit(cfg, progress=False, evaluate_test=False)
    wall = time.perf_counter() - t0
    run = Path(result.run_dir)
    split = json.loads((run / "splits.json").read_text())
    _, model = load_run(run)
    model.to(Placement.for_run(cfg).device)
    subjects = resolve_dataset(cfg).by_id(split["test"])
    t1 = time.perf_counter()
    evaluate(model, cfg, subjects[:1], None, False)
    eval_s = (time.perf_counter() - t1) * len(subjects)
    prov = json.loads((run / "provenance.json").read_text())
    sps = prov["speed"]["steps_per_s"]
    validations = len((run / "metrics.jsonl").read_text().splitlines())
    step_s = 1.0 / sps
    val_s = max(0.0, (result.train_seconds - result.steps * step_s) / max(1, validations))

    def run_seconds(steps: int, val_every: int) -> float:
        return result.prep_seconds + steps * step_s + (steps // val_every) * val_s + eval_s

    per_run = run_seconds(full_steps, full_val_every)
    study_s = 0.0
    for cell in cells:
        c = cell.cfg
        steps = c.pretrain.steps if cell.kind == "pretrain" else c.train.steps
        study_s += run_seconds(steps, c.train.val_every)
    peak = prov["device"].get("peak_device_mb")
    total = prov["device"].get("device_memory_mb")
    runs_per_gpu = int(max(1, (0.9 * total) // peak)) if peak and total else 1
    cores_per_run = size["workers"] + 1
    runs_per_gpu = min(runs_per_gpu, max(1, (os.cpu_count() or 1) // cores_per_run))
    return (
        {
            # a full run (5000 steps) does not fit the benchmark's 8 minutes: not measured
            "seconds_per_run_measured": None,
            "seconds_per_run_estimated": round(per_run, 1),
            "runs_per_gpu": runs_per_gpu,
            "estimated_study_minutes_3_seeds": round(study_s / 60.0, 1),
            "measured_or_estimated": "estimated",
            "how": (
                f"one paper-scale run shortened to {result.steps} steps with {validations} "
                f"validations was measured; a full run is priced as preparation "
                f"{result.prep_seconds:.1f} s + {full_steps} steps x {step_s:.3f} s + "
                f"{full_steps // full_val_every} validations x {val_s:.2f} s + test evaluation "
                f"{eval_s:.1f} s ({len(subjects)} subjects x the one timed); the study sums "
                f"{len(cells)} runs at full length (no early stop; pretraining steps priced as "
                "training steps), one run at a time on one GPU"
            ),
            "short_run": {
                "steps": result.steps,
                "validations": validations,
                "steps_per_s": sps,
                "data_share": prov["speed"]["data_share"],
                "prep_seconds": result.prep_seconds,
                "train_seconds": result.train_seconds,
                "test_eval_seconds_one_subject": round(eval_s / max(1, len(subjects)), 2),
                "wall_seconds": round(wall, 2),
                "device": prov["device"],
            },
            "study_runs": len(cells),
        },
        run,
    )


def segment_timing(run: Path, scans: list[str], device: str, work: Path) -> dict:
    from lowlabel.bundle import export
    from lowlabel.segment import segment

    bundle = export(run, work / "bundle")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])
        ),
    }
    cmd = [
        sys.executable,
        "-m",
        "lowlabel.cli",
        "segment",
        str(bundle),
        scans[0],
        "-o",
        str(work / "seg-first"),
        "--device",
        device,
        "-q",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    first = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    segment(bundle, scans[:1], work / "seg-warmup", progress=False, device=device)
    t0 = time.perf_counter()
    res = segment(bundle, scans[1:], work / "seg-warm", progress=False, device=device)
    warm = (time.perf_counter() - t0) / max(1, len(scans) - 1)
    if res.errors:
        raise RuntimeError(f"segmentation failed: {res.errors}")
    return {
        "s_per_scan_warm": round(warm, 3),
        "s_first_scan_with_startup": round(first, 3),
        "scans": len(scans) - 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a dry run)")
    parser.add_argument("--data", default=None, help="dataset.json (default .gpudata or shared)")
    parser.add_argument("--out", default=None, help="JSON to write")
    parser.add_argument("--prepare-data", action="store_true", help="copy malf35 to .gpudata/")
    args = parser.parse_args()
    if args.prepare_data:
        print(f"wrote {prepare_data()}")
        return
    data = args.data or str(LOCAL if LOCAL.exists() else SHARED)
    out_path = Path(
        args.out or RESULTS / ("gpu_cpu_dryrun.json" if args.device == "cpu" else "gpu.json")
    )
    started = time.perf_counter()
    load_before = [round(v, 2) for v in os.getloadavg()]

    import torch
    from monai.transforms import Compose

    from lowlabel.atomic import write_json
    from lowlabel.config import load_config
    from lowlabel.data.cohort import cache, resolve_dataset, resolve_splits
    from lowlabel.data.transforms import index_foreground, preprocess
    from lowlabel.device import Placement
    from lowlabel.engine.runtime import set_threads
    from lowlabel.provenance import machine

    size = sizes(args.quick)
    place = Placement.of(args.device, key="--device")
    dev = place.device

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    work = Path(tempfile.mkdtemp(prefix="lowlabel-gpu-"))
    try:
        cfg = load_config(None, base_overrides(data, args.device, size, str(work / "runs")))
        set_threads(0, 0)  # all cores: the loaders' workers are processes of their own
        ds = resolve_dataset(cfg)
        split = resolve_splits(cfg, ds)
        subjects = ds.by_id(split["train"])
        files = [{"image": s["image"], "label": s["label"]} for s in subjects]
        t0 = time.perf_counter()
        items = cache(subjects, Compose([preprocess(cfg.data), index_foreground()]), "", False)
        lowlabel_cache_s = time.perf_counter() - t0
        print("plain MONAI loop ...", flush=True)
        plain = plain_monai(cfg, files, dev, size, sync)
        print(f"  {plain}\nlowlabel ...", flush=True)
        fast = lowlabel_train(cfg, items, size, sync, on_device_augment=False)
        print(f"  {fast}\nlowlabel, augmentation on the device (experiment) ...", flush=True)
        try:
            on_dev = lowlabel_train(cfg, items, size, sync, on_device_augment=True)
        except Exception as err:  # an experiment: record why it could not run
            on_dev = {"error": f"{type(err).__name__}: {err}"[:500]}
        print(f"  {on_dev}\ndeterminism ...", flush=True)
        det = determinism(cfg, items, size["det_steps"])
        print(f"  {det}\npaper-scale run ...", flush=True)
        paper, run = paper_run(data, args.device, size, args.quick, work)
        print(f"  {paper}\nsegment ...", flush=True)
        test_scans = [s["image"] for s in ds.by_id(split["test"])][: size["scans"] + 1]
        seg = segment_timing(run, test_scans, args.device, work)
        print(f"  {seg}", flush=True)
        gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
        result = {
            "machine": machine(),
            "gpu": gpu,
            "torch": torch.__version__,
            "device": place.record(),
            "quick": args.quick,
            "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:]),
            "data": {"dataset": data, "labelled": split["train"], "test": split["test"]},
            "sizes": size,
            "train": {
                "plain_monai_steps_per_s": plain["steps_per_s"],
                "lowlabel_steps_per_s": fast["steps_per_s"],
                "speedup": round(fast["steps_per_s"] / plain["steps_per_s"], 2),
                "data_share": fast["data_share"],
                "peak_gpu_mb": fast.get("peak_gpu_mb"),
                "achieved_tflop_per_s": fast["achieved_tflop_per_s"],
                "plain_monai": plain,
                "lowlabel": {**fast, "cache_seconds": round(lowlabel_cache_s, 2)},
                "lowlabel_device_augment": on_dev,
            },
            "segment": seg,
            "paper_profile": paper,
            "determinism": det,
            "seconds": round(time.perf_counter() - started, 1),
            "load_average_before": load_before,
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
        }
        if dev.type == "cpu":
            result["note"] = (
                "CPU dry run at tiny sizes: proves the script runs; no GPU figure is measured here"
            )
        write_json(out_path, result)
        print(f"wrote {out_path} in {result['seconds']} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
