"""Studies: expansion into runs, checks before running, the runner (skip, resume), statistics,
the report and the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import helpers
import numpy as np
import pytest
from helpers import write_study

from lowlabel.config import run_dir
from lowlabel.errors import LowlabelError
from lowlabel.study import spec as study_spec
from lowlabel.study.stats import (
    difference_range,
    metric_range,
    multiple_comparisons_note,
    paired,
    summarize,
)

# Smoke settings for a shipped study on the tiny phantoms: 2 steps per run, 1 mm, one seed.
SMOKE = {
    "data.spacing": [1.0, 1.0, 1.0],
    "data.n_test": 2,
    "data.n_val": 1,
    "model.channels": 4,
    "train.steps": 2,
    "train.val_every": 1,
    "pretrain.steps": 2,
    "pretrain.save_steps": [1, 2],
    "train.threads": 1,
}


# ---------------------------------------------------------------------------------------------
# expansion


def test_expand_axes_times_seeds_one_folder_per_config(tmp_path, tiny_dataset):
    study = study_spec.load_study(write_study(tmp_path / "tiny.yaml", tiny_dataset))
    cells = study_spec.expand(study, "quick", None, tmp_path / "st")
    # grid: 2 depths x 2 budgets; "again" repeats the 3-level cells with the same configs
    assert len(cells) == 2 * 2 * 2
    folders = [c.run_dir for c in cells]
    assert len(set(folders)) == len(cells)
    for cell in cells:
        assert cell.run_dir == run_dir(cell.cfg)
        assert cell.run_dir.parent == tmp_path / "st" / "runs"
        assert cell.cfg.data.draw == cell.seed == cell.cfg.seed
    shared = [c for c in cells if "again" in c.labels]
    assert len(shared) == 4 and all("grid" in c.labels for c in shared)
    low = [c for c in cells if c.labels["grid"] == {"depth": "2x", "data": "low"}]
    assert {c.seed for c in low} == {0, 1}
    assert all(c.cfg.model.num_res_units == 1 and c.cfg.data.budget == 2 for c in low)
    # expansion is deterministic: the same study gives the same folders
    again = study_spec.expand(study, "quick", None, tmp_path / "st")
    assert [c.run_dir for c in again] == folders


def test_profile_scales_steps(tmp_path):
    study = study_spec.load_study("seed")
    paper = {c.key: c for c in study_spec.expand(study, "paper", None, tmp_path)}
    quick = study_spec.expand(study, "quick", None, tmp_path)
    pre = next(c for c in quick if c.kind == "pretrain" and c.cfg.pretrain.method == "autoencoder")
    # 3000 pretraining steps at scale 0.06 would be 180; the profile's pretraining_set asks for
    # 1500 (90), so the table's 180-step checkpoint is dropped, not invented
    assert pre.cfg.pretrain.steps == 90
    assert pre.cfg.pretrain.save_steps == (30, 60, 90)
    assert pre.cfg.data.patch_size == (64, 64)
    base = next(c for c in quick if c.labels.get("1a") == {"model": "3-level", "data": "low"})
    assert base.cfg.train.steps == 300 and base.cfg.train.val_every == 100
    assert base.cfg.data.spatial_dims == 2
    transfer = [c for c in quick if "2b" in c.labels]
    assert all(c.cfg.train.steps == 250 for c in transfer)  # 500 * 0.06, raised to min_train_steps
    assert {c.needs for c in transfer if c.needs} == {("autoencoder", 90), ("genesis", 90)}
    plan = json.loads(study_spec.plan_json(study, "quick", quick))
    assert plan["steps"]["2a"] == [30, 60, 90]  # what the pretraining runs keep
    # the cpu profile: every training run (2b's transfer runs too) gets a 2500-step budget, so
    # early stopping ends it; five seeds, each drawing its own labelled subjects
    cpu = study_spec.expand(study, "cpu", None, tmp_path)
    train = [c for c in cpu if c.kind == "train"]
    assert {c.cfg.train.steps for c in train} == {2500}
    assert {(c.cfg.train.schedule, c.cfg.train.precision) for c in train} == {("plateau", "bf16")}
    assert {c.seed for c in cpu} == {0, 1, 2, 3, 4}
    assert {c.cfg.data.draw for c in train} == {0, 1, 2, 3, 4}
    pre = next(c for c in cpu if c.kind == "pretrain" and c.cfg.pretrain.method == "autoencoder")
    assert pre.cfg.pretrain.steps == 750 and pre.cfg.pretrain.save_steps == (250, 500, 750)
    big = next(
        c for c in paper.values() if c.labels.get("1a") == {"model": "3-level", "data": "full"}
    )
    assert big.cfg.train.steps == 5000 and big.cfg.data.patch_size == (96, 96, 96)
    assert big.cfg.train.batch_size == 16 and big.cfg.train.val_every == 50


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tables": {"t": {"axes": ["nope"]}}}, "unknown axis 'nope'"),
        (
            {"axes": {"depth": {"x": {"model.levelz": 3}}}, "tables": {"t": {"axes": ["depth"]}}},
            "unknown config key 'model.levelz'",
        ),
        (
            {
                "tables": {
                    "t": {
                        "axes": ["data"],
                        "set": {"transfer.mode": "frozen", "transfer.init_from": "@ae"},
                    }
                }
            },
            "names no pretraining run",
        ),
        ({"profiles": {"fast": {}}}, "unknown profile 'fast'"),
        ({"comparisons": [{"table": "grid", "a": {"depth": "9"}, "b": {}}]}, "has no level '9'"),
        (
            {"comparisons": [{"table": "grid", "a": {}, "b": {}, "expect": "better"}]},
            "expect: 'better' is not one of higher, lower, same",
        ),
    ],
)
def test_bad_study_is_refused_before_running(tmp_path, tiny_dataset, change, message):
    path = write_study(tmp_path / "bad.yaml", tiny_dataset, **change)
    with pytest.raises(LowlabelError, match=message):
        study_spec.expand(study_spec.load_study(path), "quick", None, tmp_path / "st")
    assert not (tmp_path / "st").exists()


@pytest.mark.parametrize(
    "level, message",
    [
        # 32 mm phantoms at 4 mm are 8 voxels: a 5-level UNet needs 16
        (
            {"model.levels": 5, "data.spacing": [4, 4, 4], "data.patch_size": [32, 32, 32]},
            "5-level UNet needs at least 16 voxels",
        ),
        # a 16-voxel patch leaves 1 voxel at the bottom of a 5-level UNet
        ({"model.levels": 5}, "leaves a single voxel at the bottom of a 5-level UNet"),
    ],
)
def test_unet_deeper_than_the_scan_is_refused(tmp_path, tiny_dataset, level, message):
    path = write_study(
        tmp_path / "deep.yaml",
        tiny_dataset,
        axes={"depth": {"5": level}},
        tables={"t": {"axes": ["depth"]}},
    )
    # refused before any run starts: the patch by the config rules, the scans by the check
    with pytest.raises(LowlabelError, match=message):
        cells = study_spec.expand(study_spec.load_study(path), "quick", None, tmp_path / "st")
        study_spec.check(cells)


def test_missing_pretraining_cell_is_refused(tmp_path, tiny_dataset):
    study = study_spec.load_study(
        write_study(
            tmp_path / "t.yaml",
            tiny_dataset,
            pretraining={"ae": {"model.levels": 3, "pretrain.steps": 2}},
            tables={
                "t": {
                    "axes": ["data"],
                    "set": {"transfer.mode": "frozen", "transfer.init_from": "@ae"},
                }
            },
            comparisons=[],
        )
    )
    cells = study_spec.expand(study, "quick", None, tmp_path / "st")
    assert all(c.needs == ("ae", 2) for c in cells if c.kind == "train")
    with pytest.raises(LowlabelError, match="pretraining run that is not part of this study"):
        study_spec.check([c for c in cells if c.kind == "train"])


# ---------------------------------------------------------------------------------------------
# statistics


def test_summary_ci_on_known_numbers():
    s = summarize([1.0, 2.0, 3.0])
    assert s.n == 3 and s.mean == pytest.approx(2.0) and s.sd == pytest.approx(1.0)
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, df=2) * sd / sqrt(n)
    assert s.ci_low == pytest.approx(2.0 - half) and s.ci_high == pytest.approx(2.0 + half)
    one = summarize([0.5])
    assert one.n == 1 and math.isnan(one.sd) and one.text() == "0.500"
    assert summarize([1.0, float("nan"), 3.0]).n == 2


def test_paired_difference_and_verdict():
    a = {"0": 0.80, "1": 0.82, "2": 0.84, "3": 0.83}
    b = {"0": 0.70, "1": 0.71, "2": 0.75, "3": 0.72, "9": 0.1}  # seed 9 has no partner
    d = paired("a vs b", "mean_dice", a, b)
    assert d.pairs == ["0", "1", "2", "3"] and d.diff.n == 4
    assert d.diff.mean == pytest.approx(0.1025)
    assert d.diff.ci_low > 0 and d.decision == "holds" and d.verdict.startswith("holds")
    noisy = paired(
        "x", "mean_dice", {"0": 0.8, "1": 0.7, "2": 0.9}, {"0": 0.75, "1": 0.8, "2": 0.85}
    )
    assert noisy.diff.ci_low < 0 < noisy.diff.ci_high
    assert noisy.decision == "undecided" and noisy.verdict.startswith("undecided")
    one = paired("y", "m", {"0": 1.0}, {"0": 0.0})
    assert one.decision == "too few seeds" and "too few seeds" in one.verdict


def _constructed(diffs: list[float], base: float = 0.8) -> dict:
    """Two sides whose paired differences are exactly ``diffs``."""
    b = {str(i): base + 0.01 * (i % 3) for i in range(len(diffs))}
    return {"a": {k: v + d for (k, v), d in zip(b.items(), diffs, strict=True)}, "b": b}


@pytest.mark.parametrize(
    ("diffs", "decision"),
    [
        ([0.030, 0.032, 0.028, 0.031, 0.029], "holds"),  # clearly above 0
        ([-0.05, -0.06, -0.04, -0.055, -0.045], "holds"),  # clearly below 0
        ([0.001, -0.002, 0.0015, -0.001, 0.0005], "equivalent"),  # tiny, CI inside ±0.01
        ([0.05, -0.04, 0.03, -0.06, 0.01], "undecided"),  # CI contains 0, reaches past ±0.01
        ([0.0, 0.0, 0.0, 0.0, 0.0], "identical"),  # the same runs on both sides
        ([0.03, 0.031], "too few seeds"),  # 2 pairs: no decision, whatever the values
    ],
)
def test_decision_rule_on_constructed_differences(diffs, decision):
    sides = _constructed(diffs)
    d = paired("c", "mean_dice", sides["a"], sides["b"])
    assert d.diff.mean == pytest.approx(float(np.mean(diffs)))
    assert d.decision == decision
    assert d.verdict.startswith(decision)
    assert d.decided == (decision in ("holds", "equivalent"))
    if decision in ("holds", "equivalent", "undecided"):
        assert f"{d.diff.ci_low:+.3f}" in d.verdict and f"{d.diff.ci_high:+.3f}" in d.verdict


def test_equivalence_needs_the_whole_interval_inside_the_margin():
    # mean difference 0.004, well inside ±0.01, but too noisy: the CI leaves the margin
    d = paired("c", "mean_dice", **_constructed([0.02, -0.012, 0.015, -0.008, 0.005]))
    assert abs(d.diff.mean) < 0.01 and d.diff.ci_high > 0.01 and d.decision == "undecided"
    wide = paired("c", "mean_dice", **_constructed([0.001, -0.001, 0.002]), margin=0.0005)
    assert wide.decision == "undecided"


def test_intervals_stay_in_the_metric_range():
    # two seeds near 1: a plain t interval would run far above 1
    dice = summarize([0.97, 0.99], bounds=metric_range("mean_dice"))
    assert 0.0 <= dice.ci_low < dice.mean < dice.ci_high == 1.0
    loss = summarize([0.01, 0.2], bounds=metric_range("test_loss"))
    assert loss.ci_low == 0.0
    d = paired("c", "mean_dice", {"0": 0.99, "1": 0.05}, {"0": 0.01, "1": 0.95})
    assert -1.0 <= d.diff.ci_low and d.diff.ci_high <= 1.0
    assert metric_range("dice_csf") == (0.0, 1.0) and metric_range("val_mse")[0] == 0.0
    assert difference_range("mean_dice") == (-1.0, 1.0)


def test_multiple_comparisons_note_counts_the_intervals():
    holds = paired("big", "mean_dice", **_constructed([0.10, 0.11, 0.09, 0.10, 0.12]))
    noise = paired("noise", "mean_dice", **_constructed([0.05, -0.04, 0.03, -0.06, 0.01]))
    same = paired("same", "mean_dice", **_constructed([0.0] * 5))
    note = multiple_comparisons_note([holds, noise, same])
    assert "2 intervals" in note and "Bonferroni" in note and "big" in note
    assert "noise" not in note.split("hold")[-1]
    assert multiple_comparisons_note([holds]) == ""


def _fake_runs(plan: dict, effect: dict[str, float]) -> list:
    """Finished runs for every cell of ``plan``: test mean Dice 0.8 + ``effect`` of the first
    axis level that has one + a per-seed shift shared by all cells (so pairs are tight)."""
    from lowlabel.study.report.runs import Run

    runs = []
    for cell in plan["cells"]:
        levels = [v for lab in cell["labels"].values() for v in lab.values()]
        bump = next((effect[v] for v in levels if v in effect), 0.0)
        dice = 0.8 + bump + 0.01 * cell["seed"] + 0.0005 * (cell["seed"] % 2) * bool(bump)
        result = {"test": {"mean_dice": dice}, "steps": 10, "best_step": 5, "n_labelled": 3}
        metrics = [{"step": s, "val_mse": 1.0 / s + 0.001 * cell["seed"]} for s in (1, 2, 3, 5)]
        folder = Path(cell["run_dir"]) if cell.get("run_dir") else None
        runs.append(
            Run(cell["key"], cell["kind"], cell["seed"], cell["labels"], folder, result, metrics)
        )
    return runs


def test_claims_table_has_a_row_for_every_comparison_of_the_shipped_study(tmp_path):
    from lowlabel.study.report.tables import NOT_CLAIMED, claims_table, comparisons

    study = study_spec.load_study("seed")
    cells = study_spec.expand(study, "quick", None, tmp_path / "st", seeds=[0, 1, 2, 3, 4])
    plan = json.loads(study_spec.plan_json(study, "quick", cells))
    plan["steps"] = {t: [1, 5] for t in plan["steps"]}
    # full data clearly better, residual units clearly worse; the rest identical
    runs = _fake_runs(plan, {"full": 0.06, "5-level res5 p5": -0.03})
    diffs = comparisons(plan, runs)
    table = claims_table(plan, runs, diffs)
    compared = [row[1] for row in table.rows]
    for comp in study.comparisons:
        assert sum(c.startswith(comp["name"] + " (") for c in compared) == 1, comp["name"]
        row = next(r for r in table.rows if r[1].startswith(comp["name"] + " ("))
        assert row[0] == comp.get("claim", NOT_CLAIMED)
    claims = {c.get("claim") for c in study.comparisons} - {None}
    assert claims | {study.tables["2a"]["claim"]} <= {row[0] for row in table.rows}
    assert len(table.rows) == len(study.comparisons) + 1  # + the autoencoder's reconstruction
    by_name = {row[1].rsplit(" (", 1)[0]: row for row in table.rows}
    full = by_name["full vs low data, 3-level"]
    assert full[3] == "holds" and full[4].startswith("agrees: higher by 0.060")
    res = by_name["residual units (5-level res5 p5 vs 5-level), low data"]
    assert res[3] == "holds" and res[4].startswith("contradicts")
    same = by_name["autoencoder fine-tuned vs scratch"]
    assert same[3] == "identical" and same[4].startswith("cannot tell")
    recon = next(r for r in table.rows if r[0] == study.tables["2a"]["claim"])
    assert recon[3] == "holds" and recon[4].startswith("agrees: lower")


def test_reconstruction_claim_compares_the_first_and_last_saved_checkpoints(tmp_path):
    # reconstruction improves a lot from the first validation to the first checkpoint, then gets
    # worse by the last one: the claim is about training longer, so it must say "contradicts"
    from lowlabel.study.report.tables import answer, pretrain_claims

    study = study_spec.load_study("seed")
    cells = study_spec.expand(study, "quick", None, tmp_path / "st", seeds=[0, 1, 2, 3, 4])
    plan = json.loads(study_spec.plan_json(study, "quick", cells))
    plan["steps"] = {t: [3, 5] for t in plan["steps"]}
    runs = _fake_runs(plan, {})
    for run in runs:
        if run.kind == "pretrain":
            j = 0.001 * run.seed
            run.metrics = [
                {"step": 1, "val_mse": 1.0 + j},
                {"step": 2, "val_mse": 0.5 + j},
                {"step": 3, "val_mse": 0.2 + j},
                {"step": 4, "val_mse": 0.205 + j},  # checkpoint 5 reads this validation
                {"step": 6, "val_mse": 0.1 + j},  # after the last checkpoint: not read
            ]
    ((claim, diff, expect),) = [c for c in pretrain_claims(plan, runs) if "2a:" in c[1].name]
    assert claim == study.tables["2a"]["claim"] and expect == "lower"
    assert diff.name == "2a: val MSE at step 4 vs 3"
    assert diff.diff.mean == pytest.approx(0.005) and diff.decision == "holds"
    assert answer(diff, expect).startswith("contradicts")


def test_report_tables_flag_unconverged_runs_and_identical_cells(tmp_path):
    from lowlabel.study.report.render import data_words, training_words
    from lowlabel.study.report.tables import surface_table, train_table

    study = study_spec.load_study("seed")
    cells = study_spec.expand(study, "quick", None, tmp_path / "st", seeds=[0, 1, 2])
    plan = json.loads(study_spec.plan_json(study, "quick", cells))
    runs = _fake_runs(plan, {"full": 0.06})
    for run in runs:
        run.config = next(c["config"] for c in plan["cells"] if c["key"] == run.key)
        if run.labels.get("1b", {}).get("patience") == "7":
            run.result = {**run.result, "steps": 5}  # best step 5 of 5: still improving
    table = train_table(plan, runs, "1b")
    assert table.header.index("Dice CSF") < table.header.index("Dice GM")
    assert table.header.index("Dice GM") < table.header.index("Dice WM")
    rows = {r[0]: r for r in table.rows}
    col = table.header.index("Not converged")
    assert rows["7"][col] == "3/3 ⚠" and rows["2"][col] == "0/3"
    seeds = table.header.index("Seeds")
    # patience 2 and 5 gave the same runs: flagged, not reported as a zero difference
    assert rows["5"][seeds] == "3/3 (identical to 2)" and rows["2"][seeds] == "3/3"
    assert "Identical: 5 = 2" in table.note
    surface = surface_table(plan, runs, "1a")
    assert surface.header[-3:] == [
        "Vol. error CSF (mL)",
        "Vol. error GM (mL)",
        "Vol. error WM (mL)",
    ]
    words = data_words(plan, runs)
    assert "SYNTHETIC demo cohort (16" in words and "2D" in words and "2 mm" in words
    assert "4 test and 2 validation" in words and "64x64 voxels" in words and "3 seed(s)" in words
    assert "AdamW at learning rate 0.01, decayed as (1 - step/budget)^0.9" in words
    assert "float32 on the CPU, bfloat16 autocast on a GPU" in words  # quick: precision auto
    cpu = study_spec.expand(study, "cpu", None, tmp_path / "cpu", seeds=[0])
    cpu_run = next(c for c in json.loads(study_spec.plan_json(study, "cpu", cpu))["cells"])
    words = training_words(cpu_run["config"]["train"])
    assert "divided by 10 once validation stops improving" in words and "bfloat16" in words


def test_time_left_from_seconds_per_step_of_finished_runs():
    from lowlabel.study.runner import duration, estimate_left

    done = [("train", 100, 10.0), ("train", 50, 5.0), ("pretrain", 200, 40.0)]
    # train: 0.1 s/step, pretrain 0.2 s/step; 4 train runs of 100 steps on 2 workers
    assert estimate_left(done, [("train", 100)] * 4, jobs=2) == pytest.approx(20.0)
    assert estimate_left(done, [("pretrain", 300)], jobs=2) == pytest.approx(60.0)  # one run
    # a kind not seen yet takes the overall rate: 55 s / 350 steps
    assert estimate_left(done[:1], [("pretrain", 35)], jobs=1) == pytest.approx(3.5)
    assert estimate_left(done, [], jobs=2) == 0.0
    assert estimate_left([], [("train", 10)], jobs=2) is None
    assert duration(None).startswith("unknown") and duration(42) == "42 s"
    assert duration(250) == "4 min 10 s" and duration(3900) == "1 h 05 min"


def test_local_workers_size_every_thread_pool_like_ray(monkeypatch):
    """A local worker starts with OMP/MKL/OpenBLAS threads = its torch threads (Ray's
    OMP_NUM_THREADS), so its libraries and its loader processes do not spin on every core; the
    study's own environment is left as it was, and a value the user set is kept."""
    import os

    from lowlabel.study.runner import THREAD_ENV, LocalBackend, Slot

    for key in THREAD_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    backend = LocalBackend([Slot(None, 1, 1)])
    try:
        seen = [backend.call(os.getenv, key).result(timeout=120) for key in THREAD_ENV]
    finally:
        backend.close()
    assert seen == ["1", "3", "1"]
    assert "OMP_NUM_THREADS" not in os.environ and os.environ["MKL_NUM_THREADS"] == "3"


