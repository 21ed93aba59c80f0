"""How a run executes, apart from what it computes: seeds, threads, the device, autocast.

The execution settings (``config.EXECUTION_KEYS``) enter here and nowhere else: the loop asks a
:class:`Runtime` to place the model and each batch and for the autocast context, so moving work
to another device is a change to this module alone (nanoGPT's ``train.py`` does the same).
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lowlabel.config import RunConfig, TrainConfig


def seed_everything(seed: int) -> None:
    """The one place where seeds are set."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def thread_count(train: TrainConfig) -> int:
    """The thread policy of every command: ``train.threads``, or 0 for the cores that the loader
    ``train.workers`` leave free.

    On a busy machine one thread per core that nobody else needs matters more than the thread
    count: two threads that wait on each other at every layer lose whole time slices whenever
    the scheduler parks one of them (see benchmarks/results/train_speed.json).
    """
    return train.threads or max(1, (os.cpu_count() or 1) - train.workers)


def set_threads(threads: int, workers: int = 0) -> None:
    """Set torch's threads by :func:`thread_count` for ``threads`` and ``workers``."""
    torch.set_num_threads(thread_count(TrainConfig(threads=threads, workers=workers)))


def autocast(enabled: bool):
    """bfloat16 autocast on the CPU when ``enabled``, else a context that does nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@dataclass(frozen=True)
class Runtime:
    """Where and how the networks of a run execute, chosen once per run."""

    cfg: RunConfig
    device: torch.device

    def autocast(self):
        """The one autocast context of the run, for every forward pass."""
        return autocast(self.cfg.train.bf16)

    def to_device(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """A batch's tensors on the run's device (a no-op on the CPU)."""
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device and apply the memory-format and compile settings;
        returns the module to call for training (a compiled wrapper shares the parameters)."""
        model.to(self.device)
        t = self.cfg.train
        if t.channels_last:
            fmt = torch.channels_last_3d if self.cfg.data.spatial_dims == 3 else torch.channels_last
            model.to(memory_format=fmt)
        return torch.compile(model) if t.compile else model

    def settings(self, timing: dict | None = None) -> dict:
        """The settings that change speed (and, for bf16, numerics), and with ``timing`` the
        measured steps per second and share of step time spent waiting for batches."""
        t = self.cfg.train
        out = {
            "threads": torch.get_num_threads(),
            "workers": t.workers,
            "bf16": t.bf16,
            "channels_last": t.channels_last,
            "compile": t.compile,
            "track_meta": False,
        }
        if timing and timing["steps"] > 0:
            out["steps_per_s"] = round(timing["n"] / timing["steps"], 3)
            out["data_share"] = round(timing["data"] / timing["steps"], 4)
        return out


def runtime(cfg: RunConfig) -> Runtime:
    """Set this process's threads for ``cfg`` and choose its device (the CPU, for now)."""
    torch.set_num_threads(thread_count(cfg.train))
    return Runtime(cfg, torch.device("cpu"))


def prepare_model(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """:meth:`Runtime.prepare` without setting threads (for benchmarks)."""
    return Runtime(cfg, torch.device("cpu")).prepare(model)
