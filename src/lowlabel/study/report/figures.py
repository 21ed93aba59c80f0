"""The report's figures: learning curves, pretraining curves, Dice against labels, and the
segmentation overlays that evaluation wrote (``overlay.npz``; no network runs here)."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from lowlabel.atomic import atomic_path
from lowlabel.errors import LowlabelError
from lowlabel.run_folder import OVERLAY
from lowlabel.study.report.runs import PRETRAIN_COLUMNS, Run
from lowlabel.study.report.tables import table_cells
from lowlabel.study.stats import MIN_SEEDS, summarize

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return path


def learning_curves(plan: dict, runs: list[Run], name: str, path: Path) -> Path | None:
    """Training loss and validation Dice per cell; dot = best step, triangle = learning rate
    divided by 10 (plateau schedule), cross = early stop."""
    groups = table_cells(plan, runs, name)
    if not any(r.metrics for _, g in groups for r in g):
        return None
    plt = _plt()
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 3.8))
    colours = plt.get_cmap("tab10")
    dropped = False  # any learning-rate drop (plateau schedule) to name in the title
    for i, (labels, group) in enumerate(groups):
        colour = colours(i % 10)
        for j, run in enumerate(group):
            if not run.metrics:
                continue
            steps = [r["step"] for r in run.metrics]
            alpha = 1.0 if j == 0 else 0.45
            label = ", ".join(labels.values()) if j == 0 else None
            ax_loss.plot(
                steps,
                [r["train_loss"] for r in run.metrics],
                color=colour,
                alpha=alpha,
                label=label,
            )
            ax_dice.plot(steps, [r["val_dice"] for r in run.metrics], color=colour, alpha=alpha)
            if run.result:
                best = run.result.get("best_step")
                at = [r["val_dice"] for r in run.metrics if r["step"] == best]
                if at:
                    ax_dice.plot([best], at, "o", color=colour, alpha=alpha, ms=4)
                drops = [r for r in run.metrics if r.get("lr_drop")]  # plateau schedule
                if drops:
                    dropped = True
                    ax_dice.plot(
                        [r["step"] for r in drops],
                        [r["val_dice"] for r in drops],
                        "v",
                        color=colour,
                        alpha=alpha,
                        ms=5,
                    )
                if run.result.get("stopped_early"):
                    ax_dice.plot(
                        [steps[-1]],
                        [run.metrics[-1]["val_dice"]],
                        "x",
                        color=colour,
                        alpha=alpha,
                        ms=8,
                        mew=2,
                    )
    ax_loss.set(xlabel="step", ylabel="training loss (Dice + CE)", title="Training loss")
    ax_dice.set(
        xlabel="step",
        ylabel="validation mean Dice",
        title="Validation Dice (o best, v rate / 10, x early stop)"
        if dropped
        else "Validation Dice (o best, x early stop)",
    )
    ax_loss.legend(fontsize=7, loc="upper right")
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def pretrain_curves(runs: list[Run], path: Path) -> Path | None:
    pre = [r for r in runs if r.kind == "pretrain" and r.metrics]
    if not pre:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    colours = plt.get_cmap("tab10")
    methods = sorted({r.config.get("pretrain", {}).get("method", "?") for r in pre})
    for run in sorted(pre, key=lambda r: r.seed):
        method = run.config.get("pretrain", {}).get("method", "?")
        colour = colours(methods.index(method) % 10)
        steps = [r["step"] for r in run.metrics]
        for ax, key in zip(axes, PRETRAIN_COLUMNS, strict=True):
            ax.plot(
                steps,
                [r.get(key, float("nan")) for r in run.metrics],
                color=colour,
                alpha=1.0 if run.seed == pre[0].seed else 0.45,
                label=method if run.seed == min(p.seed for p in pre) else None,
            )
    for ax, title in zip(axes, PRETRAIN_COLUMNS.values(), strict=True):
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def dice_series(
    plan: dict, runs: list[Run], name: str
) -> tuple[dict[str, dict[int, list[float]]], dict[int, str]]:
    """The lines of :func:`dice_vs_labels`: one per step budget and row of the table's other
    axes (named as in the table, with the step budget where it tells lines apart), each
    ``{labelled subjects: [test mean Dice per seed]}``; and the x tick labels, the table's
    budget names (``all (10)``)."""
    axes = plan["tables"][name].get("axes") or []
    by_key: dict[tuple[str, int], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    ticks: dict[int, str] = {}
    for labels, group in table_cells(plan, runs, name):
        for run in group:
            if run.result is None or not run.result.get("test"):
                continue
            n = int(run.result["n_labelled"])
            steps = int(run.config.get("train", {}).get("steps", 0))
            others = ", ".join(labels[a] for a in axes if a != "budget")
            by_key[(others, steps)][n].append(run.value("mean_dice"))
            level = labels.get("budget", str(n))
            ticks[n] = level if level == str(n) else f"{level} ({n})"
    budgets = {steps for _, steps in by_key}
    series = {}
    for (others, steps), line in sorted(by_key.items()):
        words = [others] if others else []
        if len(budgets) > 1 or not others:
            words.append(f"{steps} steps")
        series[", ".join(words)] = {n: line[n] for n in sorted(line)}
    return series, ticks


def dice_vs_labels(plan: dict, runs: list[Run], name: str, path: Path) -> Path | None:
    """Test mean Dice against labelled subjects for one table's cells, one line per
    :func:`dice_series` line, so a line never mixes runs that differ in anything but labels;
    mean and 95% CI over seeds (from three seeds), grey dots the seeds."""
    series, ticks = dice_series(plan, runs, name)
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    seeds = max(len(v) for line in series.values() for v in line.values())
    for label, line in series.items():
        ns = list(line)
        s = [summarize(line[n], bounds=(0.0, 1.0)) for n in ns]
        lo = [x.mean - x.ci_low if x.n >= MIN_SEEDS else 0 for x in s]
        hi = [x.ci_high - x.mean if x.n >= MIN_SEEDS else 0 for x in s]
        ax.errorbar(ns, [x.mean for x in s], yerr=[lo, hi], marker="o", capsize=3, label=label)
        if seeds > 1:
            for n in ns:
                ax.plot([n] * len(line[n]), line[n], ".", color="grey", alpha=0.6)
    spread = "one run per point (one seed)" if seeds <= 1 else "mean, 95% CI over seeds"
    ax.set(
        xlabel="labelled training subjects (table's budget)",
        ylabel=f"test mean Dice ({spread})",
        title=f"Table {name}: test mean Dice against labelled subjects",
    )
    ax.set_xticks(sorted(ticks), [ticks[n] for n in sorted(ticks)])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=f"table {name}", title_fontsize=7)
    return _save(fig, path)


def overlay_slice(run: Run) -> dict | None:
    """Image, truth and prediction on axial slices of the run's first test subject, as its
    evaluation wrote them (``overlay.npz``, plain arrays), each ``(S, X, Y)``; None for a run
    without one. An older file with one ``(X, Y)`` slice reads as ``S = 1``."""
    path = run.folder / OVERLAY
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        out = {k: data[k] for k in data.files}
    for key in ("image", "label", "pred"):
        if out[key].ndim == 2:
            out[key] = out[key][None]
    return out


TISSUES = (("CSF", (0.2, 0.5, 1.0)), ("GM", (0.2, 0.85, 0.3)), ("WM", (1.0, 0.85, 0.1)))
"""Label 1, 2, 3: name and colour, in the report's order."""


