"""Quality control: per-scan numbers, warnings and snapshots, and one ``qc.html`` per output folder.

Each segmented scan gets a record in ``qc/<scan>.json`` and two PNGs (``qc/<scan>.png``: the scan
with the brain mask outline and with the segmentation overlaid, in three planes through the
brain; ``qc/<scan>_thumb.png``: the overlay row, small). ``qc.html`` lists every record in
``qc/``, flagged scans first. Warnings:

- ``skull``: the scan seems to have its skull and ``--skull-strip no`` was given;
- ``voxel_size``: voxels far from the model's training spacing;
- ``contrast``: tissue contrast unlike the training scans (another sequence, or an odd scan);
- ``volume``: a tissue volume outside the range of the training subjects (widened by half), or,
  for a bundle without that reference, a brain volume no adult has;
- ``unsure``: many brain voxels where the model's highest class probability is low;
- ``outside``: a share of the predicted tissue lay outside the brain region (where the scan is
  empty, or outside the extracted brain) and was cleared.

The record's ``outside_brain`` says which brain region was used (``signal``: the voxels of a
skull-stripped scan that are not background, holes filled; ``brain mask``: the extracted brain;
``none``: a scan with its skull segmented as given) and how many voxels of tissue were cleared
outside it.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from lowlabel.atomic import atomic_path, write_json, write_text
from lowlabel.data.io import TISSUES

log = logging.getLogger(__name__)

UNSURE_P = 0.6  # a voxel is unsure when its highest class probability is below this
UNSURE_FLAG = 0.2  # flag a scan when more than this fraction of its brain voxels are unsure
SPACING_RATIO = 1.5  # flag voxels this many times coarser or finer than the model's
VOLUME_MARGIN = 0.5  # widen the training subjects' volume range by this fraction each way
CONTRAST_RATIO = 0.5  # flag a tissue contrast under half (or over twice) the training one
OUTSIDE_FLAG = 0.01  # flag a scan when more than this share of its predicted tissue was cleared
BRAIN_ML = (500.0, 2100.0)  # GM + WM outside this is no adult brain (bundles without a reference)
COLOURS = {1: (0.23, 0.51, 0.96), 2: (0.96, 0.62, 0.04), 3: (0.06, 0.73, 0.51)}  # CSF GM WM


def tissue_z(data: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Median intensity per tissue in units of the scan's nonzero-voxel z-score (the model's own
    normalisation), so contrasts compare across scanners and scales."""
    nonzero = data[data != 0]
    mean, std = float(nonzero.mean()), float(nonzero.std()) or 1.0
    out = {}
    for value, tissue in enumerate(TISSUES, start=1):
        voxels = data[labels == value]
        out[tissue] = float((np.median(voxels) - mean) / std) if voxels.size else float("nan")
    return out


def training_reference(subjects: list[dict], label_map: dict | None) -> dict | None:
    """What the model saw in training, for QC: tissue volumes and contrasts of the labelled
    subjects (``image`` and ``label`` paths); None when they cannot be read."""
    from lowlabel.data.datasets import remap_labels
    from lowlabel.data.io import read_nifti
    from lowlabel.errors import LowlabelError

    volumes: dict[str, list[float]] = {t: [] for t in (*TISSUES, "brain")}
    contrasts: list[dict[str, float]] = []
    try:
        for subject in subjects:
            image, affine = read_nifti(subject["image"])
            label, _ = read_nifti(subject["label"], kind="label")
            label = remap_labels(label, label_map, subject["label"])
            voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
            counts = np.bincount(label.ravel().astype(np.int64), minlength=4)
            for value, tissue in enumerate(TISSUES, start=1):
                volumes[tissue].append(float(counts[value]) * voxel_ml)
            volumes["brain"].append(float(counts[2] + counts[3]) * voxel_ml)
            contrasts.append(tissue_z(image, label))
    except (LowlabelError, KeyError, OSError) as err:
        log.warning("QC reference left out of the bundle: %s", err)
        return None
    if not contrasts:
        return None
    return {
        "subjects": len(contrasts),
        "volume_ml": {k: [round(min(v), 1), round(max(v), 1)] for k, v in volumes.items()},
        "tissue_z": {t: round(float(np.mean([c[t] for c in contrasts])), 3) for t in TISSUES},
    }


