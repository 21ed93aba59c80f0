"""One scan, start to finish, in three stages; and a batch of scans through them.

``read_scan`` checks the scan, extracts the brain if asked and preprocesses it (CPU); ``infer``
runs the network on the device its model lives on; ``write_scan`` takes the probabilities back
onto the scan's own grid and writes the files and the QC record (CPU). :func:`run_batch` chains
them for many scans and, on an accelerator, reads the next scan and writes the previous one in
background threads while the network works on the current one.

``lowlabel segment`` and ``lowlabel bids`` differ only in where the files go and what they are
called (:class:`Outputs`); everything a scan goes through is here, once.
"""

from __future__ import annotations

import concurrent.futures as cf
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from lowlabel.bundle import Bundle
from lowlabel.data.io import TISSUES, quiet_nibabel, read_nifti, write_nifti
from lowlabel.data.size import shortfall, world_extent
from lowlabel.data.transforms import patch_shape
from lowlabel.errors import LowlabelError, unwrap
from lowlabel.skullstrip import BrainExtractor, Decision, brain_region, clear_outside, decide

# Scans beyond these would not fit the 2 GB a segmentation may use (float32 input, 4-class
# probabilities on the resampled and on the native grid).
MAX_INPUT_VOXELS = 100_000_000
MAX_GRID_VOXELS = 40_000_000
# Voxels coarser than this many times the model's spacing leave too little for it to see.
MAX_COARSER = 4.0


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


@dataclass
class Prepared:
    """A scan after the read stage.

    Attributes:
        item: ``{"image": (1, X, Y, Z)}`` on the model's grid, carrying its preprocessing.
        data: the intensities the network was given (zero outside an extracted brain), on the
            scan's own grid with trailing singleton axes squeezed.
        raw: the intensities as read.
        affine: the scan's affine.
        mask: the extracted brain mask, or None when the scan was taken as given.
        decision: what ``--skull-strip`` did.
        region: where tissue may be labelled (:func:`lowlabel.skullstrip.brain_region`): the
            extracted mask, the voxels with signal of a scan stripped before, or None (a scan
            with its skull segmented as given: anywhere).
    """

    path: Path
    item: dict
    data: np.ndarray
    raw: np.ndarray
    affine: np.ndarray
    mask: np.ndarray | None
    decision: Decision
    region: np.ndarray | None = None


@dataclass(frozen=True)
class Job:
    """One scan of a batch: the input, where its files go, more QC fields (e.g. its BIDS
    entities) and what to do once its files are written (e.g. BIDS sidecars)."""

    path: Path
    outputs: Outputs
    extra: dict | None = None
    done: Callable[[dict, dict | None], None] | None = None


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


def read_scan(
    bundle: Bundle,
    pre,
    path: Path,
    *,
    skull_strip: str = "no",
    extractor: Callable[[], BrainExtractor] | None = None,
) -> Prepared:
    """Check one scan, extract its brain if asked, and preprocess it for the model.

    Args:
        pre: ``preprocess(bundle.cfg.data, keys=("image",))``, built once per batch.
        skull_strip: ``auto``, ``yes`` or ``no`` (see :mod:`lowlabel.skullstrip`).
        extractor: returns the batch's brain extractor (made on first use).

    Raises:
        LowlabelError: the scan is unreadable, the model cannot take it, or it needs brain
            extraction and there is no extractor.
    """
    check_scan(path, bundle)
    data, affine = read_nifti(path)
    decision = decide(skull_strip, data, affine)
    raw, mask = data, None
    if not decision.stripped:
        item = unwrap(pre, {"image": str(path)})
        region = brain_region(data, affine, decision.head_ml)
    else:
        if extractor is None:
            raise ValueError("skull stripping needs an extractor")
        try:
            bet = extractor()
        except LowlabelError as err:
            raise LowlabelError(f"{path}: looks unstripped; {err}") from None
        mask = bet.mask(nib.Nifti1Image(data, affine))
        data = np.where(mask, data, 0).astype(np.float32)
        # the preprocessing reads files: give it the stripped scan on the same grid (the
        # preprocessed image lives in memory, so the file may go once it is read)
        with tempfile.TemporaryDirectory(prefix="lowlabel-strip-") as tmp:
            source = Path(tmp) / "stripped.nii"
            nib.save(nib.Nifti1Image(data, affine), str(source))
            item = unwrap(pre, {"image": str(source)})
        region = mask
    return Prepared(path, item, data, raw, affine, mask, decision, region)


