"""Brain extraction for scans that still carry the skull, with deepbet.

lowlabel's models are trained on skull-stripped T1 scans, but BIDS datasets hold them as the
scanner wrote them. ``--skull-strip`` decides what happens: ``no`` segments the scan as given,
``yes`` always extracts the brain first, ``auto`` does so when :func:`looks_unstripped` says the
scan still has its skull.

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