def reference_for_run(split: dict, label_map: dict | None) -> dict | None:
    """:func:`training_reference` of a run's labelled subjects (its ``splits.json``)."""
    from lowlabel.data.datasets import load_dataset
    from lowlabel.errors import LowlabelError

    if not split.get("source") or not split.get("train"):
        return None
    try:
        subjects = load_dataset(split["source"]).by_id(split["train"])
    except (LowlabelError, KeyError) as err:
        log.warning("QC reference left out of the bundle: %s", err)
        return None
    return training_reference(subjects, label_map)


def _flag(code: str, message: str) -> dict:
    return {"code": code, "message": message}


def outside_brain(region: str, cleared: int, voxel_ml: float) -> dict:
    """The QC record's ``outside_brain``: the brain region used (``signal``, ``brain mask`` or
    ``none``) and the voxels (and mL) of predicted tissue cleared outside it."""
    return {
        "region": region,
        "cleared_voxels": int(cleared),
        "cleared_ml": round(cleared * voxel_ml, 3),
    }


def assess(
    data: np.ndarray,
    affine: np.ndarray,
    labels: np.ndarray,
    top_prob: np.ndarray,
    row: dict,
    *,
    decision,
    model_spacing: tuple[float, ...],
    reference: dict | None,
    outside: dict | None = None,
) -> dict:
    """The QC numbers and warnings of one segmented scan.

    Args:
        data: ``(X, Y, Z)`` the scan as segmented (after brain extraction, if any).
        labels: ``(X, Y, Z)`` the label map on the same grid.
        top_prob: ``(X, Y, Z)`` the highest class probability per voxel.
        row: the scan's volumes (``csf_ml``, ``gm_ml``, ``wm_ml``, ``total_brain_ml``).
        decision: the :class:`lowlabel.skullstrip.Decision` taken for it.
        model_spacing: the model's voxel size (mm).
        reference: the bundle's ``qc_reference``, or None for an older bundle.
        outside: :func:`outside_brain` of the scan, recorded as ``outside_brain``.
    """
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    brain = labels > 0
    unsure = float((top_prob[brain] < UNSURE_P).mean()) if brain.any() else 1.0
    contrast = tissue_z(data, labels)
    volumes = {"CSF": row["csf_ml"], "GM": row["gm_ml"], "WM": row["wm_ml"]}
    volumes["brain"] = row["total_brain_ml"]
    flags = []
    out_of_range: list[str] = []
    if decision.unstripped and not decision.stripped:
        flags.append(
            _flag(
                "skull",
                f"seems to have its skull ({decision.head_ml:,.0f} mL of tissue) but was "
                "segmented as given; rerun with --skull-strip auto",
            )
        )
    ratio = zooms / np.asarray(model_spacing, dtype=float)
    if (ratio > SPACING_RATIO).any() or (ratio < 1 / SPACING_RATIO).any():
        flags.append(
            _flag(
                "voxel_size",
                f"voxels of {'x'.join(f'{z:g}' for z in np.round(zooms, 2))} mm, the model was "
                f"trained at {'x'.join(f'{s:g}' for s in model_spacing)} mm; check boundaries",
            )
        )
    if reference:
        ref_z = reference["tissue_z"]
        for low, high in (("GM", "WM"), ("CSF", "GM")):
            seen, want = contrast[high] - contrast[low], ref_z[high] - ref_z[low]
            if not np.isfinite(seen) or want == 0:
                continue
            r = seen / want
            if r < CONTRAST_RATIO or r > 1 / CONTRAST_RATIO:
                flags.append(
                    _flag(
                        "contrast",
                        f"{low}-{high} contrast {seen:.2f} SD, training scans {want:.2f} SD: "
                        "not the kind of T1 the model knows",
                    )
                )
                break
        for tissue, (lo, hi) in reference["volume_ml"].items():
            span = hi - lo
            lo_ok = lo - VOLUME_MARGIN * max(span, lo)
            hi_ok = hi + VOLUME_MARGIN * max(span, hi)
            if not lo_ok <= volumes[tissue] <= hi_ok:
                out_of_range.append(tissue)
                flags.append(
                    _flag(
                        "volume",
                        f"{tissue} {volumes[tissue]:,.0f} mL, outside what the model saw in "
                        f"training ({lo:,.0f}-{hi:,.0f} mL)",
                    )
                )
    elif not BRAIN_ML[0] <= volumes["brain"] <= BRAIN_ML[1]:  # a bundle without a reference
        out_of_range.append("brain")
        flags.append(
            _flag(
                "volume",
                f"brain (GM + WM) {volumes['brain']:,.0f} mL, outside "
                f"{BRAIN_ML[0]:,.0f}-{BRAIN_ML[1]:,.0f} mL",
            )
        )
    if unsure > UNSURE_FLAG:
        flags.append(
            _flag(
                "unsure",
                f"the model is unsure (top probability < {UNSURE_P:g}) in "
                f"{100 * unsure:.0f}% of brain voxels",
            )
        )
    if outside is not None and outside["cleared_ml"] > 0:
        total = outside["cleared_ml"] + row["csf_ml"] + row["total_brain_ml"]
        share = outside["cleared_ml"] / total
        if share > OUTSIDE_FLAG:
            where = (
                "outside the extracted brain"
                if outside["region"] == "brain mask"
                else ("where the scan is empty")
            )
            flags.append(
                _flag(
                    "outside",
                    f"{outside['cleared_ml']:,.1f} mL labelled as tissue {where} was cleared "
                    f"({100 * share:.0f}% of the tissue): check the segmentation at the brain's "
                    "edge",
                )
            )
    record = {
        "scan": row["scan"],
        "volumes_ml": {k: round(v, 1) for k, v in volumes.items()},
        "unsure_fraction": round(unsure, 4),
        "voxel_mm": [round(float(z), 3) for z in zooms],
        "tissue_z": {k: round(v, 3) for k, v in contrast.items()},
        "skull_strip": decision.summary,
        "head_ml": round(decision.head_ml, 1),
        "flags": flags,
        "out_of_range": out_of_range,
    }
    if outside is not None:
        record["outside_brain"] = outside
    return record


