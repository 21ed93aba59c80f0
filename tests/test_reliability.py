"""Nothing lost, nothing run: SIGKILL and resume, atomic writes, safe loading, full disks.

The kill tests run the real ``lowlabel train`` / ``lowlabel pretrain`` commands in their own
processes, kill them with SIGKILL at a random step, resume them with ``--resume`` and compare
the outcome, to the bit, with an uninterrupted run of the same config.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import make_tiny_dataset, tiny_overrides
from helpers import COMMANDS, World, fork_cli
from safetensors.torch import load_file

from lowlabel import atomic, checkpoint, cli
from lowlabel.config import load_config, run_dir
from lowlabel.engine import loop
from lowlabel.errors import LowlabelError
from lowlabel.run_folder import truncate_metrics

TIMING = {"seconds", "data_share", "steps_per_s"}  # wall-clock columns, free to differ
STEPS = 12
TRAIN = {
    "train.steps": STEPS,
    "train.val_every": 3,
    "train.checkpoint_every": 1,
    "train.patience": 0,
    "model.dropout": 0.1,
}
PRETRAIN = {
    "pretrain.steps": STEPS,
    "pretrain.save_steps": [6],
    "train.val_every": 3,
    "train.checkpoint_every": 1,
}


TINY_ARGS = [
    "--set",
    "data.n_test=1",
    "--set",
    "data.n_val=1",
    "--set",
    "train.steps=2",
    "--set",
    "data.patch_size=[16,16,16]",
    "--set",
    "model.levels=3",
    "--set",
    "model.channels=4",
    "--set",
    "pretrain.steps=2",
    "--set",
    "train.threads=1",
]


def rows(path: Path) -> list[dict]:
    out = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in out]


def same_tensors(a: Path, b: Path) -> list[str]:
    """Names of tensors that differ (or exist in one file only)."""
    ta, tb = load_file(str(a)), load_file(str(b))
    return sorted(set(ta) ^ set(tb)) + [k for k in ta if k in tb and not torch.equal(ta[k], tb[k])]


def as_set_args(overrides: dict) -> list[str]:
    return [arg for k, v in overrides.items() for arg in ("--set", f"{k}={json.dumps(v)}")]


# --- SIGKILL at a random step, then --resume ---------------------------------------------------


def _kill_and_resume(command: str, overrides: dict, log: Path) -> dict:
    """Start ``lowlabel <command>``, SIGKILL it once ``last.safetensors`` has reached a random
    step (plus a random fraction of a step), then finish it with ``--resume``."""
    cfg = load_config(None, overrides)
    folder = run_dir(cfg, command)
    argv = [sys.executable, "-m", "lowlabel.cli", command, "--quiet", *as_set_args(overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    target = random.SystemRandom().randint(1, STEPS - 4)
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=fh, env=env)
        step, deadline = 0, time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                step = checkpoint.read_meta(folder / "last.safetensors")["state"]["step"]
            except (LowlabelError, KeyError):
                step = 0
            if step >= target:
                time.sleep(random.uniform(0.0, 0.03))
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        rc = proc.wait(timeout=60)
    killed = {
        "rc": rc,
        "target": target,
        "seen_step": step,
        "finished_before_resume": (folder / "result.json").exists(),
        "last_step": checkpoint.read_meta(folder / "last.safetensors")["state"]["step"],
    }
    # a kill in the middle of a checkpoint write leaves its temporary file: make sure of one
    (folder / ".last.killed.tmp.safetensors").write_bytes(b"\0" * 64)
    with open(log, "a") as fh:
        resumed = subprocess.run([*argv, "--resume"], stdout=fh, stderr=fh, env=env, timeout=300)
    return {
        "folder": folder,
        "killed": killed,
        "resume_rc": resumed.returncode,
        "log": log.read_text(),
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), n=5, shape=(24, 24, 24))


@pytest.fixture(scope="module")
def killed_runs(dataset, tmp_path_factory) -> dict:
    """Both kill-and-resume runs, side by side (each process spends seconds on imports)."""
    root = tmp_path_factory.mktemp("killed")
    jobs = {"train": {**tiny_overrides(dataset, root / "train"), **TRAIN}}
    if "pretrain" in COMMANDS:
        jobs["pretrain"] = {**tiny_overrides(dataset, root / "pretrain"), **PRETRAIN}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {
            name: pool.submit(_kill_and_resume, name, o, root / f"{name}.log")
            for name, o in jobs.items()
        }
        return {name: f.result() for name, f in futures.items()}


def _check_killed(run: dict) -> None:
    k = run["killed"]
    context = f"{k}\n{run['log'][-3000:]}"
    assert k["rc"] == -signal.SIGKILL, context
    assert not k["finished_before_resume"], "the run finished before it could be killed" + context
    assert 1 <= k["last_step"] < STEPS, context
    assert run["resume_rc"] == 0, context


def test_train_killed_at_a_random_step_resumes_to_identical_weights(killed_runs, dataset, tmp_path):
    run = killed_runs["train"]
    _check_killed(run)
    ref_cfg = load_config(None, {**tiny_overrides(dataset, tmp_path), **TRAIN})
    ref = Path(loop.fit(ref_cfg, progress=False).run_dir)
    out = run["folder"]
    context = str(run["killed"])
    assert rows(out / "metrics.jsonl") == rows(ref / "metrics.jsonl"), context
    assert same_tensors(out / "best.safetensors", ref / "best.safetensors") == [], context
    assert same_tensors(out / "last.safetensors", ref / "last.safetensors") == [], context
    assert json.loads((out / "evaluation.json").read_text()) == json.loads(
        (ref / "evaluation.json").read_text()
    )
    result, expected = (json.loads((d / "result.json").read_text()) for d in (out, ref))
    for key in ("steps", "best_step", "best_val_dice", "stopped_early", "n_labelled", "test"):
        assert result[key] == expected[key], key
    assert not list(out.glob(".*tmp*")), "a temporary file was left behind"


def test_pretrain_killed_at_a_random_step_resumes_to_identical_weights(
    killed_runs, dataset, tmp_path
):
    if "pretrain" not in killed_runs:
        pytest.skip("no 'lowlabel pretrain' command yet")
    from lowlabel.engine.pretrain import pretrain

    run = killed_runs["pretrain"]
    _check_killed(run)
    ref = Path(
        pretrain(
            load_config(None, {**tiny_overrides(dataset, tmp_path), **PRETRAIN}), progress=False
        ).run_dir
    )
    out = run["folder"]
    context = str(run["killed"])
    assert rows(out / "metrics.jsonl") == rows(ref / "metrics.jsonl"), context
    for name in ("checkpoint-6.safetensors", f"checkpoint-{STEPS}.safetensors", "last.safetensors"):
        assert same_tensors(out / name, ref / name) == [], (name, context)
    result, expected = (json.loads((d / "result.json").read_text()) for d in (out, ref))
    for key in ("steps", "train_loss", "val_mse", "val_mae"):
        assert result[key] == expected[key], key
    assert not list(out.glob(".*tmp*")), "a temporary file was left behind"


def test_segmentation_is_deterministic(world, tmp_path):
    if world.bundle is None:
        pytest.skip("no 'lowlabel segment' command yet")
    from lowlabel.segment import segment

    scans = [world.good.parent / "images" / f"sub0{i}.nii.gz" for i in (1, 2)]
    a = segment(world.bundle, scans, tmp_path / "a", probabilities=True, progress=False, threads=1)
    b = segment(world.bundle, scans, tmp_path / "b", probabilities=True, progress=False, threads=1)
    assert a.errors == b.errors == [] and a.rows == b.rows
    # every file, the QC snapshots and records in qc/ included
    names = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*"))
    assert names == sorted(str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*"))
    assert len(names) >= 3 and "qc.html" in names
    for name in names:
        if (tmp_path / "a" / name).is_dir():
            continue
        if name.endswith(".nii.gz"):  # compare voxels: gzip headers carry a time stamp
            va, vb = (nib.load(str(tmp_path / d / name)) for d in ("a", "b"))
            assert (va.get_fdata() == vb.get_fdata()).all() and (va.affine == vb.affine).all()
        elif name == "qc.html":  # its title names the output folder
            pa, pb = ((tmp_path / d / name).read_text() for d in ("a", "b"))
            assert pa.replace("QC: a<", "QC: b<") == pb
        else:
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# --- atomic writes -------------------------------------------------------------------------------


def test_atomic_write_keeps_the_old_file_until_the_new_one_is_complete(tmp_path):
    path = tmp_path / "result.json"
    atomic.write_json(path, {"v": 1})
    with atomic.atomic_path(path) as tmp:
        tmp.write_text('{"v": 2, "half')
        assert tmp.parent == path.parent  # same file system: the rename is atomic
        assert json.loads(path.read_text()) == {"v": 1}  # a reader still sees the whole old file
        tmp.write_text('{"v": 2}')
    assert json.loads(path.read_text()) == {"v": 2}
    with pytest.raises(RuntimeError), atomic.atomic_path(path) as tmp:
        tmp.write_text('{"v": 3, "ha')
        raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    atomic.append_line(path, json.dumps({"step": 2, "val_dice": 0.1}))
    atomic.append_line(path, json.dumps({"step": 4, "val_dice": 0.2}))
    with open(path, "a") as fh:
        fh.write('{"step": 6, "val_di')  # the process died mid-line
    assert [r["step"] for r in atomic.read_jsonl(path)] == [2, 4]
    truncate_metrics(path, upto=3)  # what a resume from the step-3 checkpoint keeps
    assert [r["step"] for r in atomic.read_jsonl(path)] == [2]
    assert path.read_text().endswith("\n")


# --- full disk and unwritable folders ------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_run(dataset, tmp_path_factory):
    """A 6-step run: its overrides, config and folder."""
    overrides = {
        **tiny_overrides(dataset, tmp_path_factory.mktemp("ref")),
        **TRAIN,
        "train.steps": 6,
    }
    cfg = load_config(None, overrides)
    return overrides, cfg, Path(loop.fit(cfg, progress=False).run_dir)


def _fail_on_call(n: int, err: OSError, real):
    """Wrap ``real`` so that its ``n``-th call writes half a file, then fails with ``err``."""
    calls = []

    def wrapper(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == n:
            Path(filename).write_bytes(b"\0" * 100)
            raise err
        return real(tensors, filename, metadata=metadata)

    return wrapper


@pytest.mark.parametrize(
    ("err", "message"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk full"),
        (OSError(errno.EROFS, "Read-only file system"), "not writable"),
    ],
    ids=["disk-full", "read-only"],
)
def test_write_failure_mid_run_is_one_line_and_keeps_the_last_checkpoint(
    reference_run, tmp_path, monkeypatch, capsys, err, message
):
    overrides, cfg, ref = reference_run
    overrides = {**overrides, "out": str(tmp_path)}
    cfg = cfg.replace(out=str(tmp_path))
    from safetensors.torch import save_file

    # saves: last@1, last@2, best@3, last@3, last@4: the 5th fails, last@3 must survive
    monkeypatch.setattr(checkpoint, "save_file", _fail_on_call(5, err, save_file))
    monkeypatch.setattr(sys, "argv", ["lowlabel", "train", "--quiet", *as_set_args(overrides)])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    folder = run_dir(cfg)
    assert str(folder) in lines[0]
    # the last good checkpoint survives, whole, and no temporary file is left
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    tensors, meta = checkpoint.load(folder / "last.safetensors")
    assert meta["state"]["step"] == 3
    assert not (folder / "result.json").exists()
    # space freed: --resume finishes the run exactly as if nothing had happened
    monkeypatch.setattr(checkpoint, "save_file", save_file)
    loop.fit(cfg, resume=True, progress=False)
    assert rows(folder / "metrics.jsonl") == rows(ref / "metrics.jsonl")
    assert same_tensors(folder / "best.safetensors", ref / "best.safetensors") == []
    assert same_tensors(folder / "last.safetensors", ref / "last.safetensors") == []


def test_disk_full_while_appending_metrics_is_one_line(reference_run, tmp_path, monkeypatch):
    _, cfg, ref = reference_run
    cfg = cfg.replace(out=str(tmp_path))
    real = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(LowlabelError, match="metrics.jsonl: disk full"):
        loop.fit(cfg, progress=False)
    monkeypatch.setattr(atomic.os, "fsync", real)
    loop.fit(cfg, resume=True, progress=False)
    assert rows(run_dir(cfg) / "metrics.jsonl") == rows(ref / "metrics.jsonl")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("world"))


def _one_line_error(r: dict, *names: str) -> None:
    context = f"{r}"
    assert r["rc"] == 2, context
    lines = r["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), context
    assert "Traceback" not in r["stderr"]
    for name in names:
        assert name in lines[0], context


def _unwritable_cases(world: World, root: Path) -> dict[str, list[str]]:
    """Tests run as root, so permissions cannot stop a write: each output path goes through a
    regular file instead, which no user can create a folder under."""
    blocker = root / "not-a-folder"
    blocker.write_text("a file")
    scan = world.good.parent / "images" / "sub01.nii.gz"
    cases = {
        "train": ["train", "--data", str(world.good), "--out", str(blocker / "runs"), *TINY_ARGS],
        "export": ["export", str(world.run), "--out", str(blocker / "bundle")],
    }
    if world.bundle is not None:
        cases["segment"] = [
            "segment",
            str(world.bundle),
            str(scan),
            "--out",
            str(blocker / "seg"),
            "--quiet",
        ]
    if "pretrain" in COMMANDS:
        cases["pretrain"] = [
            "pretrain",
            "--data",
            str(world.good),
            "--out",
            str(blocker / "runs"),
            "--quiet",
            *TINY_ARGS,
        ]
    return cases


def test_an_output_folder_that_cannot_be_written_is_one_line(forked):
    blocker = forked["root"] / "unwritable" / "not-a-folder"
    assert set(forked["unwritable"]) >= {"train", "export"}
    for r in forked["unwritable"].values():
        _one_line_error(r, str(blocker))
    assert blocker.read_text() == "a file"


# --- safe loading --------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious(marker: Path, fmt: str) -> bytes:
    obj = {"state_dict": {"w": [1.0, 2.0]}, "x": Payload(marker)}
    if fmt == "torch":
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()
    if fmt == "fake-header":  # passes a naive header check: 8-byte length, then '{'
        header = b'{"__metadata__":{}}'
        return struct.pack("<Q", len(header)) + header + pickle.dumps(obj, protocol=2)
    return pickle.dumps(obj, protocol=int(fmt))


FORMATS = ["0", "2", "4", "5", "torch", "fake-header"]


def test_the_payload_is_live(tmp_path):
    """Control: unpickling the planted file really does run code."""
    marker = tmp_path / "pwned"
    pickle.loads(malicious(marker, "4"))
    assert marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_loading_refuses_pickles(tmp_path, fmt):
    marker = tmp_path / "pwned"
    path = tmp_path / "best.safetensors"
    path.write_bytes(malicious(marker, fmt))
    for load in (checkpoint.load, checkpoint.read_meta):
        with pytest.raises(LowlabelError, match="best.safetensors"):
            load(path)
    assert not marker.exists()


def test_a_checkpoint_whose_header_length_spells_pk_loads(tmp_path):
    """A safetensors header of 0x4B50 bytes starts the file with 'PK' (a zip's signature); such
    a checkpoint (a 6-level UNet's config can make one) is valid and must load."""
    from safetensors.torch import save_file

    path = tmp_path / "checkpoint-1.safetensors"
    for pad in range(19000, 19400):
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        if path.read_bytes()[:2] == b"PK":
            break
    assert path.read_bytes()[:2] == b"PK" and path.read_bytes()[8:9] == b"{"
    tensors, _ = checkpoint.load(path)
    assert tensors["w"].shape == (2,)


def _pickle_cases(world: World, root: Path) -> dict[str, list[str]]:
    """Plant a malicious pickle wherever a command expects a checkpoint."""
    import shutil

    marker = root / "pwned"
    scan = world.good.parent / "images" / "sub01.nii.gz"
    evil_run = root / "evil-run"
    shutil.copytree(world.run, evil_run)
    (evil_run / "result.json").unlink()  # unfinished: --resume loads last.safetensors
    (evil_run / "last.safetensors").write_bytes(malicious(marker, "2"))
    (evil_run / "best.safetensors").write_bytes(malicious(marker, "4"))
    evil_file = root / "pretrained.safetensors"
    evil_file.write_bytes(malicious(marker, "torch"))
    evil_pretrain = root / "evil-pretrain"
    evil_pretrain.mkdir()
    (evil_pretrain / "checkpoint-5.safetensors").write_bytes(malicious(marker, "0"))
    # --resume of the same config elsewhere finds a copy of the run folder with the planted file
    cfg = load_config(evil_run / "config.yaml")
    shutil.copytree(evil_run, run_dir(cfg.replace(out=str(root / "resumed"))))
    train = ["train", "--quiet", "--data", str(world.good), "--out", str(root / "runs"), *TINY_ARGS]
    cases = {
        "train --resume": [
            "train",
            "--quiet",
            "--config",
            str(evil_run / "config.yaml"),
            "--set",
            f"out={root / 'resumed'}",
            "--resume",
        ],
        "evaluate": ["evaluate", str(evil_run), "--quiet"],
        "export": ["export", str(evil_run), "--out", str(root / "bundle")],
        "train --init-from file": [*train, "--init-from", str(evil_file), "--set", "name=t1"],
        "train --init-from folder": [*train, "--init-from", str(evil_pretrain), "--set", "name=t2"],
    }
    if world.bundle is not None:
        evil_bundle = root / "evil-bundle"
        shutil.copytree(world.bundle, evil_bundle)
        (evil_bundle / "model.safetensors").write_bytes(malicious(marker, "5"))
        cases["segment"] = [
            "segment",
            str(evil_bundle),
            str(scan),
            "--out",
            str(root / "seg"),
            "--quiet",
        ]
    if "pretrain" in COMMANDS:
        args = ["--data", str(world.good), "--out", str(root / "pre"), *TINY_ARGS]
        pre_cfg = load_config(
            None, {"data.dataset": str(world.good), "out": str(root / "pre"), **cli_sets(TINY_ARGS)}
        )
        folder = run_dir(pre_cfg, "pretrain")
        folder.mkdir(parents=True)
        (folder / "last.safetensors").write_bytes(malicious(marker, "5"))
        cases["pretrain --resume"] = ["pretrain", "--quiet", *args, "--resume"]
    return cases


def cli_sets(args: list[str]) -> dict:
    from lowlabel.config import parse_set

    return parse_set([a for a in args if a != "--set"])


def test_planted_pickles_are_refused_by_every_command(forked):
    root = forked["root"] / "pickles"
    assert len(forked["pickles"]) >= 5
    for name, r in forked["pickles"].items():
        _one_line_error(r, "safetensors")
        assert "pickle" in r["stderr"] or "not a readable safetensors" in r["stderr"], name
    assert not (root / "pwned").exists()
    assert not (root / "bundle").exists() and not (root / "seg").exists()


@pytest.fixture(scope="module")
def forked(world, tmp_path_factory) -> dict:
    """The command-line cases of this file, run in one batch of forked processes."""
    root = tmp_path_factory.mktemp("forked")
    groups = {}
    for group, make in (("unwritable", _unwritable_cases), ("pickles", _pickle_cases)):
        (root / group).mkdir()
        groups[group] = make(world, root / group)
    jobs, keys = [], []
    for group, cases in groups.items():
        for name, argv in cases.items():
            tag = f"{group}-{name}".replace(" ", "_")
            jobs.append(
                {
                    "argv": argv,
                    "cwd": str(root / group),
                    "stdout": str(root / f"{tag}.out"),
                    "stderr": str(root / f"{tag}.err"),
                    "env": {"LOWLABEL_CACHE": str(root / "cache")},
                }
            )
            keys.append((group, name))
    rcs = fork_cli(jobs, root)
    out: dict = {"root": root, **{g: {} for g in groups}}
    for (group, name), rc, job in zip(keys, rcs, jobs, strict=True):
        out[group][name] = {
            "rc": rc,
            "argv": job["argv"],
            "stderr": Path(job["stderr"]).read_text(),
            "stdout": Path(job["stdout"]).read_text(),
        }
    return out


def test_no_source_file_can_unpickle():
    """No code path calls an unpickling loader (torch.load, pickle, np.load with pickles)."""
    src = Path(cli.__file__).parent
    banned = (
        "torch.load(",
        "pickle.load",
        "import pickle",
        "allow_pickle=True",
        "yaml.load(",
        "yaml.unsafe_load",
        "torch.jit.load",
        "joblib",
    )
    hits = [(p.name, b) for p in src.rglob("*.py") for b in banned if b in p.read_text()]
    assert hits == []


MODES_SCRIPT = r"""
import json, os, sys
os.umask(0o022)  # before lowlabel reads it
from lowlabel.bundle import export
from lowlabel.config import load_config
from lowlabel.engine.loop import fit
from lowlabel.engine.pretrain import pretrain

root = sys.argv[1]
values = json.loads(sys.argv[2])
run = fit(load_config(None, values), progress=False).run_dir
pre = pretrain(
    load_config(None, {**values, "pretrain.steps": 2, "pretrain.save_steps": [1]}), progress=False
).run_dir
export(run, os.path.join(root, "bundle"))
print(json.dumps([str(run), str(pre)]))
"""


def test_results_get_the_umask_mode_not_0600(tmp_path):
    """Under umask 022 every result file is 0644, including what safetensors writes (it makes
    fresh files private), so a model shared with a lab group is readable by it."""
    dataset = make_tiny_dataset(tmp_path / "data", n=5, shape=(24, 24, 24))
    values = tiny_overrides(dataset, tmp_path / "runs", **{"data.n_test": 1, "data.n_val": 1})
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    done = subprocess.run(
        [sys.executable, "-c", MODES_SCRIPT, str(tmp_path), json.dumps(values)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    run, pre = map(Path, json.loads(done.stdout.strip().splitlines()[-1]))
    files = [p for folder in (run, pre, tmp_path / "bundle") for p in folder.rglob("*")]
    files = [p for p in files if p.is_file()]
    names = {p.name for p in files}
    assert {"best.safetensors", "last.safetensors", "model.safetensors"} <= names
    assert any(n.startswith("checkpoint-") and n.endswith(".safetensors") for n in names), names
    wrong = {
        str(p): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != 0o644
    }
    assert wrong == {}
    assert (tmp_path / "bundle").stat().st_mode & 0o777 == 0o755
