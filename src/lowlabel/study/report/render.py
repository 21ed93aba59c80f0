"""Rendering: ``report.md`` and a self-contained ``report.html`` from the tables and figures."""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

import yaml

from lowlabel.atomic import write_text
from lowlabel.run_folder import RECONSTRUCTIONS
from lowlabel.study.report.figures import dice_vs_labels, learning_curves, overlays, pretrain_curves
from lowlabel.study.report.runs import Run, load_runs
from lowlabel.study.report.tables import (
    Table,
    claims_table,
    comparison_table,
    comparisons,
    pretrain_runs,
    pretrain_table,
    runs_csv,
    surface_table,
    table_cells,
    train_table,
)
from lowlabel.study.stats import (
    DECISIONS,
    MARGIN,
    MIN_SEEDS,
    Difference,
    multiple_comparisons_note,
)

log = logging.getLogger(__name__)


def _md_table(table: Table) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, table.header)) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in table.rows]
    return "\n".join(lines)


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
    blocks.append(("p", data_words(plan, runs)))
    seeds_note = seeds_words(study_dir, plan, runs)
    if seeds_note:
        blocks.append(("p", seeds_note))
    if plan.get("description"):
        blocks.append(
            (
                "p",
                "What the study reproduces (in the original's terms and step counts; what this "
                "profile ran is in each heading): " + plan["description"].strip(),
            )
        )
    blocks.append(
        (
            "p",
            f"{finished} of {len(runs)} runs finished; every run is listed once in "
            "runs.csv. Study file: study.yaml; expanded plan: plan.json.",
        )
    )
    diffs = comparisons(plan, runs)
    if diffs:
        claims = claims_table(plan, runs, diffs)
        blocks.append(("h2", claims.title))
        blocks.append(("table", claims))
        blocks.append(("p", claims.note))
    pre_done = False
    for name, spec in plan["tables"].items():
        if "pretraining" in spec:
            steps = plan.get("steps", {}).get(name, [])
            blocks.append(
                (
                    "h2",
                    f"{spec.get('title', name)}: as run, saved at steps "
                    + "/".join(map(str, steps)),
                )
            )
            pre_table = pretrain_table(plan, runs, name)
            blocks.append(("table", pre_table))
            blocks.append(("p", pre_table.note))
            if not pre_done:
                path = pretrain_curves(runs, figures / "pretraining_curves.png")
                if path:
                    blocks.append(("img", (path, "Pretraining curves: every method, every seed")))
                pre_done = True
            for run in pretrain_runs(runs, plan, name)[:1]:
                fig = _reconstructions(run)
                if fig is not None:
                    blocks.append(
                        (
                            "img",
                            (
                                fig,
                                f"Reconstructions at steps {'/'.join(map(str, steps))} "
                                f"(seed {run.seed}, a validation subject): input, "
                                "reconstruction and their error (colour bar) on three mid-slices",
                            ),
                        )
                    )
            continue
        table = train_table(plan, runs, name)
        blocks.append(("h2", f"{table.title}: as run, {steps_words(plan, runs, name)}"))
        blocks.append(("table", table))
        blocks.append(("p", table.note))
        surface = surface_table(plan, runs, name)
        blocks.append(("table", surface))
        blocks.append(("p", surface.note))
        if "budget" in (spec.get("axes") or []):
            path = dice_vs_labels(plan, runs, name, figures / "dice_vs_labels.png")
            if path:
                blocks.append(
                    (
                        "img",
                        (
                            path,
                            f"Test mean Dice against labelled subjects, table {name}, "
                            f"{steps_words(plan, runs, name)}: one line per step budget and "
                            "row of the table's other axes, "
                            + (
                                "one run per point (one seed)"
                                if len({r.seed for r in runs}) <= 1
                                else "mean and 95% CI over seeds, grey dots the seeds"
                            ),
                        ),
                    )
                )
        path = learning_curves(plan, runs, name, figures / f"curves_{name}.png")
        if path:
            blocks.append(
                (
                    "img",
                    (
                        path,
                        f"Learning curves, table {name}: every seed of every cell "
                        "(one colour per cell, one line per seed)",
                    ),
                )
            )
        if overlays_on:
            path = overlays(plan, runs, name, figures / f"overlays_{name}.png")
            if path:
                blocks.append(
                    (
                        "img",
                        (
                            path,
                            f"Segmentations of one test subject, table {name}: "
                            "reference and each cell's prediction (first seed)",
                        ),
                    )
                )
    if diffs:
        blocks.append(("h2", "Which differences hold"))
        blocks.append(("table", comparison_table(diffs)))
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


