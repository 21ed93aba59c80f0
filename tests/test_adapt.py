"""Adapting a trained model: a bundle or run as ``--init-from`` with ``transfer.scope: all``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_dataset, tiny_overrides
from helpers import assert_same_run, cli, crash_in_validation, metric_rows

from lowlabel.config import load_config
from lowlabel.errors import LowlabelError


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict:
    """A trained 4-step run on one tiny site and its bundle, and a second site to adapt to."""
    from lowlabel.bundle import export
    from lowlabel.engine.loop import fit

    root = tmp_path_factory.mktemp("adapt")
    first = make_tiny_dataset(root / "site_a")
    second = make_tiny_dataset(root / "site_b", n=6, seed=40)
    result = fit(load_config(None, tiny_overrides(first, root / "runs")), progress=False)
    return {
        "root": root,
        "run_dir": Path(result.run_dir),
        "bundle": export(result.run_dir, root / "model"),
        "site_b": second,
    }


def _cfg(source: dict, out: Path, **extra) -> object:
    values = {"transfer.init_from": str(source["bundle"]), "transfer.mode": "finetune"}
    values.update(extra)
    return load_config(None, tiny_overrides(source["site_b"], out, **values))


def test_scope_all_loads_every_tensor_of_a_bundle(source, tmp_path):
    from lowlabel.bundle import load
    from lowlabel.data.transforms import preprocess
    from lowlabel.engine.inference import predict_logits
    from lowlabel.models.transfer import prepare
    from lowlabel.models.unet import build_model

    cfg = _cfg(source, tmp_path / "runs", **{"transfer.scope": "all"})
    torch.manual_seed(99)
    model = build_model(cfg.model, 3)
    setup = prepare(model, cfg, tmp_path)
    bundled = load(source["bundle"])

    state, theirs = model.state_dict(), bundled.model.state_dict()
    assert state.keys() == theirs.keys()
    assert all(torch.equal(state[k], theirs[k]) for k in state)
    report = json.loads((tmp_path / "transfer.json").read_text())
    assert report["scope"] == "all" and report["n_loaded"] == report["of"] == len(state)
    assert sorted(e["target"] for e in report["loaded"]) == sorted(state)
    assert report["skipped"] == [] and report["shape_mismatches"] == []
    assert report["origin"]["kind"] == "bundle"
    assert report["origin"]["provenance"]["run_dir"] == str(source["run_dir"].resolve())

    # at step 0 the run predicts exactly what the bundle predicts
    image = Path(source["site_b"]).parent / "images" / "sub00.nii.gz"
    x = preprocess(cfg.data, keys=("image",))({"image": str(image)})["image"]
    model.eval()
    assert torch.equal(predict_logits(model, x, cfg), predict_logits(bundled.model, x, cfg))

    # fine-tuning a whole trained network: a tenth of train.lr by default, for every group
    assert report["lr_scale"] == 0.1 and report["lr"] == pytest.approx(cfg.train.lr / 10)
    assert [g["lr"] for g in setup.param_groups(cfg.train.lr)] == pytest.approx([1e-4, 1e-4])
    explicit = cfg.replace(**{"transfer.lr_scale": 0.5})
    assert explicit.transfer.learning_rate_scale == 0.5
    # the encoder scope keeps today's rate
    assert cfg.replace(**{"transfer.scope": "encoder"}).transfer.learning_rate_scale == 1.0


def test_scope_encoder_from_a_bundle_loads_the_encoder_only(source, tmp_path):
    from lowlabel.models.transfer import prepare
    from lowlabel.models.unet import build_model

    cfg = _cfg(source, tmp_path / "runs")
    model = build_model(cfg.model, 3)
    prepare(model, cfg, tmp_path)
    report = json.loads((tmp_path / "transfer.json").read_text())
    assert report["scope"] == "encoder" and 0 < report["n_loaded"] < report["of"]

    # only a whole trained network is a candidate before training: no step-0 validation here
    from lowlabel.engine.loop import fit

    result = fit(cfg, progress=False, evaluate_test=False)
    assert [r["step"] for r in metric_rows(Path(result.run_dir))] == [2, 4]


def test_a_run_from_scratch_validates_first_after_val_every_steps(source):
    rows = metric_rows(source["run_dir"])
    assert [r["step"] for r in rows] == [2, 4]
    assert all(isinstance(r["train_loss"], float) for r in rows)


def test_scope_all_validates_the_starting_model_at_step_0(source, tmp_path):
    from lowlabel.bundle import load
    from lowlabel.data.cohort import load_cohort
    from lowlabel.engine.loop import fit
    from lowlabel.engine.objectives import validate

    cfg = _cfg(source, tmp_path / "runs", **{"transfer.scope": "all"})
    result = fit(cfg, progress=False, evaluate_test=False)
    rows = metric_rows(Path(result.run_dir))
    assert [r["step"] for r in rows] == [0, 2, 4]
    first = rows[0]
    assert first["train_loss"] is None and first["best"] is True
    # the row is the source model's own validation score on this run's validation set
    expected = validate(load(source["bundle"]).model, load_cohort(cfg, False).val_items, cfg)
    assert {k: first[k] for k in expected} == expected
    assert result.best_val_dice >= first["val_dice"]


def test_when_fine_tuning_only_hurts_the_starting_model_is_kept(
    source, tmp_path, monkeypatch, capsys
):
    from lowlabel import checkpoint
    from lowlabel.bundle import load

    # a learning rate this high wrecks the network at its first update
    ruin = {"train.lr": 10.0, "transfer.lr_scale": 1.0, "train.steps": 8, "train.patience": 2}
    overrides = tiny_overrides(source["site_b"], tmp_path / "runs", **ruin)
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    args = ["train", *sets, "--init-from", source["bundle"], "--scope", "all", "-q"]
    code, out, err = cli(args, monkeypatch, capsys)
    assert code == 0, err
    run = Path(out.split()[1].rstrip(":"))
    result = json.loads((run / "result.json").read_text())
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [0, 2, 4]  # patience 2 counts from step 0
    assert [r["best"] for r in rows] == [True, False, False]
    assert result["best_step"] == 0 and result["steps"] == 4 and result["stopped_early"]
    assert result["best_val_dice"] == rows[0]["val_dice"]
    assert f"4 steps (best 0: the starting model), val Dice {rows[0]['val_dice']:.3f}" in out

    tensors, meta = checkpoint.load(run / "best.safetensors")
    best, theirs = checkpoint.split(tensors, "model"), load(source["bundle"]).model.state_dict()
    assert best.keys() == theirs.keys() and meta["step"] == 0
    assert all(torch.equal(best[k], theirs[k]) for k in best)


def test_a_resumed_adaptation_does_not_validate_step_0_again(source, tmp_path, monkeypatch):
    from lowlabel import checkpoint
    from lowlabel.config import run_dir
    from lowlabel.engine import objectives
    from lowlabel.engine.loop import fit

    cfg = _cfg(source, tmp_path / "ref", **{"transfer.scope": "all"})
    reference = fit(cfg, progress=False)
    cfg = cfg.replace(out=str(tmp_path / "crashed"))
    crash_in_validation(cfg, monkeypatch)  # after step 0's, in step 2's
    out = run_dir(cfg)
    assert checkpoint.read_meta(out / "last.safetensors")["state"]["step"] == 0
    assert [r["step"] for r in metric_rows(out)] == [0]

    real, seen = objectives.validate, []

    def counted(model, items, c):
        seen.append(1)
        return real(model, items, c)

    monkeypatch.setattr(objectives, "validate", counted)
    fit(cfg, resume=True, progress=False)
    assert len(seen) == 2  # steps 2 and 4 only
    assert_same_run(Path(reference.run_dir), out)


def test_provenance_of_an_adapted_bundle_has_both_origins(source, tmp_path):
    from lowlabel.bundle import export
    from lowlabel.engine.loop import fit

    cfg = _cfg(source, tmp_path / "runs", **{"transfer.scope": "all"})
    adapted = fit(cfg, progress=False)
    info = json.loads((export(adapted.run_dir, tmp_path / "adapted") / "bundle.json").read_text())
    mine = info["provenance"]
    assert mine["run_dir"] == str(Path(adapted.run_dir).resolve())
    assert mine["dataset"] == str(source["site_b"])
    start = mine["initialised_from"]
    assert start["kind"] == "bundle" and start["model_dir"] == str(source["bundle"].resolve())
    assert start["scope"] == "all" and start["mode"] == "finetune"
    assert start["provenance"]["run_dir"] == str(source["run_dir"].resolve())
    assert start["provenance"]["dataset"] != mine["dataset"]

    # a run folder as the source works too, and a chain nests: run -> adapted run -> this
    again = _cfg(source, tmp_path / "runs2", **{"transfer.init_from": adapted.run_dir})
    again = again.replace(**{"transfer.scope": "all"})
    from lowlabel.models.transfer import prepare
    from lowlabel.models.unet import build_model

    prepare(build_model(again.model, 3), again, tmp_path)
    report = json.loads((tmp_path / "transfer.json").read_text())
    assert report["origin"]["kind"] == "run"
    chain = report["origin"]["provenance"]["initialised_from"]["provenance"]
    assert chain["run_dir"] == str(source["run_dir"].resolve())


def test_a_different_network_is_one_line_naming_it(source, tmp_path, monkeypatch, capsys):
    from lowlabel.models.transfer import prepare
    from lowlabel.models.unet import build_model

    cfg = _cfg(source, tmp_path / "runs", **{"transfer.scope": "all", "model.channels": 8})
    with pytest.raises(LowlabelError, match="model.channels is 4 in the source, 8 in this run"):
        prepare(build_model(cfg.model, 3), cfg, tmp_path)
    assert not (tmp_path / "transfer.json").exists()

    overrides = tiny_overrides(source["site_b"], tmp_path / "runs", **{"model.levels": 4})
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    args = ["train", *sets, "--init-from", source["bundle"], "--scope", "all", "-q"]
    code, out, err = cli(args, monkeypatch, capsys)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "transfer.scope all needs the source's network" in err
    assert "model.levels is 3 in the source, 4 in this run" in err
    assert not (tmp_path / "runs").exists() or not any(
        p.name.startswith("run-") for p in (tmp_path / "runs").iterdir()
    )


def test_a_pretraining_source_with_scope_all_names_the_head(source, tmp_path):
    from lowlabel import checkpoint
    from lowlabel.config import to_dict
    from lowlabel.models.pretrain import build_pretrain_model
    from lowlabel.models.transfer import prepare
    from lowlabel.models.unet import build_model

    cfg = _cfg(source, tmp_path / "runs", **{"transfer.scope": "all"})
    path = tmp_path / "pre.safetensors"
    weights = build_pretrain_model(cfg).state_dict()
    meta = {"kind": "pretrain", "method": "genesis", "config": to_dict(cfg), "step": 2}
    checkpoint.save(path, {f"model.{k}": v for k, v in weights.items()}, meta)
    cfg = cfg.replace(**{"transfer.init_from": str(path)})
    with pytest.raises(LowlabelError, match="has no segmentation head"):
        prepare(build_model(cfg.model, 3), cfg, tmp_path)


def test_an_ensemble_bundle_is_refused_naming_its_runs(source, tmp_path):
    from lowlabel.bundle import export
    from lowlabel.models.transfer import prepare
    from lowlabel.models.unet import build_model

    run = source["run_dir"]
    ensemble = export([run, run], tmp_path / "ensemble")
    for init in (ensemble, ensemble / "model.safetensors"):
        cfg = _cfg(source, tmp_path / "runs", **{"transfer.init_from": str(init)})
        with pytest.raises(LowlabelError, match="an ensemble of 2 models cannot initialise"):
            prepare(build_model(cfg.model, 3), cfg, tmp_path)
