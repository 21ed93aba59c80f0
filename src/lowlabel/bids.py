"""lowlabel as a BIDS App: T1w scans of a BIDS dataset in, BIDS derivatives out.

``participant`` level: every ``sub-<l>/[ses-<l>/]anat/*_T1w.nii[.gz]`` (optionally only some
participants and sessions) is brain-extracted if it needs it, segmented on its own grid and
written as ``<entities>_dseg.nii.gz`` (with ``--probabilities`` also
``<entities>_label-{CSF,GM,WM}_probseg.nii.gz``, and ``<entities>_desc-brain_mask.nii.gz`` when
the brain was extracted), next to a top-level ``dseg.tsv`` and ``dataset_description.json``.
``group`` level: ``volumes.tsv`` (and its ``volumes.json`` data dictionary) from the scans'
records. Both levels rebuild ``qc.html``; ``qc/``, ``qc.html`` and the volume table are listed
in ``.bidsignore``.

Scans are found with a small glob and a regular expression rather than pybids: a BIDS App needs
only the T1w files and their entities, and pybids would add an SQL-backed index (and its
dependencies) that takes longer to build than the glob takes to run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lowlabel.atomic import write_json, write_text
from lowlabel.data.io import TISSUES
from lowlabel.errors import LowlabelError

log = logging.getLogger(__name__)

BIDS_VERSION = "1.10.0"
LEVELS = ("participant", "group")
DSEG_DESCRIPTION = "Tissue segmentation by lowlabel (classes in dseg.tsv)"
_LABEL = r"[a-zA-Z0-9]+"
_ENTITY = re.compile(rf"^([a-z]+)-({_LABEL})$")
_SUFFIXES = (".nii.gz", ".nii")
# (the validator takes "/qc" for the folder; "/qc/" or "qc/*" leave it NOT_INCLUDED)
BIDSIGNORE = "/qc\n/qc.html\n/volumes.tsv\n/volumes.json\n"
VOLUME_FIELDS = {
    "participant_id": "BIDS participant label",
    "session_id": "BIDS session label",
    "source": "the T1w image, relative to the BIDS dataset",
    "csf_ml": "CSF volume (mL)",
    "gm_ml": "grey matter volume (mL)",
    "wm_ml": "white matter volume (mL)",
    "brain_ml": "brain volume, GM + WM (mL)",
    "qc_flags": "QC warnings (see qc.html), n/a when none",
}


@dataclass(frozen=True)
class Scan:
    """A T1w image and its BIDS entities, in file-name order (``sub`` first)."""

    path: Path
    entities: tuple[tuple[str, str], ...]

    @property
    def subject(self) -> str:
        return dict(self.entities)["sub"]

    @property
    def session(self) -> str | None:
        return dict(self.entities).get("ses")

    @property
    def prefix(self) -> str:
        """``sub-<l>[_ses-<l>][_acq-<l>][_run-<l>]...``: the output names' common start."""
        return "_".join(f"{k}-{v}" for k, v in self.entities)

    @property
    def folder(self) -> Path:
        """``sub-<l>[/ses-<l>]/anat``, the same in the dataset and in the derivatives."""
        parts = [f"sub-{self.subject}"] + ([f"ses-{self.session}"] if self.session else [])
        return Path(*parts, "anat")


@dataclass
class BidsResult:
    """What a level produced: scans done, one line per skipped file, one per failed scan."""

    out_dir: Path
    done: list[Scan] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    volumes_tsv: Path | None = None
    qc_html: Path | None = None


def parse_name(name: str) -> tuple[tuple[str, str], ...] | None:
    """Entities of a ``..._T1w.nii[.gz]`` file name, or None if it is not a valid T1w name."""
    for suffix in _SUFFIXES:
        if name.endswith(f"_T1w{suffix}"):
            stem = name[: -len(f"_T1w{suffix}")]
            break
    else:
        return None
    entities = []
    for part in stem.split("_"):
        match = _ENTITY.match(part)
        if match is None:
            return None
        entities.append((match[1], match[2]))
    keys = [k for k, _ in entities]
    if not keys or keys[0] != "sub" or len(set(keys)) != len(keys):
        return None
    return tuple(entities)


def _labels(values: Sequence[str] | None, prefix: str) -> set[str] | None:
    if not values:
        return None
    return {v.removeprefix(f"{prefix}-") for v in values}


