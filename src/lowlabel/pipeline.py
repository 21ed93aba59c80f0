"""One scan, start to finish: brain extraction if asked, segmentation, output files, QC record.

``lowlabel segment`` and ``lowlabel bids`` differ only in where the files go and what they are
called (:class:`Outputs`); everything a scan goes through is here, once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from lowlabel.bundle import Bundle
from lowlabel.data.io import TISSUES, read_nifti, write_nifti
from lowlabel.errors import LowlabelError
from lowlabel.skullstrip import BrainExtractor, decide


@dataclass(frozen=True)
class Outputs:
    """Where one scan's files go.

    Attributes:
        seg: the label map.
        prob: tissue name (``CSF``, ``GM``, ``WM``) -> probability map path.
        mask: the brain mask, written when the brain was extracted.
        qc_dir: the output folder's ``qc/`` (snapshot PNGs and the scan's QC record).
        key: the scan's name in ``qc/`` and on the QC page.
    """

    seg: Path
    prob: Callable[[str], Path]
    mask: Path
    qc_dir: Path
    key: str


def plain_outputs(out_dir: Path, name: str) -> Outputs:
    """``segment``'s names: ``<name>_seg.nii.gz``, ``<name>_prob_csf.nii.gz``, ..."""
    return Outputs(
        seg=out_dir / f"{name}_seg.nii.gz",
        prob=lambda tissue: out_dir / f"{name}_prob_{tissue.lower()}.nii.gz",
        mask=out_dir / f"{name}_brainmask.nii.gz",
        qc_dir=out_dir / "qc",
        key=name,
    )


def run_scan(
    bundle: Bundle,
    pre,
    path: Path,
    outputs: Outputs,
    *,
    probabilities: bool = False,
    skull_strip: str = "no",
    extractor: Callable[[], BrainExtractor] | None = None,
    qc: bool = True,
    reference: dict | None = None,
    extra: dict | None = None,
) -> tuple[dict, dict | None]:
    """Segment one scan and write its files.

    Args:
        pre: ``preprocess(bundle.cfg.data, keys=("image",))``, built once per batch.
        skull_strip: ``auto``, ``yes`` or ``no`` (see :mod:`lowlabel.skullstrip`).
        extractor: returns the batch's brain extractor (made on first use).
        qc: write the snapshot and the QC record into ``outputs.qc_dir``.
        reference: the bundle's ``qc_reference`` (what the model saw in training).
        extra: more fields for the QC record (e.g. the scan's BIDS entities).

    Returns:
        ``(row, record)``: the scan's volumes (``scan``, ``csf_ml``, ..., ``voxel_ml``) and its QC
        record (None without ``qc``).

    Raises:
        LowlabelError: the scan is unreadable or the model cannot take it.
    """
    from lowlabel import qc as qc_mod
    from lowlabel.segment import check_scan, predict_native

    check_scan(path, bundle)
    data, affine = read_nifti(path)
    decision = decide(skull_strip, data, affine)
    ref = nib.load(str(path))
    shape = tuple(ref.shape)
    raw, mask = data, None
    with tempfile.TemporaryDirectory(prefix="lowlabel-strip-") as tmp:
        source = path
        if decision.stripped:
            if extractor is None:
                raise ValueError("skull stripping needs an extractor")
            try:
                bet = extractor()
            except LowlabelError as err:
                raise LowlabelError(f"{path}: looks unstripped; {err}") from None
            mask = bet.mask(nib.Nifti1Image(data, affine))
            data = np.where(mask, data, 0).astype(np.float32)
            # the preprocessing reads files: give it the stripped scan on the same grid
            source = Path(tmp) / "stripped.nii"
            nib.save(nib.Nifti1Image(data, affine), str(source))
        labels, probs = predict_native(bundle, pre, source)
    if mask is not None:
        # no tissue outside the extracted brain: the network sees the zeroed outside as it sees
        # the zero background of its training scans, but may still label some of it
        outside = ~mask.reshape(labels.shape)
        labels[outside] = 0
        probs[:, torch.from_numpy(outside)] = 0.0
        probs[0, torch.from_numpy(outside)] = 1.0
    write_nifti(outputs.seg, labels.reshape(shape), ref.affine, like=ref)
    if mask is not None:
        write_nifti(outputs.mask, mask.astype(np.uint8).reshape(shape), ref.affine, like=ref)
    if probabilities:
        for i, tissue in enumerate(TISSUES, start=1):
            prob = probs[i].numpy().astype(np.float32, copy=False).reshape(shape)
            write_nifti(outputs.prob(tissue), prob, ref.affine, like=ref)
    voxel_ml = abs(float(np.linalg.det(np.asarray(ref.affine, dtype=np.float64)[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=4)
    csf, gm, wm = (float(c) * voxel_ml for c in counts[1:4])
    row = {
        "scan": str(path),
        "csf_ml": csf,
        "gm_ml": gm,
        "wm_ml": wm,
        "total_brain_ml": gm + wm,
        "voxel_ml": voxel_ml,
    }
    if not qc:
        return row, None
    record = qc_mod.assess(
        data,
        affine,
        labels.reshape(data.shape),
        probs.numpy().max(0).reshape(data.shape),
        row,
        decision=decision,
        model_spacing=tuple(bundle.cfg.data.spacing),
        reference=reference,
    )
    record.update(qc_mod.snapshot(raw, affine, labels.reshape(data.shape), mask, outputs))
    record.update(extra or {})
    qc_mod.save_record(outputs.qc_dir, outputs.key, record)
    return row, record
