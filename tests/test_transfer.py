"""Transfer: explicit level-by-level encoder mapping, frozen means frozen, report, refusals."""

from __future__ import annotations

import json
import pickle
import sys

import pytest
import torch
from conftest import tiny_overrides

from lowlabel import checkpoint
from lowlabel.config import load_config, run_dir, to_dict
from lowlabel.errors import LowlabelError
from lowlabel.models.pretrain import build_pretrain_model
from lowlabel.models.transfer import block_names, encoder_blocks, prepare
from lowlabel.models.unet import build_model


def _cfg(dataset, out, **extra):
    return load_config(None, tiny_overrides(dataset, out, **extra))


def _pretrained(cfg, path):
    """A pretraining checkpoint of ``cfg``'s network with recognisable (seeded) weights."""
    torch.manual_seed(123)
    model = build_pretrain_model(cfg)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if "running" in name:  # stats a frozen encoder must keep
                buf.uniform_(0.5, 1.5)
    checkpoint.save(
        path,
        {f"model.{k}": v for k, v in model.state_dict().items()},
        {"kind": "pretrain", "method": "genesis", "config": to_dict(cfg), "step": 7},
    )
    return model


def test_encoder_blocks_follow_monai_nesting(tiny_config):
    three = build_model(tiny_config.model, 3)
    five_cfg = tiny_config.replace(**{"model.levels": 5, "data.patch_size": [32, 32, 32]})
    five = build_model(five_cfg.model, 3)
    assert block_names(three) == ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule"]
    assert block_names(five)[:3] == [
        "model.0",
        "model.1.submodule.0",
        "model.1.submodule.1.submodule.0",
    ]
    assert len(encoder_blocks(five)) == 5
    assert block_names(five)[-1] == "model" + ".1.submodule" * 4
    # channels double per level: the blocks really are the encoder, in order
    outs = [b.conv.out_channels for b in encoder_blocks(three)]
    assert outs == [4, 8, 16]


