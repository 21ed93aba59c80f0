"""The report's tables: one per study table, the paired comparisons, and ``runs.csv``."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import defaultdict
from dataclasses import dataclass

from lowlabel.study.report.runs import PRETRAIN_COLUMNS, SURFACE_COLUMNS, TRAIN_COLUMNS, Run
from lowlabel.study.stats import (
    MIN_SEEDS,
    Difference,
    Summary,
    metric_range,
    paired,
    summarize,
)

log = logging.getLogger(__name__)


@dataclass
class Table:
    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def table_cells(plan: dict, runs: list[Run], table: str) -> list[tuple[dict[str, str], list[Run]]]:
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


def cell_text(s: Summary, digits: int = 3) -> str:
    """A table cell: ``mean ± SD [95% CI]``, without the interval below :data:`MIN_SEEDS`
    seeds (with two, a t interval spans 12.7 standard errors and says nothing)."""
    if s.n < MIN_SEEDS and s.n >= 2 and s.sd > 0:
        return f"{s.mean:.{digits}f} ± {s.sd:.{digits}f}"
    return s.text(digits)


def _spread_words(seeds: int) -> str:
    """How a table's cells read, for the number of seeds per cell."""
    if seeds <= 1:
        return (
            "Each cell: one run (one seed), so no spread and no interval: a single run shows "
            "what a configuration can do, not whether it beats another."
        )
    if seeds < MIN_SEEDS:
        return (
            f"Each cell: mean ± SD over {seeds} seeds (each seed also draws the labelled "
            f"subjects); no interval below {MIN_SEEDS} seeds, where one would span more than "
            "the metric's range and mean nothing; a single number when all seeds agree."
        )
    return (
        "Each cell: mean ± SD [95% CI] over seeds (each seed also draws the labelled subjects; "
        "intervals clipped to the metric's range); a single number when all seeds agree."
    )


def not_converged(run: Run) -> bool:
    """A finished run whose best validation came at its last step: still improving when its
    step budget ran out, so its figures understate what the arm can do."""
    res = run.result or {}
    best, steps = res.get("best_step"), res.get("steps")
    return best is not None and steps is not None and best >= steps and steps > 0


def identical_cells(plan: dict, runs: list[Run], name: str) -> dict[str, str]:
    """Cells of a table whose runs gave exactly the same results as an earlier cell's, seed by
    seed (e.g. patience arms when no run stopped early): ``{cell: the earlier cell}``."""
    seen: dict[tuple, str] = {}
    out = {}
    for labels, group in table_cells(plan, runs, name):
        done = [r for r in group if r.result is not None]
        if not done:
            continue
        key = tuple(
            (r.seed, r.result.get("steps"), json.dumps(r.result.get("test"), sort_keys=True))
            for r in done
        )
        cell = ", ".join(labels.values())
        if key in seen:
            out[cell] = seen[key]
        else:
            seen[key] = cell
    return out


def train_table(plan: dict, runs: list[Run], name: str) -> Table:
    spec = plan["tables"][name]
    axes = spec.get("axes") or []
    metrics = spec.get("metrics") or list(TRAIN_COLUMNS)
    header = (
        [a.capitalize() for a in axes]
        + [TRAIN_COLUMNS.get(m, m) for m in metrics]
        + ["Stopped early", "Not converged", "Seeds"]
    )
    same = identical_cells(plan, runs, name)
    rows = []
    for labels, group in table_cells(plan, runs, name):
        done = [r for r in group if r.result is not None]
        digits = {"steps": 0, "best_step": 0}
        cells = [labels[a] for a in axes]
        for metric in metrics:
            s = summarize((r.value(metric) for r in done), bounds=metric_range(metric))
            cells.append(cell_text(s, digits.get(metric, 3)))
        cells.append(f"{sum(bool(r.result.get('stopped_early')) for r in done)}/{len(done)}")
        flag = sum(not_converged(r) for r in done)
        cells.append(f"{flag}/{len(done)}" + (" ⚠" if flag else ""))
        seeds = f"{len(done)}/{len(group)}"
        cell = ", ".join(labels.values())
        if cell in same:
            seeds += f" (identical to {same[cell]})"
        cells.append(seeds)
        rows.append(cells)
    note = _spread_words(max((len(g) for _, g in table_cells(plan, runs, name)), default=0))
    note += (
        " Dice and test loss on the test subjects. Not converged: runs whose best validation "
        "was at their last step (still improving when the step budget ran out; ⚠ read with "
        "care)."
    )
    if same:
        note += (
            " Identical: " + "; ".join(f"{a} = {b}" for a, b in same.items()) + " (the same "
            "runs on both rows, e.g. patience arms when no run stopped early)."
        )
    return Table(name, spec.get("title", name), header, rows, note)


