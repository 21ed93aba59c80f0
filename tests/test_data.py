"""Data in: dataset.json and folders, the quirks of real scans, and ``data check``."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_tiny_dataset, phantom, write

from lowlabel.config import DataConfig
from lowlabel.data.datasets import check_dataset, check_pair, load_dataset
from lowlabel.data.io import read_nifti, spacing_of
from lowlabel.data.transforms import preprocess
from lowlabel.errors import LowlabelError, find_user_error

SHAPE = (24, 24, 24)
CFG = DataConfig(patch_size=(16, 16, 16))


def _pair(root, image, label, affine, name="s"):
    return {
        "id": name,
        "image": str(write(root / f"{name}_img.nii.gz", image, affine)),
        "label": str(write(root / f"{name}_lab.nii.gz", label, affine)),
    }


def _prep(subject, cfg=CFG):
    return preprocess(cfg)({"image": subject["image"], "label": subject["label"]})


# --- sources -------------------------------------------------------------------------------


def test_dataset_json_with_extra_keys_and_unlabelled(tmp_path):
    index = make_tiny_dataset(tmp_path / "d", n=3, shape=SHAPE)
    raw = json.loads(index.read_text())
    raw.update(
        {
            "description": "x",
            "modality": {"0": "T1"},
            "numTraining": 3,
            "unlabeled": ["images/sub00.nii.gz"],
        }
    )
    raw["training"][0]["extra"] = 1
    index.write_text(json.dumps(raw))
    ds = load_dataset(index)
    assert ds.ids == ["sub00", "sub01", "sub02"]
    assert all(s["image"].startswith(str(tmp_path)) for s in ds.subjects)  # made absolute
    assert ds.unlabelled == [str((tmp_path / "d" / "images" / "sub00.nii.gz").resolve())]


def test_folder_with_images_and_labels_matched_by_name(tmp_path):
    make_tiny_dataset(tmp_path / "d", n=3, shape=SHAPE)
    ds = load_dataset(tmp_path / "d")
    assert ds.ids == ["sub00", "sub01", "sub02"]
    for s in ds.subjects:
        assert s["image"].endswith(f"images/{s['id']}.nii.gz")
        assert s["label"].endswith(f"labels/{s['id']}.nii.gz")
    (tmp_path / "d" / "labels" / "sub01.nii.gz").unlink()
    with pytest.raises(LowlabelError, match="sub01.nii.gz: no label") as refused:
        load_dataset(tmp_path / "d")
    # the two fixes: a label, or the unlabelled/ folder (pretraining and mean teacher use it)
    assert "add it" in str(refused.value)
    assert str(tmp_path / "d" / "unlabelled") in str(refused.value)
    unlabelled = tmp_path / "d" / "unlabelled"
    unlabelled.mkdir()
    (tmp_path / "d" / "images" / "sub01.nii.gz").rename(unlabelled / "sub01.nii.gz")
    ds = load_dataset(tmp_path / "d")
    assert ds.ids == ["sub00", "sub02"] and ds.unlabelled == [str(unlabelled / "sub01.nii.gz")]


@pytest.mark.parametrize("content", ["{oops", '{"training": 3}', '{"training": [{"image": "a"}]}'])
def test_malformed_dataset_json_names_the_file(tmp_path, content):
    (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(LowlabelError, match="dataset.json"):
        load_dataset(tmp_path / "dataset.json")


# --- quirks of real scans ----------------------------------------------------------------------


def test_trailing_singleton_axis_is_squeezed(tmp_path):
    image, label = phantom(SHAPE)
    s = _pair(tmp_path, image[..., None], label[..., None, None], np.eye(4))
    assert nib.load(s["image"]).shape == (*SHAPE, 1)
    array, _ = read_nifti(s["image"])
    assert array.shape == SHAPE
    assert check_pair(s)["shape"] == list(SHAPE)
    out = _prep(s)
    assert out["image"].shape[0] == 1 and out["image"].ndim == 4


def test_anisotropic_voxels_are_resampled_to_the_target_spacing(tmp_path):
    image, label = phantom((24, 24, 12))
    s = _pair(tmp_path, image, label, np.diag([1.0, 1.0, 2.5, 1.0]))
    out = _prep(s)
    assert torch.allclose(out["image"].pixdim, torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    # 12 slices of 2.5 mm span 30 mm: about 30 slices at 1 mm (before cropping to the brain)
    assert out["label"].shape[-1] > 24
    assert check_pair(s)["spacing"] == [1.0, 1.0, 2.5]


def _reorient(array, affine, perm, flips):
    """The same physical volume stored with permuted and flipped axes, with a matching affine."""
    out = np.transpose(array, perm)
    vox = np.eye(4)[:, list(perm) + [3]]  # new voxel index -> old voxel index
    for axis in flips:
        n = out.shape[axis]
        out = np.flip(out, axis)
        flip = np.eye(4)
        flip[axis, axis], flip[axis, 3] = -1, n - 1
        vox = vox @ flip
    return np.ascontiguousarray(out), affine @ vox


@pytest.mark.parametrize(
    ("perm", "flips"), [((0, 1, 2), (0,)), ((2, 0, 1), (1, 2)), ((1, 2, 0), (0, 1, 2))]
)
def test_any_orientation_gives_the_same_preprocessed_volume(tmp_path, perm, flips):
    image, label = phantom(SHAPE, seed=3)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    ref = _prep(_pair(tmp_path, image, label, affine, "ras"))
    img2, aff2 = _reorient(image, affine, perm, flips)
    lab2, _ = _reorient(label, affine, perm, flips)
    assert not np.allclose(aff2, affine)
    out = _prep(_pair(tmp_path, img2, lab2, aff2, "other"))
    assert out["label"].shape == ref["label"].shape
    assert torch.equal(out["label"].as_tensor(), ref["label"].as_tensor())
    assert torch.allclose(out["image"].as_tensor(), ref["image"].as_tensor(), atol=1e-5)


def test_int16_unnormalised_intensities_are_z_scored(tmp_path):
    image, label = phantom(SHAPE, seed=1)
    assert image.dtype == np.int16 and image.max() > 100
    big = _prep(_pair(tmp_path, image, label, np.eye(4), "a"))
    small = _prep(_pair(tmp_path, image.astype(np.float32) / 1000.0, label, np.eye(4), "b"))
    x = big["image"].as_tensor()
    brain = x != 0
    assert abs(float(x[brain].mean())) < 1e-3 and abs(float(x[brain].std()) - 1) < 1e-2
    # the scale of the scanner's units does not matter
    assert torch.allclose(x, small["image"].as_tensor(), atol=1e-3)


def test_oblique_affine_is_taken_in_stride(tmp_path):
    image, label = phantom(SHAPE, seed=2)
    th = np.deg2rad(20)
    affine = np.eye(4)
    affine[:3, :3] = np.array(
        [[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1]]
    ) @ np.diag([1.0, 1.2, 1.5])
    s = _pair(tmp_path, image, label, affine)
    assert check_pair(s)["spacing"] == [1.0, 1.2, 1.5]
    assert np.allclose(spacing_of(affine), (1.0, 1.2, 1.5))
    out = _prep(s)
    assert set(out["label"].unique().tolist()) == {0.0, 1.0, 2.0, 3.0}
    assert torch.allclose(out["image"].pixdim, torch.ones(3, dtype=torch.float64))


def test_label_map_remaps_dataset_values(tmp_path):
    image, label = phantom(SHAPE)
    s = _pair(tmp_path, image, (label * 10).astype(np.int16), np.eye(4))
    with pytest.raises(LowlabelError, match="outside 0 background"):
        check_pair(s)
    mapping = {0: 0, 10: 1, 20: 2, 30: 3}
    counts = check_pair(s, mapping)["label_counts"]
    assert counts == [int((label == i).sum()) for i in range(4)]
    out = _prep(s, DataConfig(patch_size=(16, 16, 16), label_map=mapping))
    assert set(out["label"].unique().tolist()) == {0.0, 1.0, 2.0, 3.0}
    with pytest.raises(LowlabelError, match=r"\[30\] are not in data.label_map"):
        check_pair(s, {0: 0, 10: 1, 20: 2})


# --- bad files -----------------------------------------------------------------------------------


def _bad(tmp_path, kind):
    image, label = phantom(SHAPE)
    affine = np.eye(4)
    s = _pair(tmp_path, image, label, affine)
    img_path, lab_path = s["image"], s["label"]
    if kind == "missing":
        (tmp_path / "s_img.nii.gz").unlink()
        return s, img_path, "not found"
    if kind == "corrupt":
        (tmp_path / "s_lab.nii.gz").write_bytes(b"\x00garbage" * 100)
        return s, lab_path, "corrupt"
    if kind == "truncated":
        raw = (tmp_path / "s_img.nii.gz").read_bytes()
        (tmp_path / "s_img.nii.gz").write_bytes(raw[: len(raw) // 2])
        return s, img_path, "truncated"
    if kind == "truncated_raw":  # an uncompressed .nii cut short
        nii = tmp_path / "r_img.nii"
        nib.save(nib.Nifti1Image(image, affine), str(nii))
        nii.write_bytes(nii.read_bytes()[:2000])
        return {**s, "image": str(nii)}, str(nii), "cannot read"
    if kind == "4d":
        write(tmp_path / "s_img.nii.gz", np.stack([image, image], -1), affine)
        return s, img_path, "4D"
    if kind == "nan":
        write(
            tmp_path / "s_img.nii.gz",
            np.where(label == 1, np.nan, image).astype(np.float32),
            affine,
        )
        return s, img_path, "NaN"
    if kind == "inf":
        write(
            tmp_path / "s_img.nii.gz",
            np.where(label == 3, np.inf, image).astype(np.float32),
            affine,
        )
        return s, img_path, "Inf"
    if kind == "shape":
        write(tmp_path / "s_lab.nii.gz", label[:-2], affine)
        return s, lab_path, "shape"
    if kind == "affine":
        write(tmp_path / "s_lab.nii.gz", label, np.diag([1.0, 1.0, 1.1, 1.0]))
        return s, lab_path, "affine"
    if kind == "scheme":
        write(tmp_path / "s_lab.nii.gz", np.where(label == 3, 7, label).astype(np.int16), affine)
        return s, lab_path, r"\[7\]"
    if kind == "empty":
        write(tmp_path / "s_lab.nii.gz", np.zeros_like(label), affine)
        return s, lab_path, "empty"
    if kind == "fractional":
        write(tmp_path / "s_lab.nii.gz", label.astype(np.float32) * 0.5, affine)
        return s, lab_path, "non-integer"
    raise AssertionError(kind)


BAD = [
    "missing",
    "corrupt",
    "truncated",
    "truncated_raw",
    "4d",
    "nan",
    "inf",
    "shape",
    "affine",
    "scheme",
    "empty",
    "fractional",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, kind):
    subject, path, what = _bad(tmp_path, kind)
    for run in (lambda: check_pair(subject), lambda: _prep(subject)):
        with pytest.raises(LowlabelError) as info:
            try:
                run()
            except RuntimeError as err:  # MONAI wraps transform errors; the CLI unwraps them
                raise find_user_error(err) or err from None
        message = str(info.value)
        assert message.startswith(path + ":"), message
        assert "\n" not in message
        assert re.search(what, message), message


def test_a_damaged_byte_in_a_gzip_stream_is_refused(tmp_path):
    """nibabel stops reading once it has the voxels; damage must not decode silently to garbage."""
    image, label = phantom(SHAPE)
    s = _pair(tmp_path, image, label, np.eye(4))
    path = tmp_path / "s_img.nii.gz"
    raw = path.read_bytes()
    for pos in range(len(raw) // 4, len(raw) - 8, len(raw) // 9):
        blob = bytearray(raw)
        blob[pos] ^= 0xFF
        path.write_bytes(bytes(blob))
        with pytest.raises(LowlabelError, match="s_img.nii.gz: cannot read NIfTI"):
            check_pair(s)
    path.write_bytes(raw)
    assert check_pair(s)["shape"] == list(SHAPE)


# --- data check ----------------------------------------------------------------------------------


def test_check_dataset_summarises_and_collects_every_problem(tmp_path):
    index = make_tiny_dataset(tmp_path / "d", n=4, shape=SHAPE, spacing=(1.0, 1.0, 1.5))
    report = check_dataset(index)
    assert report["problems"] == []
    assert [r["id"] for r in report["subjects"]] == ["sub00", "sub01", "sub02", "sub03"]
    assert all(
        r["shape"] == list(SHAPE) and r["spacing"] == [1.0, 1.0, 1.5] for r in report["subjects"]
    )
    _, label = phantom(SHAPE, seed=0)
    assert report["subjects"][0]["label_counts"] == [int((label == i).sum()) for i in range(4)]
    # two broken subjects: both are reported at once
    (tmp_path / "d" / "images" / "sub01.nii.gz").write_bytes(b"junk")
    write(
        tmp_path / "d" / "labels" / "sub03.nii.gz",
        np.zeros(SHAPE, np.int16),
        np.diag([1.0, 1.0, 1.5, 1.0]),
    )
    report = check_dataset(index)
    assert len(report["subjects"]) == 2
    assert len(report["problems"]) == 2
    assert "sub01.nii.gz" in report["problems"][0] and "sub03.nii.gz" in report["problems"][1]


def test_data_check_command_prints_a_summary(tmp_path):
    from typer.testing import CliRunner

    from lowlabel.cli import app

    index = make_tiny_dataset(tmp_path / "d", n=3, shape=SHAPE)
    result = CliRunner().invoke(app, ["data", "check", str(index)])
    assert result.exit_code == 0, result.output
    assert "3 labelled subjects readable" in result.output
    assert "24x24x24" in result.output
    assert "labels: bg" in result.output and "problem" not in result.output
