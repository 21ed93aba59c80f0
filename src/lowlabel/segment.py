"""Bundle -> label maps and tissue volumes for new scans, each in the scan's own grid.

Every scan goes through the training preprocessing (the one factory), sliding-window inference,
and back through MONAI's inverse of that preprocessing onto its own voxel grid. The label map is
written with the input's shape and its qform/sform copied, so it overlays the scan in any viewer.
Volumes are voxel counts times the voxel volume of the input's affine.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from lowlabel.atomic import write_text
from lowlabel.bundle import Bundle
from lowlabel.bundle import load as load_bundle
from lowlabel.data.io import TISSUES, quiet_nibabel, write_nifti
from lowlabel.data.size import shortfall, world_extent
from lowlabel.data.transforms import patch_shape
from lowlabel.engine.runtime import set_threads
from lowlabel.errors import LowlabelError, unwrap

log = logging.getLogger(__name__)

SUFFIXES = (".nii.gz", ".nii")
# Scans beyond these would not fit the 2 GB a segmentation may use (float32 input, 4-class
# probabilities on the resampled and on the native grid).
MAX_INPUT_VOXELS = 100_000_000
MAX_GRID_VOXELS = 40_000_000
# Voxels coarser than this many times the model's spacing leave too little for it to see.
MAX_COARSER = 4.0
VOLUME_COLUMNS = ("scan", "csf_ml", "gm_ml", "wm_ml", "total_brain_ml", "voxel_ml")


@dataclass
class SegmentResult:
    """What a batch produced: one volume row per segmented scan, and one line per failed input."""

    out_dir: Path
    rows: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def volumes_csv(self) -> Path:
        return self.out_dir / "volumes.csv"


def stem(path: Path) -> str:
    """The scan's name without ``.nii`` / ``.nii.gz``."""
    name = path.name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def expand_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Files and folders -> NIfTI files (a folder's in name order), and one error per bad input."""
    files: list[Path] = []
    errors: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                p
                for p in item.iterdir()
                if p.is_file() and p.name.lower().endswith(SUFFIXES) and not p.name.startswith(".")
            )
            if not found:
                errors.append(f"{item}: folder holds no .nii or .nii.gz files")
            files += found
        elif not item.exists():
            errors.append(f"{item}: no such file or folder")
        elif not item.name.lower().endswith(SUFFIXES):
            errors.append(f"{item}: not a NIfTI file (.nii or .nii.gz); convert it first")
        else:
            files.append(item)
    return files, errors


def check_scan(path: Path, bundle: Bundle) -> None:
    """Refuse, from the header alone, a scan this model cannot take.

    Unreadable files are left to the checked loader, which names the problem.

    Raises:
        LowlabelError: a 2D image, or a size or voxel spacing the model cannot take.
    """
    try:
        with quiet_nibabel():
            img = nib.load(str(path))
            shape = tuple(int(s) for s in img.shape)
            affine = np.asarray(img.affine, dtype=np.float64)
    except Exception:  # the checked loader reports a corrupt file with its reason
        return
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        return  # the loader names 4D images
    cfg = bundle.cfg
    dims = "x".join(map(str, shape))
    if len(shape) < 3 or min(shape) == 1:
        if cfg.data.spatial_dims == 3:
            raise LowlabelError(
                f"{path}: a 2D image ({dims} voxels) but the model is 3D; give a 3D volume"
            )
        raise LowlabelError(
            f"{path}: a single slice ({dims} voxels); give the whole volume "
            "(the 2D model segments it slice by slice)"
        )
    if int(np.prod(shape)) > MAX_INPUT_VOXELS:
        raise LowlabelError(f"{path}: {dims} voxels is too large to segment; crop or downsample it")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    # which world axis (R, A, S) each voxel axis runs along, as the reorientation will see it
    world = nib.orientations.io_orientation(affine)[:, 0].astype(int)
    target = np.asarray(cfg.data.spacing, dtype=float)[world]
    grid = np.asarray(shape) * zooms / target
    # a 2D model convolves within axial (R-A) slices only; the S axis may be anything
    seen = world != 2 if cfg.data.spatial_dims == 2 else np.ones(3, bool)
    spacing = "x".join(f"{z:g}" for z in np.round(zooms, 2))
    model_spacing = "x".join(f"{s:g}" for s in cfg.data.spacing)
    coarse = seen & (zooms > MAX_COARSER * target)
    if coarse.any():
        raise LowlabelError(
            f"{path}: voxels of {spacing} mm are too coarse for a model trained at "
            f"{model_spacing} mm (at most {MAX_COARSER:g}x coarser); use a finer scan"
        )
    # the minimum-size rule, with the sliding window: at least half of it must be scan
    d = cfg.data
    extent = world_extent(shape, affine)
    short = shortfall(extent, d.spacing, d.spatial_dims, cfg.model.levels, patch_shape(d))
    if short is not None:
        need = short[0]
        raise LowlabelError(
            f"{path}: {dims} voxels of {spacing} mm is too small for the model (at least {need} "
            f"voxels of {model_spacing} mm along each axis); give the whole brain"
        )
    if float(np.prod(grid)) > MAX_GRID_VOXELS:
        raise LowlabelError(
            f"{path}: {dims} voxels of {spacing} mm covers too large a field "
            f"({'x'.join(str(int(g)) for g in grid)} voxels at {model_spacing} mm); "
            "check the voxel size in the header, or crop the scan"
        )


