"""Second-site benchmark: a malf35 model on IXI, site augmentation, adapting with 1-3 IXI labels.

Parts (``--parts``, comma-separated):

- ``zero_shot``: a 4-level UNet trained on 3 labelled malf35 scans at 2 mm, with today's
  augmentation (``baseline``) and with the site preset (``robust``, ``augment.site=robust``),
  evaluated on the fixed IXI test split and on malf35's own test split. No IXI label is used in
  training or model selection.
- ``adapt``: the robust malf35 model, exported as a bundle, fine-tuned whole
  (``transfer.scope=all``) on k = 1 and 3 labelled IXI scans (drawn per seed), against training
  from scratch on the same k scans; paired 95% CIs over seeds, and the steps each arm needs to
  reach 0.90 validation Dice.
- ``pretrain_pool``: genesis pretraining (in-painting, 3000 steps) on malf35's 16-scan training
  pool, and on that pool plus IXI's images outside its test split, each fine-tuned on 1 and 3
  labelled malf35 scans (drawn per seed) against scratch; every run to early stopping at the
  transfer benchmark's scale (3-level residual UNet, 32^3 patches); paired 95% CIs over seeds and
  the steps each arm needs to reach its seed's scratch best validation Dice.

The fixed IXI test split is ``data.n_test=40, data.n_val=3, data.split_seed=0`` on IXI's
``dataset.json`` (what every IXI run here uses, so its own test split is that one); it is also
written as ``<work>/ixi_test.json``, which the malf35 models are evaluated on. No run trains,
validates or pretrains on it.

Runs go side by side, ``--jobs`` processes with one torch thread each; finished runs are reused,
so a rerun only does what is missing. Writes ``benchmarks/results/site.json``.

Usage:
    python benchmarks/site.py [--parts zero_shot,adapt,pretrain_pool] [--seeds 5] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import transfer  # the transfer benchmark's scale (this folder is on the path)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# every run: 2 mm (IXI's own resolution), 3D 64^3 patches, a 4-level UNet
COMMON = {
    "data.spatial_dims": 3,
    "data.spacing": [2.0, 2.0, 2.0],
    "data.patch_size": [64, 64, 64],
    "data.split_seed": 0,
    "model.levels": 4,
    "model.channels": 16,
    "train.schedule": "poly",  # the defaults when these figures were measured
    "train.batch_size": 2,
    "train.threads": 1,
}
MALF35 = {"data.n_test": 7, "data.n_val": 3, "data.budget": 3, "data.draw": 0, "seed": 0}
IXI_SPLIT = {"data.n_test": 40, "data.n_val": 3}
ROBUST = {"augment.site": "robust"}
# pretrain_pool: the transfer benchmark's scale (2 mm, 32^3 patches, a 3-level residual UNet) and
# its genesis settings, on malf35's default split (test 6, validation 3, pool 16), each run to
# early stopping
POOL_SCALE = {
    **transfer.SCALE,
    "data.spatial_dims": 3,
    "train.val_every": 100,
    "train.patience": 10,
}
GENESIS = {"pretrain.method": "genesis", **transfer.METHOD_SETTINGS["genesis"]}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


class Runs:
    """Training runs launched as ``lowlabel train`` processes, ``jobs`` at a time."""

    def __init__(self, out: Path, jobs: int) -> None:
        self.out, self.jobs = out, jobs
        self.waiting: list[tuple[str, Path, dict, str]] = []

    def add(self, name: str, data: Path, sets: dict, kind: str = "train") -> Path:
        """Queue a ``lowlabel train`` (or ``pretrain``) run unless it is finished; its folder."""
        from lowlabel.config import load_config, run_dir

        sets = dict(sets, name=name)
        cfg = load_config(None, dict(sets, **{"data.dataset": str(data), "out": str(self.out)}))
        folder = run_dir(cfg, kind)
        if not (folder / "result.json").exists():
            self.waiting.append((name, data, sets, kind))
        return folder

    def run(self) -> None:
        procs: list[tuple[str, subprocess.Popen]] = []
        while self.waiting or procs:
            while self.waiting and len(procs) < self.jobs:
                name, data, sets, kind = self.waiting.pop(0)
                cmd = [sys.executable, "-m", "lowlabel.cli", kind, "--data", str(data)]
                cmd += ["--out", str(self.out), "--resume", "--quiet"]
                for key, value in sets.items():
                    cmd += ["--set", f"{key}={json.dumps(value)}"]
                print(f"[{time.strftime('%H:%M:%S')}] start {name}", flush=True)
                procs.append((name, subprocess.Popen(cmd)))
            time.sleep(2)
            for name, proc in list(procs):
                if proc.poll() is not None:
                    procs.remove((name, proc))
                    if proc.returncode != 0:
                        sys.exit(f"run {name} failed with status {proc.returncode}")
                    print(f"[{time.strftime('%H:%M:%S')}] done {name}", flush=True)


def ixi_split(ixi: Path) -> tuple[list[dict], set[str]]:
    """IXI's subjects and the ids of its fixed test split."""
    from lowlabel.data.datasets import load_dataset
    from lowlabel.data.splits import make_splits

    ds = load_dataset(ixi)
    ids = [s["id"] for s in ds.subjects]
    split = make_splits(ids, IXI_SPLIT["data.n_test"], IXI_SPLIT["data.n_val"], 0)
    return ds.subjects, set(split["test"])


