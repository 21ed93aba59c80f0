"""The training loop: early stopping, best weights, checkpoints, determinism, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_dataset, tiny_overrides
from helpers import assert_same_run, crash_in_validation, metric_rows
from safetensors.torch import load_file

from lowlabel import checkpoint
from lowlabel.config import RunConfig, from_dict, load_config, run_dir
from lowlabel.engine import loop, objectives
from lowlabel.engine.loop import RunResult, fit
from lowlabel.engine.runs import load_run
from lowlabel.errors import LowlabelError

STEPS = {"train.steps": 6, "train.val_every": 2, "train.patience": 0, "model.dropout": 0.2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), n=5, shape=(24, 24, 24))


def _cfg(dataset: Path, out: Path, **extra) -> RunConfig:
    return load_config(None, tiny_overrides(dataset, out, **{**STEPS, **extra}))


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> tuple[RunConfig, RunResult]:
    """One uninterrupted 6-step run, shared by the determinism and resume tests."""
    cfg = _cfg(dataset, tmp_path_factory.mktemp("ref"))
    return cfg, fit(cfg, progress=False)


# --- early stopping ------------------------------------------------------------------------------


class ScriptedValidation:
    """Stands in for ``validate``: returns scripted Dice values and snapshots the weights seen."""

    def __init__(self, dice: list[float]) -> None:
        self.dice, self.seen = dice, []

    def __call__(self, model, items, cfg) -> dict:
        self.seen.append({k: v.clone() for k, v in model.state_dict().items()})
        d = self.dice[len(self.seen) - 1]
        return {"val_dice": d, "val_dice_csf": d, "val_dice_gm": d, "val_dice_wm": d}


@pytest.mark.parametrize(
    ("dice", "patience", "min_delta", "stop_at", "best_at"),
    [
        ([0.2, 0.5, 0.4, 0.45, 0.9, 0.9, 0.9, 0.9], 2, 0.0, 4, 2),
        ([0.2, 0.5, 0.52, 0.53, 0.9, 0.9, 0.9, 0.9], 2, 0.05, 4, 2),  # gains < min_delta
        ([0.2, 0.5, 0.4, 0.45, 0.3, 0.3, 0.3, 0.3], 3, 0.0, 5, 2),
        ([0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1], 0, 0.0, 8, 1),  # patience 0: no early stop
    ],
)
def test_early_stopping_counts_validations_and_restores_best_weights(
    dataset, tmp_path, monkeypatch, dice, patience, min_delta, stop_at, best_at
):
    scripted = ScriptedValidation(dice)
    monkeypatch.setattr(objectives, "validate", scripted)
    evaluated = {}

    def fake_evaluate(model, cfg, subjects, out, progress):
        evaluated.update({k: v.clone() for k, v in model.state_dict().items()})
        return {"summary": {"mean_dice": 0.0}}

    monkeypatch.setattr(loop, "evaluate_model", fake_evaluate)
    cfg = _cfg(
        dataset,
        tmp_path,
        **{
            "train.steps": 8,
            "train.val_every": 1,
            "train.patience": patience,
            "train.min_delta": min_delta,
        },
    )
    result = fit(cfg, progress=False)

    assert len(scripted.seen) == stop_at
    assert result.steps == stop_at
    assert result.stopped_early == (stop_at < 8)
    assert result.best_step == best_at
    assert result.best_val_dice == dice[best_at - 1]
    rows = metric_rows(Path(result.run_dir))
    assert [r["step"] for r in rows] == list(range(1, stop_at + 1))
    assert sum(r["best"] for r in rows) >= 1 and rows[best_at - 1]["best"]
    assert not any(r["best"] for r in rows[best_at:])
    # the weights saved as best, and evaluated at the end, are those seen at the best validation
    best = checkpoint.split(load_file(str(Path(result.run_dir) / "best.safetensors")), "model")
    snapshot = scripted.seen[best_at - 1]
    for key, value in snapshot.items():
        assert torch.equal(best[key], value), key
        assert torch.equal(evaluated[key], value), key
    # ... and training did move them afterwards, so restoring them was not a no-op
    assert (
        any(
            not torch.equal(scripted.seen[-1][k], snapshot[k])
            for k in snapshot
            if snapshot[k].is_floating_point()
        )
        or stop_at == best_at
    )


def test_plateau_schedule_drops_the_learning_rate_once_then_stops_and_resumes_after_the_drop(
    dataset, tmp_path, monkeypatch
):
    # patience 2: validations 3-4 do not improve, so the rate drops tenfold after step 4 and
    # patience starts again; 5 improves, 6-7 do not, so the run stops at step 7 with 5 best
    dice = [0.2, 0.5, 0.4, 0.45, 0.6, 0.55, 0.5, 0.9, 0.9, 0.9]
    extra = {"train.steps": 10, "train.val_every": 1, "train.patience": 2}
    rates: list[float] = []
    real_rate = loop.set_learning_rate

    def recorded(optimizer, *args):
        real_rate(optimizer, *args)
        rates.append(optimizer.param_groups[0]["lr"])

    monkeypatch.setattr(loop, "set_learning_rate", recorded)
    monkeypatch.setattr(objectives, "validate", ScriptedValidation(dice))
    cfg = _cfg(dataset, tmp_path / "a", **{**extra, "train.schedule": "plateau"})
    result = fit(cfg, progress=False)

    lr = cfg.train.lr
    assert result.steps == 7 and result.stopped_early and result.best_step == 5
    assert rates == pytest.approx([lr] * 4 + [lr / 10] * 3)
    rows = metric_rows(Path(result.run_dir))
    assert [r["step"] for r in rows if r.get("lr_drop")] == [4]

    # the constant schedule stops where the plateau one dropped the rate
    monkeypatch.setattr(objectives, "validate", ScriptedValidation(dice))
    constant = fit(_cfg(dataset, tmp_path / "b", **extra), progress=False)
    assert constant.steps == 4 and constant.best_step == 2

    # a run that crashes after the drop (in its sixth validation) resumes at the lower rate
    monkeypatch.setattr(objectives, "validate", ScriptedValidation(dice))
    resumed = _cfg(dataset, tmp_path / "c", **{**extra, "train.schedule": "plateau"})
    crash_in_validation(resumed, monkeypatch, after=5)
    rates.clear()
    again = fit(resumed, progress=False, resume=True)
    assert again.steps == 7 and again.best_step == 5
    assert rates == pytest.approx([lr / 10] * 2)


# --- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    tensors = {
        "model.w": torch.randn(3, 4),
        "model.b": torch.arange(5),
        "optim.0.exp_avg": torch.randn(2, dtype=torch.float64),
    }
    meta = {"kind": "train", "step": 7, "config": {"seed": 3}, "val_dice": 0.5}
    checkpoint.save(tmp_path / "c.safetensors", tensors, meta)
    loaded, loaded_meta = checkpoint.load(tmp_path / "c.safetensors")
    assert loaded_meta == meta == checkpoint.read_meta(tmp_path / "c.safetensors")
    assert loaded.keys() == tensors.keys()
    for key in tensors:
        assert torch.equal(loaded[key], tensors[key]) and loaded[key].dtype == tensors[key].dtype
    assert sorted(checkpoint.split(loaded, "model")) == ["b", "w"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temporary left


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    tensors, groups = checkpoint.optimizer_tensors(opt)
    tensors.update({f"model.{k}": v for k, v in net.state_dict().items()})
    checkpoint.save(tmp_path / "c.safetensors", tensors, {"optimizer": groups})
    tensors, meta = checkpoint.load(tmp_path / "c.safetensors")
    twin = torch.nn.Linear(4, 2)
    twin.load_state_dict(checkpoint.split(tensors, "model"))
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.5)
    checkpoint.load_optimizer(twin_opt, tensors, meta["optimizer"])
    assert twin_opt.param_groups[0]["lr"] == 0.1
    for model, optimizer in ((net, opt), (twin, twin_opt)):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
    assert torch.equal(net.weight, twin.weight) and torch.equal(net.bias, twin.bias)


def test_run_checkpoints_describe_themselves(reference):
    cfg, result = reference
    out = Path(result.run_dir)
    assert out == run_dir(cfg)
    best_meta = checkpoint.read_meta(out / "best.safetensors")
    assert from_dict(best_meta["config"]) == cfg
    assert best_meta["step"] == result.best_step and best_meta["val_dice"] == result.best_val_dice
    last_meta = checkpoint.read_meta(out / "last.safetensors")
    assert last_meta["state"]["step"] == 6
    loaded_cfg, model = load_run(out)
    assert loaded_cfg == cfg
    best = checkpoint.split(load_file(str(out / "best.safetensors")), "model")
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[key])
    for name in (
        "config.yaml",
        "splits.json",
        "metrics.jsonl",
        "evaluation.csv",
        "evaluation.json",
        "provenance.json",
        "result.json",
    ):
        assert (out / name).is_file(), name
    assert RunResult.load(out / "result.json") == result


def test_weights_that_do_not_fit_the_config_are_an_error(reference, tmp_path):
    cfg, result = reference
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(result.run_dir, copy)
    text = (copy / "config.yaml").read_text().replace("channels: 4", "channels: 8")
    (copy / "config.yaml").write_text(text)
    with pytest.raises(LowlabelError, match="best.safetensors: weights do not fit"):
        load_run(copy)


# --- determinism and resume ----------------------------------------------------------------------


def test_two_seeded_cpu_runs_are_identical(reference, tmp_path):
    cfg, result = reference
    twin = fit(cfg.replace(out=str(tmp_path)), progress=False)
    assert_same_run(Path(result.run_dir), Path(twin.run_dir))
    assert twin.test == result.test and twin.best_val_dice == result.best_val_dice
    prov = json.loads((Path(twin.run_dir) / "provenance.json").read_text())
    assert prov["seed"] == cfg.seed
    assert {"torch", "monai", "numpy", "python", "git_revision", "lowlabel"} <= prov.keys()
    # another seed is another run
    other = fit(cfg.replace(out=str(tmp_path), seed=1), progress=False)
    assert metric_rows(Path(other.run_dir)) != metric_rows(Path(result.run_dir))


def test_resume_after_a_crash_matches_the_uninterrupted_run(reference, tmp_path, monkeypatch):
    cfg, result = reference
    cfg = cfg.replace(out=str(tmp_path))
    crash_in_validation(cfg, monkeypatch)
    out = run_dir(cfg)
    assert checkpoint.read_meta(out / "last.safetensors")["state"]["step"] == 2
    assert not (out / "result.json").exists()
    # without --resume the half-finished run is not overwritten
    with pytest.raises(LowlabelError, match="--resume"):
        fit(cfg, progress=False)
    resumed = fit(cfg, resume=True, progress=False)
    assert_same_run(Path(result.run_dir), out)
    assert resumed.test == result.test and resumed.steps == 6


def test_resume_of_a_finished_run_reuses_it(reference, monkeypatch):
    cfg, result = reference
    stamp = (Path(result.run_dir) / "best.safetensors").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(objectives, "validate", no_training)
    assert fit(cfg, resume=True, progress=False) == result
    assert (Path(result.run_dir) / "best.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(LowlabelError, match="exists"):
        fit(cfg, progress=False)


def test_a_run_that_stopped_early_and_crashed_in_evaluation_resumes_without_training(
    dataset, tmp_path, monkeypatch
):
    monkeypatch.setattr(objectives, "validate", ScriptedValidation([0.2, 0.5, 0.4, 0.45, 0.9, 0.9]))

    def crash(*args):
        raise RuntimeError("killed during evaluation")

    monkeypatch.setattr(loop, "evaluate_model", crash)
    cfg = _cfg(dataset, tmp_path, **{"train.steps": 6, "train.val_every": 1, "train.patience": 2})
    with pytest.raises(RuntimeError, match="during evaluation"):
        fit(cfg, progress=False)
    never = ScriptedValidation([])  # any further training step would validate and fail here
    monkeypatch.setattr(objectives, "validate", never)
    evaluated = {}

    def fake_evaluate(model, cfg, subjects, out, progress):
        evaluated.update({k: v.clone() for k, v in model.state_dict().items()})
        return {"summary": {"mean_dice": 0.5}}

    monkeypatch.setattr(loop, "evaluate_model", fake_evaluate)
    result = fit(cfg, resume=True, progress=False)
    assert never.seen == []
    assert (result.steps, result.best_step, result.stopped_early) == (4, 2, True)
    assert result.test == {"mean_dice": 0.5}
    best = checkpoint.split(load_file(str(Path(result.run_dir) / "best.safetensors")), "model")
    assert all(torch.equal(best[k], v) for k, v in evaluated.items())


def test_2d_runs_are_deterministic_too(dataset, tmp_path):
    extra = {"data.spatial_dims": 2, "data.patch_size": [16, 16], "train.steps": 4}
    a = fit(_cfg(dataset, tmp_path / "a", **extra), progress=False)
    b = fit(_cfg(dataset, tmp_path / "b", **extra), progress=False)
    assert_same_run(Path(a.run_dir), Path(b.run_dir))
    assert len(metric_rows(Path(a.run_dir))) == 2 and a.test["n"] == 2