def segment_scan(
    bundle: Bundle,
    pre,
    path: Path,
    out_dir: Path,
    probabilities: bool = False,
    tta: bool = False,
) -> dict:
    """Segment one scan and write ``<name>_seg.nii.gz`` (and probability maps) into ``out_dir``.

    Args:
        pre: ``preprocess(bundle.cfg.data, keys=("image",))``, built once per batch.
        tta: test-time augmentation by flips (4 or 8 predictions averaged).

    Returns:
        The scan's row of ``volumes.csv``.

    Raises:
        LowlabelError: the scan is unreadable or the model cannot take it.
    """
    from lowlabel.engine.evaluate import to_native
    from lowlabel.engine.inference import predict_logits

    check_scan(path, bundle)
    item = unwrap(pre, {"image": str(path)})
    logits = predict_logits(bundle.model, item["image"], bundle.cfg, tta)
    probs = torch.softmax(logits, 0)
    del logits
    native = to_native(probs, item["image"], pre)
    del probs, item
    labels = native.argmax(0).to(torch.uint8).numpy()

    ref = nib.load(str(path))
    shape = tuple(ref.shape)
    name = stem(path)
    # the loader squeezed trailing singleton axes; the output keeps the input's exact shape
    write_nifti(out_dir / f"{name}_seg.nii.gz", labels.reshape(shape), ref.affine, like=ref)
    if probabilities:
        for i, tissue in enumerate(TISSUES, start=1):
            prob = native[i].numpy().astype(np.float32, copy=False).reshape(shape)
            write_nifti(
                out_dir / f"{name}_prob_{tissue.lower()}.nii.gz", prob, ref.affine, like=ref
            )
    voxel_ml = abs(float(np.linalg.det(np.asarray(ref.affine, dtype=np.float64)[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=4)
    csf, gm, wm = (float(c) * voxel_ml for c in counts[1:4])
    return {
        "scan": str(path),
        "csf_ml": csf,
        "gm_ml": gm,
        "wm_ml": wm,
        "total_brain_ml": gm + wm,
        "voxel_ml": voxel_ml,
    }


def segment(
    model_dir: str | Path | Bundle,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    probabilities: bool = False,
    progress: bool = True,
    threads: int = 0,
    tta: bool = False,
) -> SegmentResult:
    """Segment scans with a bundle; one bad scan does not stop the others.

    Args:
        model_dir: a bundle folder written by :func:`lowlabel.bundle.export` (or a loaded one).
        inputs: NIfTI files and folders of them.
        out_dir: where ``<name>_seg.nii.gz``, optional ``<name>_prob_{csf,gm,wm}.nii.gz`` and
            ``volumes.csv`` (CSF, GM, WM and total brain = GM + WM, in mL) are written.
        threads: torch threads, 0 for all cores (:func:`lowlabel.engine.runtime.thread_count`).
        tta: test-time augmentation by flips: 4 (2D) or 8 (3D) times the network's work.

    Returns:
        The volume rows and one error line per input that could not be segmented.

    Raises:
        LowlabelError: the model folder is missing or not a bundle, or nothing can be written.
    """
    from tqdm.auto import tqdm

    from lowlabel.data.transforms import preprocess

    bundle = model_dir if isinstance(model_dir, Bundle) else load_bundle(model_dir)
    set_threads(threads)  # the one thread policy; a bundle has no loader workers
    out_dir = Path(out_dir)
    result = SegmentResult(out_dir=out_dir)
    files, result.errors = expand_inputs(inputs)
    earlier: list[dict] = []
    if result.volumes_csv.is_file():  # read first: refuse a table that cannot be merged now
        try:
            with open(result.volumes_csv, newline="") as fh:
                for row in csv.DictReader(fh):
                    if set(row) != set(VOLUME_COLUMNS) or not row["scan"]:
                        raise ValueError(row)
                    earlier.append({k: v if k == "scan" else float(v) for k, v in row.items()})
        except (OSError, ValueError, TypeError, UnicodeDecodeError):
            raise LowlabelError(
                f"{result.volumes_csv}: not a volumes table that lowlabel wrote, so new rows "
                "cannot be added; move it away or choose a new output folder"
            ) from None
    pre = preprocess(bundle.cfg.data, keys=("image",))
    names: dict[str, Path] = {}
    for path in tqdm(files, desc="segment", unit="scan", disable=not progress, dynamic_ncols=True):
        name = stem(path)
        if name in names:
            result.errors.append(
                f"{path}: same name as {names[name]}; its output would "
                "overwrite that one, rename one of them"
            )
            continue
        names[name] = path
        try:
            result.rows.append(segment_scan(bundle, pre, path, out_dir, probabilities, tta))
        except LowlabelError as err:
            result.errors.append(str(err))
    if result.rows:
        # keep the rows of earlier calls into this folder, whose label maps are still there, so
        # that volumes.csv matches the folder; a scan segmented again (same output name) gets
        # its new row in place of the old one
        new = {stem(Path(r["scan"])): r for r in result.rows}
        rows = [new.pop(stem(Path(r["scan"])), r) for r in earlier] + list(new.values())
        write_text(result.volumes_csv, volumes_csv(rows))
    return result


def volumes_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(VOLUME_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                k: (f"{v:.3f}" if k.endswith("_ml") and k != "voxel_ml" else v)
                for k, v in row.items()
            }
        )
    return buf.getvalue()