def surface_table(plan: dict, runs: list[Run], name: str) -> Table:
    """HD95 and absolute volume error per tissue (CSF, GM, WM) for a training table's cells."""
    spec = plan["tables"][name]
    axes = spec.get("axes") or []
    rows = []
    seeds = 0
    for labels, group in table_cells(plan, runs, name):
        done = [r for r in group if r.result is not None]
        seeds = max(seeds, len(group))
        cells = [labels[a] for a in axes]
        for metric in SURFACE_COLUMNS:
            s = summarize((r.value(metric) for r in done), bounds=metric_range(metric))
            cells.append(s.text(1) if s.n < 2 else f"{s.mean:.1f} ± {s.sd:.1f}")
        rows.append(cells)
    return Table(
        f"{name}-surface",
        f"{spec.get('title', name)}: boundary distance and volume error",
        [a.capitalize() for a in axes] + list(SURFACE_COLUMNS.values()),
        rows,
        "HD95: 95th percentile Hausdorff distance (mm); vol. error: absolute volume error (mL); "
        "both on the test subjects at their native resolution; "
        + ("one run per cell (one seed)." if seeds <= 1 else "mean ± SD over seeds."),
    )


def pretrain_runs(runs: list[Run], plan: dict, name: str) -> list[Run]:
    return sorted(
        [r for r in runs if name in r.labels and r.kind == "pretrain"], key=lambda r: r.seed
    )


def _row_at(metrics: list[dict], step: int) -> dict | None:
    """The last validation at or before ``step`` (checkpoints need not fall on a validation)."""
    rows = [r for r in metrics if r.get("step", 0) <= step and "val_mse" in r]
    return rows[-1] if rows else None


def pretrain_table(plan: dict, runs: list[Run], name: str) -> Table:
    """Training and validation loss at each saved checkpoint: the last validation at or before
    the checkpoint's step, named in the first column when it came earlier."""
    spec = plan["tables"][name]
    group = pretrain_runs(runs, plan, name)
    n_seeds = len({r.seed for r in group})
    header = ["Checkpoint step (validated at)", *PRETRAIN_COLUMNS.values(), "Seeds"]
    rows = []
    earlier = False
    for step in plan.get("steps", {}).get(name, []):
        found = [f for f in (_row_at(r.metrics, step) for r in group) if f is not None]
        at = sorted({int(f["step"]) for f in found})
        cells = [str(step)]
        if at and at != [step]:
            cells[0] += " (" + "/".join(map(str, at)) + ")"
            earlier = True
        for key in PRETRAIN_COLUMNS:
            values = (float(f.get(key, float("nan"))) for f in found)
            cells.append(cell_text(summarize(values, bounds=metric_range(key)), 4))
        cells.append(f"{len(found)}/{len(group)}")
        rows.append(cells)
    note = (
        "A single run per step (one seed)."
        if n_seeds <= 1
        else f"Mean ± SD over seeds (with a 95% CI from {MIN_SEEDS} seeds on)."
    )
    note += " Validation loss on held-out validation subjects."
    if earlier:
        note += (
            " A step in brackets: the checkpoint fell between validations, so the row shows the "
            "last validation before it."
        )
    return Table(name, spec.get("title", name), header, rows, note)


def side_runs(comp: dict, key: str, runs: list[Run]) -> list[Run]:
    """The finished runs on side ``key`` (``a`` or ``b``) of a comparison."""
    table = str(comp["table"])
    want = {k: str(v) for k, v in comp[key].items()}
    return [
        r
        for r in runs
        if table in r.labels
        and r.result is not None
        and all(r.labels[table].get(k) == v for k, v in want.items())
    ]


def unconverged_words(comp: dict, runs: list[Run]) -> str:
    """A warning when runs on either side of a comparison were still improving at their last
    step (their difference is one of under-trained networks), else ``""``."""
    both = side_runs(comp, "a", runs) + side_runs(comp, "b", runs)
    flagged = sum(not_converged(r) for r in both)
    if not flagged:
        return ""
    return f"⚠ {flagged} of {len(both)} runs still improving at their last step (not converged)"


def comparisons(plan: dict, runs: list[Run]) -> list[Difference]:
    out = []
    for comp in plan.get("comparisons", []):
        metric = comp.get("metric", "mean_dice")
        side = {
            key: {str(r.seed): r.value(metric) for r in side_runs(comp, key, runs)}
            for key in ("a", "b")
        }
        out.append(
            paired(comp.get("name", f"{comp['a']} vs {comp['b']}"), metric, side["a"], side["b"])
        )
    return out


def comparison_table(diffs: list[Difference]) -> Table:
    rows = [
        [
            d.name,
            d.metric,
            d.a.text(),
            d.b.text(),
            diff_text(d),
            str(d.diff.n),
            d.decision,
            d.verdict,
        ]
        for d in diffs
    ]
    return Table(
        "comparisons",
        "Paired differences (a - b, paired by seed)",
        ["Comparison", "Metric", "a", "b", _diff_header(diffs), "Pairs", "Decision", "In words"],
        rows,
    )


def _diff_header(diffs: list[Difference]) -> str:
    """``a - b [95% CI]``, or plain ``a - b (one run each side)`` when no comparison has more
    than one pair: a column of "(no interval)" reads as broken."""
    return "a - b [95% CI]" if any(d.diff.n > 1 for d in diffs) else "a - b (one run each side)"


