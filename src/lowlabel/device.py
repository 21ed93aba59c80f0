"""Where and in which precision a run computes: the one module that knows about devices.

Everything else asks a :class:`Placement` for what it needs: the ``torch.device`` to move the
model to, :meth:`Placement.to` for batches, :meth:`Placement.autocast` around forward passes, and
:meth:`Placement.scaler` for the gradient scaler. The CPU goes through exactly the same calls as
a CUDA device (moving a CPU tensor to the CPU returns it as is; a disabled scaler steps the
optimizer directly), so the code that CI runs on the CPU is the code that runs on a GPU.

Precision: ``fp32``; ``bf16`` autocast (no scaler needed: bfloat16 has float32's exponent range);
``fp16`` autocast with a gradient scaler whose state goes into the checkpoint; ``auto`` is bf16 on
a CUDA device that supports it, fp32 otherwise (so the CPU stays bit-identical to earlier runs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from dataclasses import dataclass
from typing import Any

import torch

from lowlabel.config import DEVICE_PATTERN
from lowlabel.errors import LowlabelError
from lowlabel.provenance import machine

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# cuBLAS needs a fixed workspace to give the same sums twice (PyTorch's reproducibility notes)
CUBLAS_WORKSPACE = ":4096:8"


def check_device_name(name: str, key: str = "train.device") -> str:
    """``name`` if it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        LowlabelError: any other spelling, naming ``key``.
    """
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise LowlabelError(f"{key} '{name}': choose auto, cpu, cuda or cuda:N (e.g. cuda:0)")
    return name


def resolve_device(name: str = "auto", key: str = "train.device") -> torch.device:
    """The ``torch.device`` for ``auto | cpu | cuda | cuda:N``.

    ``auto`` is the first visible CUDA device when there is one, else the CPU.

    Raises:
        LowlabelError: a CUDA device is asked for and torch sees none (or not that many).
    """
    check_device_name(name, key)
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        why = (
            f"this torch ({torch.__version__}) is built without CUDA"
            if torch.version.cuda is None
            else "torch sees no CUDA device (driver, CUDA_VISIBLE_DEVICES?)"
        )
        raise LowlabelError(f"{key} '{name}': no CUDA device here, {why}; use cpu or auto")
    index = int(name.split(":", 1)[1]) if ":" in name else 0
    if index >= count:
        raise LowlabelError(
            f"{key} '{name}': only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})"
        )
    return torch.device("cuda", index)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``precision`` on ``device`` (``auto`` decided here)."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def deterministic_setup(deterministic: bool) -> None:
    """PyTorch's deterministic algorithms on or off, with what they need.

    On the CPU lowlabel's runs are bit-identical either way. On CUDA, ``True`` sets the cuBLAS
    workspace (read when cuBLAS starts, so set before the first matrix product), turns off cuDNN
    benchmarking (which may pick a different algorithm each run) and makes operations without a
    deterministic CUDA kernel warn. ``False`` lets cuDNN pick the fastest kernels.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


@dataclass(frozen=True)
class Placement:
    """A resolved device and precision.

    Attributes:
        device: where the model, batches and sliding-window inference live.
        precision: ``fp32``, ``bf16`` or ``fp16`` (never ``auto``).
        deterministic: whether :func:`deterministic_setup` was asked for determinism.
    """

    device: torch.device
    precision: str = "fp32"
    deterministic: bool = False

    @classmethod
    def of(
        cls,
        device: str = "auto",
        precision: str = "auto",
        deterministic: bool = False,
        key: str = "train.device",
    ) -> Placement:
        """Resolve names from a config or the command line (``key`` names the option).

        Raises:
            LowlabelError: an unknown name, or a CUDA device that is not there.
        """
        dev = resolve_device(device, key)
        if precision not in PRECISIONS:
            raise LowlabelError(
                f"train.precision '{precision}': choose one of {', '.join(PRECISIONS)}"
            )
        return cls(dev, resolve_precision(precision, dev), deterministic)

    @classmethod
    def for_run(cls, cfg: Any, device: str | None = None) -> Placement:
        """The placement of a run config (``device`` replaces ``cfg.train.device``), with the
        deterministic setup applied."""
        t = cfg.train
        place = cls.of(device or t.device, t.precision, t.deterministic)
        deterministic_setup(t.deterministic)
        return place

    @classmethod
    def of_model(cls, model: torch.nn.Module, precision: str = "auto") -> Placement:
        """Where ``model`` already lives (inference follows the model)."""
        param = next(model.parameters(), None)
        dev = param.device if param is not None else torch.device("cpu")
        return cls(dev, resolve_precision(precision, dev))

    @property
    def pin_memory(self) -> bool:
        """Whether loaders should hand out page-locked batches (they copy to a GPU faster)."""
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The one autocast context: none for fp32, else bf16/fp16 on this device type."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def scaler(self) -> torch.amp.GradScaler:
        """A gradient scaler, enabled for fp16 only (disabled, it steps the optimizer as is)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def to(self, batch: Any) -> Any:
        """``batch`` (a tensor, or tuples, lists and dicts of them) on this device.

        Copies from pinned memory to a GPU do not block the host; on the CPU this returns the
        same tensors.
        """
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.to(b) for b in batch)
        if isinstance(batch, dict):
            return {k: self.to(v) for k, v in batch.items()}
        return batch

    def fits(self, nbytes: int, share: float = 0.5) -> bool:
        """Whether ``nbytes`` more fit on the device within ``share`` of its free memory."""
        if self.device.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(self.device)
        return nbytes <= share * free

    def record(self) -> dict:
        """What ``provenance.json`` records: device, its name, driver and CUDA versions."""
        out: dict[str, Any] = {
            "device": str(self.device),
            "precision": self.precision,
            "deterministic": self.deterministic,
            "cuda_runtime": torch.version.cuda,
        }
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            out.update(
                device_name=props.name,
                compute_capability=f"{props.major}.{props.minor}",
                device_memory_mb=round(props.total_memory / 2**20),
                cudnn=torch.backends.cudnn.version(),
                driver=driver_version(),
                peak_device_mb=round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1),
            )
        else:
            out["device_name"] = machine()
        return out


def driver_version() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, or None where it cannot be asked."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def rng_tensors() -> dict[str, torch.Tensor]:
    """The random number generator states a checkpoint keeps (the CUDA one once it is in use)."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Set what :func:`rng_tensors` saved; a CUDA state is skipped on a machine without one
    (a run resumed on another device continues, though not to the bit)."""
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
