"""Shared fixtures: tiny synthetic brains made in ``tmp_path``, and a config that trains fast."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

MALF35 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "malf35"


def phantom(shape=(32, 32, 32), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A brain-like phantom: WM core, GM shell, CSF ventricle, background outside.

    Returns:
        ``(image, label)``: int16 intensities on an arbitrary scale and labels 0..3.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    centre = rng.uniform(-0.08, 0.08, size=3)[:, None, None, None]
    radii = rng.uniform(0.75, 0.9, size=3)[:, None, None, None]
    r = np.sqrt((((grid - centre) / radii) ** 2).sum(0))
    label = np.zeros(shape, np.int16)
    label[r < 0.95] = 2
    label[r < 0.7] = 3
    vent = np.sqrt(
        ((grid - centre) ** 2 / np.array([0.35, 0.2, 0.2])[:, None, None, None] ** 2).sum(0)
    )
    label[vent < 1] = 1
    means = np.array([0.0, 0.3, 0.6, 0.9])
    image = means[label] + rng.normal(0, 0.04, size=shape) * (label > 0)
    scale = rng.uniform(200, 1000)
    return np.round(image * scale).astype(np.int16), label


def write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def make_tiny_dataset(
    root: Path, n: int = 8, shape=(32, 32, 32), spacing=(1.0, 1.0, 1.0), seed: int = 0
) -> Path:
    """Write ``n`` phantom subjects and a dataset.json under ``root``; returns the json path.

    Odd subjects are stored left-right flipped (LAS) so reorientation is exercised.
    """
    root.mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n):
        image, label = phantom(shape, seed + i)
        affine = np.diag([*spacing, 1.0])
        if i % 2:
            affine[0, 0] = -spacing[0]
            affine[0, 3] = spacing[0] * (shape[0] - 1)
        sid = f"sub{i:02d}"
        write(root / "images" / f"{sid}.nii.gz", image, affine)
        write(root / "labels" / f"{sid}.nii.gz", label, affine)
        training.append({"image": f"images/{sid}.nii.gz", "label": f"labels/{sid}.nii.gz"})
    index = root / "dataset.json"
    index.write_text(json.dumps({"name": "tiny", "training": training}))
    return index


def tiny_overrides(dataset: Path, out: Path, **extra) -> dict:
    """Config overrides for a run that takes seconds on tiny phantoms."""
    values = {
        "out": str(out),
        "data.dataset": str(dataset),
        "data.n_test": 2,
        "data.n_val": 1,
        "data.budget": 2,
        "data.patch_size": [16, 16, 16],
        "model.levels": 3,
        "model.channels": 4,
        "train.steps": 4,
        "train.val_every": 2,
        "train.batch_size": 2,
        "train.threads": 1,
        # the same numbers on a machine with a GPU: tests that want one ask for it (cuda marker)
        "train.device": "cpu",
    }
    values.update(extra)
    return values


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run only where torch sees a CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOWLABEL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture()
def tiny_dataset(tmp_path) -> Path:
    return make_tiny_dataset(tmp_path / "data")


@pytest.fixture()
def tiny_config(tiny_dataset, tmp_path):
    """A :class:`RunConfig` for a 4-step run on the tiny dataset, writing to ``tmp_path/runs``."""
    from lowlabel.config import load_config

    return load_config(None, tiny_overrides(tiny_dataset, tmp_path / "runs"))
