"""Atomic file writes: a reader never sees half a file, and a crash leaves the old one intact."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lowlabel.errors import LowlabelError

_UMASK = os.umask(0o022)  # reading the umask means setting it: put it straight back
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only on success.

    Raises:
        LowlabelError: the folder cannot be written or the disk is full (the old file survives).
    """
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp" + suffix)
        # mkstemp makes the file private (0600); a result gets the mode a plain open() would give
        os.fchmod(fd, 0o666 & ~_UMASK)
        os.close(fd)
    except OSError as err:
        raise _write_error(path, err) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # again: a writer may have replaced the file (safetensors makes fresh files 0600)
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except OSError as err:
        tmp_path.unlink(missing_ok=True)
        raise _write_error(path, err) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; rename it to ``path`` only on success.

    ``path`` may exist as an empty folder (it is replaced); the caller refuses anything else
    first. On any failure the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes the folder private (0700)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_temporaries(folder: str | Path) -> int:
    """Delete the temporary files a process killed mid-write left in ``folder`` (the files they
    were meant to replace are intact); returns how many. Only for a folder one process owns.

    Ours are ``.<name>.<random>.tmp<suffix>``; safetensors (0.8) writes its file through one of
    its own first, ``.tmp<random>`` (Rust's ``tempfile`` naming), so a kill during
    ``save_file`` leaves that.
    """
    stale = sorted(set(Path(folder).glob(".*.tmp*")) | set(Path(folder).glob(".tmp*")))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _write_error(path: Path, err: OSError) -> LowlabelError:
    if err.errno == errno.ENOSPC:
        return LowlabelError(f"{path}: disk full while writing; free space and rerun with --resume")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LowlabelError(f"{path.parent}: folder is not writable; choose another output folder")
    return LowlabelError(f"{path}: cannot write ({err.strerror}); check the output folder")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append one line and flush it to disk; a torn last line is dropped by readers."""
    try:
        with open(path, "a") as fh:
            fh.write(line.rstrip("\n") + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        raise _write_error(Path(path), err) from None


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file; a torn last line (from a killed writer) is dropped."""
    rows = []
    path = Path(path)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
