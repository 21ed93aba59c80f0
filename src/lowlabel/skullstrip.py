"""Brain extraction for scans that still carry the skull, with deepbet.

lowlabel's models are trained on skull-stripped T1 scans, but BIDS datasets hold them as the
scanner wrote them. ``--skull-strip`` decides what happens: ``no`` segments the scan as given,
``yes`` always extracts the brain first, ``auto`` does so when :func:`looks_unstripped` says the
scan still has its skull.

Whatever the mode, no tissue is labelled outside the brain region (:func:`brain_region`): the
extracted brain mask when the brain was extracted, else, for a scan that was skull-stripped
before it came here, the voxels that hold signal.

Extraction uses deepbet (MIT; Fisch et al. 2024), chosen by measurement over brainextractor (a
Python port of FSL BET): on IXI scans deepbet's masks reach Dice 0.981 against the reference
intracranial masks (99 scans, lowest 0.966), brainextractor's 0.885 (3 scans), and deepbet is the
faster (``benchmarks/results/segment.json``, ``skull_strip``). deepbet's TorchScript weights
ship inside its wheel, so nothing is downloaded. It is an optional extra:
``pip install 'lowlabel[skullstrip]'``.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass

import nibabel as nib
import numpy as np

from lowlabel.errors import LowlabelError

log = logging.getLogger(__name__)

MODES = ("auto", "yes", "no")
METHOD = "deepbet 1.0.2"
# A skull-stripped adult brain covers at most about 2,000 mL (intracranial volume); a head with
# its skull, scalp and neck covers 3,000-5,000 mL above the same threshold (IXI: 3,500-4,700 mL
# with skull, 1,350-1,650 mL stripped; malf35 stripped: 1,350-1,600 mL).
SKULL_ML = 2500.0
FOREGROUND = 0.05  # of the 99th intensity percentile: above the noise of an unmasked background


def head_volume_ml(data: np.ndarray, affine: np.ndarray) -> float:
    """Volume (mL) of the voxels brighter than a twentieth of the 99th percentile.

    Args:
        data: ``(X, Y, Z)`` intensities.
        affine: the scan's voxel-to-world affine.
    """
    positive = data[data > 0]
    if positive.size == 0:
        return 0.0
    top = float(np.percentile(positive, 99))
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    return float((data > FOREGROUND * top).sum()) * voxel_ml


# A scan was skull-stripped before it came here when it has no more tissue than a brain (at most
# SKULL_ML) and one background value (0, or else the scan's minimum) fills at least EMPTY_SHARE
# of its voxels and EMPTY_FACES of the voxels on the faces of its volume, i.e. surrounds the
# brain. Measured: IXI stripped 84-87% of voxels and 100% of the faces, malf35 70-76% and 100%;
# IXI with skull 32-45% and 79-85%, which only its head volume (3,500-4,700 mL) tells apart.
# All 148 stripped IXI scans and 25 malf35 scans pass; none of the 148 IXI scans with skull.
EMPTY_SHARE = 0.2
EMPTY_FACES = 0.5


def brain_region(
    data: np.ndarray, affine: np.ndarray, head_ml: float | None = None
) -> np.ndarray | None:
    """Where a skull-stripped scan has its brain, from the image alone; None for a scan that
    does not look skull-stripped.

    The region is every voxel that is not background (see ``EMPTY_SHARE`` above for the
    rule that the scan is stripped and what its background value is), with the holes
    enclosed in 3D filled (a zeroed voxel inside the brain is still brain). It is not cut
    to the largest connected piece: malf35 subject 1002 has 523 voxels of labelled tissue
    apart from the rest of its brain. Nor is it dilated: a voxel without signal holds no
    tissue to measure: on the 148 IXI scans, the labelled tissue outside the region is at
    most 33 voxels per scan (1,342 of 24 million in all), on the 25 malf35 scans none.

    Args:
        data: ``(X, Y, Z)`` intensities as read.
        affine: the scan's voxel-to-world affine.
        head_ml: :func:`head_volume_ml` of the scan, if already known.

    Returns:
        ``(X, Y, Z)`` bool, or None.
    """
    from scipy import ndimage

    if head_ml is None:
        head_ml = head_volume_ml(data, affine)
    if head_ml > SKULL_ML or data.size == 0:
        return None
    zero, lowest = data == 0, data == data.min()
    empty = zero if zero.mean() >= lowest.mean() else lowest
    if empty.mean() < EMPTY_SHARE:
        return None
    faces = [np.take(empty, i, axis=a).ravel() for a in range(empty.ndim) for i in (0, -1)]
    if np.concatenate(faces).mean() < EMPTY_FACES:
        return None
    return ndimage.binary_fill_holes(~empty)


def clear_outside(labels: np.ndarray, region: np.ndarray) -> int:
    """Set ``labels`` to background outside ``region`` (same shape), in place.

    Returns:
        How many voxels held tissue there.
    """
    outside = ~region.reshape(labels.shape)
    cleared = int(np.count_nonzero(labels[outside]))
    labels[outside] = 0
    return cleared


def looks_unstripped(data: np.ndarray, affine: np.ndarray) -> bool:
    """Whether a scan seems to still have its skull (more tissue than any brain has)."""
    return head_volume_ml(data, affine) > SKULL_ML


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise LowlabelError(f"--skull-strip: '{mode}' is not one of {', '.join(MODES)}")
    return mode


class BrainExtractor:
    """deepbet's two networks, loaded once per batch (on the CPU)."""

    def __init__(self) -> None:
        try:
            from deepbet.bet import BrainExtraction
        except ImportError:
            raise LowlabelError(
                "--skull-strip: brain extraction needs deepbet; install it with "
                "pip install 'lowlabel[skullstrip]' (or give skull-stripped scans and "
                "--skull-strip no)"
            ) from None
        self._bet = BrainExtraction(no_gpu=True)

    def mask(self, img: nib.Nifti1Image) -> np.ndarray:
        """The brain mask of a scan, ``(X, Y, Z)`` bool on the scan's own grid."""
        # deepbet prints nothing itself, but its helpers may; keep the output to our own lines
        with contextlib.redirect_stdout(io.StringIO()):
            _, mask_img, _ = self._bet.run(img)
        return np.asarray(mask_img.dataobj).reshape(img.shape[:3]) > 0


