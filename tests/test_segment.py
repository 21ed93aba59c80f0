"""``lowlabel export`` and ``lowlabel segment``: bundles, output grids, volumes, bad input."""

from __future__ import annotations

import csv
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_tiny_dataset, phantom, tiny_overrides, write
from helpers import cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One 4-step 3D run on tiny phantoms and its exported bundle, shared by the module."""
    from lowlabel.bundle import export
    from lowlabel.config import load_config
    from lowlabel.engine.loop import fit

    root = tmp_path_factory.mktemp("segment")
    dataset = make_tiny_dataset(root / "data")
    cfg = load_config(None, tiny_overrides(dataset, root / "runs"))
    result = fit(cfg, progress=False)
    bundle_dir = export(result.run_dir, root / "model")
    return {"root": root, "run_dir": Path(result.run_dir), "bundle": bundle_dir, "cfg": cfg}


@pytest.fixture(scope="module")
def bundle(trained):
    from lowlabel.bundle import load

    return load(trained["bundle"])


def flip_affine(affine: np.ndarray, shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    """The affine of the same world image after ``np.flip(data, axes)``."""
    flip = np.eye(4)
    for a in axes:
        flip[a, a], flip[a, 3] = -1.0, shape[a] - 1
    return affine @ flip


def oblique(shape, spacing=(1.0, 1.0, 1.0), degrees: float = 20.0) -> np.ndarray:
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    tilt = np.array(
        [[1, 0, 0], [0, np.cos(t / 2), -np.sin(t / 2)], [0, np.sin(t / 2), np.cos(t / 2)]]
    )
    rot = rot @ tilt
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ (np.asarray(shape) / 2)
    return affine


def seg_of(out_dir: Path, name: str) -> nib.Nifti1Image:
    return nib.load(str(out_dir / f"{name}_seg.nii.gz"))


def assert_same_grid(seg: nib.Nifti1Image, scan: nib.Nifti1Image) -> None:
    assert seg.shape == scan.shape
    np.testing.assert_allclose(seg.affine, scan.affine, atol=1e-5)
    np.testing.assert_allclose(seg.header.get_sform(), scan.header.get_sform(), atol=1e-5)
    np.testing.assert_allclose(seg.header.get_qform(), scan.header.get_qform(), atol=1e-5)
    assert int(seg.header["sform_code"]) == int(scan.header["sform_code"])
    assert int(seg.header["qform_code"]) == int(scan.header["qform_code"])
    assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(scan.affine)
    values = np.unique(np.asarray(seg.dataobj))
    assert set(values.tolist()) <= {0, 1, 2, 3}


def test_reoriented_scans_give_the_same_segmentation(bundle, tmp_path):
    from lowlabel.segment import segment

    image, _ = phantom((32, 30, 28), seed=11)
    ras = np.diag([1.0, 1.0, 1.0, 1.0])
    ras[:3, 3] = (-16, -15, -14)
    scans = {
        "ras": (image, ras),
        "las": (np.flip(image, 0), flip_affine(ras, image.shape, (0,))),
        "lpi": (np.flip(image, (1, 2)), flip_affine(ras, image.shape, (1, 2))),
        "oblique": (image, oblique(image.shape)),
    }
    paths = [
        write(tmp_path / "in" / f"{k}.nii.gz", np.ascontiguousarray(v), a)
        for k, (v, a) in scans.items()
    ]
    result = segment(bundle, paths, tmp_path / "out", progress=False)
    assert result.errors == [] and len(result.rows) == 4
    segs = {k: seg_of(tmp_path / "out", k) for k in scans}
    for key, path in zip(scans, paths, strict=True):
        assert_same_grid(segs[key], nib.load(str(path)))
    assert nib.aff2axcodes(segs["las"].affine) == ("L", "A", "S")
    assert nib.aff2axcodes(segs["lpi"].affine) == ("R", "P", "I")
    ras_seg = np.asarray(segs["ras"].dataobj)
    assert (ras_seg > 0).any()
    # the same world image in another voxel order is the same segmentation, voxel for voxel
    np.testing.assert_array_equal(np.asarray(segs["las"].dataobj), np.flip(ras_seg, 0))
    np.testing.assert_array_equal(np.asarray(segs["lpi"].dataobj), np.flip(ras_seg, (1, 2)))
    # a tilted grid at the model's spacing is segmented as it lies, without resampling
    np.testing.assert_array_equal(np.asarray(segs["oblique"].dataobj), ras_seg)


@pytest.mark.parametrize("case", ["oblique", "anisotropic", "oblique_anisotropic", "singleton"])
def test_output_grid_equals_input_grid(bundle, tmp_path, case):
    from lowlabel.segment import segment

    if case == "oblique":
        image, _ = phantom((30, 32, 30), seed=12)
        affine = oblique(image.shape)
    elif case == "anisotropic":  # 1 x 1 x 3 mm
        image, _ = phantom((32, 32, 12), seed=13)
        affine = np.diag([-1.0, 1.0, 3.0, 1.0])
    elif case == "oblique_anisotropic":
        image, _ = phantom((28, 30, 14), seed=14)
        affine = oblique(image.shape, (1.2, 0.9, 2.5), degrees=-15)
    else:  # a trailing singleton axis, (X, Y, Z, 1)
        image, _ = phantom((30, 30, 30), seed=15)
        image = image[..., None]
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
    path = write(tmp_path / f"{case}.nii", image, affine)
    result = segment(bundle, [path], tmp_path / "out", progress=False)
    assert result.errors == []
    seg = seg_of(tmp_path / "out", case)
    assert_same_grid(seg, nib.load(str(path)))
    assert seg.get_data_dtype() == np.uint8
    # readable like any file the user writes (not private to the writer, as temp files are)
    umask = os.umask(0)
    os.umask(umask)
    mode = (tmp_path / "out" / f"{case}_seg.nii.gz").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask


def test_volumes_are_voxel_counts_times_voxel_volume(bundle, tmp_path, monkeypatch, capsys):
    spacings = {"a": (1.0, 1.0, 1.0), "b": (1.2, 0.9, 2.5)}
    for name, spacing in spacings.items():
        image, _ = phantom((30, 30, 16), seed=len(name) + ord(name))
        write(tmp_path / "in" / f"{name}.nii.gz", image, oblique(image.shape, spacing, degrees=10))
    code, out, err = cli(
        ["segment", bundle.path, tmp_path / "in", "-o", tmp_path / "out", "-q"], monkeypatch, capsys
    )
    assert code == 0, err
    assert "segmented 2 scan(s)" in out
    with open(tmp_path / "out" / "volumes.csv") as fh:
        rows = {Path(r["scan"]).name: r for r in csv.DictReader(fh)}
    assert set(rows) == {"a.nii.gz", "b.nii.gz"}
    for name, spacing in spacings.items():
        seg = seg_of(tmp_path / "out", name)
        labels = np.asarray(seg.dataobj)
        voxel_ml = float(np.prod(spacing)) / 1000.0
        row = rows[f"{name}.nii.gz"]
        assert float(row["voxel_ml"]) == pytest.approx(voxel_ml, rel=1e-6)
        for value, key in ((1, "csf_ml"), (2, "gm_ml"), (3, "wm_ml")):
            assert float(row[key]) == pytest.approx((labels == value).sum() * voxel_ml, abs=1e-3)
        brain = ((labels == 2) | (labels == 3)).sum() * voxel_ml
        assert float(row["total_brain_ml"]) == pytest.approx(brain, abs=1e-3)
        assert brain > 0


def test_probability_maps_match_the_label_map(bundle, tmp_path):
    from lowlabel.segment import segment

    image, _ = phantom((30, 28, 26), seed=21)
    path = write(tmp_path / "p.nii.gz", image, np.diag([1.0, -1.0, 1.0, 1.0]))
    segment(bundle, [path], tmp_path / "out", probabilities=True, progress=False)
    labels = np.asarray(seg_of(tmp_path / "out", "p").dataobj)
    probs = np.stack(
        [
            nib.load(str(tmp_path / "out" / f"p_prob_{t}.nii.gz")).get_fdata()
            for t in ("csf", "gm", "wm")
        ]
    )
    assert probs.shape == (3, *image.shape)
    assert probs.min() >= 0 and probs.max() <= 1 + 1e-5 and (probs.sum(0) <= 1 + 1e-4).all()
    tissue = labels > 0
    # where a tissue won, its probability is the largest of the three
    np.testing.assert_array_equal(probs.argmax(0)[tissue] + 1, labels[tissue])


def _bad_inputs(root: Path) -> dict[str, tuple[Path, str]]:
    image, _ = phantom((32, 32, 32), seed=3)
    eye = np.eye(4)
    good = write(root / "good.nii.gz", image, eye)
    corrupt = root / "corrupt.nii.gz"
    corrupt.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    truncated = root / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    notes = root / "notes.txt"
    notes.write_text("hello")
    return {
        "corrupt": (corrupt, "cannot read NIfTI"),
        "truncated": (truncated, "truncated"),
        "4d": (
            write(root / "4d.nii.gz", np.stack([image, image], -1), eye),
            "4D image with 2 volumes",
        ),
        "2d": (write(root / "slice.nii.gz", image[:, :, 16], eye), "2D image"),
        "2d_singleton": (write(root / "slab.nii.gz", image[:, :, 16:17], eye), "2D image"),
        "coarse": (
            write(root / "coarse.nii.gz", image[:, :, :8], np.diag([1.0, 1.0, 8.0, 1.0])),
            "too coarse",
        ),
        "small": (write(root / "small.nii.gz", image[:3], eye), "too small"),
        "huge_field": (
            write(root / "huge.nii.gz", image, np.diag([20.0, 20.0, 20.0, 1.0])),
            "too coarse",
        ),
        "not_nifti": (notes, "not a NIfTI"),
        "missing": (root / "nowhere.nii.gz", "no such file"),
    }


def test_every_bad_input_is_one_line_naming_the_file_and_exit_2(
    trained, tmp_path, monkeypatch, capsys
):
    cases = _bad_inputs(tmp_path / "in")
    for name, (path, message) in cases.items():
        code, _, err = cli(
            ["segment", trained["bundle"], path, "-o", tmp_path / name, "-q"], monkeypatch, capsys
        )
        lines = err.strip().splitlines()
        assert code == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert str(path) in lines[0] and message in lines[0], (name, lines[0])
        assert not list((tmp_path / name).glob("*_seg.nii.gz")), name


def test_a_batch_with_bad_files_still_segments_the_others(trained, tmp_path, monkeypatch, capsys):
    cases = _bad_inputs(tmp_path / "in")
    image, _ = phantom((30, 32, 28), seed=4)
    other = write(tmp_path / "in2" / "other.nii", image, np.diag([-1.0, 1.0, 1.0, 1.0]))
    bad = [cases["truncated"][0], cases["4d"][0]]
    args = [
        "segment",
        trained["bundle"],
        bad[0],
        tmp_path / "in" / "good.nii.gz",
        bad[1],
        other,
        "-o",
        tmp_path / "out",
        "-q",
    ]
    code, out, err = cli(args, monkeypatch, capsys)
    assert code == 2
    assert "segmented 2 scan(s)" in out
    lines = err.strip().splitlines()
    assert len(lines) == 2 and str(bad[0]) in lines[0] and str(bad[1]) in lines[1]
    assert sorted(p.name for p in (tmp_path / "out").glob("*_seg.nii.gz")) == [
        "good_seg.nii.gz",
        "other_seg.nii.gz",
    ]
    with open(tmp_path / "out" / "volumes.csv") as fh:
        assert [Path(r["scan"]).name for r in csv.DictReader(fh)] == ["good.nii.gz", "other.nii"]


def test_missing_or_wrong_model_folder(trained, tmp_path, monkeypatch, capsys):
    image, _ = phantom((24, 24, 24))
    scan = write(tmp_path / "s.nii.gz", image, np.eye(4))
    for model, message in (
        (tmp_path / "nope", "model folder not found"),
        (trained["run_dir"], "lowlabel export"),
        (tmp_path, "not a lowlabel model folder"),
    ):
        code, _, err = cli(["segment", model, scan, "-o", tmp_path / "out"], monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1
        assert str(model) in err and message in err
    broken = tmp_path / "broken"
    shutil.copytree(trained["bundle"], broken)
    (broken / "config.yaml").write_text("model: {levels: 5}\n")
    code, _, err = cli(["segment", broken, scan, "-o", tmp_path / "out"], monkeypatch, capsys)
    assert code == 2 and "do not fit" in err and str(broken) in err


class _Planted:
    """Unpickling this would create the marker file: it must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_planted_as_weights_is_refused_unread(trained, tmp_path, monkeypatch, capsys):
    planted = tmp_path / "planted"
    shutil.copytree(trained["bundle"], planted)
    marker = tmp_path / "unpickled"
    for payload in (pickle.dumps(_Planted(marker), protocol=2), None):
        weights = planted / "model.safetensors"
        if payload is None:  # what torch.save writes: a zip holding a pickle
            torch.save({"x": _Planted(marker)}, weights)
        else:
            weights.write_bytes(payload)
        image, _ = phantom((24, 24, 24))
        scan = write(tmp_path / "s.nii.gz", image, np.eye(4))
        code, _, err = cli(["segment", planted, scan, "-o", tmp_path / "out"], monkeypatch, capsys)
        assert code == 2 and "not a safetensors" in err and str(weights) in err
        assert not marker.exists()