def overlays(plan: dict, runs: list[Run], name: str, path: Path) -> Path | None:
    """Test-slice segmentations of a table's cells (first seed): one column per axial slice,
    one row each for the image, the reference and each cell's prediction (reference and
    predictions drawn alike), wrapped into two blocks side by side for more than six rows."""
    shown = []
    for labels, group in table_cells(plan, runs, name):
        done = [r for r in group if r.result is not None and r.folder is not None]
        if done:
            try:
                data = overlay_slice(done[0])
            except (LowlabelError, OSError, ValueError) as err:
                log.warning("no overlay for %s: %s", done[0].folder, err)
                data = None
            if data is not None:
                shown.append((", ".join(labels.values()), done[0], data))
    if not shown:
        return None
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    cmap = ListedColormap([(0, 0, 0, 0)] + [(*c, 0.55) for _, c in TISSUES])
    first = shown[0][2]
    n_slices = min(d["image"].shape[0] for _, _, d in shown)
    panels = [("image", None, first), ("reference", "label", first)]
    panels += [
        (f"{label}\ntest Dice {run.value('mean_dice'):.3f}", "pred", data)
        for label, run, data in shown
    ]
    # one row per panel, one column per slice; many panels wrap into two side-by-side blocks,
    # so titles stay readable at the page's width
    blocks = 1 if len(panels) <= 6 else 2
    per_block = -(-len(panels) // blocks)
    fig, axes = plt.subplots(
        per_block,
        blocks * n_slices,
        figsize=(blocks * (1.6 * n_slices + 0.7), 1.9 * per_block + 1.1),
        squeeze=False,
    )
    for ax in axes.ravel():
        ax.set_axis_off()
    slices = first.get("slices")
    for p, (title, key, data) in enumerate(panels):
        block, row = divmod(p, per_block)
        for s in range(n_slices):
            ax = axes[row, block * n_slices + s]
            ax.imshow(np.rot90(data["image"][s]), cmap="gray")
            if key:
                ax.imshow(
                    np.rot90(data[key][s]), cmap=cmap, vmin=0, vmax=3, interpolation="nearest"
                )
            if s == 0:
                ax.text(
                    -0.06,
                    0.5,
                    title,
                    transform=ax.transAxes,
                    rotation=90,
                    ha="right",
                    va="center",
                    fontsize=8,
                )
            if row == 0:
                z = f"z = {int(slices[s])}" if slices is not None and s < len(slices) else ""
                ax.set_title(f"slice {s + 1}" + (f" ({z})" if z else ""), fontsize=8)
            for x, text in ((0.03, "L"), (0.97, "R")):
                ax.text(
                    x,
                    0.5,
                    text,
                    transform=ax.transAxes,
                    color="white",
                    fontsize=7,
                    ha="left" if text == "L" else "right",
                    va="center",
                    weight="bold",
                )
    fig.legend(
        handles=[Patch(color=c, label=n) for n, c in TISSUES],
        loc="lower center",
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    fig.suptitle(
        f"Test subject {first['subject']} (seed {shown[0][1].seed}), axial slices, "
        "neurological convention (seen from above: subject's right on the right), anterior up",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    return _save(fig, path)