def find_scans(
    bids_dir: str | Path,
    participants: Sequence[str] | None = None,
    sessions: Sequence[str] | None = None,
) -> tuple[list[Scan], list[str]]:
    """The T1w scans of a BIDS dataset, and one line per file in ``anat/`` it cannot take.

    Args:
        participants: labels with or without ``sub-``; None for all.
        sessions: labels with or without ``ses-``; None for all.

    Raises:
        LowlabelError: not a BIDS dataset, or a requested participant or session is absent.
    """
    root = Path(bids_dir)
    if not root.is_dir():
        raise LowlabelError(f"{root}: BIDS dataset folder not found")
    if not (root / "dataset_description.json").is_file():
        raise LowlabelError(
            f"{root}: not a BIDS dataset (no dataset_description.json); give the dataset's root"
        )
    want_sub, want_ses = _labels(participants, "sub"), _labels(sessions, "ses")
    subjects = sorted(p.name[4:] for p in root.glob("sub-*") if p.is_dir())
    if want_sub:
        missing = sorted(want_sub - set(subjects))
        if missing:
            raise LowlabelError(
                f"--participant-label {' '.join(missing)}: no "
                f"{', '.join('sub-' + m for m in missing)} in {root}"
            )
    scans: list[Scan] = []
    skipped: list[str] = []
    seen_sessions: set[str] = set()
    for sub in subjects:
        if want_sub and sub not in want_sub:
            continue
        anat_dirs = [root / f"sub-{sub}" / "anat"] + sorted(
            (p / "anat" for p in (root / f"sub-{sub}").glob("ses-*") if p.is_dir()),
        )
        for anat in anat_dirs:
            ses = anat.parent.name[4:] if anat.parent.name.startswith("ses-") else None
            if ses:
                seen_sessions.add(ses)
            if want_ses and ses not in want_ses:
                continue
            if not anat.is_dir():
                continue
            for path in sorted(anat.iterdir()):
                if not path.name.endswith(_SUFFIXES) or path.name.startswith("."):
                    continue
                rel = path.relative_to(root)
                entities = parse_name(path.name)
                if entities is None:
                    if "_T1w." in path.name:
                        skipped.append(f"{rel}: not a valid BIDS T1w file name; skipped")
                    else:
                        skipped.append(f"{rel}: not a T1w image (lowlabel takes T1w); skipped")
                    continue
                found = dict(entities)
                if found["sub"] != sub or found.get("ses") != ses:
                    skipped.append(
                        f"{rel}: its name's sub-/ses- labels do not match its folder; skipped"
                    )
                    continue
                scans.append(Scan(path=path, entities=entities))
    if want_ses:
        missing = sorted(want_ses - seen_sessions)
        if missing:
            raise LowlabelError(
                f"--session-label {' '.join(missing)}: no "
                f"{', '.join('ses-' + m for m in missing)} in {root}"
            )
    return scans, skipped


def dataset_description(bids_dir: Path, bundle) -> dict:
    """The derivative's ``dataset_description.json``, naming lowlabel and the model."""
    from lowlabel import __version__

    prov = bundle.info.get("provenance", {})
    test = prov.get("test_metrics") or {}
    model = (
        f"model '{bundle.path.name}' (run {prov.get('run_name')}, trained on "
        f"{prov.get('dataset')} with {len(prov.get('labelled_subjects') or [])} labelled "
        f"subjects, seed {prov.get('seed')}, best step {prov.get('best_step')}"
        + (f", test Dice {test['mean_dice']:.3f}" if "mean_dice" in test else "")
        + ")"
    )
    trained = prov.get("trained_with") or {}
    return {
        "Name": "lowlabel brain tissue segmentation (CSF, GM, WM)",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "lowlabel",
                "Version": __version__,
                "Description": f"tissue segmentation with {model}; lowlabel git revision of "
                f"training: {trained.get('git_revision') or 'unknown'}",
            }
        ],
        "SourceDatasets": [{"URL": bids_dir.resolve().as_uri()}],
        "DatasetLinks": {"raw": bids_dir.resolve().as_uri()},
    }


