"""One bad-input matrix: every CLI subcommand against every kind of bad input that applies.

Each case runs the real entry point, ``lowlabel.cli.main``, in a process of its own and must end
with exit status 2, exactly one line on stderr that starts with ``error:`` and names the
offending file or key, no traceback, and nothing new on disk but the saved split file, which a
rerun reuses: a run that fails before its first step leaves no run folder.

Importing torch and MONAI costs seconds per process, so the cases are forked, two at a time, from
one process that has imported them (``fork_server.py``, by :func:`helpers.fork_cli`); a few
cases also run as plain ``python -m lowlabel.cli`` processes and must give the very same result.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import COMMANDS, FILE_DEFECTS, IMAGE_DEFECTS, World, fork_cli, snapshot


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
    cases += [("config", k) for k in ("bad_key", "bad_type")]
    cases += [
        ("bids", k) for k in ("missing_dataset", "corrupt", "truncated", "nan", "wrong_model")
    ]
    return [c for c in cases if c[0].split()[0] in COMMANDS]


CASES = _cases()


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
        "inputs": snapshot(work),
    }


def _outcome(job: dict, rc: int) -> dict:
    work = Path(job["cwd"])
    after = snapshot(work)
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
    shared = {p: snapshot(p) for p in (world.good.parent, world.run)}
    done = _run_forked(world, CASES)
    done["plain"] = {case: _run_plain(world, case) for case in PLAIN}
    done["shared_unchanged"] = all(snapshot(p) == snap for p, snap in shared.items())
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
        p for p in r["new"] if not (Path(p).parent.name == "splits" and p.endswith(".json"))
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
