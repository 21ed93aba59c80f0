"""Pretraining pools from several sources: the union, held-out subjects kept out, the record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_dataset, phantom, tiny_overrides, write
from helpers import cli

from lowlabel import checkpoint
from lowlabel.config import load_config
from lowlabel.data.cohort import unlabelled_pool


def _cfg(dataset, out, **extra):
    values = {"pretrain.steps": 2, "pretrain.save_steps": [], "train.val_every": 2}
    values.update(extra)
    return load_config(None, tiny_overrides(dataset, out, **values))


def _nifti_folder(root: Path, n: int, spacing: float = 2.0) -> list[str]:
    """``n`` unlabelled phantoms at another resolution, NIfTI files directly in ``root``."""
    paths = []
    for i in range(n):
        image, _ = phantom((20, 20, 20), seed=50 + i)
        affine = np.diag([spacing, spacing, spacing, 1.0])
        paths.append(str(write(root / f"scan{i}.nii.gz", image, affine).resolve()))
    return paths


def _held_out(split: dict, dataset: Path) -> set[str]:
    root = dataset.parent / "images"
    return {str((root / f"{sid}.nii.gz").resolve()) for sid in split["val"] + split["test"]}


def test_two_sources_give_the_union(tiny_dataset, tmp_path):
    other = make_tiny_dataset(tmp_path / "other", n=3, seed=20)
    folder = _nifti_folder(tmp_path / "scans", 2)
    cfg = _cfg(tiny_dataset, tmp_path / "runs")
    base, _, _ = unlabelled_pool(cfg)
    pool, _, split = unlabelled_pool(cfg, sources=(str(other), str(tmp_path / "scans")))

    others = [str((other.parent / "images" / f"sub{i:02d}.nii.gz").resolve()) for i in range(3)]
    images = [p["image"] for p in pool]
    assert images == [p["image"] for p in base] + others + folder
    assert len(base) == 8 - 2 - 1
    assert [s["added"] for s in split["sources"]] == [3, 2]
    assert split["dropped"] == []
    # a source listed twice, or an image already in the pool, is taken once
    twice = (str(other), str(other), folder[0], folder[0], base[0]["image"])
    again, _, _ = unlabelled_pool(cfg, sources=twice)
    assert len(again) == len(base) + 3 + 1


def test_held_out_subjects_in_a_source_are_dropped(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path / "runs")
    # the run's own dataset as a source: its validation and test subjects are refused by id
    pool, _, split = unlabelled_pool(cfg, sources=(str(tiny_dataset),))
    held = _held_out(split, tiny_dataset)
    assert len(held) == 3
    assert not held & {str(Path(p["image"]).resolve()) for p in pool}
    assert sorted(d["image"] for d in split["dropped"]) == sorted(held)
    reasons = {d["reason"].split(" subject")[0] for d in split["dropped"]}
    assert reasons == {"validation", "test"}
    assert len(pool) == 8 - 3  # the training pool, each image once

    # a copy of the dataset elsewhere whose files are links to held-out images: refused by path
    links = tmp_path / "links"
    links.mkdir()
    for i, image in enumerate(sorted(held)):
        (links / f"other{i}.nii.gz").symlink_to(image)
    pool, _, split = unlabelled_pool(cfg, sources=(str(links),))
    assert len(pool) == 8 - 3 and len(split["dropped"]) == 3


def test_pretraining_records_every_image_it_saw(tiny_dataset, tmp_path):
    from lowlabel.engine.pretrain import pretrain

    folder = _nifti_folder(tmp_path / "scans", 2)
    sources = [str(tiny_dataset), str(tmp_path / "scans")]
    cfg = _cfg(tiny_dataset, tmp_path / "runs", **{"pretrain.unlabelled": sources})
    result = pretrain(cfg, progress=False)
    run = Path(result.run_dir)
    pool = json.loads((run / "pool.json").read_text())
    splits = json.loads(Path(pool["split_file"]).read_text())
    held = _held_out(splits, tiny_dataset)

    assert result.images == 8 - 3 + 2 and result.dropped == 3
    assert set(folder) <= set(pool["images"]) and len(pool["images"]) == result.images
    assert not held & {str(Path(p).resolve()) for p in pool["images"]}
    assert [s["source"] for s in pool["sources"]] == sources
    assert sorted(d["image"] for d in pool["dropped"]) == sorted(held)
    _, meta = checkpoint.load(run / "checkpoint-2.safetensors")
    assert meta["images"] == pool["images"]

    # a segmentation run started from it records which pool its encoder came from
    from lowlabel.models.transfer import prepare
    from lowlabel.models.unet import build_model

    init = {"transfer.init_from": str(run), "transfer.mode": "finetune"}
    seg = _cfg(tiny_dataset, tmp_path / "runs", **init)
    prepare(build_model(seg.model, 3), seg, tmp_path)
    start = json.loads((tmp_path / "transfer.json").read_text())["origin"]
    assert start["kind"] == "pretrain" and start["run_dir"] == str(run.resolve())
    assert start["images"] == result.images and start["step"] == 2
    # a run without sources keeps the folder it always had
    assert _cfg(tiny_dataset, tmp_path / "runs").pretrain.unlabelled == ()


def test_config_file_reads_sources_beside_it(tiny_dataset, tmp_path):
    _nifti_folder(tmp_path / "cfgdir" / "scans", 1)
    path = tmp_path / "cfgdir" / "run.yaml"
    path.write_text("pretrain:\n  unlabelled: [scans]\n")
    cfg = load_config(path)
    assert cfg.pretrain.unlabelled == (str(tmp_path / "cfgdir" / "scans"),)


def test_cli_unlabelled_sources(tiny_dataset, tmp_path, monkeypatch, capsys):
    scans = tmp_path / "scans"
    _nifti_folder(scans, 1)
    overrides = tiny_overrides(tiny_dataset, tmp_path / "runs", **{"pretrain.steps": 2})
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    base = ["pretrain", *sets, "-q"]

    code, out, err = cli([*base, "--unlabelled", tmp_path / "nowhere"], monkeypatch, capsys)
    assert code == 2 and err.strip().count("\n") == 0
    assert err.startswith(f"error: {tmp_path / 'nowhere'}: unlabelled source not found")

    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = cli([*base, "--unlabelled", empty], monkeypatch, capsys)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"error: {empty}: no images in this unlabelled source" in err
    assert not (tmp_path / "runs").exists() or not any(
        p.name.startswith("run-") for p in (tmp_path / "runs").iterdir()
    )

    args = [*base, "--unlabelled", scans, "--unlabelled", tiny_dataset]
    code, out, err = cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert "steps on 6 images" in out
    assert "left out 3 image(s)" in out
    shutil.rmtree(tmp_path / "runs")


def test_folder_sources_leave_out_label_maps_and_other_channels(tmp_path):
    from lowlabel.data.datasets import source_images

    image, label = phantom((8, 8, 8))
    flat = tmp_path / "flat"
    for name in ("a_T1", "a_tissues", "a_brainmask", "b", "b_seg"):
        write(flat / f"{name}.nii.gz", label if "_" in name[1:] else image, np.eye(4))
    assert [Path(p).name for p in source_images(flat)] == ["a_T1.nii.gz", "b.nii.gz"]

    nnunet = tmp_path / "Dataset001"
    for name in ("imagesTr/c_0000", "imagesTr/c_0001", "labelsTr/c", "imagesTs/d_0000"):
        write(nnunet / f"{name}.nii.gz", image, np.eye(4))
    (nnunet / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}}))
    expected = ["c_0000.nii.gz", "d_0000.nii.gz"]
    assert [Path(p).name for p in source_images(nnunet)] == expected
    assert [Path(p).name for p in source_images(nnunet / "dataset.json")] == expected


def test_ixi_dataset_json_gives_its_skull_stripped_images():
    from lowlabel.data.datasets import source_images

    ixi = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ixi" / "dataset.json"
    if not ixi.is_file():
        pytest.skip("IXI data not present")
    images = source_images(ixi)
    assert len(images) == 148 and all(p.endswith("_SS.nii.gz") for p in images)
    # the folder itself holds labels and masks too: only images join
    from_folder = source_images(ixi.parent)
    assert not [p for p in from_folder if "tissues" in p or "mask" in p]