def test_local_workers_write_their_standard_error_to_the_study_log(tmp_path, capfd):
    """What a worker's libraries print (e.g. a C++ runtime's last words when a stopped worker's
    threads are torn down) goes to the study's log, not between the study's own lines."""
    import os

    from lowlabel.study.runner import LocalBackend, Slot

    log = tmp_path / "workers.log"
    backend = LocalBackend([Slot(None, 1, 1)], log)
    try:
        written = backend.call(os.write, 2, b"terminate called from a worker\n").result(timeout=120)
    finally:
        backend.close()
    assert written == len(b"terminate called from a worker\n")
    assert "terminate called from a worker" in log.read_text()
    assert "terminate called" not in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------
# running


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """:func:`helpers.cli` with stdout and stderr together."""
    code, out, err = helpers.cli(list(args), monkeypatch, capsys)
    return code, out + err


def _runs_csv(study_dir: Path) -> list[dict]:
    with open(study_dir / "runs.csv") as fh:
        return list(csv.DictReader(fh))


def one_cell_per_kind(study: study_spec.Study) -> study_spec.Study:
    """``study`` cut to a plain training cell, a transfer cell and the pretraining run it needs,
    with the tables and comparisons that name only those; a study without pretraining keeps the
    first and the last level of each axis instead (two runs, so a rerun can find one interrupted
    and one missing)."""
    keep_axes = {}
    for axis, levels in study.axes.items():
        plain = [lv for lv, v in levels.items() if not (v or {}).get("transfer.init_from")]
        transfer = [lv for lv, v in levels.items() if (v or {}).get("transfer.init_from")]
        second = transfer[:1] if study.pretraining else plain[1:][-1:]
        keep_axes[axis] = {lv: levels[lv] for lv in plain[:1] + second}
    refs = {
        str(v["transfer.init_from"]).lstrip("@").split(":")[0]
        for levels in keep_axes.values()
        for v in levels.values()
        if v and v.get("transfer.init_from")
    }
    with_transfer = [
        t
        for t, table in study.tables.items()
        if any(len(keep_axes[a]) > 1 for a in table.get("axes") or [])
    ]
    plain_tables = [t for t, table in study.tables.items() if table.get("axes")]
    chosen = with_transfer[:1] or plain_tables[:1]
    chosen += [t for t, table in study.tables.items() if table.get("pretraining") in refs]
    tables = {t: study.tables[t] for t in chosen}
    axes = keep_axes
    comparisons = [
        c
        for c in study.comparisons
        if c["table"] in tables
        and all(lv in axes[a] for side in ("a", "b") for a, lv in c[side].items())
    ]
    pretraining = {name: v for name, v in study.pretraining.items() if name in refs}
    return dataclasses.replace(
        study, axes=axes, tables=tables, comparisons=comparisons, pretraining=pretraining
    )


