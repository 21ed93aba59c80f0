"""A study's report from what its runs wrote: ``report.md``, a self-contained ``report.html``,
``runs.csv`` and ``figures/``.

Nothing here trains: the report reads ``plan.json`` and each run folder (``result.json``,
``metrics.jsonl``), so ``lowlabel report STUDY_DIR`` rebuilds it at any time, also from a study
that is only partly done. The only computation is one forward pass per shown segmentation overlay,
cached in the run folder.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowlabel.atomic import atomic_path, read_jsonl, write_text
from lowlabel.errors import LowlabelError
from lowlabel.run_folder import BEST, METRICS, RESULT, SPLITS
from lowlabel.study.stats import Difference, Summary, paired, summarize

log = logging.getLogger(__name__)

TRAIN_COLUMNS = {
    "test_loss": "Test loss",
    "mean_dice": "Mean Dice",
    "dice_csf": "Dice CSF",
    "dice_wm": "Dice WM",
    "dice_gm": "Dice GM",
    "steps": "Steps run",
    "best_step": "Best step",
}
PRETRAIN_COLUMNS = {"train_loss": "Train loss", "val_mse": "Val loss (MSE)", "val_mae": "Val MAE"}


@dataclass
class Run:
    """One run folder as the report sees it."""

    key: str
    kind: str
    seed: int
    labels: dict[str, dict[str, str]]
    folder: Path | None
    result: dict | None
    metrics: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.folder is None:
            return "waiting"
        if self.result is not None:
            return "finished"
        return "interrupted" if self.folder.exists() else "not started"

    def value(self, metric: str) -> float:
        """A table metric of a finished training run (NaN when absent)."""
        if self.result is None:
            return float("nan")
        if metric in ("steps", "best_step"):
            return float(self.result.get(metric, float("nan")))
        return float((self.result.get("test") or {}).get(metric, float("nan")))


def load_runs(study_dir: Path) -> tuple[dict, list[Run]]:
    """The plan and one :class:`Run` per distinct run folder.

    Raises:
        LowlabelError: the folder holds no study (no ``plan.json``).
    """
    plan_path = study_dir / "plan.json"
    if not plan_path.is_file():
        raise LowlabelError(f"{study_dir}: no plan.json; give a folder written by 'lowlabel study'")
    try:
        plan = json.loads(plan_path.read_text())
    except json.JSONDecodeError:
        raise LowlabelError(f"{plan_path}: damaged; rerun 'lowlabel study' to rewrite it") from None
    runs, seen = [], set()
    by_key = {c["key"]: c for c in plan["cells"]}
    for cell in plan["cells"]:
        if not cell.get("run_dir") and cell.get("needs"):
            cell = _resolved(cell, by_key.get(cell.get("pretrain_key")))
        folder = Path(cell["run_dir"]) if cell.get("run_dir") else None
        if folder is not None and not folder.is_absolute() and not folder.exists():
            folder = study_dir / "runs" / folder.name  # a moved study folder
        ident = str(folder) if folder else cell["key"]
        if ident in seen:
            continue
        seen.add(ident)
        result = None
        if folder is not None and (folder / RESULT).exists():
            try:
                result = json.loads((folder / RESULT).read_text())
            except json.JSONDecodeError:
                result = None
        metrics = read_jsonl(folder / METRICS) if folder else []
        runs.append(
            Run(
                cell["key"],
                cell["kind"],
                cell["seed"],
                cell["labels"],
                folder,
                result,
                metrics,
                cell["config"],
            )
        )
    return plan, runs


def _resolved(cell: dict, pre: dict | None) -> dict:
    """A transfer cell whose plan entry predates its pretraining run's end (an interrupted study):
    its folder follows from the checkpoint that run kept."""
    from lowlabel.config import from_dict, run_dir

    result = Path(pre["run_dir"]) / RESULT if pre and pre.get("run_dir") else None
    if result is None or not result.exists():
        return cell
    try:
        checkpoints = json.loads(result.read_text()).get("checkpoints") or {}
    except json.JSONDecodeError:
        return cell
    path = checkpoints.get(str(cell["needs"][1]))
    if path is None:
        return cell
    config = json.loads(json.dumps(cell["config"]))
    config["transfer"]["init_from"] = str(path)
    return {**cell, "config": config, "run_dir": str(run_dir(from_dict(config)))}


# ---------------------------------------------------------------------------------------------
# tables


@dataclass
class Table:
    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def _groups(plan: dict, runs: list[Run], table: str) -> list[tuple[dict[str, str], list[Run]]]:
    """The cells of a training table in axis order, each with its runs (one per seed)."""
    axes = plan["tables"][table].get("axes") or []
    out: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        if table in run.labels:
            out[tuple(run.labels[table].get(a, "") for a in axes)].append(run)
    order = [tuple(levels) for levels in _product([plan["axes"][a] for a in axes])]
    return [
        (dict(zip(axes, key, strict=True)), sorted(out[key], key=lambda r: r.seed))
        for key in order
        if key in out
    ]


def _product(lists: list[list[str]]) -> list[list[str]]:
    result: list[list[str]] = [[]]
    for items in lists:
        result = [r + [str(i)] for r in result for i in items]
    return result


def train_table(plan: dict, runs: list[Run], name: str) -> Table:
    spec = plan["tables"][name]
    axes = spec.get("axes") or []
    metrics = spec.get("metrics") or list(TRAIN_COLUMNS)
    header = (
        [a.capitalize() for a in axes]
        + [TRAIN_COLUMNS.get(m, m) for m in metrics]
        + ["Stopped early", "Seeds"]
    )
    rows = []
    for labels, group in _groups(plan, runs, name):
        done = [r for r in group if r.result is not None]
        digits = {"steps": 0, "best_step": 0}
        cells = [labels[a] for a in axes]
        for metric in metrics:
            cells.append(summarize(r.value(metric) for r in done).text(digits.get(metric, 3)))
        cells.append(f"{sum(bool(r.result.get('stopped_early')) for r in done)}/{len(done)}")
        cells.append(f"{len(done)}/{len(group)}")
        rows.append(cells)
    note = (
        "Each cell: mean ± SD [95% CI] over seeds (each seed also draws the labelled "
        "subjects); a single number when there is one seed or all seeds agree."
    )
    return Table(name, spec.get("title", name), header, rows, note)


def _pretrain_runs(runs: list[Run], plan: dict, name: str) -> list[Run]:
    return sorted(
        [r for r in runs if name in r.labels and r.kind == "pretrain"], key=lambda r: r.seed
    )


def _row_at(metrics: list[dict], step: int) -> dict | None:
    rows = [r for r in metrics if r.get("step", 0) <= step]
    return rows[-1] if rows and rows[-1].get("step") == step else (rows[-1] if rows else None)


def pretrain_table(plan: dict, runs: list[Run], name: str) -> Table:
    spec = plan["tables"][name]
    group = _pretrain_runs(runs, plan, name)
    header = ["Steps", *PRETRAIN_COLUMNS.values(), "Seeds"]
    rows = []
    for step in plan.get("steps", {}).get(name, []):
        found = [_row_at(r.metrics, step) for r in group]
        found = [f for f in found if f is not None and f.get("step") == step]
        cells = [str(step)]
        for key in PRETRAIN_COLUMNS:
            cells.append(summarize(float(f.get(key, float("nan"))) for f in found).text(4))
        cells.append(f"{len(found)}/{len(group)}")
        rows.append(cells)
    return Table(
        name,
        spec.get("title", name),
        header,
        rows,
        "Mean ± SD [95% CI] over seeds; validation on held-out validation subjects.",
    )


def comparisons(plan: dict, runs: list[Run]) -> list[Difference]:
    out = []
    for comp in plan.get("comparisons", []):
        table, metric = str(comp["table"]), comp.get("metric", "mean_dice")
        side = {}
        for key in ("a", "b"):
            want = {k: str(v) for k, v in comp[key].items()}
            side[key] = {
                str(r.seed): r.value(metric)
                for r in runs
                if table in r.labels
                and r.result is not None
                and all(r.labels[table].get(k) == v for k, v in want.items())
            }
        out.append(
            paired(comp.get("name", f"{comp['a']} vs {comp['b']}"), metric, side["a"], side["b"])
        )
    return out


# ---------------------------------------------------------------------------------------------
# figures


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
    """Training loss and validation Dice per cell; dot = best step, cross = early stop."""
    groups = _groups(plan, runs, name)
    if not any(r.metrics for _, g in groups for r in g):
        return None
    plt = _plt()
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 3.8))
    colours = plt.get_cmap("tab10")
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
        xlabel="step", ylabel="validation mean Dice", title="Validation Dice (o best, x early stop)"
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


def dice_vs_labels(runs: list[Run], path: Path) -> Path | None:
    """Mean test Dice against labelled subjects, one line per network (scratch runs)."""
    points: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run.kind != "train" or run.result is None or not run.result.get("test"):
            continue
        if run.config.get("transfer", {}).get("mode", "scratch") != "scratch":
            continue
        m, t = run.config["model"], run.config["train"]
        name = (
            f"{m['levels']}-level"
            + (f" res{m['num_res_units']}" if m["num_res_units"] else "")
            + f" p{t['patience']}"
            + (f" {t['steps']} steps" if t["steps"] else "")
        )
        points[name][int(run.result["n_labelled"])].append(run.value("mean_dice"))
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (name, by_n) in enumerate(sorted(points.items())):
        ns = sorted(by_n)
        shift = 0.06 * (i - (len(points) - 1) / 2)  # keep overlapping error bars apart
        s = [summarize(by_n[n]) for n in ns]
        lo = [x.mean - x.ci_low if x.n > 1 else 0 for x in s]
        hi = [x.ci_high - x.mean if x.n > 1 else 0 for x in s]
        ax.errorbar(
            [n + shift for n in ns],
            [x.mean for x in s],
            yerr=[lo, hi],
            marker="o",
            capsize=3,
            label=name,
        )
    ax.set(
        xlabel="labelled training subjects",
        ylabel="test mean Dice (95% CI over seeds)",
        title="Dice against the number of labelled subjects",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def overlay_slice(run: Run) -> dict | None:
    """Image, truth and prediction on the mid-axial slice of the run's first test subject,
    computed once and cached as ``overlay.npz`` (plain arrays) in the run folder."""
    cache = run.folder / "overlay.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    splits = run.folder / SPLITS
    if not splits.exists() or not (run.folder / BEST).exists():
        return None
    import torch

    from lowlabel.data.datasets import load_dataset
    from lowlabel.data.transforms import preprocess
    from lowlabel.engine.inference import predict_logits
    from lowlabel.engine.runs import load_run
    from lowlabel.errors import unwrap

    split = json.loads(splits.read_text())
    if not split.get("test"):
        return None
    cfg, model = load_run(run.folder)
    subject = load_dataset(split["source"]).by_id(split["test"][:1])[0]
    item = unwrap(preprocess(cfg.data), {"image": subject["image"], "label": subject["label"]})
    with torch.no_grad():
        pred = predict_logits(model, item["image"], cfg).argmax(0)
    z = item["image"].shape[-1] // 2
    out = {
        "image": np.asarray(item["image"][0, :, :, z], dtype=np.float32),
        "label": np.asarray(item["label"][0, :, :, z], dtype=np.uint8),
        "pred": np.asarray(pred[:, :, z], dtype=np.uint8),
        "subject": np.asarray(subject["id"]),
    }
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **out)
    return out


def overlays(plan: dict, runs: list[Run], name: str, path: Path) -> Path | None:
    """Test-slice segmentations of a table's cells (first seed): image, truth, prediction."""
    shown = []
    for labels, group in _groups(plan, runs, name):
        done = [r for r in group if r.result is not None and r.folder is not None]
        if done:
            try:
                data = overlay_slice(done[0])
            except (LowlabelError, OSError) as err:
                log.warning("no overlay for %s: %s", done[0].folder, err)
                data = None
            if data is not None:
                shown.append((", ".join(labels.values()), done[0], data))
    if not shown:
        return None
    plt = _plt()
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(
        [(0, 0, 0, 0), (0.2, 0.5, 1, 0.55), (0.2, 0.85, 0.3, 0.55), (1, 0.85, 0.1, 0.55)]
    )
    first = shown[0][2]
    panels = [("image", None, first), ("truth", "label", first)]
    panels += [
        (f"{label}\nDice {run.value('mean_dice'):.3f}", "pred", data) for label, run, data in shown
    ]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (title, key, data) in zip(axes.flat, panels, strict=False):
        ax.imshow(np.rot90(data["image"]), cmap="gray")
        if key:
            ax.imshow(np.rot90(data[key]), cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    fig.suptitle(
        f"Test subject {first['subject']} (seed {shown[0][1].seed}), mid-axial slice: "
        "CSF blue, GM green, WM yellow",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# markdown and html


def _md_table(table: Table) -> str:
    lines = ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return "\n".join(lines)


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _diff_rows(diffs: list[Difference]) -> Table:
    rows = [
        [d.name, d.metric, d.a.text(), d.b.text(), d.diff.text(), str(d.diff.n), d.verdict]
        for d in diffs
    ]
    return Table(
        "comparisons",
        "Paired differences (a - b, paired by seed)",
        ["Comparison", "Metric", "a", "b", "a - b", "Pairs", "Conclusion"],
        rows,
    )


def _fmt(summary: Summary) -> str:
    return summary.text()


def runs_csv(runs: list[Run]) -> str:
    """One row per distinct run (a run shared by two tables appears once)."""
    fields = [
        "key",
        "kind",
        "status",
        "seed",
        "tables",
        "run_dir",
        "n_labelled",
        "steps",
        "best_step",
        "stopped_early",
        "best_val_dice",
        "test_loss",
        "mean_dice",
        "dice_csf",
        "dice_gm",
        "dice_wm",
        "hd95_mean",
        "train_loss",
        "val_mse",
        "val_mae",
        "seconds",
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for run in runs:
        row = {
            "key": run.key,
            "kind": run.kind,
            "status": run.status,
            "seed": run.seed,
            "tables": ";".join(
                f"{t}:" + ",".join(f"{a}={v}" for a, v in lab.items())
                for t, lab in sorted(run.labels.items())
            ),
            "run_dir": str(run.folder) if run.folder else "",
        }
        res = run.result or {}
        for key in (
            "n_labelled",
            "steps",
            "best_step",
            "stopped_early",
            "best_val_dice",
            "train_loss",
            "val_mse",
            "val_mae",
        ):
            if key in res:
                row[key] = res[key]
        row["seconds"] = res.get("train_seconds", res.get("seconds", ""))
        for key in ("test_loss", "mean_dice", "dice_csf", "dice_gm", "dice_wm", "hd95_mean"):
            if key in (res.get("test") or {}):
                row[key] = res["test"][key]
        if run.kind == "pretrain" and run.metrics:
            last = run.metrics[-1]
            for key in PRETRAIN_COLUMNS:
                row.setdefault(key, last.get(key, ""))
        writer.writerow(row)
    return buf.getvalue()


def build_report(study_dir: str | Path, overlays_on: bool = True) -> Path:
    """Write ``report.md``, ``report.html``, ``runs.csv`` and ``figures/`` into ``study_dir``.

    Returns:
        The path of ``report.html``.

    Raises:
        LowlabelError: the folder holds no study.
    """
    study_dir = Path(study_dir)
    plan, runs = load_runs(study_dir)
    figures = study_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    write_text(study_dir / "runs.csv", runs_csv(runs))

    finished = sum(r.status == "finished" for r in runs)
    blocks: list[tuple[str, object]] = []  # ("h2"|"p"|"table"|"img", payload)
    blocks.append(("h1", f"Study {plan['study']} ({plan['profile']} profile)"))
    if plan.get("description"):
        blocks.append(("p", plan["description"]))
    blocks.append(
        (
            "p",
            f"{finished} of {len(runs)} runs finished; every run is listed once in "
            "runs.csv. Study file: study.yaml; expanded plan: plan.json.",
        )
    )
    pre_done = False
    for name, spec in plan["tables"].items():
        if "pretraining" in spec:
            blocks.append(("h2", spec.get("title", name)))
            blocks.append(("table", pretrain_table(plan, runs, name)))
            if not pre_done:
                path = pretrain_curves(runs, figures / "pretraining_curves.png")
                if path:
                    blocks.append(("img", (path, "Pretraining curves (all methods, all seeds)")))
                pre_done = True
            for run in _pretrain_runs(runs, plan, name)[:1]:
                fig = (run.result or {}).get("figure")
                if fig and Path(fig).exists():
                    blocks.append(
                        (
                            "img",
                            (
                                Path(fig),
                                f"Reconstructions at each saved step "
                                f"(seed {run.seed}): input, reconstruction, "
                                "error",
                            ),
                        )
                    )
            continue
        table = train_table(plan, runs, name)
        blocks.append(("h2", table.title))
        blocks.append(("table", table))
        blocks.append(("p", table.note))
        path = learning_curves(plan, runs, name, figures / f"curves_{name}.png")
        if path:
            blocks.append(("img", (path, f"Learning curves, {name} (first seed solid)")))
        if overlays_on:
            path = overlays(plan, runs, name, figures / f"overlays_{name}.png")
            if path:
                blocks.append(("img", (path, f"Segmentations on a test slice, {name}")))
    path = dice_vs_labels(runs, figures / "dice_vs_labels.png")
    if path:
        blocks.append(("h2", "Dice against the number of labelled subjects"))
        blocks.append(("img", (path, "Test mean Dice against labelled subjects")))
    diffs = comparisons(plan, runs)
    if diffs:
        blocks.append(("h2", "Which differences hold"))
        blocks.append(("table", _diff_rows(diffs)))
        blocks.append(("p", _summary_words(diffs)))

    md, body = [], []
    for kind, payload in blocks:
        if kind in ("h1", "h2"):
            md.append(("# " if kind == "h1" else "## ") + str(payload))
            body.append(f"<{kind}>{html.escape(str(payload))}</{kind}>")
        elif kind == "p":
            md.append(str(payload))
            body.append(f"<p>{html.escape(str(payload))}</p>")
        elif kind == "table":
            md.append(_md_table(payload))
            body.append(_html_table(payload))
        elif kind == "img":
            img, caption = payload
            rel = img.relative_to(study_dir) if img.is_relative_to(study_dir) else img
            md.append(f"![{caption}]({rel})")
            data = base64.b64encode(img.read_bytes()).decode()
            body.append(
                f'<figure><img alt="{html.escape(caption)}" '
                f'src="data:image/png;base64,{data}"><figcaption>'
                f"{html.escape(caption)}</figcaption></figure>"
            )
    write_text(study_dir / "report.md", "\n\n".join(md) + "\n")
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>"
        f"{html.escape(plan['study'])} study</title><style>{_CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )
    write_text(study_dir / "report.html", page)
    return study_dir / "report.html"


def _summary_words(diffs: list[Difference]) -> str:
    holds = [d.name for d in diffs if d.diff.n >= 2 and not d.diff.ci_low <= 0 <= d.diff.ci_high]
    noise = [d.name for d in diffs if d.diff.n >= 2 and d.diff.ci_low <= 0 <= d.diff.ci_high]
    few = [d.name for d in diffs if d.diff.n < 2]
    parts = []
    if holds:
        parts.append("Differences that hold (95% CI excludes 0): " + "; ".join(holds) + ".")
    if noise:
        parts.append(
            "Within noise (95% CI contains 0), so no conclusion: " + "; ".join(noise) + "."
        )
    if few:
        parts.append("Too few paired seeds for an interval: " + "; ".join(few) + ".")
    return " ".join(parts) or "No comparisons could be made yet."


_CSS = """
body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #bbb;padding:3px 8px;text-align:left}th{background:#eee}
figure{margin:1em 0}img{max-width:100%}figcaption{font-size:12px;color:#555}
"""


def nan_to_dash(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value}"
