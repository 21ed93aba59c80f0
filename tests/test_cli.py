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
from helpers import cli

ROOT = Path(__file__).resolve().parents[1]


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
    for args in ([], ["data"]):
        code, out, err = cli([*args, "--help"], monkeypatch, capsys)
        commands = out.split("Commands:\n", 1)[1]
        assert code == 0 and "..." not in commands  # each command's line is whole


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


def _interrupt(
    cmd: list[str], started, timeout: float = 240, sig: int = signal.SIGINT, group: bool = True
) -> subprocess.CompletedProcess:
    """Start ``lowlabel cmd`` in its own process group, wait until ``started()``, then send
    ``sig`` to the whole group, as a terminal's Ctrl-C does (or, ``group=False``, to the command's
    own process only, as ``kill PID`` does)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lowlabel.cli", *cmd],
        env=env,
        start_new_session=True,
        # a terminal's foreground command starts with Ctrl-C at its default, whatever the shell
        # that runs these tests ignores (a job started with `&` or nohup ignores SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
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
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
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


@pytest.mark.parametrize(
    "sig, group",
    [(signal.SIGINT, True), (signal.SIGTERM, False)],
    ids=["ctrl-c to the group", "sigterm to the study alone"],
)
def test_ctrl_c_or_sigterm_stops_a_study_with_exit_130_and_no_worker_traceback(
    tmp_path, sig, group
):
    """Ctrl-C reaches the whole process group; ``kill PID`` (SIGTERM) reaches the study process
    alone, and used to leave its two workers running without a parent (the study never exited).
    Both now stop the workers, each run resumable."""
    from helpers import write_study

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
    done = _interrupt(cmd, lambda: _logged(study_dir), sig=sig, group=group)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "leaked" not in done.stderr  # the worker pool was shut down, not abandoned
    assert done.stderr.strip().splitlines() == [
        "interrupted; rerun the same study command to continue"
    ]


# --- smaller items ----------------------------------------------------------------------------


def test_config_list_explains_every_key_that_set_accepts(monkeypatch, capsys):
    import yaml

    from lowlabel.config import RunConfig, load_config, to_dict

    def leaves(data: dict, prefix: str = "") -> set[str]:
        out = set()
        for key, value in data.items():
            if isinstance(value, dict) and key != "label_map":
                out |= leaves(value, f"{prefix}{key}.")
            else:
                out.add(prefix + key)
        return out

    code, out, err = cli(["config", "--list"], monkeypatch, capsys)
    assert code == 0, err
    heads = [line for line in out.splitlines() if not line.startswith(" ")]
    listed = [line.split(" (")[0] for line in heads]
    assert set(listed) == leaves(to_dict(RunConfig())) and len(listed) == len(set(listed))
    meanings = [line for line in out.splitlines() if line.startswith("    ")]
    assert len(meanings) >= len(listed)  # every key has at least one line of meaning
    assert "data.budget (int; default 3)" in heads
    assert "model.name ('unet' or 'dynunet'; default \"unet\")" in heads
    # what --list names, --set takes
    assert load_config(None, {"train.min_delta": 0.01}).train.min_delta == 0.01
    code, out, err = cli(["config", "--set", "train.steps=7"], monkeypatch, capsys)
    assert code == 0 and yaml.safe_load(out)["train"]["steps"] == 7


def test_a_missing_path_is_refused_before_torch_loads(tmp_path):
    """The error comes in a fraction of a second: torch and MONAI are not even imported."""
    script = (
        "import sys\n"
        "from lowlabel.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as stop:\n"
        "    print(stop.code, 'torch' in sys.modules, 'monai' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    missing = tmp_path / "datset.json"
    for argv in (
        ["train", "--data", str(missing)],
        ["pretrain", "--data", str(missing)],
        ["study", "seed", "--data", str(missing)],
        ["evaluate", str(tmp_path / "no-run")],
        ["export", str(tmp_path / "no-run"), "-o", str(tmp_path / "m")],
        ["segment", str(tmp_path / "no-model"), str(missing), "-o", str(tmp_path / "s")],
    ):
        done = subprocess.run(
            [sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env
        )
        assert done.stdout.split() == ["2", "False", "False"], (argv, done.stdout, done.stderr)
        named = next(a for a in argv if a.startswith(str(tmp_path)))
        assert done.stderr.startswith(f"error: {named}: ")
        assert done.stderr.count("\n") == 1 and "not found" in done.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "s").exists()


def test_train_without_data_says_it_uses_the_demo_cohort(tmp_path, monkeypatch, capsys):
    from lowlabel.engine import loop
    from lowlabel.errors import LowlabelError

    def stop(cfg, **kwargs):
        raise LowlabelError("stopped before training")

    monkeypatch.setattr(loop, "fit", stop)
    code, out, err = cli(["train", "--out", tmp_path], monkeypatch, capsys)
    assert code == 2
    first, last = err.splitlines()
    assert "synthetic demo cohort" in first and "no --data" in first
    assert last == "error: stopped before training"
    data = make_tiny_dataset(tmp_path / "data", n=4, shape=(16, 16, 16))
    code, out, err = cli(["train", "--data", data, "--out", tmp_path], monkeypatch, capsys)
    assert code == 2 and "demo" not in err


def test_evaluate_prints_a_table_with_units_and_json_on_request(tiny_config, monkeypatch, capsys):
    import json

    from lowlabel.engine.loop import fit

    run = fit(tiny_config, progress=False).run_dir
    code, out, err = cli(["evaluate", run, "--quiet"], monkeypatch, capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "2 subject(s), mean ± SD"
    assert lines[1].split() == ["tissue", "Dice", "HD95", "(mm)", "volume", "error", "(mL)"]
    assert [line.split()[0] for line in lines[2:]] == ["CSF", "GM", "WM", "mean"]
    code, out, err = cli(["evaluate", run, "--quiet", "--json"], monkeypatch, capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["n"] == 2 and 0 <= summary["mean_dice"] <= 1 and "dice_gm_sd" in summary
    assert f"{summary['dice_gm']:.3f}" in lines[3]
