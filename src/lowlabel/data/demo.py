"""The embedded demo cohort: synthetic subjects made from nilearn's MNI152 2009 template.

nilearn's wheel ships the skull-stripped MNI152 T1 template with grey- and white-matter
probability maps. CSF is taken as brain minus GM minus WM, and the tissue label is the argmax.
Each synthetic subject gets its own smooth random deformation (labels follow it,
nearest-neighbour), bias field, contrast, noise and intensity scale, and every other one is stored
left-to-right flipped (LAS), so a train/test split means something and reorientation is exercised.

These are not real patients: they are deformed copies of one population template.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

from lowlabel.data.io import write_nifti


def _template(spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Template T1, tissue probabilities (3, X, Y, Z) and affine at ``spacing`` mm."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata() > 0
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata()
    csf = np.clip(mask.astype(float) - gm - wm, 0, 1)
    probs = np.stack([csf, gm, wm]) * mask
    image = t1.get_fdata() * mask
    # crop to the brain with a margin, then resample to the demo spacing
    idx = np.argwhere(mask)
    lo, hi = np.maximum(idx.min(0) - 4, 0), np.minimum(idx.max(0) + 5, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    zoom = 1.0 / spacing
    image = ndimage.zoom(image[box], zoom, order=1)
    probs = np.stack([ndimage.zoom(p[box], zoom, order=1) for p in probs])
    affine = t1.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    affine[:3, :3] = affine[:3, :3] * spacing
    return image.astype(np.float32), probs.astype(np.float32), affine


def _labels(probs: np.ndarray) -> np.ndarray:
    brain = probs.sum(0) > 0.5
    return np.where(brain, probs.argmax(0) + 1, 0).astype(np.int16)


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], grid: int, sd: float
) -> np.ndarray:
    coarse = rng.normal(0.0, sd, size=(grid, grid, grid))
    return ndimage.zoom(coarse, [s / grid for s in shape], order=3)[
        : shape[0], : shape[1], : shape[2]
    ]


def _subject(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, spacing: float):
    shape = image.shape
    centre = (np.array(shape) - 1) / 2
    # small global rotation and scaling, plus a smooth local displacement of a few mm
    angles = np.deg2rad(rng.uniform(-6, 6, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = (
        np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    )
    matrix = rot * rng.uniform(0.93, 1.07, size=3)
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = matrix @ (grid - centre[:, None]) + centre[:, None]
    disp_vox = 3.0 / spacing
    for axis in range(3):
        coords[axis] += _smooth_field(rng, shape, 5, disp_vox).ravel()
    moved = ndimage.map_coordinates(image, coords, order=1).reshape(shape)
    seg = ndimage.map_coordinates(labels, coords, order=0).reshape(shape).astype(np.int16)
    brain = seg > 0
    # contrast, bias field, noise, then an arbitrary scanner scale stored as int16
    moved = np.clip(moved, 0, None) ** rng.uniform(0.8, 1.25)
    moved *= np.exp(_smooth_field(rng, shape, 3, 0.12))
    moved += rng.normal(0, rng.uniform(0.01, 0.04), size=shape)
    moved = np.where(brain, np.clip(moved, 0.01, None), 0.0)
    scale = rng.uniform(300, 1500)
    return np.round(moved * scale).astype(np.int16), seg


def make_demo(
    outdir: str | Path, n_subjects: int = 16, spacing: float = 2.0, seed: int = 0
) -> Path:
    """Write the demo cohort as ``images/``, ``labels/`` and a ``dataset.json``; returns the json.

    The folder appears complete or not at all: it is built under a temporary name and renamed.
    """
    outdir = Path(outdir)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=outdir.parent, prefix=f".{outdir.name}."))
    try:
        image, probs, affine = _template(spacing)
        labels = _labels(probs)
        rng = np.random.default_rng(seed)
        flip = np.diag([-1.0, 1.0, 1.0, 1.0])
        flip[0, 3] = image.shape[0] - 1
        training = []
        for i in range(n_subjects):
            sid = f"demo{i + 1:03d}"
            img, seg = _subject(image, labels, rng, spacing)
            aff = affine
            if i % 2:
                img, seg, aff = img[::-1].copy(), seg[::-1].copy(), affine @ flip
            write_nifti(tmp / "images" / f"{sid}.nii.gz", img, aff)
            write_nifti(tmp / "labels" / f"{sid}.nii.gz", seg, aff)
            training.append({"image": f"images/{sid}.nii.gz", "label": f"labels/{sid}.nii.gz"})
        meta = {
            "name": "lowlabel demo cohort (synthetic)",
            "description": "Synthetic subjects: random smooth deformations, bias fields, contrast "
            "and noise applied to nilearn's MNI152 2009 template. Not real patients.",
            "labels": {"0": "background", "1": "CSF", "2": "GM", "3": "WM"},
            "modality": {"0": "T1"},
            "spacing_mm": spacing,
            "seed": seed,
            "numTraining": n_subjects,
            "training": training,
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        if outdir.exists():
            shutil.rmtree(outdir)
        os.replace(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return outdir / "dataset.json"


def cache_root() -> Path:
    return Path(os.environ.get("LOWLABEL_CACHE", Path.home() / ".cache" / "lowlabel"))


def demo_dataset(n_subjects: int = 16, spacing: float = 2.0) -> Path:
    """The demo cohort's dataset.json, made once in the cache folder and reused."""
    folder = cache_root() / f"demo-{n_subjects}x{spacing:g}mm"
    index = folder / "dataset.json"
    if not index.exists():
        make_demo(folder, n_subjects, spacing)
    return index
