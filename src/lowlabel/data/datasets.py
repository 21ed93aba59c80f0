"""From a ``dataset.json`` or a folder to a checked list of subjects.

A subject is a dict ``{"id", "image", "label"[, "mask"]}`` of absolute paths. Unlabelled images
(a dataset's ``unlabeled``/``unlabelled`` list, or an ``unlabelled/`` folder) are returned apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowlabel.data.io import read_nifti, spacing_of
from lowlabel.errors import LowlabelError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Dataset:
    """The subjects of one data source.

    Attributes:
        source: the dataset.json or folder it came from.
        subjects: labelled subjects, sorted by id.
        unlabelled: paths of images without labels (for pretraining only).
    """

    source: str
    subjects: list[dict] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [s["id"] for s in self.subjects]

    def by_id(self, ids: list[str]) -> list[dict]:
        index = {s["id"]: s for s in self.subjects}
        return [index[i] for i in ids]


def _stem(path: str | Path) -> str:
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def subject_id(image: str) -> str:
    """A subject's id in a ``dataset.json``: its image's file name without the usual tails."""
    stem = _stem(image)
    for tail in ("_SS", "_T1w", "_T1", "_image", "_img", "_0000"):
        if stem.endswith(tail) and len(stem) > len(tail):
            return stem[: -len(tail)]
    return stem


def possible_ids(image: str) -> set[str]:
    """The ids the subject of ``image`` has in a ``dataset.json`` or in a folder dataset."""
    return {subject_id(image), _stem(image)}


def _from_json(path: Path) -> Dataset:
    from monai.data import load_decathlon_datalist

    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LowlabelError(f"{path}: not valid JSON ({err}); fix the file") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("training"), list):
        raise LowlabelError(f"{path}: needs a 'training' list of {{image, label}} entries")
    for i, item in enumerate(raw["training"]):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise LowlabelError(f"{path}: training entry {i} needs both 'image' and 'label'")
    items = load_decathlon_datalist(
        str(path), is_segmentation=True, data_list_key="training", base_dir=str(path.parent)
    )
    subjects = []
    for item in items:
        subject = {"id": subject_id(item["image"]), "image": item["image"], "label": item["label"]}
        if isinstance(item.get("mask"), str):
            subject["mask"] = item["mask"]
        subjects.append(subject)
    unlabelled: list[str] = []
    for key in ("unlabeled", "unlabelled"):
        for entry in raw.get(key, []) or []:
            rel = entry["image"] if isinstance(entry, dict) else entry
            p = Path(rel)
            unlabelled.append(str(p if p.is_absolute() else (path.parent / p).resolve()))
    return Dataset(str(path), subjects, unlabelled)


def _niftis(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES))


def _from_folder(path: Path) -> Dataset:
    images_dir, labels_dir = path / "images", path / "labels"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise LowlabelError(
            f"{path}: a dataset folder needs images/ and labels/ subfolders (matched by name), "
            "or give a dataset.json"
        )
    labels = {_stem(p): p for p in _niftis(labels_dir)}
    subjects = []
    for image in _niftis(images_dir):
        stem = _stem(image)
        label = labels.get(stem)
        if label is None:
            raise LowlabelError(
                f"{image}: no label with the same name in {labels_dir}; add it, or move the "
                f"image to {path / 'unlabelled'} to use it for pretraining only"
            )
        subjects.append({"id": stem, "image": str(image.resolve()), "label": str(label.resolve())})
    unlabelled = []
    for name in ("unlabelled", "unlabeled"):
        if (path / name).is_dir():
            unlabelled += [str(p.resolve()) for p in _niftis(path / name)]
    return Dataset(str(path), subjects, unlabelled)


def load_dataset(source: str | Path) -> Dataset:
    """Read a dataset.json or an ``images/`` + ``labels/`` folder.

    Raises:
        LowlabelError: the source is missing, malformed, empty, or has duplicate subject ids.
    """
    path = Path(source)
    if not path.exists():
        raise LowlabelError(f"{path}: dataset not found; give a dataset.json or a folder")
    ds = _from_json(path) if path.is_file() else _from_folder(path)
    if not ds.subjects:
        raise LowlabelError(f"{path}: no labelled subjects found")
    ids = [s["id"] for s in ds.subjects]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise LowlabelError(
            f"{path}: subject ids {dupes} appear twice; give each scan its own name"
        )
    return Dataset(ds.source, sorted(ds.subjects, key=lambda s: s["id"]), ds.unlabelled)


def remap_labels(label: np.ndarray, label_map: dict[int, int] | None, path: str) -> np.ndarray:
    """Map dataset label values onto 0..3 and check that nothing falls outside the scheme."""
    if label_map:
        out = np.zeros_like(label)
        known = np.zeros(label.shape, bool)
        for src, dst in label_map.items():
            hit = label == src
            out[hit] = dst
            known |= hit
        if not known.all():
            extra = sorted(int(v) for v in np.unique(label[~known]))[:8]
            raise LowlabelError(
                f"{path}: label values {extra} are not in data.label_map; add them to the map"
            )
        label = out
    values = np.unique(label)
    bad = [int(v) for v in values if v not in (0, 1, 2, 3)]
    if bad:
        raise LowlabelError(
            f"{path}: label values {bad[:8]} are outside 0 background, 1 CSF, 2 GM, 3 WM; "
            "set data.label_map to remap them"
        )
    if len(values) == 1 and values[0] == 0:
        raise LowlabelError(f"{path}: label map is empty (all background); check the file")
    return label


def check_same_grid(
    path: str | Path,
    shape: tuple[int, ...],
    affine: np.ndarray,
    image: str | Path,
    image_shape: tuple[int, ...],
    image_affine: np.ndarray,
) -> None:
    """The one image/label grid check: the file at ``path`` must share ``image``'s grid.

    Raises:
        LowlabelError: naming ``path``, when its shape or affine differ.
    """
    if shape != image_shape:
        raise LowlabelError(
            f"{path}: shape {shape} differs from its image {image} {image_shape}; "
            "resample it onto the image grid (nearest-neighbour for a label)"
        )
    if not np.allclose(affine, image_affine, atol=1e-3):
        raise LowlabelError(
            f"{path}: affine differs from its image {image}; the label must share the image "
            "grid (resample it, nearest-neighbour)"
        )


def check_pair(subject: dict, label_map: dict[int, int] | None = None) -> dict:
    """Read a subject's image and label, check they agree, and summarise them.

    Raises:
        LowlabelError: unreadable files, shape or affine mismatch, bad label values, NaN/Inf.
    """
    image, affine = read_nifti(subject["image"], kind="image")
    label, label_affine = read_nifti(subject["label"], kind="label")
    check_same_grid(
        subject["label"], label.shape, label_affine, subject["image"], image.shape, affine
    )
    label = remap_labels(label, label_map, subject["label"])
    counts = np.bincount(label.ravel().astype(np.int64), minlength=4)[:4]
    return {
        "id": subject["id"],
        "shape": list(image.shape),
        "spacing": [round(v, 3) for v in spacing_of(affine)],
        "dtype": str(image.dtype),
        "label_counts": [int(c) for c in counts],
    }


def check_dataset(source: str | Path, label_map: dict[int, int] | None = None) -> dict:
    """Validate every subject of a dataset and return a summary (``lowlabel data check``).

    Problems are collected, not raised, so a user sees all of them at once.
    """
    ds = load_dataset(source)
    rows, problems = [], []
    for subject in ds.subjects:
        try:
            rows.append(check_pair(subject, label_map))
        except LowlabelError as err:
            problems.append(str(err))
    for path in ds.unlabelled:
        try:
            read_nifti(path)
        except LowlabelError as err:
            problems.append(str(err))
    return {
        "source": ds.source,
        "subjects": rows,
        "unlabelled": len(ds.unlabelled),
        "problems": problems,
    }


# file names (before .nii[.gz]) of label maps and masks, never pool images in a plain folder
NOT_IMAGES = (
    "_seg",
    "_dseg",
    "_probseg",
    "_label",
    "_labels",
    "_mask",
    "_brainmask",
    "_tissues",
    "_classified",
)


def _folder_images(path: Path) -> list[str]:
    """The images of a folder source: ``images/`` (or nnU-Net's ``imagesTr/`` and ``imagesTs/``,
    first channel ``*_0000`` only) and ``unlabelled/``; else the NIfTI files in the folder itself,
    except those named like label maps or masks (:data:`NOT_IMAGES`)."""
    nnunet = [path / name for name in ("imagesTr", "imagesTs") if (path / name).is_dir()]
    if nnunet:
        return [str(p.resolve()) for f in nnunet for p in _niftis(f) if _stem(p).endswith("_0000")]
    folders = [path / name for name in ("images", "unlabelled", "unlabeled")]
    folders = [f for f in folders if f.is_dir()]
    if folders:
        return [str(p.resolve()) for f in folders for p in _niftis(f)]
    return [str(p.resolve()) for p in _niftis(path) if not _stem(p).lower().endswith(NOT_IMAGES)]


def source_images(source: str | Path) -> list[str]:
    """Every image of one source of unlabelled scans, as resolved absolute paths (labels ignored).

    A source is a ``dataset.json`` (its ``training`` images and its unlabelled list; an nnU-Net
    ``dataset.json`` stands for its folder), a folder (with ``images/``, nnU-Net's
    ``imagesTr/``, an ``unlabelled/`` folder, or NIfTI files directly inside it, label maps and
    masks by name left out) or a single NIfTI file.

    Raises:
        LowlabelError: the source does not exist, is not one of those, or holds no image.
    """
    path = Path(source)
    fix = "give a dataset.json, a folder of NIfTI files (or with images/) or a .nii.gz file"
    if not path.exists():
        raise LowlabelError(f"{path}: unlabelled source not found; {fix}")
    if path.is_file() and path.name.endswith(NIFTI_SUFFIXES):
        images = [str(path.resolve())]
    elif path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise LowlabelError(f"{path}: not a NIfTI file nor valid JSON; {fix}") from None
        if not isinstance(raw, dict):
            raise LowlabelError(f"{path}: not a dataset.json (no 'training' list); {fix}")
        images = []
        if "training" not in raw and (path.parent / "imagesTr").is_dir():
            images = _folder_images(path.parent)  # nnU-Net v2: the folder lists the images
        for key in ("training", "unlabeled", "unlabelled"):
            entries = raw.get(key) or []
            if not isinstance(entries, list):
                raise LowlabelError(f"{path}: '{key}' is not a list; fix the file")
            for entry in entries:
                rel = entry.get("image") if isinstance(entry, dict) else entry
                if not isinstance(rel, str):
                    raise LowlabelError(f"{path}: an entry of '{key}' names no image; fix it")
                p = Path(rel)
                images.append(str((p if p.is_absolute() else path.parent / p).resolve()))
    else:
        images = _folder_images(path)
    if not images:
        raise LowlabelError(f"{path}: no images in this unlabelled source; {fix}")
    return list(dict.fromkeys(images))
