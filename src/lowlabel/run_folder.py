"""The one owner of a run's files: their names, create / refuse / resume, atomic writing.

A run folder (``<out>/<name>-<hash>``, see :func:`lowlabel.config.run_dir`) holds:

- ``config.yaml``: the resolved config;
- ``splits.json`` (training) or ``pool.json`` (pretraining): the subjects and images used
  (a pretraining run's ``images``, also listed in each of its checkpoints, plus the
  ``pretrain.unlabelled`` sources and the images ``dropped`` from them, with the reason),
  ``unlabelled.json`` for a mean-teacher run;
- ``metrics.jsonl``: one line per validation;
- ``last.safetensors``: resumable state (model, optimizer, RNG, loop state);
- ``best.safetensors`` (training) or ``checkpoint-<step>.safetensors`` (pretraining);
- ``evaluation.{csv,json}`` and ``overlay.npz`` (a test slice for the study report),
  ``transfer.json``, ``reconstructions.png`` where they apply;
- ``provenance.json`` and, last, ``result.json``, which marks the run finished.

Every file is written atomically (temporary name, then rename).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowlabel import checkpoint
from lowlabel.atomic import append_line, read_jsonl, remove_temporaries, write_json, write_text
from lowlabel.config import RunConfig, dump_yaml, run_dir, to_dict
from lowlabel.errors import LowlabelError

CONFIG = "config.yaml"
SPLITS = "splits.json"
POOL = "pool.json"
UNLABELLED = "unlabelled.json"
METRICS = "metrics.jsonl"
LAST = "last.safetensors"
BEST = "best.safetensors"
RESULT = "result.json"
PROVENANCE = "provenance.json"
TRANSFER = "transfer.json"
EVALUATION = "evaluation.json"
EVALUATION_CSV = "evaluation.csv"
OVERLAY = "overlay.npz"
RECONSTRUCTIONS = "reconstructions.png"


CHECKPOINTS = "checkpoint-*.safetensors"


def checkpoint_name(step: int) -> str:
    """A pretraining run's checkpoint kept at ``step``."""
    return f"checkpoint-{step}.safetensors"


def kept_checkpoints(folder: str | Path) -> list[Path]:
    """A pretraining run's kept checkpoints in ``folder``, by step."""
    found = Path(folder).glob(CHECKPOINTS)
    return sorted(found, key=lambda p: int(p.stem.split("-")[1]))


class RunFolder:
    """A run's folder and the files in it.

    Args:
        path: the folder; :meth:`of` finds it from a config.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, cfg: RunConfig, kind: str = "train") -> RunFolder:
        """The folder of ``cfg``'s run of ``kind`` (``train`` or ``pretrain``)."""
        return cls(run_dir(cfg, kind))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    def checkpoint(self, step: int) -> Path:
        return self.path / checkpoint_name(step)

    # --- lifecycle ------------------------------------------------------------------------------

    def finished(self, resume: bool, what: str = "a run") -> dict | None:
        """The saved result of a finished run when resuming; None when there is work to do.

        Creates nothing.

        Raises:
            LowlabelError: the folder already holds ``what`` and ``resume`` is off.
        """
        done = self.path / RESULT
        if done.exists() and resume:
            return json.loads(done.read_text())
        if (done.exists() or self.last.exists()) and not resume:
            raise LowlabelError(
                f"{self.path}: {what} with this config exists; pass --resume to continue or "
                "reuse it, or --set name=... for a new run"
            )
        return None

    @contextlib.contextmanager
    def setting_up(self) -> Iterator[RunFolder]:
        """Make the folder for the block that prepares a run; if the block fails, a folder that
        this call made is removed again, so a run that never started leaves nothing behind."""
        new = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            remove_temporaries(self.path)
            yield self
        except BaseException:
            if new:
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    def write_config(self, cfg: RunConfig) -> None:
        write_text(self.path / CONFIG, dump_yaml(cfg))

    def write_json(self, name: str, data: Any) -> None:
        write_json(self.path / name, data)

    # --- state and metrics ----------------------------------------------------------------------

    def start(
        self,
        resume: bool,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict,
        modules: dict[str, nn.Module] | None = None,
    ) -> None:
        """Restore ``model``, ``optimizer``, ``modules``, the RNG and ``state`` from ``last``
        when resuming one, keeping the metrics it covers; otherwise start the metrics afresh."""
        if resume and self.last.exists():
            state.update(checkpoint.restore_state(self.last, model, optimizer, modules)["state"])
            self.truncate_metrics(state["step"])
        elif self.metrics.exists():
            self.metrics.unlink()

    def save_state(
        self,
        kind: str,
        cfg: RunConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict,
        modules: dict[str, nn.Module] | None = None,
    ) -> None:
        """Write ``last``: what :meth:`start` restores."""
        meta = {"kind": kind, "config": to_dict(cfg), "state": state}
        checkpoint.save_state(self.last, model, optimizer, meta, modules)

    def save_weights(self, path: Path, model: nn.Module, meta: dict) -> None:
        """Weights of one network (as ``model.*``) and ``meta``: ``best`` or a kept checkpoint."""
        checkpoint.save(path, {f"model.{k}": v for k, v in model.state_dict().items()}, meta)

    def load_weights(self, path: Path, model: nn.Module) -> None:
        tensors, _ = checkpoint.load(path)
        model.load_state_dict(checkpoint.split(tensors, "model"))

    def append_metrics(self, row: dict) -> None:
        append_line(self.metrics, json.dumps(row))

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics) if self.metrics.exists() else []

    def truncate_metrics(self, upto: int) -> None:
        """Keep the lines of ``metrics.jsonl`` up to step ``upto``: those a checkpoint covers."""
        rows = [r for r in read_jsonl(self.metrics) if r.get("step", 0) <= upto]
        write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def finish(self, result: dict, provenance: dict) -> None:
        """Write ``provenance.json``, then ``result.json``, which marks the run finished."""
        write_json(self.path / PROVENANCE, provenance)
        write_json(self.path / RESULT, result)


def truncate_metrics(path: Path, upto: int) -> None:
    """:meth:`RunFolder.truncate_metrics` for the ``metrics.jsonl`` at ``path``."""
    RunFolder(Path(path).parent).truncate_metrics(upto)
