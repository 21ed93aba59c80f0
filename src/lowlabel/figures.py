"""Figures for runs and reports (matplotlib, Agg backend: no display needed).

Plain functions that take arrays and write a PNG; they import matplotlib when called so the
CLI stays fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lowlabel.atomic import atomic_path

VIEWS = ("axial", "coronal", "sagittal")


def mid_slices(volume: np.ndarray) -> dict[str, np.ndarray]:
    """Axial, coronal and sagittal mid-slices of an ``(X, Y, Z)`` RAS volume, oriented for display
    (anterior or superior up)."""
    x, y, z = (s // 2 for s in volume.shape)
    return {
        "axial": np.rot90(volume[:, :, z]),
        "coronal": np.rot90(volume[:, y, :]),
        "sagittal": np.rot90(volume[x, :, :]),
    }


def reconstruction_figure(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    path: str | Path,
    title: str = "",
) -> Path:
    """One row per checkpoint: input, reconstruction and error for three mid-slices.

    Args:
        rows: ``(label, input, reconstruction, target)`` with ``(X, Y, Z)`` volumes on one grid;
            the error shown is ``reconstruction - target``.
        path: PNG to write (atomically).
        title: figure title.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(rows), 1)
    fig, axes = plt.subplots(n, 9, figsize=(18, 2.3 * n + 0.9), squeeze=False)
    err_image = None
    if rows:
        target = rows[0][3]
        lo, hi = np.percentile(target, [0.5, 99.5])
        err_max = max(float(np.percentile(np.abs(r[2] - r[3]), 99.5)) for r in rows) or 1.0
    for r, (label, x, recon, truth) in enumerate(rows):
        panels = {
            "input": mid_slices(x),
            "reconstruction": mid_slices(recon),
            "error": mid_slices(recon - truth),
        }
        for v, view in enumerate(VIEWS):
            for k, kind in enumerate(("input", "reconstruction", "error")):
                ax = axes[r, 3 * v + k]
                if kind == "error":
                    err_image = ax.imshow(
                        panels[kind][view], cmap="bwr", vmin=-err_max, vmax=err_max
                    )
                else:
                    ax.imshow(panels[kind][view], cmap="gray", vmin=lo, vmax=hi)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{view}\n{kind}", fontsize=13)
        axes[r, 0].set_ylabel(label, fontsize=13)
    if title:
        fig.suptitle(title, fontsize=15)
    fig.tight_layout(rect=(0, 0, 0.94, 1))
    if err_image is not None:
        bar = fig.colorbar(err_image, ax=axes.ravel().tolist(), fraction=0.015, pad=0.01)
        bar.set_label("error: reconstruction - target (intensity)", fontsize=12)
        bar.ax.tick_params(labelsize=11)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return Path(path)
