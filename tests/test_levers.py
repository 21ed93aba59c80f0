"""Accuracy levers as config switches: nnU-Net's DynUNet with deep supervision, the loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_dataset, tiny_overrides
from monai.losses import DiceCELoss

from lowlabel.config import RunConfig, config_hash, load_config
from lowlabel.engine.loop import fit
from lowlabel.engine.objectives import SegmentationLoss
from lowlabel.engine.runs import load_run
from lowlabel.errors import LowlabelError
from lowlabel.models.unet import build_model


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), n=5, shape=(24, 24, 24))


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 8, 8, 8, generator=g)
    label = torch.randint(0, 4, (2, 1, 8, 8, 8), generator=g)
    return logits, label


def test_default_loss_is_exactly_the_loss_runs_were_trained_with():
    logits, label = _batch()
    loss = SegmentationLoss(RunConfig())
    before = DiceCELoss(to_onehot_y=True, softmax=True)
    assert torch.equal(loss(logits, label), before(logits, label))
    assert loss.top(logits) is logits


@pytest.mark.parametrize(
    "overrides",
    [{"loss.batch": True}, {"loss.class_weights": [1, 3, 1, 1]}, {"loss.lambda_ce": 0.0}],
)
def test_loss_switches_change_the_loss(overrides):
    logits, label = _batch()
    default = SegmentationLoss(RunConfig())(logits, label)
    changed = SegmentationLoss(RunConfig().replace(**overrides))(logits, label)
    assert not torch.isclose(changed, default)


def test_batch_dice_is_monais():
    logits, label = _batch(1)
    loss = SegmentationLoss(RunConfig().replace(**{"loss.batch": True}))(logits, label)
    expected = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)(logits, label)
    assert torch.equal(loss, expected)


def test_new_keys_at_their_defaults_keep_every_run_folder_name():
    # the default run's folder hash from before the loss section and deep supervision existed
    # (the defaults of that time: 16 channels, the poly schedule)
    old = RunConfig().replace(**{"model.channels": 16, "train.schedule": "poly"})
    assert config_hash(old) == "a337aef2"
    assert config_hash(old, "pretrain") == "a337aef2"
    assert config_hash(old.replace(**{"loss.batch": True})) != "a337aef2"
    # a pretraining run does not read the loss
    changed = old.replace(**{"loss.class_weights": [1, 2, 1, 1]})
    assert config_hash(changed, "pretrain") == "a337aef2"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.deep_supervision": True}, "model.deep_supervision': needs model.name dynunet"),
        ({"loss.class_weights": [1, 2, 1]}, "loss.class_weights': give four weights"),
        ({"loss.class_weights": [0, 0, 0, 0]}, "loss.class_weights': give four weights"),
    ],
)
def test_bad_lever_settings_name_the_key(overrides, message):
    with pytest.raises(LowlabelError, match=message):
        RunConfig().replace(**overrides)


def test_deep_supervision_heads_train_only_and_weigh_halving():
    cfg = RunConfig().replace(
        **{"model.name": "dynunet", "model.deep_supervision": True, "model.levels": 4}
    )
    torch.manual_seed(0)
    net = build_model(cfg.model, 3)
    x = torch.randn(2, 1, 16, 16, 16)
    net.train()
    out = net(x)
    assert out.shape == (2, 3, 4, 16, 16, 16)  # top head + the 2 lower decoder levels
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 4, 16, 16, 16)
    _, label = _batch()
    label = torch.randint(0, 4, (2, 1, 16, 16, 16))
    loss = SegmentationLoss(cfg)
    plain = DiceCELoss(to_onehot_y=True, softmax=True)
    expected = sum(w * plain(out[:, i], label) for i, w in enumerate((1.0, 0.5, 0.25)))
    assert torch.allclose(loss(out, label), expected)
    assert torch.equal(loss.top(out), out[:, 0])
    # pretraining builds the same network without the extra heads
    plain_net = build_model(cfg.model, 3, out_channels=1, deep_supervision=False).train()
    assert plain_net(x).shape == (2, 1, 16, 16, 16)


@pytest.mark.parametrize("semi", ["none", "mean_teacher"])
def test_nnunet_levers_train_and_reload(dataset, tmp_path, semi):
    """DynUNet with deep supervision, batch Dice and CSF weighted double train end to end (also
    with a mean teacher) and the best weights load back into the network of the config."""
    cfg = load_config(
        None,
        tiny_overrides(
            dataset,
            tmp_path / "runs",
            **{
                "model.name": "dynunet",
                "model.deep_supervision": True,
                "loss.batch": True,
                "loss.class_weights": [1, 2, 1, 1],
                "semi.method": semi,
                "train.steps": 2,
                "train.val_every": 2,
            },
        ),
    )
    result = fit(cfg, progress=False)
    assert result.test is not None and 0.0 <= result.test["mean_dice"] <= 1.0
    loaded_cfg, model = load_run(result.run_dir)
    assert loaded_cfg == cfg and not model.training


def test_tensors_that_share_memory_are_saved_as_copies(tmp_path):
    """MONAI's DynUNet reaches its blocks under two names; safetensors refused that before."""
    from lowlabel import checkpoint

    w = torch.randn(3, 2)
    checkpoint.save(tmp_path / "w.safetensors", {"a": w, "b": w, "c": w[0]}, {"kind": "x"})
    tensors, meta = checkpoint.load(tmp_path / "w.safetensors")
    assert meta == {"kind": "x"} and all(torch.equal(tensors[k], w) for k in "ab")
    assert torch.equal(tensors["c"], w[0])


@pytest.mark.parametrize("profile", ["quick", "cpu", "paper"])
def test_every_lever_of_the_levers_study_is_its_own_run(profile, tmp_path):
    """Two levers with one config would be one run filling one cell: the other would lose its
    comparison (as the 64-voxel patch lever did at 1 mm, where 64 voxels was the default)."""
    from lowlabel.study import spec

    study = spec.load_study("levers")
    cells = spec.expand(study, profile, None, tmp_path, seeds=[0])
    levers = {c.labels["levers"]["lever"] for c in cells}
    assert levers == set(study.axes["lever"]) and len(cells) == len(levers)
    assert all(len(c.labels) == 1 for c in cells)
    names = {comp["a"]["lever"] for comp in study.comparisons} | {"default"}
    assert names == levers  # every lever is compared, each against the default or its base
