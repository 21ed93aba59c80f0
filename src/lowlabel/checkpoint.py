"""Checkpoints that describe themselves: safetensors tensors plus JSON metadata.

A checkpoint holds the model weights (``model.*``), optionally the optimizer state (``optim.*``)
and RNG state (``rng.*``), and in its metadata the resolved config, step and best metric. Loading
never unpickles: a file that is not safetensors is refused before anything in it is interpreted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lowlabel.atomic import atomic_path
from lowlabel.device import restore_rng, rng_tensors
from lowlabel.errors import LowlabelError

META_KEY = "lowlabel"


def save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write tensors and metadata atomically (temporary name, then rename).

    A tensor that shares memory with an earlier one, wholly or in part, is written as a copy:
    safetensors refuses shared memory, and MONAI's ``DynUNet`` reaches each block by two names.
    """
    flat, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        storage = v.untyped_storage().data_ptr()
        flat[k] = v.clone() if storage in seen and v.nbytes else v
        seen.add(storage)
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={META_KEY: json.dumps(meta)})


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint without loading its tensors."""
    from safetensors import safe_open

    path = _check(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise _refuse(path, err) from None
    return json.loads(meta.get(META_KEY, "{}"))


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load ``(tensors, meta)``; refuses anything that is not a safetensors file."""
    path = _check(path)
    meta = read_meta(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise _refuse(path, err) from None
    return tensors, meta


def _check(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise LowlabelError(f"{path}: checkpoint not found")
    with open(path, "rb") as fh:
        head = fh.read(16)
    # a safetensors file starts with an 8-byte little-endian header length, then '{'; the
    # length's own bytes may spell a pickle or zip signature (a 19,280-byte header starts 'PK'),
    # so only the '{' tells; a forged header after it fails in safetensors' own parser
    if len(head) < 9 or head[8:9] != b"{":
        raise LowlabelError(
            f"{path}: not a safetensors checkpoint (a pickle or zip file?); lowlabel never "
            "unpickles weights, export them with safetensors"
        )
    return path


def _refuse(path: Path, err: Exception) -> LowlabelError:
    return LowlabelError(f"{path}: not a readable safetensors checkpoint ({err}); re-create it")


def split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix.`` with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer's state into tensors plus JSON-safe param groups."""
    state = optimizer.state_dict()
    tensors = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"optim.{pid}.{key}"] = torch.as_tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in split(tensors, "optim").items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def save_state(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    modules: dict[str, torch.nn.Module] | None = None,
) -> None:
    """Write resumable state: model, optimizer, torch RNG, and ``meta`` (config, loop state).

    ``modules`` are further networks of the run (e.g. a mean teacher), saved under their name.
    """
    opt_tensors, groups = optimizer_tensors(optimizer)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for name, module in (modules or {}).items():
        tensors.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    tensors.update(opt_tensors)
    tensors.update(rng_tensors())
    save(path, tensors, {**meta, "optimizer": groups})


def restore_state(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    modules: dict[str, torch.nn.Module] | None = None,
) -> dict[str, Any]:
    """Load what :func:`save_state` wrote into ``model``, ``optimizer`` and ``modules``; returns
    its metadata.

    Tensors are read onto the CPU and copied to wherever ``model`` and ``optimizer`` now live, so
    a run saved on one device resumes on another."""
    tensors, meta = load(path)
    model.load_state_dict(split(tensors, "model"))
    for name, module in (modules or {}).items():
        module.load_state_dict(split(tensors, name))
    load_optimizer(optimizer, tensors, meta["optimizer"])
    restore_rng(tensors)
    return meta
