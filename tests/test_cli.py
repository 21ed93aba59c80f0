"""The command line as a new user meets it: usage errors, Ctrl-C, help, ``config --list``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


def cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run the ``lowlabel`` entry point in-process; returns (exit status, stdout, stderr)."""
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


USAGE_ERRORS = {
    "unknown command": (["trian"], "No such command 'trian'. Did you mean 'train'"),
    "unknown option": (["train", "--bogus"], "No such option: --bogus"),
    "set with a space": (["train", "--set", "train.steps", "300"], "--set train.steps=300"),
    "missing option": (["segment", "my-model", "seg"], "'--out'"),
    "bad integer": (["study", "seed", "--jobs", "two"], "Invalid value for '--jobs'"),
    "unknown subcommand": (["data", "chek", "x"], "No such command 'chek'. Did you mean 'check'"),
}


@pytest.mark.parametrize("case", USAGE_ERRORS, ids=list(USAGE_ERRORS))
def test_a_usage_error_is_one_line_and_exit_2(case, monkeypatch, capsys):
    argv, expected = USAGE_ERRORS[case]
    code, out, err = cli(argv, monkeypatch, capsys)
    assert code == 2, (out, err)
    assert "Traceback" not in err and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]
    assert "--help" in lines[0]  # where to look next


def test_no_arguments_prints_the_help_and_exits_2(monkeypatch, capsys):
    """Click's convention: a command run with nothing to do shows its help, as a usage error."""
    code, out, err = cli([], monkeypatch, capsys)
    assert code == 2
    assert "Traceback" not in err
    assert "Usage: lowlabel" in err and "train" in err and "segment" in err
    code, out, err = cli(["data"], monkeypatch, capsys)
    assert code == 2 and "Usage: lowlabel data" in err and "check" in err


def test_help_is_exit_0_and_plain(monkeypatch, capsys):
    code, out, err = cli(["train", "--help"], monkeypatch, capsys)
    assert code == 0 and err == ""
    assert "--resume" in out and "<bool>" not in out


def test_a_plain_process_gives_one_line_too():
    """The installed entry point as a shell runs it, not only ``main()`` in-process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run(
        [sys.executable, "-m", "lowlabel.cli", "trian"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Did you mean 'train'" in done.stderr


# --- Ctrl-C ---------------------------------------------------------------------------------


def _interrupt(cmd: list[str], started, timeout: float = 240) -> subprocess.CompletedProcess:
    """Start ``lowlabel cmd`` in its own process group, wait until ``started()``, then send
    SIGINT to the whole group, as a terminal's Ctrl-C does."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowlabel.cli", *cmd],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while not started() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        assert started(), "the command never got going"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # nothing of the command is left running (the study's workers included)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("processes of the interrupted command outlived it")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


TINY = [
    "--set",
    "data.n_test=1",
    "--set",
    "data.n_val=1",
    "--set",
    "data.budget=2",
    "--set",
    "data.patch_size=[16,16,16]",
    "--set",
    "model.levels=3",
    "--set",
    "model.channels=4",
    "--set",
    "train.threads=1",
    "--set",
    "train.batch_size=1",
]


def _logged(folder: Path) -> bool:
    return any(p.stat().st_size > 0 for p in folder.glob("**/metrics.jsonl"))


def test_ctrl_c_stops_train_with_exit_130_and_says_how_to_resume(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", n=4, shape=(24, 24, 24))
    runs = tmp_path / "runs"
    cmd = ["train", "--data", str(data), "--out", str(runs), "--quiet", *TINY]
    cmd += ["--set", "train.steps=100000", "--set", "train.val_every=1"]
    done = _interrupt(cmd, lambda: _logged(runs))
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted; rerun with --resume to continue"
    assert done.stdout == ""


def test_ctrl_c_stops_a_study_with_exit_130_and_no_worker_traceback(tmp_path):
    from test_study import write_study

    data = make_tiny_dataset(tmp_path / "data", n=4, shape=(24, 24, 24))
    base = {
        "data.dataset": str(data),
        "data.patch_size": [16, 16, 16],
        "data.n_test": 1,
        "data.n_val": 1,
        "model.channels": 4,
        "train.steps": 100000,
        "train.val_every": 1,
        "train.threads": 1,
    }
    path = write_study(tmp_path / "tiny.yaml", data, base=base)
    study_dir = tmp_path / "study"
    cmd = ["study", str(path), "--out", str(study_dir), "--jobs", "2", "--quiet"]
    done = _interrupt(cmd, lambda: _logged(study_dir))
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "leaked" not in done.stderr  # the worker pool was shut down, not abandoned
    assert done.stderr.strip().splitlines() == [
        "interrupted; rerun the same study command to continue"
    ]
