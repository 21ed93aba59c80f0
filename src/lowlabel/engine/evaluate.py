"""Native-resolution evaluation on held-out subjects.

Class probabilities are taken back through the inverse of the preprocessing (MONAI ``Invertd``)
onto each scan's own grid, then argmax-ed, and compared there with the label as stored: no metric
is computed on resampled labels. As ``lowlabel segment`` does, no tissue is kept outside the
brain region of a skull-stripped scan (:func:`lowlabel.skullstrip.brain_region`).
"""

from __future__ import annotations

import csv
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from monai.metrics import compute_hausdorff_distance
from monai.transforms import Invertd
from torch import nn
from tqdm.auto import tqdm

from lowlabel.atomic import atomic_path, write_json, write_text
from lowlabel.config import RunConfig
from lowlabel.data.datasets import remap_labels
from lowlabel.data.io import TISSUES, read_nifti, spacing_of
from lowlabel.data.transforms import preprocess
from lowlabel.engine.inference import labels_of, plain, predict_logits
from lowlabel.errors import unwrap
from lowlabel.run_folder import EVALUATION, EVALUATION_CSV, OVERLAY
from lowlabel.skullstrip import brain_region, clear_outside

log = logging.getLogger(__name__)


def to_native(probs: torch.Tensor, image: MetaTensor, pre: Callable) -> torch.Tensor:
    """Resample ``(C, ...)`` probabilities from the preprocessed grid back to the scan's own grid.

    Args:
        probs: probabilities on the grid of ``image``.
        image: the preprocessed image, carrying its applied operations.
        pre: the very preprocessing instance that produced ``image``.
    """
    pred = MetaTensor(probs, meta=dict(image.meta))
    inverter = Invertd(
        "pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True
    )
    out = inverter({"pred": pred, "image": image})["pred"]
    return plain(out)


def segment_metrics(pred: torch.Tensor, truth: torch.Tensor, spacing: tuple[float, ...]) -> dict:
    """Dice, HD95 (mm) and absolute volume difference (mL) per tissue.

    Dice and volumes come from one count of (prediction, truth) label pairs; HD95 is MONAI's,
    tissue by tissue on boolean masks (a float one-hot of the scan would be 4x its size).

    Args:
        pred, truth: ``(X, Y, Z)`` integer label maps on the same grid, labels 0 to 3.
        spacing: voxel size in mm.
    """
    n = len(TISSUES) + 1
    pairs = pred.long().ravel() * n + truth.long().ravel()
    counts = torch.bincount(pairs, minlength=n * n).reshape(n, n).tolist()  # [pred][truth]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    row = {}
    for i, name in enumerate(TISSUES, start=1):
        key = name.lower()
        both, p, t = counts[i][i], sum(counts[i]), sum(c[i] for c in counts)
        row[f"dice_{key}"] = 2.0 * both / (p + t) if p + t else 1.0  # both empty: agreement
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # MONAI's own deprecated argument
            # a tissue missing from either map has no HD95 (nan); MONAI's warning would call
            # it "class 0", the only channel it is given
            warnings.filterwarnings("ignore", "the (prediction|ground truth) of class", UserWarning)
            hd = compute_hausdorff_distance(
                (pred == i)[None, None],
                (truth == i)[None, None],
                include_background=True,
                percentile=95,
                spacing=list(spacing),
            )
        row[f"hd95_{key}"] = float(hd[0, 0])
        row[f"vol_{key}_ml"] = p * voxel_ml
        row[f"true_vol_{key}_ml"] = t * voxel_ml
        row[f"avd_{key}_ml"] = abs(p - t) * voxel_ml
    row["mean_dice"] = float(np.mean([row[f"dice_{t.lower()}"] for t in TISSUES]))
    row["hd95_mean"] = float(np.nanmean([row[f"hd95_{t.lower()}"] for t in TISSUES]))
    return row