README = """# lowlabel tissue segmentation

BIDS derivatives written by `lowlabel bids` (participant level; `group` adds the tables):

- `sub-*/[ses-*/]anat/*_dseg.nii.gz`: 1 CSF, 2 GM, 3 WM (see `dseg.tsv`), on each T1w's own grid;
- `*_label-{CSF,GM,WM}_probseg.nii.gz` (with `--probabilities`): class probabilities;
- `*_desc-brain_mask.nii.gz`: the brain mask, where the brain was extracted (deepbet);
- `volumes.tsv` (group level): tissue volumes in mL per scan, with QC flags;
- `qc.html` and `qc/`: snapshots, QC numbers and warnings per scan.

The model and its provenance are named in `dataset_description.json` (`GeneratedBy`).
"""


def sidecar(scan: Scan, bids_dir: Path, description: str | None, **more) -> dict:
    """A derivative's JSON sidecar: what it is, and the T1w it came from and lies on."""
    source = f"bids:raw:{scan.path.relative_to(bids_dir).as_posix()}"
    described = {"Description": description} if description else {}
    return {**described, "Sources": [source], "SpatialReference": source, **more}


def dseg_tsv() -> str:
    lines = ["index\tname\tabbreviation"]
    names = {"CSF": "cerebrospinal fluid", "GM": "grey matter", "WM": "white matter"}
    for index, tissue in enumerate(TISSUES, start=1):
        lines.append(f"{index}\t{names[tissue]}\t{tissue}")
    return "\n".join(lines) + "\n"


def outputs_for(out_dir: Path, scan: Scan):
    from lowlabel.pipeline import Outputs

    anat = out_dir / scan.folder
    prefix = scan.prefix
    return Outputs(
        seg=anat / f"{prefix}_dseg.nii.gz",
        prob=lambda tissue: anat / f"{prefix}_label-{tissue}_probseg.nii.gz",
        mask=anat / f"{prefix}_desc-brain_mask.nii.gz",
        qc_dir=out_dir / "qc",
        key=prefix,
    )


def _json_of(nifti: Path) -> Path:
    return nifti.with_name(nifti.name.removesuffix(".nii.gz") + ".json")


def write_sidecars(scan: Scan, bids_dir: Path, outputs, record: dict, probabilities: bool) -> None:
    write_json(
        _json_of(outputs.seg),
        # the Description is inherited from the top-level dseg.json
        sidecar(scan, bids_dir, None),
    )
    if probabilities:
        for tissue in TISSUES:
            write_json(
                _json_of(outputs.prob(tissue)),
                sidecar(scan, bids_dir, f"{tissue} probability from lowlabel's model"),
            )
    if "stripped" in record["skull_strip"]:
        write_json(
            _json_of(outputs.mask),
            sidecar(scan, bids_dir, "Brain mask from deepbet", Type="Brain"),
        )


def _check_dirs(bids_dir: Path, out_dir: Path) -> None:
    if out_dir.resolve() == bids_dir.resolve():
        raise LowlabelError(
            f"{out_dir}: the output folder is the BIDS dataset itself; give e.g. "
            f"{bids_dir / 'derivatives' / 'lowlabel'}"
        )
    if out_dir.is_file():
        raise LowlabelError(f"{out_dir}: is a file; give a folder for the derivatives")