def diff_text(diff: Difference) -> str:
    """The difference cell: with one pair, the bare difference."""
    return f"{diff.diff.mean:+.3f}" if diff.diff.n == 1 else diff.interval()


NOT_CLAIMED = "(not a claim of the original; a check lowlabel adds)"


def answer(diff: Difference, expect: str) -> str:
    """lowlabel's answer to a claim, in words, from the decision on its comparison.

    Args:
        diff: the paired difference ``a - b`` the claim rests on.
        expect: the sign of ``a - b`` that agrees with the claim: higher, lower or same.
    """
    decision, mean = diff.decision, diff.diff.mean
    if diff.diff.n == 0:
        return "not measured yet"
    if decision == "too few seeds" and diff.diff.n == 1:
        return "cannot tell: one seed decides nothing (a single pair of runs)"
    if decision == "too few seeds":
        return f"cannot tell: {diff.diff.n} paired seeds are too few for a decision"
    if decision == "identical":
        return "cannot tell: the runs on both sides were identical"
    if decision == "undecided":
        return f"open: the CI contains 0 and reaches beyond ±{diff.margin:g}; more seeds needed"
    if decision == "equivalent":
        if expect == "same":
            return f"agrees: equivalent within ±{diff.margin:g}"
        return f"disagrees: no difference beyond ±{diff.margin:g}"
    direction = "higher" if mean > 0 else "lower"
    if expect == "same":
        return f"disagrees: a real difference ({direction} by {abs(mean):.3f})"
    if direction == expect:
        return f"agrees: {direction} by {abs(mean):.3f}"
    return f"contradicts: {direction} by {abs(mean):.3f}, the opposite direction"


def pretrain_claims(plan: dict, runs: list[Run]) -> list[tuple[str, Difference, str]]:
    """The claims on pretraining tables: validation loss (MSE) at the table's last saved
    checkpoint against its first (the original compared autoencoders trained for different step
    counts, not against an untrained one), paired by seed; each checkpoint reads the last
    validation at or before its step. A claim that training improves reconstruction expects
    lower. A table without saved checkpoints compares the last validation with the first."""
    out = []
    for name, spec in plan["tables"].items():
        if "pretraining" not in spec or not spec.get("claim"):
            continue
        saved = plan.get("steps", {}).get(name, [])
        first, last, steps = {}, {}, set()
        for run in pretrain_runs(runs, plan, name):
            rows = [r for r in run.metrics if "val_mse" in r]
            if len(saved) >= 2:
                a, b = _row_at(rows, saved[0]), _row_at(rows, saved[-1])
            else:
                a, b = (rows[0], rows[-1]) if rows else (None, None)
            if run.result is None or a is None or b is None or a is b:
                continue
            first[str(run.seed)] = float(a["val_mse"])
            last[str(run.seed)] = float(b["val_mse"])
            steps.add((a["step"], b["step"]))
        where = (
            "at step {1} vs {0}".format(*sorted(steps)[0])
            if len(steps) == 1
            else "at the last saved checkpoint vs the first"
            if len(saved) >= 2
            else "at the last validation vs the first"
        )
        diff = paired(f"{name}: val MSE {where}", "val_mse", last, first)
        out.append((str(spec["claim"]), diff, "lower"))
    return out


def claims_table(plan: dict, runs: list[Run], diffs: list[Difference]) -> Table:
    """Each claim of the original study next to lowlabel's answer: one row per comparison of
    the study (claimed ones first) and one per pretraining table with a claim."""
    specs = plan.get("comparisons", [])
    rows = []
    claimed = [(c, d) for c, d in zip(specs, diffs, strict=True) if c.get("claim")]
    for comp, diff in claimed:
        rows.append((str(comp["claim"]), diff, comp.get("expect", "higher"), comp))
    rows += [(*row, None) for row in pretrain_claims(plan, runs)]
    rows += [
        (NOT_CLAIMED, d, "", c) for c, d in zip(specs, diffs, strict=True) if not c.get("claim")
    ]

    def words(diff: Difference, expect: str, comp: dict | None) -> str:
        text = answer(diff, expect) if expect else diff.verdict
        warn = unconverged_words(comp, runs) if comp else ""
        return f"{text}; {warn}" if warn else text

    return Table(
        "claims",
        "The original study's claims, answered",
        ["The original found", "lowlabel compares", _diff_header(diffs), "Decision", "Answer"],
        [
            [
                claim,
                f"{d.name} ({d.metric})",
                diff_text(d),
                d.decision,
                words(d, expect, comp),
            ]
            for claim, d, expect, comp in rows
        ],
        "The original's figures are single runs on other data; lowlabel's are paired differences "
        "over seeds on this study's data. Decision: holds (95% CI excludes 0), equivalent (CI "
        "inside ±0.01), undecided (neither), identical (nothing differed), too few seeds. ⚠: runs "
        "whose best validation came at their last step, still improving when their step budget "
        "ran out, so the difference is between networks that had not finished learning.",
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


def nan_to_dash(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value}"