@pytest.mark.parametrize("name", sorted(study_spec.builtin_studies()))
def test_every_cell_of_a_shipped_study_expands_and_checks(name, tmp_path, tiny_dataset):
    """Every cell of every profile's grid is a valid config that can run on the data."""
    from lowlabel.study.runner import prepare

    study = study_spec.load_study(name)
    for profile in study.profiles:
        _, out, cells = prepare(
            study, profile, str(tiny_dataset), tmp_path / profile, seeds=[0], overrides=SMOKE
        )
        plan = json.loads((out / "plan.json").read_text())
        assert len(plan["cells"]) == len(cells) == len({c.key for c in cells})
        keys = {c.key for c in cells}
        for cell in cells:
            assert cell.pretrain_key in keys if cell.needs else cell.pretrain_key is None
        kinds = {(c.kind, c.needs is not None) for c in cells}
        assert ("train", False) in kinds
        assert bool(study.pretraining) == ({("pretrain", False), ("train", True)} <= kinds)


@pytest.mark.parametrize("name", sorted(study_spec.builtin_studies()))
def test_shipped_study_smoke_run_then_rerun_finishes_only_missing(
    name, tmp_path, tiny_dataset, monkeypatch, capsys, caplog
):
    """A shipped study, cut to one cell per kind, runs 2 steps per cell on the tiny phantoms; a
    rerun after damage redoes exactly the damaged runs, and the report lists every run once."""
    from lowlabel.study.runner import run_study

    study = one_cell_per_kind(study_spec.load_study(name))
    out = tmp_path / "study"
    first = run_study(
        study, "quick", str(tiny_dataset), out, seeds=[0], overrides=SMOKE, jobs=2, progress=False
    )
    assert first.failed == {} and first.ran == first.runs and first.skipped == 0
    plan = json.loads((out / "plan.json").read_text())
    kinds = sorted((c["kind"], bool(c["needs"])) for c in plan["cells"])
    expected = [("pretrain", False), ("train", False), ("train", True)]
    assert kinds == (expected if study.pretraining else [("train", False)] * 2)
    folders = {Path(c["run_dir"]) for c in plan["cells"]}
    assert len(folders) == first.runs and all((f / "result.json").exists() for f in folders)
    rows = _runs_csv(out)
    assert len(rows) == first.runs and {r["status"] for r in rows} == {"finished"}
    assert len({r["run_dir"] for r in rows}) == len(rows)

    # evaluation wrote the test slice the report shows, so the report runs no network
    assert all((f / "overlay.npz").exists() for f in folders if f.name.startswith("seg-"))
    assert list((out / "figures").glob("overlays_*.png"))

    # transfer cells were started from their pretraining run's checkpoint
    for cell in plan["cells"]:
        if cell["needs"]:
            init = Path(cell["config"]["transfer"]["init_from"])
            assert init.exists() and init.parent.name.startswith("pre-")

    report = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for table in plan["tables"].values():
        assert table["title"] in report
    assert page.count("<table>") >= len(plan["tables"]) and "data:image/png;base64," in page
    assert report.startswith("# Study") and "\n\nData: " in report  # it says what it ran on
    assert "Dice CSF | Dice GM | Dice WM" in report and "HD95 CSF (mm)" in report
    assert report.count("## The original study's claims, answered") == 1
    assert report.count("Dice against the number of labelled subjects") <= 1
    with np.load(next(f for f in folders if f.name.startswith("seg-")) / "overlay.npz") as ov:
        assert ov["image"].ndim == 3 and ov["image"].shape[0] == len(ov["slices"]) >= 2
    assert 'src="figures/' not in page  # self-contained
    if shutil.which("chromium"):  # the page renders in a real browser, tables and images shown
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
        from check_report_html import check

        shown = check(out / "report.html")
        assert shown["tables"] >= len(plan["tables"]) and 0 not in shown["rows"]
        # every figure the page embeds is shown (a study cut to two plain cells has fewer)
        assert shown["images"] == page.count("<img") >= 2 and shown["broken"] == []

    # damage: one run interrupted (result.json gone, checkpoint kept), one never started
    train = sorted(f for f in folders if f.name.startswith("seg-"))
    interrupted, missing = train[0], train[-1]
    (interrupted / "result.json").unlink()
    for item in missing.iterdir():
        item.unlink()
    missing.rmdir()
    untouched = {
        f: (f / "result.json").stat().st_mtime_ns
        for f in folders
        if f not in (interrupted, missing)
    }
    caplog.set_level("INFO", logger="lowlabel.study.runner")
    second = run_study(
        study,
        "quick",
        str(tiny_dataset),
        out,
        seeds=[0],
        overrides=SMOKE,
        jobs=2,
        progress=False,
        report=False,
    )
    assert second.ran == 2 and second.skipped == first.runs - 2 and second.failed == {}
    # before it started, the rerun said what it would do and how long that would take
    head = next(r.getMessage() for r in caplog.records if "estimated time left" in r.getMessage())
    assert f"{first.runs} runs, {first.runs - 2} done, 2 to run" in head
    if first.runs > 2:  # a finished run to estimate from (a study cut to two cells has none)
        assert "unknown" not in head and head.rstrip().endswith(" s")
    else:
        assert "unknown until the first run finishes" in head
    assert all((f / "result.json").stat().st_mtime_ns == t for f, t in untouched.items())
    assert (interrupted / "result.json").exists() and (missing / "result.json").exists()

    # the report rebuilds from the runs alone, each run once
    code, text = _cli(monkeypatch, capsys, "report", out, "--no-overlays")
    assert code == 0 and "report.html" in text
    rows = _runs_csv(out)
    assert len(rows) == first.runs and {r["status"] for r in rows} == {"finished"}


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_study_list(monkeypatch, capsys):
    code, text = _cli(monkeypatch, capsys, "study", "list")
    lines = text.splitlines()
    assert code == 0 and [line.split(":")[0] for line in lines] == ["levers", "seed"]
    assert "1a" in lines[1] and "(levers)" in lines[0]


