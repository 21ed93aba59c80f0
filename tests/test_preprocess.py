"""The one preprocessing factory: labels never interpolated, an exact way back to native space,
z-scores inside the brain."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import phantom, write
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot

from lowlabel.config import DataConfig
from lowlabel.data.transforms import patch_shape, preprocess
from lowlabel.engine.evaluate import segment_metrics, to_native

SHAPE = (24, 24, 24)


def _oblique(spacing=(1.0, 1.0, 1.0), deg=15.0):
    th = np.deg2rad(deg)
    affine = np.eye(4)
    rot = np.array([[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]])
    affine[:3, :3] = rot @ np.diag(spacing)
    return affine


def _flipped(spacing=(1.0, 1.0, 1.0)):
    """LPS-like storage: x and y axes reversed."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:2, 3] = [spacing[0] * 23, spacing[1] * 23]
    return affine


def _permuted():
    """Axes stored in (z, x, y) order."""
    return np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]])


def _item(tmp_path, image, label, affine, cfg):
    paths = {
        "image": str(write(tmp_path / "img.nii.gz", image, affine)),
        "label": str(write(tmp_path / "lab.nii.gz", label, affine)),
    }
    pre = preprocess(cfg)
    return pre, pre(paths)


@pytest.mark.parametrize("spacing", [(0.7, 0.7, 0.7), (1.3, 1.0, 2.1), (1.7, 1.7, 1.7)])
def test_resampled_labels_keep_their_values(tmp_path, spacing):
    """Classes 1 and 3 touch with no 2 between them: linear interpolation plus rounding would
    invent a band of 2 at their border; nearest-neighbour never does."""
    _, label = phantom(SHAPE)
    label = np.where(label == 2, 3, label).astype(np.int16)
    image = (label * 100 + 50 * (label > 0)).astype(np.int16)
    cfg = DataConfig(patch_size=(16, 16, 16), spacing=spacing)
    _, out = _item(tmp_path, image, label, _oblique((1.0, 1.2, 0.9)), cfg)
    values = torch.unique(out["label"].as_tensor())
    assert values.tolist() == [0.0, 1.0, 3.0]
    assert torch.equal(out["label"].as_tensor(), out["label"].as_tensor().round())
    # the large class keeps its volume (the ~90-voxel ventricle is too small to test this way)
    vol_in = float((label == 3).sum()) * 1.0 * 1.2 * 0.9
    vol_out = float((out["label"] == 3).sum()) * float(np.prod(spacing))
    assert vol_out == pytest.approx(vol_in, rel=0.1)


@pytest.mark.parametrize(
    "affine",
    [np.eye(4), _flipped(), _permuted(), _oblique(), np.diag([1.0, 1.0, 2.0, 1.0])],
    ids=["ras", "flipped", "permuted", "oblique", "anisotropic"],
)
def test_orientation_round_trip_back_to_native_space_is_exact(tmp_path, affine):
    image, label = phantom(SHAPE, seed=4)
    cfg = DataConfig(patch_size=(32, 32, 32), spacing=(1.0, 1.0, 1.0))
    pre, out = _item(tmp_path, image, label, affine, cfg)
    assert tuple(out["image"].shape[1:]) >= (32, 32, 32)  # cropped to the brain, then padded
    # a perfect prediction on the preprocessed grid, taken back, is the stored label voxel for voxel
    probs = one_hot(out["label"][None].long(), 4)[0].float()
    native = to_native(probs, out["image"], pre)
    assert tuple(native.shape) == (4, *SHAPE)
    assert np.array_equal(native.argmax(0).numpy(), label)


def test_round_trip_through_a_coarser_grid_stays_close(tmp_path):
    image, label = phantom(SHAPE, seed=5)
    cfg = DataConfig(patch_size=(16, 16, 16), spacing=(1.5, 1.5, 1.5))
    pre, out = _item(tmp_path, image, label, _flipped(), cfg)
    native = to_native(one_hot(out["label"][None].long(), 4)[0].float(), out["image"], pre)
    pred = native.argmax(0)
    metrics = segment_metrics(pred, torch.from_numpy(label), (1.0, 1.0, 1.0))
    assert metrics["dice_wm"] > 0.85 and metrics["dice_gm"] > 0.75


