"""Rendering: ``report.md`` and a self-contained ``report.html`` from the tables and figures."""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

from lowlabel.atomic import write_text
from lowlabel.study.report.figures import dice_vs_labels, learning_curves, overlays, pretrain_curves
from lowlabel.study.report.runs import load_runs
from lowlabel.study.report.tables import (
    Table,
    claims_table,
    comparison_table,
    comparisons,
    pretrain_runs,
    pretrain_table,
    runs_csv,
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
    lines = ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
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
    if plan.get("description"):
        blocks.append(("p", plan["description"]))
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
            blocks.append(("h2", spec.get("title", name)))
            blocks.append(("table", pretrain_table(plan, runs, name)))
            if not pre_done:
                path = pretrain_curves(runs, figures / "pretraining_curves.png")
                if path:
                    blocks.append(("img", (path, "Pretraining curves (all methods, all seeds)")))
                pre_done = True
            for run in pretrain_runs(runs, plan, name)[:1]:
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
    return " ".join(parts) or "No comparisons could be made yet."


_CSS = """
body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #bbb;padding:3px 8px;text-align:left}th{background:#eee}
figure{margin:1em 0}img{max-width:100%}figcaption{font-size:12px;color:#555}
"""