def _ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The volume with its axes in R, A, S order (flips and permutations only) and the voxel
    sizes along them."""
    ornt = nib.orientations.io_orientation(affine)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    ras_zooms = np.empty(3)
    ras_zooms[ornt[:, 0].astype(int)] = zooms
    return nib.orientations.apply_orientation(volume, ornt), ras_zooms


def snapshot(
    data: np.ndarray,
    affine: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray | None,
    outputs,
) -> dict:
    """Write ``<key>.png`` (scan with mask outline above, segmentation overlaid below; sagittal,
    coronal, axial through the brain's centre) and ``<key>_thumb.png`` (the overlay row, small).

    Returns:
        The two paths relative to the output folder, as ``snapshot`` and ``thumbnail``.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.patches import Patch

    img, zooms = _ras(data, affine)
    seg, _ = _ras(labels, affine)
    brain_mask = _ras(mask, affine)[0] if mask is not None else None
    inside = seg > 0
    if not inside.any():
        inside = img != 0
    if not inside.any():  # an empty scan: show its middle
        inside = np.ones_like(img, dtype=bool)
    centre = [int(round(c.mean())) for c in np.nonzero(inside)]
    nonzero = img[img != 0]
    lo, hi = np.percentile(nonzero, [0.5, 99.5]) if nonzero.size else (0.0, 1.0)
    # crop to what there is to see (the head, or the brain), with a margin
    shown = inside | (img > lo + 0.05 * (hi - lo))
    box = []
    for axis in range(3):
        idx = np.nonzero(shown.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        margin = max(2, int(0.05 * img.shape[axis]))
        box.append(slice(max(0, idx[0] - margin), min(img.shape[axis], idx[-1] + margin + 1)))

    def planes(volume):
        # (2D slice shown with x to the right and y up, aspect = voxel height / width)
        x, y, z = centre
        return [
            (volume[x, box[1], box[2]], zooms[2] / zooms[1], "sagittal", "A", "P"),
            (volume[box[0], y, box[2]], zooms[2] / zooms[0], "coronal", "R", "L"),
            (volume[box[0], box[1], z], zooms[1] / zooms[0], "axial", "R", "L"),
        ]

    colours = np.zeros((4, 4))
    for value, rgb in COLOURS.items():
        colours[value] = (*rgb, 0.45)

    def draw(axes, overlay: bool, small: bool) -> None:
        seg_planes = planes(seg)
        mask_planes = planes(brain_mask) if brain_mask is not None else [None] * 3
        for ax, (sl, aspect, name, right, left), (sp, *_), mp in zip(
            axes, planes(img), seg_planes, mask_planes, strict=True
        ):
            ax.imshow(sl.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect)
            if overlay:
                ax.imshow(colours[sp.T.astype(int)], origin="lower", aspect=aspect)
            elif mp is not None:
                ax.contour(mp[0].T, levels=[0.5], colors=["#ef4444"], linewidths=1.0)
            ax.set_axis_off()
            if not small:
                ax.set_title(name, fontsize=10)
                kw = {"transform": ax.transAxes, "color": "w", "fontsize": 9, "va": "bottom"}
                ax.text(0.98, 0.02, right, ha="right", **kw)
                ax.text(0.02, 0.02, left, ha="left", **kw)

    outputs.qc_dir.mkdir(parents=True, exist_ok=True)
    full = outputs.qc_dir / f"{outputs.key}.png"
    thumb = outputs.qc_dir / f"{outputs.key}_thumb.png"
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.4), facecolor="black")
    draw(axes[0], overlay=False, small=False)
    draw(axes[1], overlay=True, small=False)
    for ax in axes[0]:
        ax.title.set_color("w")
    for ax in axes[1]:
        ax.title.set_color("w")
    handles = [Patch(color=COLOURS[v], label=t) for v, t in enumerate(TISSUES, start=1)] + (
        [Patch(color="#ef4444", label="brain mask")] if mask is not None else []
    )
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=len(handles),
        frameon=False,
        labelcolor="w",
        fontsize=10,
    )
    fig.suptitle(outputs.key, color="w", fontsize=12)
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    with atomic_path(full) as tmp:
        fig.savefig(tmp, dpi=100, facecolor="black", format="png")
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(6, 2.1), facecolor="black")
    draw(axes, overlay=True, small=True)
    fig.subplots_adjust(0, 0, 1, 1, 0.02, 0)
    with atomic_path(thumb) as tmp:
        fig.savefig(tmp, dpi=60, facecolor="black", format="png")
    plt.close(fig)
    return {"snapshot": f"qc/{full.name}", "thumbnail": f"qc/{thumb.name}"}