def ixi_test_dataset(ixi: Path, work: Path) -> tuple[Path, list[str]]:
    """``<work>/ixi_test.json``: the fixed IXI test split as a dataset of its own."""
    from lowlabel.atomic import write_json

    subjects, test = ixi_split(ixi)
    items = [{"image": s["image"], "label": s["label"]} for s in subjects if s["id"] in test]
    path = work / "ixi_test.json"
    write_json(path, {"name": "ixi-test", "labels": {"0": "background"}, "training": items})
    return path, sorted(test)


def evaluate(run: Path, data: Path | None = None) -> dict:
    """``lowlabel evaluate`` on ``data`` (None: the run's own test split), at native resolution."""
    where = [] if data is None else ["--data", str(data)]
    out = subprocess.run(
        [sys.executable, "-m", "lowlabel.cli", "evaluate", str(run), *where, "--json", "--quiet"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(result: dict) -> dict:
    keys = ("mean_dice", "dice_csf", "dice_gm", "dice_wm")
    return {k: round(float(result[k]), 4) for k in keys if k in result}


def result_of(run: Path) -> dict:
    return json.loads((run / "result.json").read_text())


def steps_to(run: Path, level: float) -> int | None:
    """The first validation step whose mean Dice reaches ``level`` (None: never)."""
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("val_dice") is not None and row["val_dice"] >= level:
            return int(row["step"])
    return None


def interval(values: list[float]) -> dict:
    from lowlabel.study.stats import summarize

    s = summarize(values)
    return {"mean": round(s.mean, 4), "ci95": [round(s.ci_low, 4), round(s.ci_high, 4)]}


def zero_shot(args: argparse.Namespace, runs: Runs, ixi_test: Path) -> dict:
    steps = args.zero_shot_steps or args.steps
    sets = dict(COMMON, **MALF35, **{"train.steps": steps, "train.val_every": 100})
    if args.zero_shot_patience:
        sets["train.patience"] = args.zero_shot_patience
    arms = {"baseline": sets, "robust": dict(sets, **ROBUST)}
    folders = {arm: runs.add(f"malf35-{arm}", args.malf35, arms[arm]) for arm in args.arms}
    runs.run()
    out: dict = {}
    for arm, folder in folders.items():
        res = result_of(folder)
        out[arm] = {
            "ixi_test": summary(evaluate(folder, ixi_test)),
            # evaluated again, so every arm's figures come from the same code
            "malf35_test": summary(evaluate(folder)),
            "steps": res["steps"],
            "best_step": res["best_step"],
            "train_seconds": round(res["train_seconds"], 1),
            "run_dir": str(folder),
        }
    for arm in folders:
        out[f"{arm}_mean_dice"] = out[arm]["ixi_test"]["mean_dice"]
        out[f"malf35_test_mean_dice_{arm}"] = out[arm]["malf35_test"]["mean_dice"]
    return out


def adapt(args: argparse.Namespace, runs: Runs, work: Path, source_run: Path) -> dict:
    bundle = work / "malf35-robust-model"
    if "adapted" in args.adapt_arms and not bundle.exists():
        subprocess.run(
            [sys.executable, "-m", "lowlabel.cli", "export", str(source_run), "-o", str(bundle)],
            check=True,
        )
    base = dict(COMMON, **IXI_SPLIT, **{"train.val_every": 50, "train.patience": 10})
    folders: dict[tuple[int, int, str], Path] = {}
    for k in args.budgets:
        for seed in range(args.seeds):
            sets = dict(base, **{"data.budget": k, "data.draw": seed, "seed": seed})
            if "scratch" in args.adapt_arms:
                folders[(k, seed, "scratch")] = runs.add(
                    f"ixi-k{k}-s{seed}-scratch", args.ixi, dict(sets, **{"train.steps": args.steps})
                )
            if "adapted" not in args.adapt_arms:
                continue
            folders[(k, seed, "adapted")] = runs.add(
                f"ixi-k{k}-s{seed}-adapted",
                args.ixi,
                dict(
                    sets,
                    **{
                        "train.steps": args.adapt_steps,
                        "transfer.init_from": str(bundle),
                        "transfer.mode": "finetune",
                        "transfer.scope": "all",
                    },
                ),
            )
    runs.run()
    if set(args.adapt_arms) != {"scratch", "adapted"}:
        return {}  # one arm only (e.g. run apart): the comparison comes with both
    out: dict = {"bundle": str(bundle), "source_run": str(source_run)}
    for k in args.budgets:
        per: dict = {}
        for arm in ("adapted", "scratch"):
            per[arm] = {
                seed: result_of(folders[(k, seed, arm)])["test"]["mean_dice"]
                for seed in range(args.seeds)
            }
        gains = [per["adapted"][s] - per["scratch"][s] for s in range(args.seeds)]
        out[str(k)] = {
            "adapted": interval(list(per["adapted"].values())),
            "scratch": interval(list(per["scratch"].values())),
            "gain": interval(gains),
            "seeds": args.seeds,
            "per_seed": {arm: {str(s): round(v, 4) for s, v in per[arm].items()} for arm in per},
            "steps_to_0.90": {
                arm: [steps_to(folders[(k, s, arm)], 0.90) for s in range(args.seeds)]
                for arm in ("adapted", "scratch")
            },
            # the same seed's scratch run's best validation Dice: when each arm first reaches it
            "steps_to_scratch_best": {
                arm: [
                    steps_to(
                        folders[(k, s, arm)],
                        result_of(folders[(k, s, "scratch")])["best_val_dice"] - 1e-9,
                    )
                    for s in range(args.seeds)
                ]
                for arm in ("adapted", "scratch")
            },
            "steps": {
                arm: [result_of(folders[(k, s, arm)])["steps"] for s in range(args.seeds)]
                for arm in ("adapted", "scratch")
            },
            "best_step": {
                arm: [result_of(folders[(k, s, arm)])["best_step"] for s in range(args.seeds)]
                for arm in ("adapted", "scratch")
            },
        }
    return out


def ixi_pool_dataset(ixi: Path, work: Path) -> tuple[Path, int]:
    """``<work>/ixi_pool.json``: IXI's images outside its fixed test split, without labels."""
    from lowlabel.atomic import write_json

    subjects, test = ixi_split(ixi)
    items = [{"image": s["image"]} for s in subjects if s["id"] not in test]
    path = work / "ixi_pool.json"
    write_json(path, {"name": "ixi-pool", "labels": {"0": "background"}, "training": items})
    return path, len(items)


def converged(run: Path, budget: int) -> bool:
    """Early stopping ended the run, or its best step came before 80% of its step budget."""
    res = result_of(run)
    return bool(res.get("stopped_early")) or res["best_step"] < 0.8 * budget


def pretrain_pool(args: argparse.Namespace, runs: Runs, work: Path) -> dict:
    """Genesis pretraining on malf35's 16-scan pool vs that pool plus IXI, fine-tuned on 1 and 3
    labelled malf35 scans, against scratch; every run to early stopping."""
    ixi_pool, ixi_images = ixi_pool_dataset(args.ixi, work)
    base = dict(POOL_SCALE, **{"train.steps": args.pool_steps})
    pre = dict(
        base,
        **GENESIS,
        **{"seed": 0, "pretrain.steps": args.pretrain_steps, "train.batch_size": 4},
    )
    pretrained = {
        "16": runs.add("pool16-genesis", args.malf35, pre, kind="pretrain"),
        "160": runs.add(
            "pool160-genesis",
            args.malf35,
            dict(pre, **{"pretrain.unlabelled": [str(ixi_pool)]}),
            kind="pretrain",
        ),
    }
    folders: dict[tuple[int, int, str], Path] = {}
    for k in args.budgets:
        for seed in range(args.seeds):
            sets = dict(base, **{"data.budget": k, "data.draw": seed, "seed": seed})
            folders[(k, seed, "scratch")] = runs.add(
                f"malf35-k{k}-s{seed}-scratch", args.malf35, sets
            )
    runs.run()  # pretraining first (queued first), scratch alongside and after
    for k in args.budgets:
        for seed in range(args.seeds):
            sets = dict(base, **{"data.budget": k, "data.draw": seed, "seed": seed})
            for pool, folder in pretrained.items():
                folders[(k, seed, f"pool{pool}")] = runs.add(
                    f"malf35-k{k}-s{seed}-pool{pool}",
                    args.malf35,
                    dict(sets, **{"transfer.init_from": str(folder), "transfer.mode": "finetune"}),
                )
    runs.run()
    arms = ("scratch", "pool16", "pool160")
    out: dict = {
        "method": "genesis (in-painting only), fine-tuned whole (transfer.mode=finetune)",
        "settings": dict(base, **{"train.patience": POOL_SCALE["train.patience"]}),
        "pretraining": {},
        "note": (
            "the 160 pool is malf35's 16 training-pool scans plus IXI's images outside its fixed "
            "40-scan test split (no run of this benchmark pretrains on an IXI test scan); test "
            "on malf35's fixed test split"
        ),
    }
    for pool, folder in pretrained.items():
        res = result_of(folder)
        out["pretraining"][pool] = {
            "images": res["images"],
            "steps": res["steps"],
            "seconds": round(res["seconds"], 1),
            "val_mse": round(res["val_mse"], 5),
            "run_dir": str(folder),
        }
    for k in args.budgets:
        dice = {
            arm: [result_of(folders[(k, s, arm)])["test"]["mean_dice"] for s in range(args.seeds)]
            for arm in arms
        }
        row: dict = {"seeds": args.seeds}
        for arm in arms:
            row[arm] = interval(dice[arm])
        for pool in ("16", "160"):
            row[f"pool_{pool}_vs_scratch"] = interval(
                [a - b for a, b in zip(dice[f"pool{pool}"], dice["scratch"], strict=True)]
            )
        row["pool_160_vs_pool_16"] = interval(
            [a - b for a, b in zip(dice["pool160"], dice["pool16"], strict=True)]
        )
        row["per_seed"] = {arm: [round(v, 4) for v in dice[arm]] for arm in arms}
        # when each arm's validation Dice first reaches the same seed's scratch run's best
        row["steps_to_scratch_best"] = {
            arm: [
                steps_to(
                    folders[(k, s, arm)],
                    result_of(folders[(k, s, "scratch")])["best_val_dice"] - 1e-9,
                )
                for s in range(args.seeds)
            ]
            for arm in arms
        }
        for key in ("steps", "best_step"):
            row[key] = {
                arm: [result_of(folders[(k, s, arm)])[key] for s in range(args.seeds)]
                for arm in arms
            }
        row["converged"] = {
            arm: [converged(folders[(k, s, arm)], args.pool_steps) for s in range(args.seeds)]
            for arm in arms
        }
        out[str(k)] = row
    out["ixi_pool_images"] = ixi_images
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--malf35", type=Path, default=SHARED / "malf35" / "dataset.json")
    parser.add_argument("--ixi", type=Path, default=SHARED / "ixi" / "dataset.json")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "work" / "site")
    parser.add_argument("--parts", default="zero_shot,adapt")
    parser.add_argument("--steps", type=int, default=3000, help="malf35 and scratch step budget")
    parser.add_argument(
        "--zero-shot-steps", type=int, default=0, help="malf35 step budget (0: --steps)"
    )
    parser.add_argument(
        "--zero-shot-patience", type=int, default=0, help="malf35 patience (0: the default)"
    )
    parser.add_argument("--adapt-steps", type=int, default=1000, help="step budget of adapted runs")
    parser.add_argument("--arms", type=lambda s: s.split(","), default=["baseline", "robust"])
    parser.add_argument("--adapt-arms", type=lambda s: s.split(","), default=["scratch", "adapted"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[1, 3])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--pool-steps", type=int, default=4000, help="pretrain_pool step budget")
    parser.add_argument("--pretrain-steps", type=int, default=3000)
    parser.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results" / "site.json"
    )
    args = parser.parse_args()
    for path in (args.malf35, args.ixi):
        if not path.exists():
            sys.exit(f"{path}: not found; pass --malf35 / --ixi")
    from lowlabel.atomic import write_json
    from lowlabel.provenance import machine

    args.out.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    ixi_test, test_ids = ixi_test_dataset(args.ixi, args.out)
    results.update(
        {
            "machine": machine(),
            "settings": COMMON,
            "ixi_test_subjects": len(test_ids),
            "ixi_test_ids": test_ids,
        }
    )
    runs = Runs(args.out, args.jobs)
    parts = args.parts.split(",")
    command = "python benchmarks/site.py " + " ".join(sys.argv[1:])
    commands = results.setdefault("commands", {})  # the command that last ran each part
    commands.update({part: command for part in parts})
    t0, load_before = time.time(), load_average()
    if "zero_shot" in parts:
        results["zero_shot"] = dict(results.get("zero_shot", {}), **zero_shot(args, runs, ixi_test))
        write_json(args.results, results)
    if "adapt" in parts:
        robust = results.get("zero_shot", {}).get("robust", {}).get("run_dir")
        if robust is None and "adapted" in args.adapt_arms:
            sys.exit("the adapted arm needs the robust malf35 model: run --parts zero_shot first")
        adapted = adapt(args, runs, args.out, Path(robust or "."))
        if adapted:
            results["adapt"] = adapted
    if "pretrain_pool" in parts:
        t_pool, load_pool = time.time(), load_average()
        results["pretrain_pool"] = pretrain_pool(args, runs, args.out)
        results["pretrain_pool"]["wall_seconds"] = round(time.time() - t_pool, 1)
        results["pretrain_pool"]["load_average_before_after"] = [load_pool, load_average()]
    results["wall_seconds_last_invocation"] = round(time.time() - t0, 1)
    results["load_average_before_after"] = [load_before, load_average()]
    write_json(args.results, results)
    print(
        json.dumps(
            {k: results[k] for k in ("zero_shot", "adapt", "pretrain_pool") if k in results},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