def _reconstructions(run: Run) -> Path | None:
    """A pretraining run's reconstruction figure, found in its own folder (the path its
    result recorded may name where the study was first written)."""
    if run.result is None or run.folder is None:
        return None
    own = run.folder / RECONSTRUCTIONS
    if own.is_file():
        return own
    fig = run.result.get("figure")
    return Path(fig) if fig and Path(fig).is_file() else None


def seeds_words(study_dir: Path, plan: dict, runs: list[Run]) -> str:
    """A plain warning when the study has too few seeds for any decision, naming the study's
    profiles that have enough (read from the ``study.yaml`` kept in the study folder)."""
    seeds = len({r.seed for r in runs})
    if seeds >= MIN_SEEDS:
        return ""
    better = []
    try:
        spec = yaml.safe_load((study_dir / "study.yaml").read_text()) or {}
        for name, prof in (spec.get("profiles") or {}).items():
            n = len((prof or {}).get("seeds") or spec.get("seeds") or [])
            if n >= MIN_SEEDS and name != plan.get("profile"):
                better.append(f"'{name}' ({n} seeds)")
    except (OSError, AttributeError, yaml.YAMLError):
        pass
    head = (
        "ONE SEED: every number below is a single run, and one seed decides nothing"
        if seeds <= 1
        else f"{seeds} SEEDS: too few for a decision"
    )
    text = (
        f"{head}: differences between runs this close are within what another seed (another "
        "draw of the labelled subjects, another initialisation) would change, so no comparison "
        f"is decided (a decision needs at least {MIN_SEEDS} paired seeds). Read this report as a "
        "check that the pipeline runs and learns."
    )
    if better:
        text += (
            " For answers, run the profile "
            + " or ".join(better)
            + f": 'lowlabel study {plan.get('source') or plan['study']} --profile "
            + better[0].split("'")[1]
            + "' (add --data DATASET to run it on your own labelled scans)."
        )
    return text


def steps_words(plan: dict, runs: list[Run], name: str) -> str:
    """What the runs of a training table actually ran: step budget, steps run, validations."""
    budgets, ran, val = set(), [], set()
    for _, group in table_cells(plan, runs, name):
        for run in group:
            train = run.config.get("train", {})
            budgets.add(int(train.get("steps", 0)))
            val.add(int(train.get("val_every", 0)))
            if run.result is not None:
                ran.append(int(run.result.get("steps", 0)))
    text = "budget " + "/".join(map(str, sorted(budgets))) + " steps"
    if ran:
        text += f" (ran {min(ran)}-{max(ran)})" if min(ran) != max(ran) else f" (ran {ran[0]})"
    if val:
        text += ", validation every " + "/".join(map(str, sorted(val)))
    return text


