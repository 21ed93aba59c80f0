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

import pytest
from helpers import write_study

from lowlabel.config import run_dir
from lowlabel.errors import LowlabelError
from lowlabel.study import spec as study_spec
from lowlabel.study.stats import paired, summarize

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
    assert pre.cfg.pretrain.save_steps == (5, 10, 15, 30)
    assert pre.cfg.data.patch_size == (64, 64, 64)
    base = next(c for c in quick if c.labels.get("1a") == {"model": "3-level", "data": "low"})
    assert base.cfg.train.steps == 50 and base.cfg.train.val_every == 5
    transfer = [c for c in quick if "2b" in c.labels]
    assert all(c.cfg.train.steps == 20 for c in transfer)  # 500 * 0.01, raised to min_train_steps
    assert {c.needs for c in transfer if c.needs} == {("autoencoder", 30), ("genesis", 30)}
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
    assert d.diff.ci_low > 0 and d.verdict.startswith("holds")
    noisy = paired(
        "x", "mean_dice", {"0": 0.8, "1": 0.7, "2": 0.9}, {"0": 0.75, "1": 0.8, "2": 0.85}
    )
    assert noisy.diff.ci_low < 0 < noisy.diff.ci_high
    assert noisy.verdict.startswith("within noise")
    assert "no conclusion" in paired("y", "m", {"0": 1.0}, {"0": 0.0}).verdict


# ---------------------------------------------------------------------------------------------
# running


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from lowlabel import cli

    monkeypatch.setattr(sys, "argv", ["lowlabel", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out + out.err


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
    name, tmp_path, tiny_dataset, monkeypatch, capsys
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
    assert 'src="figures/' not in page  # self-contained
    if shutil.which("chromium"):  # the page renders in a real browser, tables and images shown
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
        from check_report_html import check

        shown = check(out / "report.html")
        assert shown["tables"] >= len(plan["tables"]) and 0 not in shown["rows"]
        assert shown["images"] >= 3 and shown["broken"] == []

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
