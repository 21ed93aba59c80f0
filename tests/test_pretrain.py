"""Pretraining: what the run folder holds, which images it saw, exact resume, CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from conftest import tiny_overrides
from typer.testing import CliRunner

from lowlabel import checkpoint
from lowlabel.cli import app
from lowlabel.config import load_config, run_dir
from lowlabel.errors import LowlabelError


def _cfg(dataset, out, **extra):
    values = {"pretrain.steps": 4, "pretrain.save_steps": [2], "train.val_every": 2}
    values.update(extra)
    return load_config(None, tiny_overrides(dataset, out, **values))


def test_pretrain_run_folder_and_images_seen(tiny_dataset, tmp_path, monkeypatch):
    from lowlabel.engine import pretrain as pretrain_module
    from lowlabel.engine.pretrain import pretrain

    class SlowBatches(pretrain_module.PretrainBatches):  # training time dominates the run's
        def __getitem__(self, step):
            time.sleep(0.3)
            return super().__getitem__(step)

    monkeypatch.setattr(pretrain_module, "PretrainBatches", SlowBatches)
    cfg = _cfg(tiny_dataset, tmp_path / "runs", **{"pretrain.method": "genesis"})
    t0 = time.perf_counter()
    result = pretrain(cfg, progress=False)
    wall = time.perf_counter() - t0
    run = tmp_path / "runs" / result.run_dir.split("/")[-1]
    assert result.steps == 4
    # the run's time, its training counted once (it used to be counted twice)
    trained = [json.loads(line)["seconds"] for line in (run / "metrics.jsonl").open()][-1]
    assert 1.2 <= trained < result.seconds <= wall
    assert sorted(result.checkpoints) == ["2", "4"]
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "last.safetensors",
        "checkpoint-2.safetensors",
        "checkpoint-4.safetensors",
        "reconstructions.png",
        "result.json",
        "pool.json",
    ):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert {"train_loss", "val_mse", "val_mae"} <= set(rows[0])
    assert result.val_mse == pytest.approx(rows[-1]["val_mse"])
    assert (run / "reconstructions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the pool is the training pool (budget 0): never a validation or test subject
    splits = json.loads(next((tmp_path / "runs" / "splits").glob("*.json")).read_text())
    held_out = set(splits["test"]) | set(splits["val"])
    _, meta = checkpoint.load(run / "checkpoint-2.safetensors")
    assert meta["kind"] == "pretrain" and meta["step"] == 2 and meta["method"] == "genesis"
    seen = [p.split("/")[-1].split(".")[0] for p in meta["images"]]
    assert len(seen) == 8 - 2 - 1
    assert not held_out & set(seen)
    assert sum(meta["patches_per_image"].values()) == 2 * cfg.train.batch_size

    again = pretrain(cfg, resume=True, progress=False)
    assert again == result
    with pytest.raises(LowlabelError, match="--resume"):
        pretrain(cfg, progress=False)


def test_pretrain_resume_is_bit_identical(tiny_dataset, tmp_path, monkeypatch):
    import lowlabel.engine.pretrain as engine

    extra = {
        "pretrain.method": "genesis",
        "pretrain.save_steps": [],
        "model.norm": "batch",
        "model.dropout": 0.2,
    }
    whole = engine.pretrain(_cfg(tiny_dataset, tmp_path / "a", **extra), progress=False)

    cfg = _cfg(tiny_dataset, tmp_path / "b", **extra)
    real = engine.validate_recon
    calls = {"n": 0}

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # dies at step 4, after the state of step 2 was saved
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "validate_recon", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        engine.pretrain(cfg, progress=False)
    monkeypatch.setattr(engine, "validate_recon", real)
    _, meta = checkpoint.load(run_dir(cfg, "pretrain") / "last.safetensors")
    assert meta["state"]["step"] == 2
    resumed = engine.pretrain(cfg, resume=True, progress=False)

    a, _ = checkpoint.load(whole.checkpoints["4"])
    b, _ = checkpoint.load(resumed.checkpoints["4"])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.val_mse == whole.val_mse


def test_genesis_corruption_is_seeded_and_autoencoder_is_identity(tiny_config):
    from lowlabel.models.pretrain import corrupt

    x = np.random.default_rng(0).normal(size=(1, 16, 16, 16)).astype(np.float32)
    gen = tiny_config.replace(**{"pretrain.method": "genesis", "pretrain.paint_prob": 1.0})
    a = corrupt(x, gen, np.random.default_rng([3, 7]))
    b = corrupt(x, gen, np.random.default_rng([3, 7]))
    c = corrupt(x, gen, np.random.default_rng([3, 8]))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.allclose(a, x)
    ae = tiny_config.replace(**{"pretrain.method": "autoencoder"})
    assert np.array_equal(corrupt(x, ae, np.random.default_rng(0)), x)


def test_unknown_method_names_the_key(tiny_config):
    with pytest.raises(LowlabelError, match="pretrain.method"):
        tiny_config.replace(**{"pretrain.method": "noskip"})


def test_reconstruction_figure_one_row_per_step(tmp_path):
    import matplotlib.image

    from lowlabel.figures import reconstruction_figure

    vol = np.random.default_rng(0).normal(size=(20, 24, 16))
    one = reconstruction_figure([("step 1", vol, vol * 0.9, vol)], tmp_path / "one.png")
    three = reconstruction_figure(
        [(f"step {i}", vol, vol, vol) for i in range(3)], tmp_path / "three.png"
    )
    assert matplotlib.image.imread(three).shape[0] > 2 * matplotlib.image.imread(one).shape[0]


def test_cli_pretrain_help_and_run(tiny_dataset, tmp_path):
    runner = CliRunner()
    help_ = runner.invoke(app, ["pretrain", "--help"])
    assert help_.exit_code == 0
    for flag in ("--config", "--set", "--data", "--out", "--resume", "--quiet"):
        assert flag in help_.output
    train_help = runner.invoke(app, ["train", "--help"])
    assert "--init-from" in train_help.output and "--transfer" in train_help.output

    args = ["pretrain", "--data", str(tiny_dataset), "--out", str(tmp_path / "runs"), "--quiet"]
    for key, value in tiny_overrides(
        tiny_dataset, tmp_path / "runs", **{"pretrain.steps": 2, "train.val_every": 2}
    ).items():
        if key not in ("out", "data.dataset"):
            args += ["--set", f"{key}={json.dumps(value)}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "checkpoint 2:" in result.output
    assert "reconstructions.png" in result.output