def data_words(plan: dict, runs: list[Run]) -> str:
    """What the study ran on: the data, its size and splits, resolution, patch and network."""
    train = [r for r in runs if r.kind == "train" and r.config]
    if not train:
        return "No runs planned."
    cfg = train[0].config
    d, m = cfg["data"], cfg["model"]
    if d.get("dataset"):
        data = f"Data: {d['dataset']}"
    else:
        data = (
            f"Data: the SYNTHETIC demo cohort ({d['demo_subjects']} deformed copies of the "
            "MNI152 template with random bias fields, contrast and noise; not patients): its "
            "figures show that the pipeline works, not how well it works on real scans"
        )
    labelled = sorted(
        {
            int(r.result["n_labelled"])
            for r in train
            if r.result and r.result.get("n_labelled") is not None
        }
    )
    dims = "2D (axial slices)" if d.get("spatial_dims") == 2 else "3D"
    spacing = "x".join(f"{v:g}" for v in d["spacing"])
    patch = "x".join(map(str, d["patch_size"]))
    widths = sorted({int(r.config["model"]["channels"]) for r in train})
    levels = sorted({int(r.config["model"]["levels"]) for r in train})
    seeds = sorted({r.seed for r in runs})
    return (
        f"{data}. Splits per seed: {d['n_test']} test and {d['n_val']} validation subjects, "
        f"the rest for training, of which "
        + ("/".join(map(str, labelled)) if labelled else "a budget of")
        + f" labelled. Resampled to {spacing} mm; {dims} patches of {patch} voxels; UNets of "
        f"{'/'.join(map(str, levels))} levels starting at {'/'.join(map(str, widths))} "
        f"channels ({m.get('norm', 'instance')} norm). {training_words(cfg['train'])} "
        f"Profile '{plan['profile']}', {len(seeds)} seed(s): {', '.join(map(str, seeds))}."
    )


SCHEDULES = {
    "constant": "held constant until early stopping",
    "poly": "decayed as (1 - step/budget)^0.9 until early stopping",
    "plateau": "divided by 10 once validation stops improving for the patience, then held "
    "until it stops improving again",
}


PRECISIONS = {
    "auto": "float32 on the CPU, bfloat16 autocast on a GPU that supports it",
    "fp32": "float32",
    "bf16": "bfloat16 autocast",
    "fp16": "float16 autocast",
}


def training_words(train: dict) -> str:
    """How the runs trained: optimizer, rate and its schedule, batch, precision."""
    precision = PRECISIONS.get(train.get("precision", "auto"), train.get("precision"))
    schedule = SCHEDULES.get(train.get("schedule", "constant"), train.get("schedule"))
    return (
        f"AdamW at learning rate {train['lr']:g}, {schedule}; batches of "
        f"{train['batch_size']}; {precision}."
    )


def _summary_words(diffs: list[Difference]) -> str:
    groups: dict[str, list[str]] = {k: [] for k in DECISIONS}
    for d in diffs:
        groups[d.decision].append(d.name)
    words = {
        "holds": "Differences that hold (95% CI excludes 0)",
        "equivalent": f"Equivalent (95% CI inside ±{MARGIN:g})",
        "undecided": f"Undecided (CI contains 0 but reaches beyond ±{MARGIN:g}; more seeds needed)",
        "identical": "Identical runs on both sides (nothing to estimate)",
        "too few seeds": f"Too few paired seeds for a decision (fewer than {MIN_SEEDS})",
    }
    parts = [f"{words[k]}: " + "; ".join(v) + "." for k, v in groups.items() if v]
    decided = len(groups["holds"]) + len(groups["equivalent"])
    if diffs:
        parts.insert(0, f"{decided} of {len(diffs)} comparisons decided.")
    note = multiple_comparisons_note(diffs)
    if note:
        parts.append(note)
    elif len(diffs) > 1:
        parts.append(
            f"Multiple comparisons: {len(diffs)} comparisons are read together; at 95% each, "
            f"about {0.05 * len(diffs):.1f} would exclude 0 by chance alone if nothing were real. "
            f"With at least {MIN_SEEDS} seeds this note also says which still hold at the "
            "Bonferroni level."
        )
    return " ".join(parts) or "No comparisons could be made yet."


_CSS = """
body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #bbb;padding:3px 8px;text-align:left}th{background:#eee}
figure{margin:1em 0}img{max-width:100%}figcaption{font-size:12px;color:#555}
"""
