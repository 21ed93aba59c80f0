"""The one minimum-size rule: how many voxels a network of ``levels`` resolution levels needs.

Config validation (patch sizes), ``train`` and ``pretrain`` (cached scans), ``study`` (scan
headers, before any run) and ``segment`` (a new scan) all ask these functions. Sizes are taken
along the world axes (R, A, S) that preprocessing reorients every scan to, so ``data.spacing``
applies to the axis it names; a 2D model convolves within axial (R-A) slices and ignores S.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np


def coarsest_factor(levels: int) -> int:
    """How much the coarsest level of a ``levels``-level UNet downsamples: ``2 ** (levels - 1)``."""
    return 2 ** (levels - 1)


def world_extent(shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """Physical size (mm) of a scan along R, A and S, from its voxel grid and affine."""
    affine = np.asarray(affine, dtype=float)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    world = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    extent = np.zeros(3)
    extent[world] = np.asarray(shape[:3], dtype=float) * zooms
    return extent


def shortfall(
    extent: Sequence[float],
    spacing: Sequence[float],
    spatial_dims: int,
    levels: int,
    window: Sequence[int] | None = None,
) -> tuple[int, int] | None:
    """``(voxels needed, voxels the scan has)`` along the axes the network sees, or None when the
    scan is big enough.

    Args:
        extent: the scan's size in mm along R, A, S (:func:`world_extent`).
        spacing: ``data.spacing`` (R, A, S) the scan is resampled to.
        window: with a sliding window (R, A, S voxels), a scan must also span half of it, or it
            would be mostly padding, which the model never saw in training.
    """
    grid = np.asarray(extent, dtype=float) / np.asarray(spacing, dtype=float)
    need = np.full(3, float(coarsest_factor(levels)))
    if window is not None:
        need = np.maximum(need, np.ceil(np.asarray(window, dtype=float) / 2))
    seen = np.array([True, True, spatial_dims == 3])
    if not (grid < need)[seen].any():
        return None
    return int(need[seen].max()), int(grid[seen].min())


def too_small(
    extent: Sequence[float], spacing: Sequence[float], spatial_dims: int, levels: int
) -> str | None:
    """Why a scan of ``extent`` (mm, R, A, S) cannot go through a ``levels``-level UNet at
    ``spacing``, or None when it can: a scan smaller than the coarsest level is refused rather
    than padded."""
    short = shortfall(extent, spacing, spatial_dims, levels)
    if short is None:
        return None
    need, has = short
    return (
        f"a {levels}-level UNet needs at least {need} voxels per axis but this scan has about "
        f"{has} at data.spacing {list(spacing)}; use fewer model.levels or a finer data.spacing"
    )


def patch_problem(patch: Sequence[int], levels: int, instance_norm: bool) -> str | None:
    """Why a training patch does not fit a ``levels``-level UNet, or None when it does."""
    factor = coarsest_factor(levels)
    if any(p % factor for p in patch):
        return f"{list(patch)} must be divisible by {factor} for a {levels}-level network"
    if instance_norm and min(patch) < 2 * factor:
        return (
            f"{list(patch)} leaves a single voxel at the bottom of a {levels}-level UNet, where "
            f"instance norm cannot work; use a patch of at least {2 * factor} or fewer "
            "model.levels"
        )
    return None