def test_bundle_round_trip_predicts_like_the_run(trained, tmp_path):
    from lowlabel.bundle import load
    from lowlabel.data.transforms import preprocess
    from lowlabel.engine.inference import predict_logits
    from lowlabel.engine.runs import load_run

    info = json.loads((trained["bundle"] / "bundle.json").read_text())
    prov = info["provenance"]
    assert prov["label_budget"] == 2 and len(prov["labelled_subjects"]) == 2
    assert prov["seed"] == trained["cfg"].seed and prov["dataset"].endswith("dataset.json")
    assert 0 <= prov["test_metrics"]["mean_dice"] <= 1
    assert info["exported_with"]["monai"] and info["exported_with"]["lowlabel"]
    assert info["labels"] == {"0": "background", "1": "CSF", "2": "GM", "3": "WM"}
    assert info["preprocessing"]["spacing_mm"] == [1.0, 1.0, 1.0]
    assert {p.name for p in trained["bundle"].iterdir()} == {
        "model.safetensors",
        "config.yaml",
        "bundle.json",
    }

    cfg_run, model_run = load_run(trained["run_dir"])
    loaded = load(trained["bundle"])
    assert loaded.cfg == cfg_run
    image, _ = phantom((32, 32, 32), seed=31)
    item = preprocess(cfg_run.data, keys=("image",))(
        {"image": str(write(tmp_path / "x.nii.gz", image, np.eye(4)))}
    )
    torch.testing.assert_close(
        predict_logits(loaded.model, item["image"], loaded.cfg),
        predict_logits(model_run, item["image"], cfg_run),
        rtol=0,
        atol=0,
    )


