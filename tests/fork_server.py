"""Runs ``lowlabel`` once per case, each in a process forked from this one, two at a time.

Importing torch and MONAI costs seconds per process; this server imports them once, so each
forked case pays only for its own work. Usage: ``python fork_server.py CASES.json RESULTS.json``
(see :func:`helpers.fork_cli`).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

import lowlabel.cli as cli

# what the commands import lazily, imported once here so each forked case pays only for its work
PRELOAD = (
    "torch",
    "monai.transforms",
    "lowlabel.engine.loop",
    "lowlabel.engine.runs",
    "lowlabel.engine.evaluate",
    "lowlabel.engine.pretrain",
    "lowlabel.bundle",
    "lowlabel.segment",
    "lowlabel.qc",
    "lowlabel.bids",
    "lowlabel.study.runner",
    "lowlabel.study.report",
)


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


def main(cases: str, results: str) -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
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


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
