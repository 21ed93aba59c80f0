"""``lowlabel export --format monai-bundle``: the MONAI bundle segments as ``lowlabel segment``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_tiny_dataset, phantom, tiny_overrides, write


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from lowlabel.config import load_config
    from lowlabel.engine.loop import fit

    root = tmp_path_factory.mktemp("monai")
    dataset = make_tiny_dataset(root / "data")
    # a few more steps than the smoke runs, so the label map has all three tissues to compare
    cfg = load_config(None, tiny_overrides(dataset, root / "runs", **{"train.steps": 30}))
    return Path(fit(cfg, progress=False).run_dir)


def test_bundle_layout_and_metadata(run_dir, tmp_path):
    from lowlabel.monai_bundle import export_monai

    out = export_monai(run_dir, tmp_path / "mb", "CC-BY-4.0")
    for rel in (
        "configs/metadata.json",
        "configs/inference.json",
        "models/model.pt",
        "docs/README.md",
        "LICENSE",
    ):
        assert (out / rel).is_file(), rel
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    for key in (
        "version",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "task",
        "description",
        "authors",
        "copyright",
        "network_data_format",
        "changelog",
    ):
        assert key in meta, key
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 4
    assert "CC-BY-4.0" in (out / "LICENSE").read_text()


def test_monai_bundle_run_matches_lowlabel_segment(run_dir, tmp_path):
    """``python -m monai.bundle run`` on a synthetic scan gives lowlabel's label map."""
    pytest.importorskip("fire")
    pytest.importorskip("ignite")
    from lowlabel.bundle import export
    from lowlabel.monai_bundle import export_monai
    from lowlabel.segment import segment

    image, _ = phantom((40, 36, 32), seed=11)
    affine = np.diag([-1.1, 1.0, 1.2, 1.0])  # LAS and anisotropic: reorientation and resampling
    affine[0, 3] = 40.0
    scans = tmp_path / "scans"
    write(scans / "scan.nii.gz", image, affine)

    ours = segment(
        export(run_dir, tmp_path / "model"),
        [scans],
        tmp_path / "ours",
        qc=False,
        skull_strip="no",
        progress=False,
    )
    assert ours.errors == []
    bundle = export_monai(run_dir, tmp_path / "mb", "CC-BY-4.0")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(bundle / "configs" / "inference.json"),
            "--bundle_root",
            str(bundle),
            "--dataset_dir",
            str(scans),
            "--output_dir",
            str(tmp_path / "theirs"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a = nib.load(str(tmp_path / "ours" / "scan_seg.nii.gz"))
    b = nib.load(str(tmp_path / "theirs" / "scan_seg.nii.gz"))
    assert np.allclose(a.affine, b.affine, atol=1e-4)
    ours_labels = np.asarray(a.dataobj)
    theirs = np.asarray(b.dataobj).reshape(ours_labels.shape)
    for value in (1, 2, 3):
        p, q = ours_labels == value, theirs == value
        assert p.any(), f"class {value} absent: the comparison would be empty"
        assert 2 * (p & q).sum() / (p.sum() + q.sum()) >= 0.99, value


def test_cli_monai_bundle_needs_a_licence_and_is_not_a_lowlabel_model(
    run_dir, tmp_path, monkeypatch, capsys
):
    from lowlabel.cli import main

    def cli(args):
        monkeypatch.setattr(sys, "argv", ["lowlabel", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as done:
            code = done.code
        return code, capsys.readouterr().err

    code, err = cli(["export", run_dir, "-o", tmp_path / "mb", "--format", "monai-bundle"])
    assert code == 2 and "--weights-license" in err and not (tmp_path / "mb").exists()
    code, err = cli(["export", run_dir, "-o", tmp_path / "x", "--format", "onnx"])
    assert code == 2 and "'onnx' is not one of lowlabel, monai-bundle" in err
    licence = tmp_path / "LICENCE.txt"
    licence.write_text("Use freely, cite us.\n")
    code, err = cli(
        [
            "export",
            run_dir,
            "-o",
            tmp_path / "mb",
            "--format",
            "monai-bundle",
            "--weights-license",
            licence,
        ]
    )
    assert code == 0, err
    assert (tmp_path / "mb" / "LICENSE").read_text() == "Use freely, cite us.\n"
    # lowlabel never loads the pickled model.pt: the folder is not a lowlabel model
    scan = write(tmp_path / "s.nii.gz", phantom()[0], np.eye(4))
    code, err = cli(["segment", tmp_path / "mb", scan, "-o", tmp_path / "o"])
    assert code == 2 and "not a lowlabel model folder" in err


def test_monai_bundle_of_an_unfinished_run_needs_allow_unfinished(run_dir, tmp_path):
    import shutil

    from lowlabel.errors import LowlabelError
    from lowlabel.monai_bundle import export_monai

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "result.json").unlink()
    with pytest.raises(LowlabelError, match="unfinished.*--allow-unfinished"):
        export_monai(run, tmp_path / "mb", "CC-BY-4.0")
    assert not (tmp_path / "mb").exists() and list(tmp_path.glob(".mb.*")) == []
    out = export_monai(run, tmp_path / "mb", "CC-BY-4.0", allow_unfinished=True)
    assert (out / "models" / "model.pt").is_file()