@pytest.mark.parametrize(
    "content, message",
    [
        ("name: [unclosed", "not valid YAML"),
        ("tables: {t: {axes: [nope]}}", "unknown axis 'nope'"),
        ("tables: {t: {set: {train.stepz: 3}}}", "unknown config key 'train.stepz'"),
        ("colour: red\ntables: {t: {}}", "unknown study key 'colour'"),
    ],
)
def test_cli_bad_study_file_exits_2(tmp_path, monkeypatch, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    code, text = _cli(monkeypatch, capsys, "study", path, "--out", tmp_path / "st")
    assert code == 2 and text.startswith("error:") and message in text
    assert not (tmp_path / "st").exists()


def test_cli_unknown_study_and_report_of_non_study(tmp_path, monkeypatch, capsys):
    code, text = _cli(monkeypatch, capsys, "study", "no-such-study")
    assert code == 2 and "not a built-in study" in text
    code, text = _cli(monkeypatch, capsys, "report", tmp_path)
    assert code == 2 and "no plan.json" in text


def test_mlflow_missing_or_bad_uri_is_a_clear_error(tmp_path, tiny_dataset):
    from lowlabel.study.runner import run_study

    path = write_study(tmp_path / "t.yaml", tiny_dataset)
    try:
        import mlflow  # noqa: F401

        uri, message = str(tmp_path / "mlruns"), "give a database or server URI"
    except ImportError:
        uri, message = "sqlite:///x.db", "needs MLflow"
    with pytest.raises(LowlabelError, match=message):
        run_study(path, study_dir=tmp_path / "st", mlflow_uri=uri, progress=False)
    assert not (tmp_path / "st").exists()


def test_mlflow_logs_each_run(tmp_path, tiny_dataset):
    mlflow = pytest.importorskip("mlflow")
    from lowlabel.study.runner import run_study

    path = write_study(
        tmp_path / "t.yaml",
        tiny_dataset,
        seeds=[0],
        tables={"t": {"set": {"model.levels": 3, "data.budget": 2}}},
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_study(
        path, study_dir=tmp_path / "st", mlflow_uri=uri, jobs=2, progress=False, report=False
    )
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["st"])
    assert len(runs) == result.runs == 1
    assert "metrics.test_mean_dice" in runs.columns and "params.model.levels" in runs.columns


def test_learning_curves_mark_the_plateau_schedules_rate_drops(tmp_path, monkeypatch):
    from lowlabel.study.report import figures

    study = study_spec.load_study("seed")
    cells = study_spec.expand(study, "quick", None, tmp_path / "st", seeds=[0, 1])
    plan = json.loads(study_spec.plan_json(study, "quick", cells))
    runs = _fake_runs(plan, {})
    for run in runs:
        run.result = {**run.result, "stopped_early": True}
        run.metrics = [
            {"step": s, "train_loss": 1.0 / s, "val_dice": 0.5 + 0.01 * s, "lr_drop": s == 3}
            for s in (1, 2, 3, 4, 5)
        ]
    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig) or path)
    assert figures.learning_curves(plan, runs, "1b", tmp_path / "c.png") is not None
    dice_axes = saved[0].axes[1]
    drops = [line for line in dice_axes.lines if line.get_marker() == "v"]
    assert len(drops) == 3 * 2  # one per run: 3 patience cells x 2 seeds
    assert all(list(line.get_xdata()) == [3] for line in drops)
    assert "v rate / 10" in dice_axes.get_title()
