"""The run folder: made only for a run that starts, named by what changes results, resumed
visibly; and one thread policy for train and evaluate."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from conftest import tiny_overrides

from lowlabel import cli
from lowlabel.config import config_hash, dump_yaml, load_config, run_dir
from lowlabel.errors import LowlabelError


def _cfg(tiny_dataset, tmp_path, **extra):
    return load_config(None, tiny_overrides(tiny_dataset, tmp_path / "runs", **extra))


def _main(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["lowlabel", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code


def _set_args(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]


@pytest.mark.parametrize(
    "extra",
    [
        {"data.budget": 30},  # more labels than the dataset has
        {"data.dataset": "does/not/exist.json"},
        {"transfer.mode": "finetune", "transfer.init_from": "no-such-checkpoint.safetensors"},
    ],
    ids=["budget", "missing-data", "missing-init"],
)
def test_a_train_that_fails_before_its_first_step_leaves_no_run_folder(
    tiny_dataset, tmp_path, monkeypatch, capsys, extra
):
    overrides = tiny_overrides(tiny_dataset, tmp_path / "runs", **extra)
    assert _main(monkeypatch, "train", "--quiet", *_set_args(overrides)) == 2
    assert capsys.readouterr().err.startswith("error: ")
    runs = tmp_path / "runs"
    left = [p.name for p in runs.iterdir() if p.name != "splits"] if runs.exists() else []
    assert left == []


def test_a_pretrain_that_fails_before_its_first_step_leaves_no_run_folder(tiny_dataset, tmp_path):
    from lowlabel.engine.pretrain import pretrain

    cfg = _cfg(tiny_dataset, tmp_path, **{"data.n_test": 4, "data.n_val": 4})  # no pool
    with pytest.raises(LowlabelError, match="leave none to train on"):
        pretrain(cfg, progress=False)
    assert not run_dir(cfg, "pretrain").exists()


@pytest.mark.parametrize("existed", [False, True])
def test_a_failure_while_setting_up_removes_only_a_folder_it_made(
    tiny_dataset, tmp_path, monkeypatch, existed
):
    from lowlabel.engine import loop

    def broken(*args):
        raise LowlabelError("broken setup")

    monkeypatch.setattr(loop, "segmentation", broken)
    cfg = _cfg(tiny_dataset, tmp_path)
    folder = run_dir(cfg)
    if existed:
        folder.mkdir(parents=True)
        (folder / "notes.txt").write_text("mine")
    with pytest.raises(LowlabelError, match="broken setup"):
        loop.fit(cfg, progress=False)
    assert folder.exists() == existed
    if existed:
        assert (folder / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.threads", 3),
        ("train.workers", 0),
        ("train.compile", True),
        ("train.channels_last", True),
    ],
)
def test_execution_keys_do_not_rename_the_run(tiny_config, key, value):
    assert run_dir(tiny_config.replace(**{key: value})) == run_dir(tiny_config)


def test_results_keys_still_rename_the_run(tiny_config):
    assert config_hash(tiny_config.replace(**{"train.batch_size": 3})) != config_hash(tiny_config)


SITE_KEYS = (
    "site",
    "scanner_like",
    "gamma",
    "bias_field_coeff",
    "contrast_prob",
    "contrast_shift",
    "histogram_prob",
    "histogram_points",
    "thick_slice_prob",
    "thick_slice_mm",
    "lowres_prob",
    "lowres_zoom",
    "blur_prob",
    "blur_sigma",
)


def test_default_execution_settings_keep_the_folder_names_of_older_runs(tiny_config):
    import hashlib

    from lowlabel.config import to_dict

    for precision in ("auto", "bf16"):
        # all execution keys at their defaults (the device and determinism are newer than these
        # runs: not in their configs at all), the precision as the bf16 key it replaced
        cfg = tiny_config.replace(**{"train.threads": 0, "train.precision": precision})
        data = to_dict(cfg)
        del data["name"], data["out"], data["semi"]
        del data["train"]["device"], data["train"]["deterministic"]
        del data["loss"], data["model"]["deep_supervision"]  # added later, at their defaults here
        del data["pretrain"]["unlabelled"], data["transfer"]["scope"], data["transfer"]["lr_scale"]
        for key in SITE_KEYS:  # so were the site augmentation's keys
            del data["augment"][key]
        data["train"]["bf16"] = data["train"].pop("precision") == "bf16"
        old = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
        assert config_hash(cfg) == old


def test_a_pretraining_run_is_hashed_on_what_it_reads(tiny_config):
    pre = tiny_config
    for key, value in (("train.patience", 9), ("data.budget", 4), ("train.lr", 0.5)):
        assert run_dir(pre.replace(**{key: value}), "pretrain") == run_dir(pre, "pretrain")
    for key, value in (("pretrain.steps", 7), ("data.draw", 1), ("model.channels", 8)):
        assert run_dir(pre.replace(**{key: value}), "pretrain") != run_dir(pre, "pretrain")


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"transfer.mode": "frozen"}, "needs a pretrained checkpoint"),
        ({"transfer.init_from": "x.safetensors"}, "mode is scratch"),
    ],
)
def test_transfer_mode_and_init_from_must_agree_in_any_config(tiny_config, extra, message):
    with pytest.raises(LowlabelError, match=message):
        tiny_config.replace(**extra)


def test_resuming_says_from_which_step(tiny_dataset, tmp_path, monkeypatch, capsys):
    from lowlabel.engine import objectives
    from lowlabel.engine.loop import fit

    overrides = tiny_overrides(tiny_dataset, tmp_path / "runs", **{"data.n_test": 0})
    real = objectives.validate
    metrics = run_dir(load_config(None, overrides)) / "metrics.jsonl"

    def crash_on_second(model, items, cfg):
        if metrics.exists() and metrics.read_text().strip():
            raise KeyboardInterrupt
        return real(model, items, cfg)

    monkeypatch.setattr(objectives, "validate", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        fit(load_config(None, overrides), progress=False)
    monkeypatch.setattr(objectives, "validate", real)
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["lowlabel", "train", "--resume", *_set_args(overrides)])
    cli.main()
    captured = capsys.readouterr()
    assert f"resuming {metrics.parent} at step 2" in captured.err
    assert captured.out.startswith(f"run {metrics.parent}: 4 steps")


def test_evaluate_uses_the_thread_policy_of_training(tiny_dataset, tmp_path, monkeypatch):
    from lowlabel.engine.loop import fit
    from lowlabel.engine.runs import evaluate_run

    cfg = _cfg(tiny_dataset, tmp_path)
    folder = fit(cfg, progress=False).run_dir
    # the run asked for the default policy: all cores but those of its one loader worker
    policy = cfg.replace(**{"train.threads": 0, "train.workers": 1})
    (tmp_path / "runs" / os.path.basename(folder) / "config.yaml").write_text(dump_yaml(policy))
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    before = torch.get_num_threads()
    try:
        evaluate_run(folder, progress=False)
        assert torch.get_num_threads() == 3  # as in training, not all 4 cores
    finally:
        torch.set_num_threads(before)


def test_a_kill_during_a_safetensors_write_leaves_nothing_after_resume(tmp_path):
    """safetensors writes through a ``.tmpXXXXXX`` file of its own; a run killed during
    ``save_file`` left one in its folder, which resuming did not remove."""
    from lowlabel.atomic import remove_temporaries

    for name in (".tmpZZh0nR", ".last.x1.tmp.safetensors", "best.safetensors", "tmp.txt"):
        (tmp_path / name).write_bytes(b"\0")
    assert remove_temporaries(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "tmp.txt"]
