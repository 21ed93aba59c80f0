"""No tissue where there is no head: on a skull-stripped scan, tissue predicted outside the
brain region (the voxels with signal) is cleared, by ``segment`` and by ``evaluate``; a scan
without an empty margin, or with its skull, is segmented as before."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import phantom, write
from torch import nn

from lowlabel.bundle import Bundle
from lowlabel.config import load_config
from lowlabel.skullstrip import SKULL_ML, brain_region, clear_outside, head_volume_ml


class TissueEverywhere(nn.Module):
    """A model that labels every voxel it sees white matter."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv3d(1, 4, 1)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


@pytest.fixture()
def everywhere(tmp_path) -> Bundle:
    cfg = load_config(
        None, {"data.patch_size": [16, 16, 16], "model.levels": 3, "train.device": "cpu"}
    )
    return Bundle(path=tmp_path / "model", cfg=cfg, model=TissueEverywhere().eval(), info={})


def _margin_scan(shape=(44, 48, 40)) -> np.ndarray:
    """A phantom brain in the middle of a larger, empty field of view."""
    brain, _ = phantom((28, 30, 26), seed=3)
    image = np.zeros(shape, np.int16)
    image[8:36, 9:39, 7:33] = brain
    return image


def _record(out: Path, name: str) -> dict:
    return json.loads((out / "qc" / f"{name}.json").read_text())


def test_no_tissue_outside_the_signal_of_a_stripped_scan(everywhere, tmp_path):
    from lowlabel.segment import segment

    image = _margin_scan()
    path = write(tmp_path / "in" / "wide.nii.gz", image, np.diag([1.0, 1.0, 1.0, 1.0]))
    result = segment(everywhere, [path], tmp_path / "out", progress=False, skull_strip="no")
    assert not result.errors
    labels = np.asarray(nib.load(str(tmp_path / "out" / "wide_seg.nii.gz")).dataobj)
    assert labels.shape == image.shape
    assert not labels[image == 0].any()  # nothing where the scan is empty
    assert (labels[image != 0] == 3).all()  # the model's tissue is kept inside
    record = _record(tmp_path / "out", "wide")
    outside = record["outside_brain"]
    assert outside["region"] == "signal" and outside["cleared_voxels"] > 1000
    assert outside["cleared_ml"] == pytest.approx(outside["cleared_voxels"] / 1000.0, abs=1e-3)
    assert "outside" in [f["code"] for f in record["flags"]]
    assert result.rows[0]["wm_ml"] == pytest.approx(np.count_nonzero(image) / 1000.0)


def test_a_scan_without_an_empty_margin_is_segmented_as_before(everywhere, tmp_path):
    from lowlabel.segment import segment

    rng = np.random.default_rng(0)
    image = (_margin_scan() + rng.integers(5, 40, size=(44, 48, 40))).astype(np.int16)
    path = write(tmp_path / "in" / "noisy.nii.gz", image, np.eye(4))
    segment(everywhere, [path], tmp_path / "out", progress=False, skull_strip="no")
    labels = np.asarray(nib.load(str(tmp_path / "out" / "noisy_seg.nii.gz")).dataobj)
    assert (labels == 3).all()
    assert _record(tmp_path / "out", "noisy")["outside_brain"] == {
        "region": "none",
        "cleared_voxels": 0,
        "cleared_ml": 0.0,
    }


def test_brain_region_rule():
    image = _margin_scan().astype(np.float32)
    region = brain_region(image, np.eye(4))
    assert region is not None and np.array_equal(region, image != 0)
    # a hole enclosed by the brain is brain; a detached piece of it is kept
    holed = image.copy()
    holed[20:23, 22:25, 18:21] = 0
    holed[2:4, 2:4, 2:4] = 500
    region = brain_region(holed, np.eye(4))
    assert region[21, 23, 19] and region[2, 2, 2] and not region[0, 0, 0]
    # no empty margin (noise everywhere): nothing to derive a region from
    noise = np.random.default_rng(0).uniform(1.0, 20.0, size=image.shape)
    assert brain_region(image + noise, np.eye(4)) is None
    # a head with its skull (more tissue than any brain), however empty its margin
    big = np.diag([3.0, 3.0, 3.0, 1.0])
    grid = np.stack(np.meshgrid(*[np.arange(64) - 32] * 3, indexing="ij"))
    head = np.where((grid**2).sum(0) < 30**2, 400.0, 0.0).astype(np.float32)
    assert head_volume_ml(head, big) > SKULL_ML
    assert (head == 0).mean() > 0.4 and brain_region(head, big) is None
    # a background at a constant below zero counts as empty too
    shifted = np.where(image != 0, image, -100.0)
    assert np.array_equal(brain_region(shifted, np.eye(4)), image != 0)


def test_clear_outside_counts_tissue_only():
    labels = np.array([[0, 1, 2], [3, 0, 2]], np.uint8)
    region = np.array([[True, True, False], [False, False, True]])
    assert clear_outside(labels, region) == 2
    assert labels.tolist() == [[0, 1, 0], [0, 0, 2]]


def test_evaluate_clears_outside_the_brain(everywhere, tmp_path):
    from lowlabel.engine.evaluate import evaluate

    image = _margin_scan()
    label = np.where(image != 0, 3, 0).astype(np.int16)
    subject = {
        "id": "wide",
        "image": str(write(tmp_path / "i.nii.gz", image, np.eye(4))),
        "label": str(write(tmp_path / "l.nii.gz", label, np.eye(4))),
    }
    row = evaluate(everywhere.model, everywhere.cfg, [subject], progress=False)["subjects"][0]
    assert row["outside_cleared_ml"] > 1.0
    assert row["dice_wm"] == pytest.approx(1.0)
    assert row["vol_wm_ml"] == pytest.approx(np.count_nonzero(image) / 1000.0)