def test_four_level_pretraining_maps_into_three_levels(tiny_dataset, tmp_path):
    src_cfg = _cfg(tiny_dataset, tmp_path / "runs", **{"model.levels": 4})
    source = _pretrained(src_cfg, tmp_path / "pre.safetensors")
    cfg = _cfg(
        tiny_dataset,
        tmp_path / "runs",
        **{"transfer.init_from": str(tmp_path / "pre.safetensors"), "transfer.mode": "finetune"},
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare(model, cfg, tmp_path)
    report = json.loads((tmp_path / "transfer.json").read_text())

    assert [lv["level"] for lv in report["levels_mapped"]] == [0, 1, 2]
    assert report["levels_mapped"][2] == {
        "level": 2,
        "source": "model.1.submodule.1.submodule.0",
        "target": "model.1.submodule.1.submodule",
        "tensors": 3,
        "of": 3,
    }
    assert report["unmapped_source_levels"] == [3]
    pairs = {(e["source"], e["target"]) for e in report["loaded"]}
    bottom = "model.1.submodule.1.submodule"  # level 2: a down block in 4 levels, the bottom in 3
    leaves = ("conv.weight", "conv.bias", "adn.A.weight")
    assert pairs == {
        (f"{src}.{leaf}", f"{tgt}.{leaf}")
        for leaf in leaves
        for src, tgt in (
            ("model.0", "model.0"),
            ("model.1.submodule.0", "model.1.submodule.0"),
            (f"{bottom}.0", bottom),
        )
    }
    assert report["n_loaded"] == 9 and report["skipped"] == [] and report["shape_mismatches"] == []
    src = source.state_dict()
    after = model.state_dict()
    for s, t in pairs:
        assert torch.equal(after[t], src[s]), t
    # nothing outside the mapped encoder changed: the decoder keeps its initialisation
    loaded = {t for _, t in pairs}
    for key, value in after.items():
        if key not in loaded:
            assert torch.equal(value, before[key]), key


def test_residual_units_differ_map_what_matches(tiny_dataset, tmp_path):
    src_cfg = _cfg(tiny_dataset, tmp_path / "runs", **{"model.num_res_units": 1})
    _pretrained(src_cfg, tmp_path / "pre.safetensors")
    cfg = _cfg(
        tiny_dataset,
        tmp_path / "runs",
        **{
            "model.num_res_units": 2,
            "transfer.init_from": str(tmp_path / "pre.safetensors"),
            "transfer.mode": "finetune",
        },
    )
    prepare(build_model(cfg.model, 3), cfg, tmp_path)
    report = json.loads((tmp_path / "transfer.json").read_text())
    targets = {e["target"] for e in report["loaded"]}
    assert "model.0.conv.unit0.conv.weight" in targets
    assert "model.0.conv.unit1.conv.weight" in report["skipped"]
    # residual convolutions have the same shape whatever the number of units: they load by name
    assert "model.0.residual.weight" in targets


def test_frozen_encoder_is_bit_identical_and_not_optimised(tiny_dataset, tmp_path):
    from lowlabel.engine.loop import fit

    extra = {"model.norm": "batch", "model.num_res_units": 1}
    src_cfg = _cfg(tiny_dataset, tmp_path / "runs", **extra)
    source = _pretrained(src_cfg, tmp_path / "pre.safetensors")
    cfg = _cfg(
        tiny_dataset,
        tmp_path / "runs",
        **extra,
        **{
            "transfer.init_from": str(tmp_path / "pre.safetensors"),
            "transfer.mode": "frozen",
            "train.patience": 0,
        },
    )

    # the optimizer never sees a frozen parameter
    model = build_model(cfg.model, 3)
    setup = prepare(model, cfg, tmp_path / "probe")
    groups = setup.param_groups(1e-3)
    in_opt = {id(p) for g in groups for p in g["params"]}
    frozen = {id(p) for b in encoder_blocks(model) for p in b.parameters()}
    assert frozen and not in_opt & frozen
    assert len(in_opt) + len(frozen) == len(list(model.parameters()))

    result = fit(cfg, progress=False, evaluate_test=False)
    tensors, _ = checkpoint.load(run_dir(cfg) / "last.safetensors")
    trained = checkpoint.split(tensors, "model")
    src = source.state_dict()
    enc_keys = [
        f"{name}.{k}"
        for name, block in zip(block_names(model), encoder_blocks(model), strict=True)
        for k in block.state_dict()
    ]
    assert any("running_mean" in k for k in enc_keys)
    for key in enc_keys:  # weights and batch-norm statistics alike
        assert torch.equal(trained[key], src[key]), key
    decoder = [k for k in trained if k not in enc_keys and "running_mean" in k]
    fresh = build_model(cfg.model, 3).state_dict()
    assert decoder and any(not torch.equal(trained[k], fresh[k]) for k in decoder)
    assert result.steps == cfg.train.steps


def test_finetune_and_gradual_modes(tiny_dataset, tmp_path):
    _pretrained(_cfg(tiny_dataset, tmp_path / "runs"), tmp_path / "pre.safetensors")
    base = {"transfer.init_from": str(tmp_path / "pre.safetensors")}
    cfg = _cfg(
        tiny_dataset,
        tmp_path / "runs",
        **base,
        **{"transfer.mode": "finetune", "transfer.encoder_lr_scale": 0.1},
    )
    model = build_model(cfg.model, 3)
    groups = prepare(model, cfg, tmp_path / "ft").param_groups(1e-3)
    enc = {id(p) for b in encoder_blocks(model) for p in b.parameters()}
    enc_group = [g for g in groups if {id(p) for p in g["params"]} == enc]
    assert len(enc_group) == 1 and enc_group[0]["lr"] == pytest.approx(1e-4)
    assert [g["lr"] for g in groups if g is not enc_group[0]] == [1e-3]
    assert all(p.requires_grad for p in model.parameters())

    cfg = _cfg(
        tiny_dataset,
        tmp_path / "runs",
        **base,
        **{"transfer.mode": "gradual", "transfer.unfreeze_after": 3},
    )
    model = build_model(cfg.model, 3)
    setup = prepare(model, cfg, tmp_path / "gr")
    opt = torch.optim.AdamW(setup.param_groups(1e-3))
    blocks = encoder_blocks(model)
    setup.train_mode(model, 2, opt)
    assert not any(p.requires_grad for b in blocks for p in b.parameters())
    assert not any(b.training for b in blocks) and model.training
    setup.train_mode(model, 3, opt)
    assert all(p.requires_grad for b in blocks for p in b.parameters())
    assert all(b.training for b in blocks)


def test_transfer_that_loads_nothing_is_refused(tiny_dataset, tmp_path, monkeypatch, capsys):
    from lowlabel import cli

    _pretrained(
        _cfg(tiny_dataset, tmp_path / "runs", **{"model.channels": 8}),
        tmp_path / "wide.safetensors",
    )
    cfg = _cfg(
        tiny_dataset,
        tmp_path / "runs",
        **{"transfer.init_from": str(tmp_path / "wide.safetensors"), "transfer.mode": "frozen"},
    )
    with pytest.raises(LowlabelError, match="no encoder convolution fits"):
        prepare(build_model(cfg.model, 3), cfg, tmp_path / "x")
    assert not (tmp_path / "x" / "transfer.json").exists()

    args = [
        "lowlabel",
        "train",
        "--data",
        str(tiny_dataset),
        "--out",
        str(tmp_path / "cli"),
        "--init-from",
        str(tmp_path / "wide.safetensors"),
        "--transfer",
        "frozen",
        "--quiet",
    ]
    for key, value in tiny_overrides(tiny_dataset, tmp_path / "cli").items():
        if key not in ("out", "data.dataset"):
            args += ["--set", f"{key}={json.dumps(value)}"]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "wide.safetensors" in err and len(err.splitlines()) == 1


def test_pickled_or_missing_sources_are_refused(tiny_dataset, tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(pickle.dumps({"model.0.conv.weight": [1.0]}))
    for source, message in (
        (bad, "never unpickles"),
        (tmp_path / "nope", "does not exist"),
        (tmp_path, "no model here"),
    ):
        cfg = _cfg(
            tiny_dataset,
            tmp_path / "runs",
            **{"transfer.init_from": str(source), "transfer.mode": "finetune"},
        )
        with pytest.raises(LowlabelError, match=message):
            prepare(build_model(cfg.model, 3), cfg, tmp_path / "x")


def test_transfer_from_a_pretraining_run_folder(tiny_dataset, tmp_path):
    from lowlabel.engine.loop import fit
    from lowlabel.engine.pretrain import pretrain

    pre = pretrain(
        _cfg(
            tiny_dataset,
            tmp_path / "runs",
            **{"pretrain.steps": 2, "train.val_every": 2, "pretrain.method": "autoencoder"},
        ),
        progress=False,
    )
    cfg = _cfg(
        tiny_dataset,
        tmp_path / "runs",
        **{"transfer.init_from": pre.run_dir, "transfer.mode": "finetune", "train.steps": 2},
    )
    fit(cfg, progress=False, evaluate_test=False)
    report = json.loads((run_dir(cfg) / "transfer.json").read_text())
    assert report["source"] == pre.checkpoints["2"]
    assert report["source_method"] == "autoencoder" and report["mode"] == "finetune"
    assert report["n_loaded"] > 0 and report["unmapped_source_levels"] == []