def save_record(qc_dir: Path, key: str, record: dict) -> None:
    write_json(qc_dir / f"{key}.json", dict(record, key=key))


def load_records(out_dir: str | Path) -> list[dict]:
    """Every scan's QC record in ``out_dir/qc``, flagged ones first, then by name."""
    records = []
    for path in sorted((Path(out_dir) / "qc").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("%s: unreadable QC record, left off the page", path)
            continue
        if isinstance(record, dict) and "key" in record:
            records.append(record)
    return sorted(records, key=lambda r: (not r.get("flags"), r["key"]))


FLAG_NAMES = {
    "skull": "skull",
    "voxel_size": "voxel size",
    "contrast": "contrast",
    "volume": "volume",
    "unsure": "unsure",
    "outside": "outside brain",
}

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#111;background:#fafafa}
h1{font-size:1.35em;margin:0 0 .2em}.sub{color:#555;margin:0 0 1em}
.sum span{display:inline-block;margin-right:1.2em}.sum b{font-size:1.2em}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}
th,td{padding:4px 8px;border-bottom:1px solid #e5e5e5;text-align:left;vertical-align:middle}
th{background:#f0f0f0;cursor:pointer;user-select:none;position:sticky;top:0;white-space:nowrap}
th:after{content:" \\2195";color:#aaa}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.flagged{background:#fff7ed}td img{display:block;height:84px;border-radius:2px}
.chip{display:inline-block;padding:1px 6px;margin:1px;border-radius:9px;font-size:12px;
background:#fde68a;color:#78350f}.chip.skull,.chip.contrast{background:#fecaca;color:#7f1d1d}
.ok{color:#15803d}td.bad{color:#b91c1c;font-weight:600}.msg{font-size:12px;color:#444;max-width:28em}.scan{font-family:monospace}
input{margin:0 0 .8em;padding:3px 6px;width:20em}
.key span{display:inline-block;width:10px;height:10px;margin:0 3px 0 10px;border-radius:2px}
"""

_JS = """
const tb=document.querySelector('tbody');let dir={};
document.querySelectorAll('th').forEach((th,i)=>th.onclick=()=>{
 const rows=[...tb.rows],num=th.dataset.num!==undefined,d=dir[i]=-(dir[i]||-1);
 rows.sort((a,b)=>{let x=a.cells[i].dataset.v??a.cells[i].innerText,
  y=b.cells[i].dataset.v??b.cells[i].innerText;
  if(num){x=parseFloat(x);y=parseFloat(y)}return (x>y?1:x<y?-1:0)*d});
 rows.forEach(r=>tb.appendChild(r))});
document.querySelector('input').oninput=e=>{const q=e.target.value.toLowerCase();
 [...tb.rows].forEach(r=>r.style.display=r.innerText.toLowerCase().includes(q)?'':'none')};
"""


def write_page(out_dir: str | Path, title: str, model: str = "") -> Path:
    """Write ``qc.html``: every QC record in the folder, sortable, flagged scans first."""
    out_dir = Path(out_dir)
    records = load_records(out_dir)
    flagged = [r for r in records if r.get("flags")]
    counts: dict[str, int] = {}
    for r in flagged:
        for code in {f["code"] for f in r["flags"]}:
            counts[code] = counts.get(code, 0) + 1
    rows = []
    for r in records:
        v = r["volumes_ml"]
        codes: dict[str, list[str]] = {}
        for f in r["flags"]:
            codes.setdefault(f["code"], []).append(f["message"])
        chips = "".join(
            f'<span class="chip {code}" title="{html.escape("; ".join(messages))}">'
            f"{FLAG_NAMES.get(code, code)}{f' x{len(messages)}' if len(messages) > 1 else ''}"
            "</span>"
            for code, messages in codes.items()
        )
        bad = set(r.get("out_of_range", []))
        messages = "<br>".join(html.escape(f["message"]) for f in r["flags"])
        cells = [
            f'<td data-v="{r["key"]}"><a href="{html.escape(r["snapshot"])}">'
            f'<img src="{html.escape(r["thumbnail"])}" alt="{html.escape(r["key"])}" '
            'loading="lazy"></a></td>',
            f'<td class="scan" title="{html.escape(r["scan"])}">{html.escape(r["key"])}</td>',
            f'<td data-v="{len(r["flags"])}">{chips or "<span class=ok>ok</span>"}'
            f'<div class="msg">{messages}</div></td>',
            *(
                f'<td class="n{" bad" if k in bad else ""}">{v[k]:,.1f}</td>'
                for k in ("CSF", "GM", "WM", "brain")
            ),
            f'<td class="n{" bad" if "unsure" in codes else ""}" '
            f'data-v="{r["unsure_fraction"]}">{100 * r["unsure_fraction"]:.1f}%</td>',
            f'<td class="n{" bad" if "voxel_size" in codes else ""}" '
            f'data-v="{max(r["voxel_mm"])}">{"x".join(f"{z:g}" for z in r["voxel_mm"])}</td>',
            f"<td>{html.escape(r['skull_strip'])}</td>",
        ]
        cls = ' class="flagged"' if r["flags"] else ""
        rows.append(f"<tr{cls}>{''.join(cells)}</tr>")
    heads = [
        ("snapshot", False),
        ("scan", False),
        ("QC flags", True),
        ("CSF mL", True),
        ("GM mL", True),
        ("WM mL", True),
        ("brain mL", True),
        ("unsure", True),
        ("voxel mm", True),
        ("skull", False),
    ]
    thead = "".join(f"<th{' data-num' if num else ''}>{h}</th>" for h, num in heads)
    summary = (
        f"<span><b>{len(records)}</b> scans</span><span><b>{len(flagged)}</b> flagged</span>"
        + "".join(
            f"<span>{FLAG_NAMES.get(c, c)}: <b>{n}</b></span>" for c, n in sorted(counts.items())
        )
    )
    key = "".join(
        f'<span style="background:rgb{tuple(int(255 * c) for c in COLOURS[v])}"></span>{t}'
        for v, t in enumerate(TISSUES, start=1)
    )
    tables = [n for n in ("volumes.tsv", "volumes.csv") if (out_dir / n).is_file()]
    links = " ".join(f'<a href="{n}">{n}</a>' for n in tables)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="sub">{html.escape(model)} Click a snapshot for the full-size image; click a column to
sort. Brain = GM + WM. Unsure: brain voxels whose highest class probability is below
{UNSURE_P:g}.<span class="key">{key}</span></p>
<p class="sum">{summary}{f"<span>table: {links}</span>" if links else ""}</p>
<input placeholder="filter: scan name or flag" aria-label="filter">
<table><thead><tr>{thead}</tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table>
<script>{_JS}</script></body></html>
"""
    path = out_dir / "qc.html"
    write_text(path, page)
    return path
