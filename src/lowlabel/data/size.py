"""The one minimum-size rule: how many voxels a network of ``levels`` resolution levels needs.

Config validation (patch sizes), ``train`` and ``pretrain`` (cached scans), ``study`` (scan
headers, before any run) and ``segment`` (a new scan) all ask these functions.
"""

from __future__ import annotations

from collections.abc import Sequence


def coarsest_factor(levels: int) -> int:
    """How much the coarsest level of a ``levels``-level UNet downsamples: ``2 ** (levels - 1)``."""
    return 2 ** (levels - 1)


def fewest_voxels(extent_mm: Sequence[float], spacing: Sequence[float], spatial_dims: int) -> float:
    """Voxels along the shortest axis a network sees once a scan of ``extent_mm`` (x, y, z) is
    resampled to ``spacing``; a 2D model ignores the through-plane axis (the shortest)."""
    voxels = sorted(float(e) / float(s) for e, s in zip(extent_mm, spacing, strict=True))
    return voxels[1] if spatial_dims == 2 else voxels[0]


def too_small(
    extent_mm: Sequence[float], spacing: Sequence[float], spatial_dims: int, levels: int
) -> str | None:
    """Why a scan of ``extent_mm`` cannot go through the network, or None when it can.

    A scan smaller than the coarsest level is refused rather than padded.
    """
    need = coarsest_factor(levels)
    fewest = fewest_voxels(extent_mm, spacing, spatial_dims)
    if fewest >= need:
        return None
    return (
        f"a {levels}-level UNet needs at least {need} voxels per axis but this scan has about "
        f"{int(fewest)} at data.spacing {list(spacing)}; use fewer model.levels or a finer "
        "data.spacing"
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