def test_segment_into_a_used_folder_merges_volumes(bundle, tmp_path, monkeypatch, capsys):
    """volumes.csv always lists every label map in the folder: a second call adds its rows, a
    scan segmented again replaces its row."""
    for name, seed in (("a", 1), ("b", 2)):
        image, _ = phantom((28, 28, 20), seed=seed)
        write(tmp_path / "in" / f"{name}.nii.gz", image, np.diag([1.0, 1.0, 1.0, 1.0]))
    out = tmp_path / "out"

    def table() -> dict[str, dict]:
        with open(out / "volumes.csv") as fh:
            return {Path(r["scan"]).name: r for r in csv.DictReader(fh)}

    for name in ("a", "b"):
        code, _, err = cli(
            ["segment", bundle.path, tmp_path / "in" / f"{name}.nii.gz", "-o", out, "-q"],
            monkeypatch,
            capsys,
        )
        assert code == 0, err
    assert set(table()) == {"a.nii.gz", "b.nii.gz"}
    assert sorted(p.name for p in out.glob("*_seg.nii.gz")) == ["a_seg.nii.gz", "b_seg.nii.gz"]
    first_b = table()["b.nii.gz"]

    # a new b (larger voxels) segmented again: its row is replaced, a's is kept as it was
    image, _ = phantom((28, 28, 20), seed=3)
    write(tmp_path / "in2" / "b.nii.gz", image, np.diag([2.0, 2.0, 2.0, 1.0]))
    before_a = table()["a.nii.gz"]
    code, _, err = cli(
        ["segment", bundle.path, tmp_path / "in2" / "b.nii.gz", "-o", out, "-q"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    with open(out / "volumes.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [Path(r["scan"]).name for r in rows] == ["a.nii.gz", "b.nii.gz"]  # one row per scan
    assert rows[0] == before_a
    assert rows[1]["scan"] == str(tmp_path / "in2" / "b.nii.gz") and rows[1] != first_b
    assert float(rows[1]["voxel_ml"]) == pytest.approx(0.008)


def test_segment_refuses_to_merge_into_a_foreign_volumes_csv(bundle, tmp_path, monkeypatch, capsys):
    image, _ = phantom((28, 28, 20), seed=1)
    scan = write(tmp_path / "in" / "a.nii.gz", image, np.diag([1.0, 1.0, 1.0, 1.0]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "volumes.csv").write_text("subject,volume\nx,3\n")
    code, _, err = cli(["segment", bundle.path, scan, "-o", out, "-q"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and str(out / "volumes.csv") in err
    assert (out / "volumes.csv").read_text() == "subject,volume\nx,3\n"
    assert not (out / "a_seg.nii.gz").exists()  # refused before any work


def test_export_of_an_unfinished_run_needs_allow_unfinished(trained, tmp_path, monkeypatch, capsys):
    """A script 'lowlabel train ... && lowlabel export ...' must not ship a half-trained model."""
    run = tmp_path / "run"
    shutil.copytree(trained["run_dir"], run)
    (run / "result.json").unlink()
    code, out, err = cli(["export", run, "-o", tmp_path / "m"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1
    assert str(run) in err and "unfinished" in err and "--allow-unfinished" in err
    assert not (tmp_path / "m").exists()
    code, out, err = cli(
        ["export", run, "-o", tmp_path / "m", "--allow-unfinished"], monkeypatch, capsys
    )
    assert code == 0, err
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_export_refuses_a_non_empty_folder_and_a_non_run(trained, tmp_path, monkeypatch, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    code, _, err = cli(["export", trained["run_dir"], "-o", taken], monkeypatch, capsys)
    assert code == 2 and str(taken) in err and (taken / "keep.txt").read_text() == "mine"
    code, _, err = cli(["export", tmp_path, "-o", tmp_path / "m"], monkeypatch, capsys)
    assert code == 2 and "not a finished training run" in err and not (tmp_path / "m").exists()
    code, out, _ = cli(["export", trained["run_dir"], "-o", tmp_path / "m2"], monkeypatch, capsys)
    assert code == 0 and "m2" in out and (tmp_path / "m2" / "bundle.json").is_file()


def test_2d_model_segments_volumes_and_refuses_single_slices(trained, tmp_path):
    from lowlabel.bundle import export, load
    from lowlabel.config import load_config
    from lowlabel.engine.loop import fit
    from lowlabel.errors import LowlabelError
    from lowlabel.pipeline import check_scan
    from lowlabel.segment import segment

    dataset = trained["root"] / "data" / "dataset.json"
    cfg = load_config(
        None,
        tiny_overrides(
            dataset, tmp_path / "runs", **{"data.spatial_dims": 2, "data.patch_size": [16, 16]}
        ),
    )
    model = load(export(fit(cfg, progress=False).run_dir, tmp_path / "model2d"))
    image, _ = phantom((30, 28, 12), seed=41)
    path = write(tmp_path / "v.nii.gz", image, np.diag([1.0, 1.0, 3.0, 1.0]))
    result = segment(model, [path], tmp_path / "out", progress=False)
    assert result.errors == []
    assert_same_grid(seg_of(tmp_path / "out", "v"), nib.load(str(path)))
    one = write(tmp_path / "one.nii.gz", image[:, :, 5:6], np.eye(4))
    with pytest.raises(LowlabelError, match="single slice"):
        check_scan(one, model)


def test_the_real_command_prints_one_line_for_a_garbage_nifti(trained, tmp_path):
    """nibabel logs its own header complaints; the user still sees one line (own process, so
    nothing of the test's logging set-up hides a stray line)."""
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a NIfTI header at all " * 30))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lowlabel.cli",
            "segment",
            str(trained["bundle"]),
            str(garbage),
            "-o",
            str(tmp_path / "out"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: {garbage}: cannot read NIfTI (corrupt")


def test_two_scans_with_one_name_do_not_overwrite_each_other(bundle, tmp_path):
    from lowlabel.segment import segment

    image, _ = phantom((28, 28, 28), seed=51)
    first = write(tmp_path / "site1" / "t1.nii.gz", image, np.eye(4))
    second = write(tmp_path / "site2" / "t1.nii", image[::-1].copy(), np.eye(4))
    result = segment(bundle, [first, second], tmp_path / "out", progress=False)
    assert [r["scan"] for r in result.rows] == [str(first)]
    assert len(result.errors) == 1 and result.errors[0].startswith(f"{second}: same name as")


def test_overlapped_reading_and_writing_give_the_same_outputs(bundle, tmp_path, monkeypatch):
    """Reading the next scan and writing the last one in threads (what a GPU does) changes
    nothing: same files, same volumes, errors in input order; at most one scan read ahead."""
    import threading

    from lowlabel import pipeline
    from lowlabel import segment as seg_mod

    scans = []
    for i, shape in enumerate([(28, 28, 28), (30, 28, 26), (28, 30, 28)]):
        image, _ = phantom(shape, seed=60 + i)
        scans.append(write(tmp_path / "in" / f"s{i}.nii.gz", image, np.eye(4)))
    bad = tmp_path / "in" / "s1b.nii.gz"
    bad.write_bytes(b"not a nifti file")
    inputs = [scans[0], scans[1], bad, scans[2]]
    plain = seg_mod.segment(bundle, inputs, tmp_path / "a", progress=False, overlap=False)

    threads, reads = set(), []
    real_read = pipeline.read_scan

    def read(b, pre, path, **kwargs):
        threads.add(threading.current_thread().name)
        reads.append(path)
        return real_read(b, pre, path, **kwargs)

    monkeypatch.setattr(pipeline, "read_scan", read)
    over = seg_mod.segment(bundle, inputs, tmp_path / "b", progress=False, overlap=True)
    assert over.rows and [r["scan"] for r in over.rows] == [r["scan"] for r in plain.rows]
    assert over.rows == plain.rows
    assert over.errors == plain.errors and len(over.errors) == 1 and str(bad) in over.errors[0]
    assert reads == inputs and all(t.startswith("segment-read") for t in threads)
    for scan in scans:
        name = scan.name[: -len(".nii.gz")]
        a = np.asarray(nib.load(str(tmp_path / "a" / f"{name}_seg.nii.gz")).dataobj)
        b = np.asarray(nib.load(str(tmp_path / "b" / f"{name}_seg.nii.gz")).dataobj)
        assert np.array_equal(a, b)
    assert (tmp_path / "a" / "volumes.csv").read_text().replace(str(tmp_path / "a"), "") == (
        tmp_path / "b" / "volumes.csv"
    ).read_text().replace(str(tmp_path / "b"), "")
