"""One bad-input matrix: every CLI subcommand against every kind of bad input that applies.

Each case runs the real entry point, ``lowlabel.cli.main``, in a process of its own and must end
with exit status 2, exactly one line on stderr that starts with ``error:`` and names the
offending file or key, no traceback, and nothing new on disk except what the command may keep (a
run folder's ``config.yaml``/``splits.json``/``pool.json`` and the saved split file, which a rerun
reuses).

Importing torch and MONAI costs seconds per process, so the cases are forked, two at a time, from
one process that has imported them (:data:`FORK_SERVER`); a few cases also run as plain
``python -m lowlabel.cli`` processes and must give the very same result.
"""

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
from conftest import make_tiny_dataset, phantom, tiny_overrides, write

from lowlabel.cli import app

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
# files a training or pretraining command may leave when the data turn out bad: they describe the
# run and are complete (written atomically), and a rerun reuses them
MAY_KEEP = {"config.yaml", "splits.json", "pool.json"}

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


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _cases() -> list[tuple[str, str]]:
    cases = [("data check", k) for k in FILE_DEFECTS + ["bad_key", "bad_type"]]
    cases += [
        ("train", k)
        for k in FILE_DEFECTS
        + ["bad_test_scan", "too_small", "bad_key", "bad_type", "impossible_budget", "wrong_model"]
    ]
    cases += [
        ("evaluate", k)
        for k in FILE_DEFECTS
        + ["wrong_model", "damaged_checkpoint", "damaged_splits", "damaged_config"]
    ]
    cases += [
        ("pretrain", k)
        for k in IMAGE_DEFECTS + ["too_small", "bad_key", "bad_type", "impossible_budget"]
    ]
    cases += [("segment", k) for k in IMAGE_DEFECTS[1:] + ["too_small", "wrong_model"]]
    cases += [("export", k) for k in ("wrong_model", "damaged_checkpoint", "damaged_config")]
    cases += [("study", k) for k in ("missing", "bad_key", "bad_type", "impossible_budget")]
    cases += [("report", "wrong_model"), ("data demo", "impossible_budget")]
    cases += [
        ("bids", k) for k in ("missing_dataset", "corrupt", "truncated", "nan", "wrong_model")
    ]
    return [c for c in cases if c[0].split()[0] in COMMANDS]


CASES = _cases()


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


FORK_SERVER = r"""
import importlib, json, os, sys, traceback

cases, results = sys.argv[1], sys.argv[2]
import lowlabel.cli as cli

# what the commands import lazily, imported once here so each forked case pays only for its work
for name in ("torch", "monai.transforms", "lowlabel.engine.loop", "lowlabel.engine.runs",
             "lowlabel.engine.evaluate", "lowlabel.engine.pretrain", "lowlabel.bundle",
             "lowlabel.segment", "lowlabel.study.runner", "lowlabel.study.report"):
    try:
        importlib.import_module(name)
    except ImportError:
        pass


def child(case):
    os.chdir(case["cwd"])
    os.environ.update(case["env"])
    for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = ["lowlabel", *case["argv"]]
    code = 0
    try:
        cli.main()
    except SystemExit as stop:  # what the interpreter would do with it
        code = stop.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
        code = 0 if code is None else code
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


todo = list(enumerate(json.load(open(cases))))
running, done = {}, {}
while todo or running:
    while todo and len(running) < 2:
        i, case = todo.pop(0)
        pid = os.fork()
        if pid == 0:
            child(case)
        running[pid] = i
    pid, status = os.wait()
    done[running.pop(pid)] = os.waitstatus_to_exitcode(status)
json.dump([done[i] for i in range(len(done))], open(results, "w"))
"""


def _env(work: Path) -> dict:
    return {"LOWLABEL_CACHE": str(work / "cache"), "OMP_NUM_THREADS": "1"}


def _prepare(world: World, case: tuple[str, str], real: bool = False) -> dict:
    command, kind = case
    name = f"{command.replace(' ', '-')}-{kind}" + ("-real" if real else "")
    work = world.root / "cases" / name
    work.mkdir(parents=True)
    argv, named = world.argv(command, kind, work)
    return {
        "argv": argv,
        "named": named,
        "cwd": str(work),
        "env": _env(work),
        "stdout": str(world.root / "logs" / f"{name}.out"),
        "stderr": str(world.root / "logs" / f"{name}.err"),
        "inputs": _snapshot(work),
    }


def _outcome(job: dict, rc: int) -> dict:
    work = Path(job["cwd"])
    after = _snapshot(work)
    inputs = job["inputs"]
    return {
        "argv": job["argv"],
        "named": job["named"],
        "rc": rc,
        "stdout": Path(job["stdout"]).read_text(),
        "stderr": Path(job["stderr"]).read_text(),
        "new": sorted(p for p in after if p not in inputs and not p.startswith("cache/")),
        "changed": sorted(p for p in inputs if p in after and after[p] != inputs[p]),
    }


