"""A study killed part-way (SIGKILL) and run again finishes only what is missing."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

from helpers import write_study

# The study process kills its own process group (itself and its workers) with SIGKILL right
# after the first run has finished: a kill at a known point, however fast or busy the machine.
KILL_AFTER_FIRST_RUN = """
import concurrent.futures, os, signal, sys
real_wait = concurrent.futures.wait

def wait_then_die(*args, **kwargs):
    real_wait(*args, **kwargs)
    os.killpg(os.getpid(), signal.SIGKILL)  # the group this session leader started

concurrent.futures.wait = wait_then_die
from lowlabel.cli import main
sys.argv = ["lowlabel", *sys.argv[1:]]
main()
"""


def _finished(study_dir) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in study_dir.glob("runs/*/result.json")}


def test_killed_study_reruns_only_missing_runs(tmp_path, tiny_dataset):
    table = {"axes": ["data"], "set": {"model.levels": 3}}  # two runs: full and low data
    path = write_study(tmp_path / "tiny.yaml", tiny_dataset, seeds=[0], tables={"t": table})
    study_dir = tmp_path / "study"
    args = ["study", str(path), "--out", str(study_dir), "--jobs", "1", "--quiet"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_FIRST_RUN, *args],
        env=env,
        start_new_session=True,  # its own process group, so the kill reaches nothing else
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = _finished(study_dir)
    assert len(before) == 1  # one job at a time: exactly the first run finished

    cmd = [sys.executable, "-m", "lowlabel.cli", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    after = _finished(study_dir)
    assert len(after) == 2
    for name, mtime in before.items():
        assert after[name] == mtime  # finished runs were not run again
    with open(study_dir / "runs.csv") as fh:
        rows = list(csv.DictReader(fh))
    folders = [r.get("run_dir") or r.get("folder") for r in rows]
    assert len(folders) == len(set(folders)) == len(after)  # each run counted once
