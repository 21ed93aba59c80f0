"""How a run executes, apart from what it computes: seeds, threads, the device, autocast.

The execution settings (``config.EXECUTION_KEYS``) and the precision enter a run here and nowhere
else: the loop asks a :class:`Runtime` to place the model and each batch, for the autocast
context and for the optimizer update (through a gradient scaler), so the loop never learns which
device it runs on (nanoGPT's ``train.py`` does the same). What a device is (names, precision
policy, its provenance record) is :mod:`lowlabel.device`'s.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from lowlabel.config import RunConfig, TrainConfig
from lowlabel.device import Placement


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


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The optimizer of every run: AdamW with torch's fused kernel, one pass over all the
    parameters instead of one per operation (the same update up to rounding; on one CPU thread the
    16M-parameter 6-level autoencoder's update takes 9 ms instead of 34 ms, a fifth of its step)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


@dataclass(frozen=True)
class Runtime:
    """Where and how the networks of a run execute, chosen once per run.

    The device and precision are a :class:`~lowlabel.device.Placement`; the CPU goes through the
    same calls as a CUDA device (moving to the CPU returns the same tensors, a disabled gradient
    scaler steps the optimizer as is), so what CI runs is what runs on a GPU.
    """

    cfg: RunConfig
    placement: Placement
    scaler: torch.amp.GradScaler = field(compare=False)

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def pin_memory(self) -> bool:
        """Whether the loader should hand out page-locked batches (faster copies to a GPU)."""
        return self.placement.pin_memory

    def autocast(self):
        """The one autocast context of the run, for every forward pass."""
        return self.placement.autocast()

    def to_device(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """A batch's tensors on the run's device (the same tensors on the CPU)."""
        return self.placement.to(batch)

    def place(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device in the configured memory format (in place; returns it).

        Done before the optimizer state is restored, so a run saved on one device resumes on
        another with its optimizer state where its parameters are."""
        model.to(self.device)
        if self.cfg.train.channels_last:
            fmt = torch.channels_last_3d if self.cfg.data.spatial_dims == 3 else torch.channels_last
            model.to(memory_format=fmt)
        return model

    def prepare(self, model: nn.Module) -> nn.Module:
        """:meth:`place` ``model`` and apply the compile setting; returns the module to call for
        training (a compiled wrapper shares the parameters)."""
        self.place(model)
        return torch.compile(model) if self.cfg.train.compile else model

    def update(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Backward pass and optimizer step through the gradient scaler.

        The scaler only scales in fp16; otherwise it is a plain ``backward()`` and ``step()``.
        An active scaler's state goes into ``state`` so that ``last.safetensors`` keeps it.
        """
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()

    def resume(self, state: dict) -> None:
        """Restore the gradient scaler from a resumed ``state`` (see :meth:`update`)."""
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def record(self) -> dict:
        """The device record of ``provenance.json``: device, its name, driver and CUDA."""
        return self.placement.record()

    def settings(self, timing: dict | None = None) -> dict:
        """The settings that change speed (and, for precision, numerics), and with ``timing``
        the measured steps per second and share of step time spent waiting for batches."""
        t = self.cfg.train
        out = {
            "threads": torch.get_num_threads(),
            "workers": t.workers,
            "device": str(self.device),
            "precision": self.placement.precision,
            "channels_last": t.channels_last,
            "compile": t.compile,
            "track_meta": False,
        }
        if timing and timing["steps"] > 0:
            out["steps_per_s"] = round(timing["n"] / timing["steps"], 3)
            out["data_share"] = round(timing["data"] / timing["steps"], 4)
        return out


def runtime(cfg: RunConfig) -> Runtime:
    """Set this process's threads for ``cfg``, resolve its device and precision and apply the
    deterministic setting.

    Raises:
        LowlabelError: ``train.device`` names a CUDA device that is not there.
    """
    torch.set_num_threads(thread_count(cfg.train))
    placement = Placement.for_run(cfg)
    return Runtime(cfg, placement, placement.scaler())


def cpu_runtime(cfg: RunConfig) -> Runtime:
    """A :class:`Runtime` on the CPU, without setting threads (for benchmarks)."""
    placement = Placement(torch.device("cpu"))
    return Runtime(cfg, placement, placement.scaler())


def prepare_model(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """:meth:`Runtime.prepare` on the CPU without setting threads (for benchmarks)."""
    return cpu_runtime(cfg).prepare(model)