def fork_cli(jobs: list[dict], root: Path) -> list[int]:
    """Run ``lowlabel`` once per job (``argv``, ``cwd``, ``env``, ``stdout``, ``stderr`` paths),
    each in a process forked from :data:`FORK_SERVER`; returns the exit statuses."""
    spec, out, server = (root / n for n in ("cases.json", "rcs.json", "server.py"))
    spec.write_text(
        json.dumps([{k: j[k] for k in ("argv", "cwd", "env", "stdout", "stderr")} for j in jobs])
    )
    server.write_text(FORK_SERVER)
    subprocess.run(
        [sys.executable, str(server), str(spec), str(out)],
        check=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(out.read_text())


def _run_forked(world: World, cases: list[tuple[str, str]]) -> dict:
    (world.root / "logs").mkdir(exist_ok=True)
    jobs = [_prepare(world, case) for case in cases]
    rcs = fork_cli(jobs, world.root)
    return {case: _outcome(job, rc) for case, job, rc in zip(cases, jobs, rcs, strict=True)}


def _run_plain(world: World, case: tuple[str, str]) -> dict:
    """The same case as a plain ``python -m lowlabel.cli`` process."""
    job = _prepare(world, case, real=True)
    with open(job["stdout"], "w") as out, open(job["stderr"], "w") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "lowlabel.cli", *job["argv"]],
            stdout=out,
            stderr=err,
            env={**os.environ, **job["env"]},
            cwd=job["cwd"],
            timeout=300,
        )
    return _outcome(job, proc.returncode)


# a few cases also run as plain processes: the forked ones must match them
PLAIN = [
    c
    for c in [("data check", "corrupt"), ("train", "nan"), ("evaluate", "wrong_model")]
    if c in CASES
]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    world = World(tmp_path_factory.mktemp("matrix"))
    shared = {p: _snapshot(p) for p in (world.good.parent, world.run)}
    done = _run_forked(world, CASES)
    done["plain"] = {case: _run_plain(world, case) for case in PLAIN}
    done["shared_unchanged"] = all(_snapshot(p) == snap for p, snap in shared.items())
    done["root"] = str(world.root)
    return done


def test_matrix_covers_every_subcommand():
    assert {"train", "evaluate", "data"} <= COMMANDS
    covered = {c[0].split()[0] for c in CASES}
    assert covered == COMMANDS, COMMANDS - covered


def _check(r: dict) -> None:
    context = f"\n$ lowlabel {' '.join(r['argv'])}\nstdout: {r['stdout']}\nstderr: {r['stderr']}"
    assert "Traceback" not in r["stderr"], context
    assert r["rc"] == 2, context
    lines = r["stderr"].splitlines()
    assert len(lines) == 1, context
    assert lines[0].startswith("error: "), context
    assert r["named"] in lines[0], f"error does not name {r['named']}" + context
    # nothing new but what the command may keep; nothing half-written (no temporary files)
    leftovers = [
        p
        for p in r["new"]
        if Path(p).name not in MAY_KEEP
        and not (Path(p).parent.name == "splits" and p.endswith(".json"))
    ]
    assert leftovers == [], context
    assert not [p for p in r["new"] if ".tmp" in p], context
    assert r["changed"] == [], context


@pytest.mark.parametrize("case", CASES, ids=[f"{c}-{k}".replace(" ", "-") for c, k in CASES])
def test_bad_input_gives_one_line_exit_2_and_leaves_nothing(results, case):
    _check(results[case])


@pytest.mark.parametrize("case", PLAIN, ids=[f"{c}-{k}".replace(" ", "-") for c, k in PLAIN])
def test_a_plain_process_gives_the_same_result(results, case):
    plain, forked = results["plain"][case], results[case]
    _check(plain)
    assert plain["rc"] == forked["rc"]
    assert plain["stderr"].replace("-real/", "/") == forked["stderr"]


def test_the_bad_test_scan_is_in_the_test_set():
    """The ``bad_test_scan`` case proves a test scan is checked before training only while
    sub02 is the test subject of these settings."""
    from lowlabel.data.splits import make_splits

    assert make_splits([f"sub{i:02d}" for i in range(5)], 1, 1, 0)["test"] == ["sub02"]


def test_shared_inputs_are_never_modified(results):
    assert results["shared_unchanged"]


def test_the_error_line_is_one_short_sentence(results):
    """Readable, not a dump: no raw repr of a whole config or array."""
    for case in CASES:
        line = results[case]["stderr"].strip()
        assert len(line) < 500, (case, line)
