"""Reading and writing NIfTI scans with the checks a user's data needs.

Every reader error becomes a :class:`LowlabelError` that names the file and the fix.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from lowlabel.atomic import atomic_path
from lowlabel.errors import LowlabelError

TISSUES = ("CSF", "GM", "WM")
LABEL_NAMES = ("background",) + TISSUES


@contextlib.contextmanager
def quiet_nibabel() -> Iterator[None]:
    """Mute nibabel's own header-check log lines: a bad file is reported once, in one line."""
    logger = logging.getLogger("nibabel.global")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_nifti(path: str | Path, *, kind: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D scan as ``(array, affine)``, squeezing trailing singleton axes.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        kind: ``image`` (float32, must be finite) or ``label`` (integer-valued, returned int16).

    Returns:
        The array of shape ``(X, Y, Z)`` and its 4x4 voxel-to-world affine.

    Raises:
        LowlabelError: missing, unreadable, truncated, not 3D, or non-finite intensities.
    """
    path = Path(path)
    if not path.is_file():
        raise LowlabelError(f"{path}: file not found; check the path in the dataset")
    try:
        with quiet_nibabel():
            if path.name.endswith(".gz"):
                # decompress in one go: gzip checks the stream's CRC, so a damaged file is refused
                # instead of decoding to garbage (nibabel stops reading once it has the voxels)
                img = nib.Nifti1Image.from_bytes(gzip.decompress(path.read_bytes()))
            else:
                img = nib.load(str(path))
            data = np.asarray(img.dataobj)
    except (
        OSError,
        EOFError,
        zlib.error,
        ValueError,
        nib.filebasedimages.ImageFileError,
        nib.spatialimages.HeaderDataError,
    ) as err:  # from_bytes: garbage in a valid gzip
        reason = "truncated" if isinstance(err, EOFError) or "EOF" in str(err) else "corrupt"
        raise LowlabelError(
            f"{path}: cannot read NIfTI ({reason}: {str(err).splitlines()[0][:80]}); "
            "re-export or re-copy the file"
        ) from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise LowlabelError(
            f"{path}: 4D image with {data.shape[-1]} volumes; give one 3D volume per file "
            "(e.g. split it with fslsplit)"
        )
    if data.ndim != 3:
        raise LowlabelError(f"{path}: expected a 3D volume, got shape {tuple(data.shape)}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise LowlabelError(f"{path}: the header's affine is not invertible; fix the header")
    if kind == "label":
        if not np.all(np.isfinite(data)) or np.any(data != np.round(data)):
            raise LowlabelError(
                f"{path}: label map has non-integer values; labels must be integers"
            )
        return data.astype(np.int16), affine
    data = data.astype(np.float32)
    if not np.all(np.isfinite(data)):
        raise LowlabelError(
            f"{path}: image has NaN or Inf intensities; replace them (e.g. with 0) before use"
        )
    return data, affine


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes in mm from an affine."""
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray, *, like=None) -> None:
    """Write atomically: to a temporary name in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine)
    if like is not None:
        img.header.set_qform(like.header.get_qform(), int(like.header["qform_code"]))
        img.header.set_sform(like.header.get_sform(), int(like.header["sform_code"]))
        img.header.set_xyzt_units(*like.header.get_xyzt_units())
    else:
        img.header.set_qform(affine, 1)
        img.header.set_sform(affine, 1)
        img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
