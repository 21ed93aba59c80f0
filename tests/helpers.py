"""Helpers shared by the test modules: the bad-input world, and running ``lowlabel`` in forked
processes (:mod:`fork_server`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import make_tiny_dataset, phantom, tiny_overrides, write
from safetensors.torch import load_file

from lowlabel.cli import app
from lowlabel.config import RunConfig, run_dir
from lowlabel.engine import objectives
from lowlabel.engine.loop import fit

FORK_SERVER = Path(__file__).with_name("fork_server.py")

COMMANDS = {c.name or c.callback.__name__ for c in app.registered_commands} | {
    g.name for g in app.registered_groups
}
SHAPE = (24, 24, 24)
TINY = [
    "--set",
    "data.n_test=1",
    "--set",
    "data.n_val=1",
    "--set",
    "data.patch_size=[16,16,16]",
    "--set",
    "model.levels=3",
    "--set",
    "model.channels=4",
    "--set",
    "train.steps=2",
    "--set",
    "train.val_every=1",
    "--set",
    "train.threads=1",
    "--set",
    "train.batch_size=1",
]

# the defects of issue 2, each put into subject sub00 of an otherwise good dataset
FILE_DEFECTS = [
    "missing_dataset",
    "missing",
    "corrupt",
    "truncated",
    "wrong_shape",
    "wrong_affine",
    "nan",
    "empty_label",
    "out_of_scheme",
]
IMAGE_DEFECTS = ["missing_dataset", "missing", "corrupt", "truncated", "nan"]  # no labels read


def _defect(root: Path, kind: str) -> tuple[Path, str]:
    """Write a 5-subject dataset under ``root`` with ``kind`` in sub00; returns the dataset
    (``dataset.json``) and the path the error must name."""
    index = make_tiny_dataset(root, n=5, shape=SHAPE)
    image, label = root / "images" / "sub00.nii.gz", root / "labels" / "sub00.nii.gz"
    affine = nib.load(str(image)).affine
    img, lab = phantom(SHAPE, 0)
    if kind == "missing":
        image.unlink()
        return index, str(image)
    if kind == "corrupt":
        image.write_bytes(b"\x1f\x8b\x08\x00garbage" * 64)
        return index, str(image)
    if kind == "truncated":
        image.write_bytes(image.read_bytes()[:1500])
        return index, str(image)
    if kind == "nan":
        write(image, np.where(lab == 3, np.nan, img).astype(np.float32), affine)
        return index, str(image)
    if kind == "wrong_shape":
        write(label, lab[:, :, :-3], affine)
        return index, str(label)
    if kind == "wrong_affine":
        shifted = affine.copy()
        shifted[2, 3] += 4.0
        write(label, lab, shifted)
        return index, str(label)
    if kind == "empty_label":
        write(label, np.zeros_like(lab), affine)
        return index, str(label)
    if kind == "out_of_scheme":
        write(label, np.where(lab == 2, 5, lab).astype(np.int16), affine)
        return index, str(label)
    if kind == "bad_test_scan":  # sub02 is the test subject of split seed 0: found before training
        scan = root / "images" / "sub02.nii.gz"
        scan.write_bytes(scan.read_bytes()[:1500])
        return index, str(scan)
    if kind == "missing_dataset":
        return root / "nosuch" / "dataset.json", str(root / "nosuch" / "dataset.json")
    if kind == "too_small":  # every scan 6 voxels across: a 4-level network needs 8
        shutil.rmtree(root)
        return make_tiny_dataset(root, n=5, shape=(6, 6, 6)), str(root / "images")
    raise AssertionError(kind)


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


class World:
    """Shared inputs (datasets, a finished run, a bundle), built once."""

    def __init__(self, root: Path) -> None:
        from lowlabel.config import load_config
        from lowlabel.engine.loop import fit

        self.root = root
        self.good = make_tiny_dataset(root / "good", n=5, shape=SHAPE)
        cfg = load_config(
            None,
            tiny_overrides(
                self.good,
                root / "runs",
                **{"data.n_test": 1, "data.n_val": 1, "train.steps": 2, "train.val_every": 1},
            ),
        )
        self.run = Path(fit(cfg, progress=False).run_dir)
        self.bundle = None
        if "segment" in COMMANDS:
            from lowlabel.bundle import export

            self.bundle = export(self.run, root / "bundle")
        self.damaged = root / "damaged-run"
        shutil.copytree(self.run, self.damaged)
        weights = self.damaged / "best.safetensors"
        weights.write_bytes(weights.read_bytes()[:300])
        self.no_splits = root / "run-without-splits"  # copied without its splits.json
        shutil.copytree(self.run, self.no_splits)
        (self.no_splits / "splits.json").unlink()
        self.bad_config = root / "run-with-bad-config"  # config.yaml edited by hand, wrongly
        shutil.copytree(self.run, self.bad_config)
        (self.bad_config / "config.yaml").write_text("train:\n  stepz: 3\n")

    def argv(self, command: str, kind: str, work: Path) -> tuple[list[str], str]:
        """The command line for one case, and the file or key the error must name."""
        out = work / "out"
        data = named = None
        if kind in FILE_DEFECTS or kind in ("too_small", "bad_test_scan", "missing_dataset"):
            data, named = _defect(work / "data", kind)
        if kind in ("bad_key", "bad_type"):
            key, value = ("train.stepz", "3") if kind == "bad_key" else ("train.steps", "many")
            sets, named = ["--set", f"{key}={value}"], key
        else:
            sets = []
        if command == "data check":
            return ["data", "check", str(data or self.good), *sets], named
        if command == "data demo":  # too few subjects for a train/validation/test split
            return ["data", "demo", str(out), "--subjects", "2"], "--subjects"
        if command in ("train", "pretrain"):
            argv = [command, "--data", str(data or self.good), "--out", str(out), "--quiet", *TINY]
            if command == "pretrain":
                argv += ["--set", "pretrain.steps=2"]
            if kind == "too_small":
                argv += ["--set", "model.levels=4"]
            if kind == "impossible_budget":
                key = "data.budget=9" if command == "train" else "data.n_test=9"
                argv += ["--set", key]
                named = key.split("=")[0]
            if kind == "wrong_model":
                argv += ["--init-from", str(self.good.parent)]
                named = str(self.good.parent)
            return [*argv, *sets], named
        if command == "evaluate":
            if kind == "wrong_model":
                return ["evaluate", str(self.good.parent), "--quiet"], str(self.good.parent)
            if kind == "damaged_checkpoint":
                return ["evaluate", str(self.damaged), "--quiet"], "best.safetensors"
            if kind == "damaged_splits":
                return ["evaluate", str(self.no_splits), "--quiet"], str(
                    self.no_splits / "splits.json"
                )
            if kind == "damaged_config":
                return ["evaluate", str(self.bad_config), "--quiet"], str(
                    self.bad_config / "config.yaml"
                )
            return ["evaluate", str(self.run), "--data", str(data), "--quiet"], named
        if command == "segment":
            if kind == "wrong_model":
                scan = self.good.parent / "images" / "sub01.nii.gz"
                return ["segment", str(self.run), str(scan), "--out", str(out), "--quiet"], str(
                    self.run
                )
            scan = Path(named) if kind != "too_small" else data.parent / "images" / "sub00.nii.gz"
            return ["segment", str(self.bundle), str(scan), "--out", str(out), "--quiet"], str(scan)
        if command == "export":
            if kind == "damaged_config":
                return ["export", str(self.bad_config), "--out", str(out)], str(
                    self.bad_config / "config.yaml"
                )
            source = self.good.parent if kind == "wrong_model" else self.damaged
            return ["export", str(source), "--out", str(out)], str(
                source
            ) if kind == "wrong_model" else "best.safetensors"
        if command == "study":
            if kind == "missing":
                path = work / "nosuch-study.yaml"
                return ["study", str(path), "--out", str(out), "--quiet"], str(path)
            if kind == "impossible_budget":
                sets, named = ["--set", "data.n_test=99"], "n_test"
            return [
                "study",
                "seed",
                "--data",
                str(self.good),
                "--out",
                str(out),
                "--quiet",
                *sets,
            ], named
        if command == "report":
            return ["report", str(self.good.parent)], str(self.good.parent)
        if command == "config":
            return ["config", *sets], named
        if command == "bids":
            ds = work / "bids"
            argv = ["bids", str(ds), str(out), "participant", "--quiet"]
            if kind == "missing_dataset":
                return [*argv, "--model", str(self.bundle)], str(ds)
            ds.mkdir()
            (ds / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.10.0"}')
            t1w = ds / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
            t1w.parent.mkdir(parents=True)
            if kind == "wrong_model":
                shutil.copy(self.good.parent / "images" / "sub01.nii.gz", t1w)
                return [*argv, "--model", str(self.run)], str(self.run)
            shutil.copy(named, t1w)  # the defective scan, as a BIDS T1w
            return [*argv, "--model", str(self.bundle)], str(t1w)
        raise AssertionError(command)


def fork_cli(jobs: list[dict], root: Path) -> list[int]:
    """Run ``lowlabel`` once per job (``argv``, ``cwd``, ``env``, ``stdout``, ``stderr`` paths),
    each in a process forked from :data:`FORK_SERVER`; returns the exit statuses."""
    spec, out = root / "cases.json", root / "rcs.json"
    spec.write_text(
        json.dumps([{k: j[k] for k in ("argv", "cwd", "env", "stdout", "stderr")} for j in jobs])
    )
    subprocess.run(
        [sys.executable, str(FORK_SERVER), str(spec), str(out)],
        check=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(out.read_text())


def write_study(path: Path, dataset: Path | None = None, **changes) -> Path:
    """A small study: 2 x 2 grid of depth and budget, plus a one-axis table, two seeds."""
    study = {
        "name": "tiny",
        "base": {
            "data.patch_size": [16, 16, 16],
            "model.channels": 4,
            "train.steps": 2,
            "train.val_every": 1,
            "data.n_test": 2,
            "data.n_val": 1,
            "train.threads": 1,
            **({"data.dataset": str(dataset)} if dataset else {}),
        },
        "seeds": [0, 1],
        "axes": {
            "depth": {
                "3-level": {"model.levels": 3},
                "2x": {"model.levels": 3, "model.num_res_units": 1},
            },
            "data": {"full": {"data.budget": 0}, "low": {"data.budget": 2}},
        },
        "tables": {
            "grid": {"axes": ["depth", "data"]},
            "again": {"axes": ["data"], "set": {"model.levels": 3}},
        },
        "comparisons": [
            {
                "name": "full vs low",
                "table": "grid",
                "a": {"depth": "3-level", "data": "full"},
                "b": {"depth": "3-level", "data": "low"},
            }
        ],
    }
    if "tables" in changes:
        study["comparisons"] = []  # they name the default tables
    for key, value in changes.items():
        study[key] = value
    path.write_text(yaml.safe_dump(study))
    return path


# --- training runs compared ---------------------------------------------------------------

TIMING = {"seconds", "data_share", "steps_per_s"}  # wall-clock columns, free to differ


def metric_rows(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock columns."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def assert_same_run(a: Path, b: Path) -> None:
    assert metric_rows(a) == metric_rows(b)
    assert_same_weights(a / "best.safetensors", b / "best.safetensors")
    assert_same_weights(a / "last.safetensors", b / "last.safetensors")
    assert json.loads((a / "evaluation.json").read_text()) == json.loads(
        (b / "evaluation.json").read_text()
    )


def crash_in_validation(cfg: RunConfig, monkeypatch, after: int = 1) -> None:
    """Run ``fit(cfg)`` until it crashes in the validation after the first ``after`` (by default
    its second: the first one logged and checkpointed, however many networks each validation
    scores)."""
    real = objectives.validate
    metrics = run_dir(cfg) / "metrics.jsonl"

    def crash_on_second(model, items, c):
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after:
            raise RuntimeError("simulated crash")
        return real(model, items, c)

    monkeypatch.setattr(objectives, "validate", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(cfg, progress=False)
    monkeypatch.setattr(objectives, "validate", real)


def cli(args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run the ``lowlabel`` entry point in-process; returns (exit status, stdout, stderr).

    ``COLUMNS`` is fixed so that help text wraps the same on every terminal.
    """
    from lowlabel.cli import main

    monkeypatch.setattr(sys, "argv", ["lowlabel", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "100")
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err