class LazyExtractor:
    """Loads deepbet when a scan first needs it: ``auto`` works without it on stripped scans."""

    def __init__(self) -> None:
        self._made: BrainExtractor | None = None

    def __call__(self) -> BrainExtractor:
        if self._made is None:
            self._made = BrainExtractor()
        return self._made


def extractor_for(mode: str) -> LazyExtractor | None:
    """The batch's extractor for a ``--skull-strip`` mode; ``yes`` checks deepbet up front.

    Raises:
        LowlabelError: an unknown mode, or ``yes`` without deepbet installed.
    """
    check_mode(mode)
    if mode == "no":
        return None
    lazy = LazyExtractor()
    if mode == "yes":
        lazy()
    return lazy


@dataclass
class Decision:
    """What ``--skull-strip`` did with one scan."""

    mode: str
    head_ml: float
    unstripped: bool
    stripped: bool

    @property
    def summary(self) -> str:
        if self.stripped:
            why = "forced" if self.mode == "yes" else "skull detected"
            return f"stripped ({why})"
        return "as given" + (" (skull detected)" if self.unstripped else "")


def decide(mode: str, data: np.ndarray, affine: np.ndarray) -> Decision:
    head = head_volume_ml(data, affine)
    unstripped = head > SKULL_ML
    stripped = mode == "yes" or (mode == "auto" and unstripped)
    return Decision(mode=mode, head_ml=head, unstripped=unstripped, stripped=stripped)