def evaluate(
    model: nn.Module,
    cfg: RunConfig,
    subjects: list[dict],
    out_dir: Path | None = None,
    progress: bool = True,
    tta: bool = False,
) -> dict:
    """Evaluate ``model`` (or an ensemble) on ``subjects`` at native resolution.

    Writes ``evaluation.csv`` (one row per subject) and ``evaluation.json`` (means and SDs) into
    ``out_dir`` when given. ``tta``: test-time augmentation by flips
    (:func:`lowlabel.engine.inference.predict_logits`). Tissue predicted outside the brain
    region of a skull-stripped scan is cleared, as ``lowlabel segment`` clears it; each row's
    ``outside_cleared_ml`` says how much.

    Returns:
        ``{"subjects": [rows], "summary": {metric: mean}}``.
    """
    pre = preprocess(cfg.data, keys=("image", "label"))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    rows = []
    for i, subject in enumerate(tqdm(subjects, desc="evaluate", disable=not progress, leave=False)):
        item = unwrap(pre, {"image": subject["image"], "label": subject["label"]})
        logits = predict_logits(model, item["image"], cfg, tta)
        if i == 0 and out_dir is not None:
            write_overlay(Path(out_dir) / OVERLAY, item, labels_of(plain(logits)), subject["id"])
        test_loss = float(loss_fn(logits[None], item["label"][None].as_tensor()))
        probs = torch.softmax(logits, 0)
        native = to_native(probs, item["image"], pre)
        pred = labels_of(native).numpy()
        label, affine = read_nifti(subject["label"], kind="label")
        label = torch.from_numpy(remap_labels(label, cfg.data.label_map, subject["label"]))
        region = brain_region(*read_nifti(subject["image"]))
        cleared = 0 if region is None else clear_outside(pred, region)
        row = {"id": subject["id"], "test_loss": test_loss}
        spacing = spacing_of(affine)
        row.update(segment_metrics(torch.from_numpy(pred), label, spacing))
        row["outside_cleared_ml"] = cleared * float(np.prod(spacing)) / 1000.0
        rows.append(row)
    summary = summarise(rows)
    if out_dir is not None:
        write_json(Path(out_dir) / EVALUATION, {"summary": summary, "subjects": rows})
        write_text(Path(out_dir) / EVALUATION_CSV, rows_to_csv(rows))
    return {"subjects": rows, "summary": summary}


OVERLAY_FRACTIONS = (0.35, 0.5, 0.65)
"""Where the overlay's axial slices lie, as fractions of the height (inferior to superior)."""


def write_overlay(path: Path, item: dict, pred: torch.Tensor, subject: str) -> None:
    """Three axial slices of a preprocessed (RAS) scan, its label and a prediction, as plain
    arrays (``overlay.npz``), so that a study report shows segmentations without running a
    network.

    Args:
        item: preprocessed ``image`` and ``label``, each ``(1, X, Y, Z)``.
        pred: ``(X, Y, Z)`` predicted labels on the same grid.

    The arrays are ``(S, X, Y)`` with ``slices`` (S,) their ``Z`` indices.
    """
    depth = item["image"].shape[-1]
    zs = sorted({min(depth - 1, int(f * depth)) for f in OVERLAY_FRACTIONS})
    arrays = {
        "image": np.stack([np.asarray(item["image"][0, :, :, z], dtype=np.float32) for z in zs]),
        "label": np.stack([np.asarray(item["label"][0, :, :, z], dtype=np.uint8) for z in zs]),
        "pred": np.stack([np.asarray(pred[:, :, z], dtype=np.uint8) for z in zs]),
        "slices": np.asarray(zs),
        "subject": np.asarray(subject),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def summarise(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k != "id"] if rows else []
    out = {"n": len(rows)}
    for key in keys:
        values = np.array([r[key] for r in rows], dtype=float)
        out[key] = float(np.nanmean(values))
        out[f"{key}_sd"] = float(np.nanstd(values, ddof=1)) if len(values) > 1 else 0.0
    return out


def rows_to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()
