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

from lowlabel.atomic import write_text
from lowlabel.bundle import Bundle
from lowlabel.bundle import load as load_bundle
from lowlabel.engine.runtime import set_threads
from lowlabel.errors import LowlabelError
from lowlabel.pipeline import Job, plain_outputs, run_batch
from lowlabel.skullstrip import extractor_for

log = logging.getLogger(__name__)

SUFFIXES = (".nii.gz", ".nii")
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


def segment(
    model_dir: str | Path | Bundle,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    probabilities: bool = False,
    progress: bool = True,
    threads: int = 0,
    device: str = "auto",
    overlap: bool | None = None,
    skull_strip: str = "auto",
    qc: bool = True,
    tta: bool = False,
) -> SegmentResult:
    """Segment scans with a bundle; one bad scan does not stop the others.

    Args:
        model_dir: a bundle folder written by :func:`lowlabel.bundle.export` (or a loaded one).
        inputs: NIfTI files and folders of them.
        out_dir: where ``<name>_seg.nii.gz``, optional ``<name>_prob_{csf,gm,wm}.nii.gz`` and
            ``volumes.csv`` (CSF, GM, WM and total brain = GM + WM, in mL) are written.
        threads: torch threads, 0 for all cores (:func:`lowlabel.engine.runtime.thread_count`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` for the network.
        overlap: read the next scan and write the previous one in background threads while the
            network segments the current one; None does so on an accelerator, where the CPU
            is otherwise idle (on the CPU the three would compete for the same cores).
        skull_strip: ``auto`` (extract the brain of scans that look unstripped), ``yes`` or
            ``no``; masks go to ``<name>_brainmask.nii.gz`` (see :mod:`lowlabel.skullstrip`).
            Whatever the mode, no tissue is labelled outside the brain region
            (:func:`lowlabel.skullstrip.brain_region`); ``qc/<name>.json`` records what was
            cleared (``outside_brain``).
        qc: write ``qc/`` (snapshots, per-scan QC records) and ``qc.html`` (see :mod:`lowlabel.qc`).
        tta: test-time augmentation by flips: 4 (2D) or 8 (3D) times the network's work.

    Returns:
        The volume rows and one error line per input that could not be segmented.

    Raises:
        LowlabelError: the model folder is missing or not a bundle, a CUDA device is asked for
            and there is none, an unknown ``skull_strip`` (or ``yes`` without deepbet), or
            nothing can be written.
    """
    from lowlabel.data.transforms import preprocess
    from lowlabel.device import Placement

    place = Placement.of(device, key="--device")
    extractor = extractor_for(skull_strip)
    bundle = model_dir if isinstance(model_dir, Bundle) else load_bundle(model_dir)
    bundle.model.to(place.device)
    overlap = place.device.type != "cpu" if overlap is None else overlap
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
    todo: list[Path] = []
    for path in files:
        name = stem(path)
        if name in names:
            result.errors.append(
                f"{path}: same name as {names[name]}; its output would "
                "overwrite that one, rename one of them"
            )
            continue
        names[name] = path
        todo.append(path)
    outcomes = run_batch(
        bundle,
        pre,
        [Job(path, plain_outputs(out_dir, stem(path))) for path in todo],
        overlap=overlap,
        probabilities=probabilities,
        skull_strip=skull_strip,
        extractor=extractor,
        qc=qc,
        reference=bundle.info.get("qc_reference"),
        progress=progress,
        tta=tta,
    )
    for outcome in outcomes:
        if isinstance(outcome, LowlabelError):
            result.errors.append(str(outcome))
        else:
            result.rows.append(outcome[0])
    if result.rows:
        # keep the rows of earlier calls into this folder, whose label maps are still there, so
        # that volumes.csv matches the folder; a scan segmented again (same output name) gets
        # its new row in place of the old one
        new = {stem(Path(r["scan"])): r for r in result.rows}
        rows = [new.pop(stem(Path(r["scan"])), r) for r in earlier] + list(new.values())
        write_text(result.volumes_csv, volumes_csv(rows))
        if qc:  # the page lists every scan with a QC record in the folder, earlier ones too
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
