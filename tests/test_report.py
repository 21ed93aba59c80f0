"""The study report as a reader sees it, built from constructed run folders (no training): what
it says with one seed, the pretraining table at checkpoints between validations, a moved study
folder, the Dice-against-labels figure's lines, and 2D overlays."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lowlabel.study import spec as study_spec
from lowlabel.study.report import build_report
from lowlabel.study.report.figures import dice_series, overlays
from lowlabel.study.report.runs import Run, load_runs
from lowlabel.study.report.tables import pretrain_table


def _write_run(folder: Path, cell: dict, dice: float) -> None:
    """A finished run folder: result, metrics and (segmentation runs) a 2D overlay."""
    folder.mkdir(parents=True, exist_ok=True)
    if cell["kind"] == "pretrain":
        metrics = [
            {"step": s, "train_loss": 1.0 / s, "val_mse": 0.5 / s, "val_mae": 0.4 / s}
            for s in (25, 50, 75, 100)
        ]
        result = {"steps": 100}
    else:
        metrics = [
            {"step": s, "train_loss": 1.0 / s, "val_dice": dice * s / 100} for s in (50, 100)
        ]
        test = {"mean_dice": dice, "dice_csf": dice, "dice_gm": dice, "dice_wm": dice}
        result = {"test": test, "steps": 100, "best_step": 100, "n_labelled": 3}
        rng = np.random.default_rng(0)
        np.savez(
            folder / "overlay.npz",
            image=rng.random((3, 20, 24), dtype=np.float32),
            label=rng.integers(0, 4, (3, 20, 24), dtype=np.uint8),
            pred=rng.integers(0, 4, (3, 20, 24), dtype=np.uint8),
            slices=np.array([5, 10, 15]),
            subject=np.array("demo003"),
        )
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (folder / "result.json").write_text(json.dumps(result))


@pytest.fixture
def one_seed_study(tmp_path) -> Path:
    """The shipped seed study, quick profile (one seed), every run that needs no pretraining
    checkpoint finished; patience arms identical, as when no run stops early."""
    study = study_spec.load_study("seed")
    out = tmp_path / "study"
    cells = study_spec.expand(study, "quick", None, out, seeds=[0])
    plan = json.loads(study_spec.plan_json(study, "quick", cells))
    plan["steps"] = {t: [40, 80, 100] for t in plan["steps"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan))
    shutil.copy(study.path, out / "study.yaml")
    bumps = {"full": 0.02, "all": 0.02, "5-level": 0.004, "1": -0.01}
    for cell in plan["cells"]:
        levels = {v for lab in cell["labels"].values() for v in lab.values()}
        if cell.get("run_dir"):
            _write_run(Path(cell["run_dir"]), cell, 0.80 + sum(bumps.get(v, 0) for v in levels))
    return out


def test_one_seed_report_says_it_decides_nothing_and_names_a_profile_that_does(one_seed_study):
    build_report(one_seed_study)
    md = (one_seed_study / "report.md").read_text()
    assert "ONE SEED" in md and "one seed decides nothing" in md
    assert "too few seeds: one seed decides nothing (+" in md
    assert "--profile cpu" in md  # the shipped profile with enough seeds
    assert "SYNTHETIC demo cohort" in md
    # no column of "(no interval)" that reads as broken
    assert "(no interval)" not in md and "a - b (one run each side)" in md
    assert "[95% CI]" not in md.split("## Which differences hold")[0].split("## Table 1a")[0]
    # the patience arms are the same runs: said so, not "too few seeds"
    row = next(line for line in md.splitlines() if line.startswith("| patience 2 vs 5 |"))
    assert "| identical |" in row
    assert "Multiple comparisons" in md
    # every constructed run ends at its best step: each claim on them says so
    row = next(line for line in md.splitlines() if line.startswith("| residual units help |"))
    assert row.endswith("⚠ 2 of 2 runs still improving at their last step (not converged) |")
    # the original's step counts appear only where the original is described
    for line in md.splitlines():
        if line.startswith("## Table 2a"):
            assert "saved at steps 40/80/100" in line and "3000" not in line


def test_dice_against_labels_section_is_once_and_has_its_figure(one_seed_study):
    build_report(one_seed_study)
    md = (one_seed_study / "report.md").read_text()
    headings = [h for h in md.splitlines() if h.startswith("#") and "Dice against the number" in h]
    assert len(headings) == 1 and headings[0].startswith("## Table 1c")
    section = md.split(headings[0])[1].split("\n## ")[0]
    assert "![Test mean Dice against labelled subjects" in section
    assert md.count("figures/dice_vs_labels.png") == 1
    assert (one_seed_study / "figures" / "dice_vs_labels.png").stat().st_size > 0


def test_pretraining_table_reads_the_last_validation_before_each_checkpoint(one_seed_study):
    plan, runs = load_runs(one_seed_study)
    table = pretrain_table(plan, runs, "2a")
    rows = {r[0]: r for r in table.rows}
    # checkpoints at 40 and 80 fall between validations (every 25): no empty row
    assert set(rows) == {"40 (25)", "80 (75)", "100"}
    assert rows["40 (25)"][2] == f"{0.5 / 25:.4f}" and rows["100"][2] == f"{0.5 / 100:.4f}"
    assert all(r[-1] == "1/1" for r in table.rows)
    assert "last validation before it" in table.note


def test_moved_study_reports_its_own_runs(one_seed_study, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(one_seed_study, moved)
    # the copy's runs differ from the original's: the copy's report must show the copy's
    for result in (moved / "runs").glob("seg-*/result.json"):
        data = json.loads(result.read_text())
        data["test"]["mean_dice"] = 0.5
        result.write_text(json.dumps(data))
    _, runs = load_runs(moved)
    seg = [r for r in runs if r.kind == "train" and r.result]
    assert seg and all(r.folder.is_relative_to(moved) for r in seg)
    assert {r.value("mean_dice") for r in seg} == {0.5}
    shutil.rmtree(one_seed_study)  # the original gone: the copy still reports
    _, runs = load_runs(moved)
    assert sum(r.status == "finished" for r in runs) == len(seg) + 2  # + 2 pretraining runs


def _budget_runs(plan: dict, steps_of: dict[str, int]) -> list[Run]:
    runs = []
    for cell in plan["cells"]:
        if "1c" not in cell["labels"]:
            continue
        level = cell["labels"]["1c"]["budget"]
        n = {"all": 10}.get(level, int(level) if level.isdigit() else 0)
        config = {"train": {"steps": steps_of.get(level, 400)}}
        result = {"test": {"mean_dice": 0.7 + 0.01 * n}, "n_labelled": n}
        runs.append(
            Run(cell["key"], "train", cell["seed"], cell["labels"], None, result, [], config)
        )
    return runs


def test_dice_against_labels_never_mixes_step_budgets(tmp_path):
    study = study_spec.load_study("seed")
    cells = study_spec.expand(study, "quick", None, tmp_path / "st", seeds=[0, 1, 2])
    plan = json.loads(study_spec.plan_json(study, "quick", cells))
    same, ticks = dice_series(plan, _budget_runs(plan, {}), "1c")
    assert list(same) == ["400 steps"] and sorted(same["400 steps"]) == [1, 3, 10]
    assert ticks[10] == "all (10)" and ticks[3] == "3"  # the table's names
    mixed, _ = dice_series(plan, _budget_runs(plan, {"all": 800}), "1c")
    assert set(mixed) == {"400 steps", "800 steps"}
    assert sorted(mixed["800 steps"]) == [10] and sorted(mixed["400 steps"]) == [1, 3]
    assert all(len(v) == 3 for line in mixed.values() for v in line.values())  # 3 seeds


def test_overlays_of_2d_runs_show_every_slice_and_cell(one_seed_study, monkeypatch):
    from lowlabel.study.report import figures

    drawn = {}

    def keep(fig, path):
        drawn["fig"] = fig
        return path

    monkeypatch.setattr(figures, "_save", keep)
    plan, runs = load_runs(one_seed_study)
    assert overlays(plan, runs, "1a", one_seed_study / "o.png") is not None
    fig = drawn["fig"]
    shown = [ax for ax in fig.axes if ax.images]
    # image, reference and 10 cells, each on all 3 slices, in two blocks of 6 rows
    assert len(shown) == 12 * 3
    assert len(fig.axes) == 6 * 6
    # the reference drawn like the predictions: grey image under a label layer
    layers = sorted({len(ax.images) for ax in shown})
    assert layers == [1, 2] and sum(len(ax.images) == 1 for ax in shown) == 3
    texts = [t.get_text() for ax in shown for t in ax.texts]
    assert texts.count("L") == texts.count("R") == 36
    assert "reference" in texts and any(t.startswith("3-level, low\ntest Dice") for t in texts)
    titles = {ax.get_title() for ax in fig.axes} - {""}
    assert titles == {"slice 1 (z = 5)", "slice 2 (z = 10)", "slice 3 (z = 15)"}
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["CSF", "GM", "WM"]
