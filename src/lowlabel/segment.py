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
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from lowlabel.atomic import write_text
from lowlabel.bundle import Bundle
from lowlabel.bundle import load as load_bundle
from lowlabel.data.io import quiet_nibabel
from lowlabel.data.transforms import patch_shape
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
    # the network's coarsest level needs 2**(levels-1) voxels, and a scan under half the training
    # window would be mostly padding, which the model never saw in training
    window = np.asarray(patch_shape(cfg.data), dtype=float)[world]
    need = np.maximum(2 ** (cfg.model.levels - 1), np.ceil(window / 2))
    if (grid < need)[seen].any():
        need = int(need[seen].max())
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


def predict_native(bundle: Bundle, pre, path: Path) -> tuple[np.ndarray, torch.Tensor]:
    """Class probabilities and labels of one scan on the scan's own grid.

    Args:
        pre: ``preprocess(bundle.cfg.data, keys=("image",))``, built once per batch.
        path: the scan, already accepted by :func:`check_scan`.

    Returns:
        ``(labels, probs)``: ``(X, Y, Z)`` uint8 labels 0..3 and ``(4, X, Y, Z)`` probabilities.

    Raises:
        LowlabelError: the scan is unreadable.
    """
    from lowlabel.engine.evaluate import to_native
    from lowlabel.engine.inference import predict_logits

    item = unwrap(pre, {"image": str(path)})
    logits = predict_logits(bundle.model, item["image"], bundle.cfg)
    probs = torch.softmax(logits, 0)
    del logits
    native = to_native(probs, item["image"], pre)
    del probs, item
    return native.argmax(0).to(torch.uint8).numpy(), native


def segment(
    model_dir: str | Path | Bundle,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    probabilities: bool = False,
    progress: bool = True,
    threads: int = 0,
    skull_strip: str = "auto",
    qc: bool = True,
) -> SegmentResult:
    """Segment scans with a bundle; one bad scan does not stop the others.

    Args:
        model_dir: a bundle folder written by :func:`lowlabel.bundle.export` (or a loaded one).
        inputs: NIfTI files and folders of them.
        out_dir: where ``<name>_seg.nii.gz``, optional ``<name>_prob_{csf,gm,wm}.nii.gz`` and
            ``volumes.csv`` (CSF, GM, WM and total brain = GM + WM, in mL) are written.
        threads: torch threads, 0 for all cores.
        skull_strip: ``auto`` (extract the brain of scans that look unstripped), ``yes`` or
            ``no``; masks go to ``<name>_brainmask.nii.gz`` (see :mod:`lowlabel.skullstrip`).
        qc: write ``qc/`` (snapshots, per-scan QC records) and ``qc.html`` (see :mod:`lowlabel.qc`).

    Returns:
        The volume rows and one error line per input that could not be segmented.

    Raises:
        LowlabelError: the model folder is missing or not a bundle, or nothing can be written.
    """
    from tqdm.auto import tqdm

    from lowlabel.data.transforms import preprocess
    from lowlabel.pipeline import plain_outputs, run_scan
    from lowlabel.skullstrip import extractor_for

    extractor = extractor_for(skull_strip)
    bundle = model_dir if isinstance(model_dir, Bundle) else load_bundle(model_dir)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    out_dir = Path(out_dir)
    result = SegmentResult(out_dir=out_dir)
    files, result.errors = expand_inputs(inputs)
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
            row, _ = run_scan(
                bundle,
                pre,
                path,
                plain_outputs(out_dir, name),
                probabilities=probabilities,
                skull_strip=skull_strip,
                extractor=extractor,
                qc=qc,
                reference=bundle.info.get("qc_reference"),
            )
            result.rows.append(row)
        except LowlabelError as err:
            result.errors.append(str(err))
    if result.rows:
        write_text(result.volumes_csv, volumes_csv(result.rows))
        if qc:
            from lowlabel.qc import write_page

            write_page(out_dir, f"lowlabel QC: {out_dir.name}", model_line(bundle))
    return result


def model_line(bundle: Bundle) -> str:
    """The model in one sentence, for the QC page."""
    prov = bundle.info.get("provenance", {})
    spacing = "x".join(f"{s:g}" for s in bundle.cfg.data.spacing)
    return (
        f"Model {bundle.path.name} ({prov.get('run_name') or 'run'}, "
        f"{prov.get('dataset', 'unknown data')}, {spacing} mm)."
    )


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