def participant(
    bids_dir: str | Path,
    out_dir: str | Path,
    model_dir: str | Path,
    *,
    participants: Sequence[str] | None = None,
    sessions: Sequence[str] | None = None,
    probabilities: bool = False,
    skull_strip: str = "auto",
    progress: bool = True,
    threads: int = 0,
    device: str = "auto",
    overlap: bool | None = None,
    tta: bool = False,
) -> BidsResult:
    """The participant level: segment each T1w scan into BIDS derivatives and QC.

    Scans go through the same stages as ``lowlabel segment`` (:func:`lowlabel.pipeline.run_batch`),
    with the network on ``device`` and, on an accelerator, reading and writing overlapped with it;
    ``tta``: test-time augmentation by flips, as ``lowlabel segment --tta``.

    Raises:
        LowlabelError: not a BIDS dataset, unknown labels, a bad model folder, output folder or
            device.
    """
    from lowlabel.bundle import load as load_bundle
    from lowlabel.data.transforms import preprocess
    from lowlabel.device import Placement
    from lowlabel.engine.runtime import set_threads
    from lowlabel.pipeline import Job, run_batch
    from lowlabel.qc import write_page
    from lowlabel.segment import model_line
    from lowlabel.skullstrip import extractor_for

    bids_dir, out_dir = Path(bids_dir), Path(out_dir)
    _check_dirs(bids_dir, out_dir)
    scans, skipped = find_scans(bids_dir, participants, sessions)
    result = BidsResult(out_dir=out_dir, skipped=skipped)
    place = Placement.of(device, key="--device")
    extractor = extractor_for(skull_strip)
    bundle = load_bundle(model_dir)
    if not scans:
        raise LowlabelError(f"{bids_dir}: no T1w scans found (sub-*/[ses-*/]anat/*_T1w.nii[.gz])")
    bundle.model.to(place.device)
    overlap = place.device.type != "cpu" if overlap is None else overlap
    set_threads(threads)
    pre = preprocess(bundle.cfg.data, keys=("image",))
    jobs = []
    for scan in scans:
        extra = {
            "bids": {
                "participant_id": f"sub-{scan.subject}",
                "session_id": f"ses-{scan.session}" if scan.session else None,
                "source": scan.path.relative_to(bids_dir).as_posix(),
                "entities": dict(scan.entities),
            }
        }
        outputs = outputs_for(out_dir, scan)

        def sidecars(row, record, scan=scan, outputs=outputs) -> None:
            write_sidecars(scan, bids_dir, outputs, record, probabilities)

        jobs.append(Job(scan.path, outputs, extra, sidecars))
    outcomes = run_batch(
        bundle,
        pre,
        jobs,
        overlap=overlap,
        probabilities=probabilities,
        skull_strip=skull_strip,
        extractor=extractor,
        reference=bundle.info.get("qc_reference"),
        progress=progress,
        desc="participant",
        tta=tta,
    )
    for scan, outcome in zip(scans, outcomes, strict=True):
        if isinstance(outcome, LowlabelError):
            result.errors.append(str(outcome))
        else:
            result.done.append(scan)
    if result.done:  # nothing at the top of the folder when no scan could be segmented
        write_json(out_dir / "dataset_description.json", dataset_description(bids_dir, bundle))
        write_text(out_dir / "dseg.tsv", dseg_tsv())
        write_json(out_dir / "dseg.json", {"Description": DSEG_DESCRIPTION})
        write_text(out_dir / ".bidsignore", BIDSIGNORE)
        write_text(out_dir / "README.md", README)
        result.qc_html = write_page(out_dir, f"lowlabel QC: {bids_dir.name}", model_line(bundle))
    return result


def group(bids_dir: str | Path, out_dir: str | Path) -> BidsResult:
    """The group level: ``volumes.tsv`` (one row per scan) and ``qc.html`` over all scans.

    Raises:
        LowlabelError: the participant level has not written anything into ``out_dir``.
    """
    from lowlabel.qc import load_records, write_page

    bids_dir, out_dir = Path(bids_dir), Path(out_dir)
    _check_dirs(bids_dir, out_dir)
    records = [r for r in load_records(out_dir) if "bids" in r]
    if not records:
        raise LowlabelError(
            f"{out_dir}: no participant-level results; run the participant level first"
        )
    records.sort(
        key=lambda r: (r["bids"]["participant_id"], r["bids"]["session_id"] or "", r["key"])
    )
    sessions = any(r["bids"]["session_id"] for r in records)
    columns = [c for c in VOLUME_FIELDS if sessions or c != "session_id"]
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for r in records:
        v = r["volumes_ml"]
        values = {
            "participant_id": r["bids"]["participant_id"],
            "session_id": r["bids"]["session_id"] or "n/a",
            "source": r["bids"]["source"],
            "csf_ml": f"{v['CSF']:.1f}",
            "gm_ml": f"{v['GM']:.1f}",
            "wm_ml": f"{v['WM']:.1f}",
            "brain_ml": f"{v['brain']:.1f}",
            "qc_flags": ",".join(sorted({f["code"] for f in r["flags"]})) or "n/a",
        }
        writer.writerow([values[c] for c in columns])
    result = BidsResult(out_dir=out_dir, volumes_tsv=out_dir / "volumes.tsv")
    write_text(result.volumes_tsv, buf.getvalue())
    write_json(
        out_dir / "volumes.json",
        {c: {"Description": VOLUME_FIELDS[c]} for c in columns},
    )
    description = json.loads((out_dir / "dataset_description.json").read_text())
    generated = (description.get("GeneratedBy") or [{}])[0].get("Description", "")
    result.qc_html = write_page(out_dir, f"lowlabel QC: {bids_dir.name}", generated)
    return result
