"""The real malf35 cohort (../shared/data/malf35) loads and round-trips; skipped when absent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MALF35

pytestmark = pytest.mark.skipif(
    not (MALF35 / "dataset.json").exists(), reason="malf35 is not beside the checkout"
)


def test_malf35_subjects_and_labels():
    from lowlabel.data.datasets import check_pair, load_dataset

    ds = load_dataset(MALF35 / "dataset.json")
    assert len(ds.subjects) == 25
    summary = check_pair(ds.subjects[0])
    assert len(summary["shape"]) == 3
    assert summary["spacing"] == [1.0, 1.0, 1.0]
    assert all(c > 0 for c in summary["label_counts"])


def test_malf35_labels_survive_preprocessing_and_return_to_native_grid():
    from lowlabel.config import DataConfig
    from lowlabel.data.datasets import load_dataset
    from lowlabel.data.io import read_nifti
    from lowlabel.data.transforms import preprocess
    from lowlabel.engine.evaluate import to_native

    subject = load_dataset(MALF35 / "dataset.json").subjects[0]
    pre = preprocess(DataConfig())
    item = pre({"image": subject["image"], "label": subject["label"]})
    assert set(torch.unique(item["label"]).tolist()) == {0.0, 1.0, 2.0, 3.0}
    onehot = torch.nn.functional.one_hot(item["label"][0].long(), 4).permute(3, 0, 1, 2).float()
    native = to_native(onehot, item["image"], pre).argmax(0).numpy()
    label, _ = read_nifti(subject["label"], kind="label")
    assert native.shape == label.shape
    assert np.array_equal(native, label)
