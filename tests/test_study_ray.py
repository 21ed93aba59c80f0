"""The Ray backend runs a study's cells as Ray tasks; results land in the same study folder."""

from __future__ import annotations

import contextlib
import json

import pytest
import yaml

ray = pytest.importorskip("ray")


@pytest.fixture()
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_backend_runs_the_study_and_reruns_nothing(tmp_path, tiny_dataset, local_ray):
    from lowlabel.study.runner import run_study

    study = tmp_path / "tiny.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "base": {
                    "data.dataset": str(tiny_dataset),
                    "data.patch_size": [16, 16, 16],
                    "data.n_test": 2,
                    "data.n_val": 1,
                    "model.levels": 3,
                    "model.channels": 4,
                    "train.steps": 2,
                    "train.val_every": 1,
                    "train.threads": 1,
                },
                "seeds": [0],
                "axes": {"data": {"full": {"data.budget": 0}, "low": {"data.budget": 2}}},
                "tables": {"t": {"title": "full vs low", "axes": ["data"]}},
            }
        )
    )
    out = tmp_path / "study"
    result = run_study(study, study_dir=out, backend="ray", jobs=2, progress=False)
    assert result.failed == {} and result.runs == result.ran == 2
    plan = json.loads((out / "plan.json").read_text())
    for cell in plan["cells"]:
        folder = out / "runs" / cell["run_dir"].split("/")[-1]
        res = json.loads((folder / "result.json").read_text())
        assert res["steps"] == 2 and 0.0 <= res["test"]["mean_dice"] <= 1.0
    assert "full vs low" in (out / "report.md").read_text()
    again = run_study(study, study_dir=out, backend="ray", jobs=2, progress=False, report=False)
    assert again.ran == 0 and again.skipped == 2


CONNECT = r"""
import sys
from lowlabel.study.runner import RayBackend

backend = RayBackend(0, sys.argv[1])
print("jobs", backend.jobs, "threads", backend.threads)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_cluster_with_token_authentication_is_reached(tmp_path):
    """Ray 2.5x: 'ray start --head' turns on token authentication when ~/.ray/auth_token exists,
    but a client given an explicit --address sends the token only with RAY_AUTH_MODE=token."""
    import os
    import secrets
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray_cli is None:
        pytest.skip("no 'ray' command")
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a limit
    log = tmp_path / "ray.log"
    with open(log, "w") as fh:
        head = subprocess.Popen(
            [
                ray_cli,
                "start",
                "--head",
                "--block",
                f"--port={port}",
                "--num-cpus=1",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={temp}",
            ],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped below, and only it
        )
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text() and time.monotonic() < deadline:
            assert head.poll() is None, log.read_text()
            time.sleep(0.5)
        assert "Token authentication is enabled" in log.read_text()  # the case of the issue
        done = subprocess.run(
            [sys.executable, "-c", CONNECT, f"127.0.0.1:{port}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "jobs 1 threads 1" in done.stdout
        assert "InvalidAuthToken" not in done.stderr
    finally:
        # 'ray stop' would stop every Ray of this user on the machine; this cluster is one
        # process group, ours
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # Ray drains for 30 s: no need here
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)
