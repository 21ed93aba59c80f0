"""A study killed part-way (SIGKILL) and run again finishes only what is missing."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

from test_study import write_study


def _finished(study_dir) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in study_dir.glob("runs/*/result.json")}


def test_killed_study_reruns_only_missing_runs(tmp_path, tiny_dataset):
    base = {
        "data.patch_size": [16, 16, 16],
        "model.channels": 4,
        "train.steps": 40,
        "train.val_every": 10,
        "data.n_test": 2,
        "data.n_val": 1,
        "train.threads": 1,
        "data.dataset": str(tiny_dataset),
    }
    path = write_study(tmp_path / "tiny.yaml", tiny_dataset, base=base)
    study_dir = tmp_path / "study"
    cmd = [
        sys.executable,
        "-m",
        "lowlabel.cli",
        "study",
        str(path),
        "--out",
        str(study_dir),
        "--jobs",
        "1",
        "--quiet",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not _finished(study_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _finished(study_dir)
    assert before, "no run finished before the kill"

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    after = _finished(study_dir)
    assert len(after) > len(before)  # the kill left work undone, and the rerun did it
    for name, mtime in before.items():
        assert after[name] == mtime  # finished runs were not run again
    with open(study_dir / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    folders = [r.get("run_dir") or r.get("folder") for r in rows]
    assert len(folders) == len(set(folders)) == len(after)  # each run counted once