def test_z_score_inside_the_brain_and_crop_to_it(tmp_path):
    image, label = phantom(SHAPE, seed=6)
    padded = np.zeros((40, 40, 40), np.int16)
    padded[8:32, 8:32, 8:32] = image
    cfg = DataConfig(patch_size=(16, 16, 16))
    _, out = _item(tmp_path, padded, np.pad(label, 8), np.eye(4), cfg)
    x = out["image"].as_tensor()[0]
    brain = x != 0
    assert float(x[brain].mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(x[brain].std()) == pytest.approx(1.0, abs=1e-2)
    # the 2-voxel margin of air around the brain stays exactly 0 after normalisation
    assert float(x[:2].abs().max()) == 0.0 and float(x[-2:].abs().max()) == 0.0
    # cropped to the brain's bounding box plus a 2-voxel margin, far smaller than 40^3
    nz = np.argwhere(image != 0)
    extent = nz.max(0) - nz.min(0) + 1
    assert tuple(x.shape) == tuple(int(e) + 4 for e in extent)


def test_small_volumes_are_padded_to_the_patch(tmp_path):
    image, label = phantom((12, 12, 12))
    cfg = DataConfig(patch_size=(32, 32, 32))
    _, out = _item(tmp_path, image, label, np.eye(4), cfg)
    assert tuple(out["image"].shape) == (1, 32, 32, 32)
    assert tuple(out["label"].shape) == (1, 32, 32, 32)


def test_2d_models_see_slices_and_only_in_plane_padding(tmp_path):
    cfg = DataConfig(spatial_dims=2, patch_size=(32, 32))
    assert patch_shape(cfg) == (32, 32, 1)
    image, label = phantom((12, 12, 10))
    _, out = _item(tmp_path, image, label, np.eye(4), cfg)
    shape = tuple(out["image"].shape)
    assert shape[1:3] == (32, 32) and shape[3] <= 14


def test_segment_metrics_on_known_volumes():
    truth = torch.zeros(20, 20, 20, dtype=torch.long)
    truth[2:18, 2:18, 2:18] = 2
    truth[5:15, 5:15, 5:15] = 3
    truth[9:11, 9:11, 9:11] = 1
    perfect = segment_metrics(truth, truth, (1.0, 1.0, 2.0))
    for t in ("csf", "gm", "wm"):
        assert perfect[f"dice_{t}"] == pytest.approx(1.0)
        assert perfect[f"hd95_{t}"] == pytest.approx(0.0)
        assert perfect[f"avd_{t}_ml"] == 0.0
    assert perfect["true_vol_csf_ml"] == pytest.approx(8 * 2.0 / 1000)
    worse = truth.clone()
    worse[5:15, 5:15, 5] = 2  # one WM slab becomes GM
    m = segment_metrics(worse, truth, (1.0, 1.0, 2.0))
    assert m["avd_wm_ml"] == pytest.approx(100 * 2.0 / 1000)
    assert m["dice_wm"] < 1.0 and m["dice_csf"] == pytest.approx(1.0)


def test_segment_metrics_equal_monais_on_the_one_hot_maps():
    """Counting label pairs and measuring tissue by tissue gives MONAI's Dice and HD95 of the
    whole one-hot maps, with a tissue missing from the prediction and one missing from both."""
    rng = np.random.default_rng(0)
    truth = torch.from_numpy(rng.integers(0, 4, (14, 12, 10)))
    truth[:, :, :3] = 0
    pred = truth.clone()
    pred[rng.random(pred.shape) < 0.2] = 2
    for case in ("as is", "no CSF predicted", "no CSF anywhere"):
        p, t = pred.clone(), truth.clone()
        if case != "as is":
            p[p == 1] = 0
        if case == "no CSF anywhere":
            t[t == 1] = 0
        spacing = (1.0, 0.8, 2.5)
        ours = segment_metrics(p, t, spacing)
        p1, t1 = one_hot(p[None, None], 4), one_hot(t[None, None], 4)
        dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(p1, t1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hd = HausdorffDistanceMetric(include_background=False, percentile=95)(
                p1, t1, spacing=list(spacing)
            )
        for i, tissue in enumerate(("csf", "gm", "wm")):
            assert ours[f"dice_{tissue}"] == pytest.approx(float(dice[0, i]), abs=1e-6), case
            np.testing.assert_allclose(ours[f"hd95_{tissue}"], float(hd[0, i]), rtol=1e-6)
        if case == "no CSF predicted":
            assert ours["dice_csf"] == 0.0 and np.isnan(ours["hd95_csf"])  # no surface
        if case == "no CSF anywhere":
            assert ours["dice_csf"] == 1.0 and np.isnan(ours["hd95_csf"])
