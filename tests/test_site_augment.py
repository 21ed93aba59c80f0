"""Augmentation that imitates other scanners (``augment.site``): labels stay labels, grids and
affines stay, a seeded draw repeats, and the preset changes the image."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import phantom
from monai.data import MetaTensor, get_track_meta, set_track_meta
from monai.transforms import (
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandHistogramShiftd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from lowlabel.config import AugmentConfig, DataConfig, RunConfig, config_hash, load_config
from lowlabel.data.transforms import (
    KeepBackgroundd,
    augment,
    index_foreground,
    site_settings,
    thick_slices,
    tissue_contrast,
)
from lowlabel.errors import LowlabelError

AFFINE = np.array([[2.0, 0, 0, -30], [0, 2.0, 0, -40], [0, 0, 2.0, -20], [0, 0, 0, 1]])


def _item(shape=(40, 40, 40)) -> dict:
    """A cached training subject as the training loop holds it: z-scored, foreground indexed."""
    image, label = phantom(shape)
    item = {
        key: MetaTensor(torch.from_numpy(a.astype(np.float32))[None], affine=AFFINE)
        for key, a in (("image", image), ("label", label))
    }
    item = NormalizeIntensityd("image", nonzero=True)(item)
    return index_foreground()(item)


def _data(nd: int) -> DataConfig:
    patch = (24, 24, 24) if nd == 3 else (24, 24)
    return DataConfig(spatial_dims=nd, patch_size=patch, spacing=(2.0, 2.0, 2.0))


def _draw(item: dict, data: DataConfig, aug: AugmentConfig, seed: int) -> dict:
    transform = augment(data, aug)
    transform.set_random_state(seed=seed)
    return transform(item)[0]


ROBUST = AugmentConfig(site="robust")


@pytest.mark.parametrize("nd", [3, 2])
def test_robust_keeps_labels_grids_and_affines(nd):
    item, data = _item(), _data(nd)
    changed = 0
    for seed in range(6):
        plain = _draw(item, data, AugmentConfig(), seed)
        robust = _draw(item, data, ROBUST, seed)
        # the site stages run after the spatial ones, which draw the same patch and warp:
        # the label is exactly today's, values and all
        assert torch.equal(robust["label"].as_tensor(), plain["label"].as_tensor())
        assert set(np.unique(robust["label"].numpy())) <= {0.0, 1.0, 2.0, 3.0}
        assert robust["image"].shape == plain["image"].shape == (1, *data.patch_size)
        assert torch.equal(robust["image"].affine, plain["image"].affine)
        assert torch.isfinite(robust["image"].as_tensor()).all()
        changed += not torch.equal(robust["image"].as_tensor(), plain["image"].as_tensor())
        # the background of a skull-stripped scan stays exactly zero through every stage
        still = AugmentConfig(intensity_prob=0.0, gamma_prob=0.0, bias_field_prob=0.0)
        warped = _draw(item, data, dataclasses.replace(still, noise_prob=0.0), seed)["image"]
        assert (robust["image"][warped == 0] == 0).all()
    assert changed >= 4  # each stage runs on a share of patches, so a few may pass unchanged


def test_robust_draw_repeats_with_its_seed_on_plain_tensors():
    item, data = _item(), _data(3)
    tracking = get_track_meta()
    set_track_meta(False)  # as the training batches run it
    try:
        a = [_draw(item, data, ROBUST, seed) for seed in (3, 4)]
        b = [_draw(item, data, ROBUST, seed) for seed in (3, 4)]
    finally:
        set_track_meta(tracking)
    for x, y in zip(a, b, strict=True):
        assert type(x["image"]) is torch.Tensor
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert not torch.equal(a[0]["image"], a[1]["image"])


def test_site_none_is_todays_chain_and_folder():
    kinds = [type(t) for t in augment(_data(3), AugmentConfig()).transforms]
    assert kinds == [
        RandCropByPosNegLabeld,
        RandFlipd,
        RandAffined,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandAdjustContrastd,
        RandBiasFieldd,
        RandGaussianNoised,
    ]
    site = site_settings(AugmentConfig())
    assert site.gamma == (0.7, 1.5) and site.bias_field_coeff == 0.2
    assert site.contrast_prob == site.thick_slice_prob == site.blur_prob == 0.0
    cfg = RunConfig()
    assert config_hash(cfg) != config_hash(cfg.replace(**{"augment.site": "robust"}))
    # the new keys at their defaults leave the hash as it was before they existed
    assert config_hash(cfg) == config_hash(cfg.replace(**{"augment.contrast_shift": 0.5}))


def test_a_key_set_by_hand_wins_over_the_preset():
    site = site_settings(AugmentConfig(site="robust", contrast_prob=0.0, gamma_prob=0.9))
    assert site.contrast_prob == 0.0 and site.gamma_prob == 0.9
    assert site.thick_slice_prob == 0.3 and site.bias_field_prob == 0.5
    assert site_settings(AugmentConfig(blur_prob=0.4)).blur_prob == 0.4


def test_bad_site_keys_name_the_key():
    cfg = load_config(None, {"augment.site": "robust"})
    assert cfg.augment.site == "robust"
    with pytest.raises(LowlabelError, match="augment.site"):
        load_config(None, {"augment.site": "strong"})
    with pytest.raises(LowlabelError, match="augment.blur_prob"):
        load_config(None, {"augment.blur_prob": 1.5})
    with pytest.raises(LowlabelError, match="augment.thick_slice_mm"):
        load_config(None, {"augment.thick_slice_mm": [6, 2]})


def test_tissue_contrast_moves_means_in_order_and_keeps_background():
    item = _item()
    image, label = item["image"], item["label"]
    x, lab = image.numpy()[0], label.numpy()[0]
    # GM pushed up by more than the GM-WM gap: the order must survive
    out = tissue_contrast(image, label, np.array([-0.3, 2.0, -0.3]), keep=0.3)
    y = out.numpy()[0]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, image.affine)
    assert (y[x == 0] == 0).all()
    before = [x[lab == k].mean() for k in (1, 2, 3)]
    after = [y[lab == k].mean() for k in (1, 2, 3)]
    assert after[0] < after[1] < after[2]
    assert after[2] - after[1] >= 0.3 * (before[2] - before[1]) - 1e-3
    assert after[1] - before[1] > 0.3  # GM did move up
    # monotone: intensities within the brain keep their order
    fg = x != 0
    order = np.argsort(x[fg], kind="stable")
    assert (np.diff(y[fg][order]) >= -1e-5).all()


def test_thick_slices_blurs_one_axis_only():
    rng = np.random.default_rng(0)
    image = MetaTensor(torch.from_numpy(rng.normal(size=(1, 20, 20, 20)).astype(np.float32)))
    out = thick_slices(image, axis=2, factor=3.0)
    assert out.shape == image.shape and isinstance(out, MetaTensor)
    diff_z = (out[0, :, :, 1:] - out[0, :, :, :-1]).abs().mean()
    diff_x = (out[0, 1:] - out[0, :-1]).abs().mean()
    assert diff_z < 0.5 * diff_x  # smooth along z, still noisy along x
    # a 2D patch (C, H, W)
    flat = torch.from_numpy(rng.normal(size=(1, 20, 20)).astype(np.float32))
    assert thick_slices(flat, axis=0, factor=2.5).shape == flat.shape


def test_histogram_shift_keeps_the_zero_background():
    item = _item()
    shift = KeepBackgroundd(RandHistogramShiftd("image", num_control_points=8, prob=1.0))
    shift.set_random_state(seed=1)
    out = shift(item)["image"].numpy()
    x = item["image"].numpy()
    assert (out[x == 0] == 0).all() and not np.array_equal(out, x)


def test_scanner_like_bias_field_keeps_zero_signal_at_zero():
    item = _item()
    x = item["image"].as_tensor()
    fg = x != 0
    bias = KeepBackgroundd(RandBiasFieldd("image", prob=1.0, coeff_range=(0.5, 0.5)), positive=True)
    bias.set_random_state(seed=0)
    out = bias(item)["image"].as_tensor()
    # multiplied about the brain's darkest voxel (zero signal), not about the z-scores' zero
    assert out[fg].min() == pytest.approx(float(x[fg].min()), abs=1e-4)
    assert (out[~fg] == 0).all() and not torch.allclose(out, x)
    plain = RandBiasFieldd("image", prob=1.0, coeff_range=(0.5, 0.5))
    plain.set_random_state(seed=0)
    moved = plain(item)["image"].as_tensor()
    assert abs(float(moved[fg].min()) - float(x[fg].min())) > 1e-2


@pytest.mark.parametrize("nd", [3, 2])
def test_a_robust_run_trains(tiny_config, nd):
    from lowlabel.engine.loop import fit

    extra = {"augment.site": "robust", "train.steps": 2, "data.n_test": 0}
    if nd == 2:
        extra.update({"data.spatial_dims": 2, "data.patch_size": [16, 16]})
    result = fit(tiny_config.replace(**extra), progress=False, evaluate_test=False)
    rows = (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()
    assert len(rows) >= 1 and all(np.isfinite(json.loads(r)["train_loss"]) for r in rows)