def infer(bundle: Bundle, item: dict, tta: bool = False) -> torch.Tensor:
    """Class probabilities ``(4, X, Y, Z)`` on the preprocessed grid (on the CPU), computed on
    the device the bundle's model lives on (an ensemble bundle's members averaged); ``tta``:
    test-time augmentation by flips, 4 (2D) or 8 (3D) times the network's work."""
    from lowlabel.engine.inference import predict_logits

    return torch.softmax(predict_logits(bundle.model, item["image"], bundle.cfg, tta), 0)


def write_scan(
    bundle: Bundle,
    pre,
    scan: Prepared,
    probs: torch.Tensor,
    outputs: Outputs,
    *,
    probabilities: bool = False,
    qc: bool = True,
    reference: dict | None = None,
    extra: dict | None = None,
) -> tuple[dict, dict | None]:
    """Take ``probs`` back onto the scan's own grid and write its files and QC record.

    Args:
        probs: :func:`infer`'s output for ``scan.item``.
        qc: write the snapshot and the QC record into ``outputs.qc_dir``.
        reference: the bundle's ``qc_reference`` (what the model saw in training).
        extra: more fields for the QC record (e.g. the scan's BIDS entities).

    Returns:
        ``(row, record)``: the scan's volumes (``scan``, ``csf_ml``, ..., ``voxel_ml``) and its QC
        record (None without ``qc``).
    """
    from lowlabel import qc as qc_mod
    from lowlabel.engine.evaluate import to_native
    from lowlabel.engine.inference import labels_of

    native = to_native(probs, scan.item["image"], pre)
    del probs
    labels = labels_of(native).to(torch.uint8).numpy()
    mask = scan.mask
    cleared = 0
    if scan.region is not None:
        # no tissue outside the brain: the network sees the empty outside as it sees the zero
        # background of its training scans, but may still label some of it (on a larger field
        # of view than its training scans', tens of thousands of voxels behind the cerebellum)
        cleared = clear_outside(labels, scan.region)
        outside = torch.from_numpy(~scan.region.reshape(labels.shape))
        native[:, outside] = 0.0
        native[0, outside] = 1.0
    ref = nib.load(str(scan.path))
    # the loader squeezed trailing singleton axes; the outputs keep the input's exact shape
    shape = tuple(ref.shape)
    write_nifti(outputs.seg, labels.reshape(shape), ref.affine, like=ref)
    if mask is not None:
        write_nifti(outputs.mask, mask.astype(np.uint8).reshape(shape), ref.affine, like=ref)
    if probabilities:
        for i, tissue in enumerate(TISSUES, start=1):
            prob = native[i].numpy().astype(np.float32, copy=False).reshape(shape)
            write_nifti(outputs.prob(tissue), prob, ref.affine, like=ref)
    voxel_ml = abs(float(np.linalg.det(np.asarray(ref.affine, dtype=np.float64)[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=4)
    csf, gm, wm = (float(c) * voxel_ml for c in counts[1:4])
    row = {
        "scan": str(scan.path),
        "csf_ml": csf,
        "gm_ml": gm,
        "wm_ml": wm,
        "total_brain_ml": gm + wm,
        "voxel_ml": voxel_ml,
    }
    if not qc:
        return row, None
    grid = scan.data.shape
    record = qc_mod.assess(
        scan.data,
        scan.affine,
        labels.reshape(grid),
        native.numpy().max(0).reshape(grid),
        row,
        decision=scan.decision,
        model_spacing=tuple(bundle.cfg.data.spacing),
        reference=reference,
        outside=qc_mod.outside_brain(
            "none" if scan.region is None else "brain mask" if mask is not None else "signal",
            cleared,
            voxel_ml,
        ),
    )
    record.update(qc_mod.snapshot(scan.raw, scan.affine, labels.reshape(grid), mask, outputs))
    record.update(extra or {})
    qc_mod.save_record(outputs.qc_dir, outputs.key, record)
    return row, record


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
    tta: bool = False,
) -> tuple[dict, dict | None]:
    """Segment one scan and write its files: the three stages one after the other.

    Args:
        pre: ``preprocess(bundle.cfg.data, keys=("image",))``, built once per batch.
        skull_strip, extractor: as for :func:`read_scan`.
        tta: as for :func:`infer`.
        probabilities, qc, reference, extra: as for :func:`write_scan`.

    Returns:
        ``(row, record)`` as :func:`write_scan` returns them.

    Raises:
        LowlabelError: the scan is unreadable or the model cannot take it.
    """
    scan = read_scan(bundle, pre, path, skull_strip=skull_strip, extractor=extractor)
    probs = infer(bundle, scan.item, tta)
    return write_scan(
        bundle,
        pre,
        scan,
        probs,
        outputs,
        probabilities=probabilities,
        qc=qc,
        reference=reference,
        extra=extra,
    )


def run_batch(
    bundle: Bundle,
    pre,
    jobs: Sequence[Job],
    *,
    overlap: bool = False,
    probabilities: bool = False,
    skull_strip: str = "no",
    extractor: Callable[[], BrainExtractor] | None = None,
    qc: bool = True,
    reference: dict | None = None,
    progress: bool = True,
    desc: str = "segment",
    tta: bool = False,
) -> list[tuple[dict, dict | None] | LowlabelError]:
    """Segment scans one by one; one bad scan does not stop the others.

    Args:
        overlap: read the next scan and write the previous one in background threads while the
            network segments the current one (worth it on an accelerator, where the CPU is
            otherwise idle). At most one scan is read ahead and one written behind, so memory
            stays bounded.
        skull_strip, extractor: as for :func:`read_scan`.
        probabilities, qc, reference: as for :func:`write_scan`.
        tta: as for :func:`infer`.

    Returns:
        Per job, in order: ``(row, record)``, or the error that stopped that scan.
    """
    from tqdm.auto import tqdm

    reader = cf.ThreadPoolExecutor(1, f"{desc}-read") if overlap else None
    writer = cf.ThreadPoolExecutor(1, f"{desc}-write") if overlap else None

    def run(pool, fn, *args, **kwargs) -> cf.Future:
        if pool is not None:
            return pool.submit(fn, *args, **kwargs)
        done: cf.Future = cf.Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except LowlabelError as err:
            done.set_exception(err)
        return done

    def read(job: Job) -> cf.Future:
        return run(
            reader, read_scan, bundle, pre, job.path, skull_strip=skull_strip, extractor=extractor
        )

    def write(job: Job, scan: Prepared, probs: torch.Tensor) -> tuple[dict, dict | None]:
        row, record = write_scan(
            bundle,
            pre,
            scan,
            probs,
            job.outputs,
            probabilities=probabilities,
            qc=qc,
            reference=reference,
            extra=job.extra,
        )
        if job.done is not None:
            job.done(row, record)
        return row, record

    outcomes: list[cf.Future] = []
    ahead: cf.Future | None = None  # the next scan's read, started before this one's inference
    try:
        for i, job in enumerate(
            tqdm(jobs, desc=desc, unit="scan", disable=not progress, dynamic_ncols=True)
        ):
            reading = ahead if ahead is not None else read(job)
            ahead = None
            if reader is not None and i + 1 < len(jobs):
                ahead = read(jobs[i + 1])
            if reading.exception() is not None:
                outcomes.append(reading)  # reported in input order with the others
                continue
            scan = reading.result()
            probs = infer(bundle, scan.item, tta)
            if outcomes and writer is not None:
                outcomes[-1].exception()  # wait: one write in flight, not a queue of volumes
            outcomes.append(run(writer, write, job, scan, probs))
            del scan, probs, reading
        results: list[tuple[dict, dict | None] | LowlabelError] = []
        for outcome in outcomes:
            try:
                results.append(outcome.result())
            except LowlabelError as err:
                results.append(err)
        return results
    finally:
        for pool in (reader, writer):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
