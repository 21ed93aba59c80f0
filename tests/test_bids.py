"""``lowlabel bids``, QC and ``--skull-strip``: naming, filters, tables, flags, brain masks."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_tiny_dataset, phantom, tiny_overrides, write
from helpers import cli

IXI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ixi"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A 4-step run on tiny phantoms (1 mm), exported; shared by the module."""
    from lowlabel.bundle import export
    from lowlabel.config import load_config
    from lowlabel.engine.loop import fit

    root = tmp_path_factory.mktemp("bids")
    dataset = make_tiny_dataset(root / "data")
    result = fit(load_config(None, tiny_overrides(dataset, root / "runs")), progress=False)
    return export(result.run_dir, root / "model")


def t1w(path: Path, seed: int = 0, spacing: float = 1.0) -> Path:
    image, _ = phantom((32, 32, 32), seed)
    return write(path, image, np.diag([spacing, spacing, spacing, 1.0]))


def make_bids(root: Path) -> Path:
    """sub-01 with two sessions (one with acq and run), sub-02 without sessions, plus files that
    cannot be taken."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "tiny", "BIDSVersion": "1.10.0"})
    )
    t1w(root / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", 0)
    t1w(root / "sub-01/ses-2/anat/sub-01_ses-2_acq-mprage_run-2_T1w.nii.gz", 1)
    t1w(root / "sub-02/anat/sub-02_T1w.nii.gz", 2)
    t1w(root / "sub-02/anat/sub-02_T2w.nii.gz", 3)
    t1w(root / "sub-02/anat/sub-03_T1w.nii.gz", 4)  # wrong folder
    t1w(root / "sub-02/anat/sub-02_bad name_T1w.nii.gz", 5)
    return root


def test_parse_name_keeps_entities_in_order():
    from lowlabel.bids import parse_name

    assert parse_name("sub-01_T1w.nii.gz") == (("sub", "01"),)
    assert parse_name("sub-01_ses-pre_acq-mp2rage_run-3_T1w.nii") == (
        ("sub", "01"),
        ("ses", "pre"),
        ("acq", "mp2rage"),
        ("run", "3"),
    )
    assert parse_name("sub-01_T2w.nii.gz") is None
    assert parse_name("ses-1_sub-01_T1w.nii.gz") is None
    assert parse_name("sub-01_sub-02_T1w.nii.gz") is None
    assert parse_name("sub-01_acq-a_b_T1w.nii.gz") is None


def test_find_scans_with_and_without_sessions(tmp_path):
    from lowlabel.bids import find_scans

    root = make_bids(tmp_path / "ds")
    scans, skipped = find_scans(root)
    assert [s.prefix for s in scans] == [
        "sub-01_ses-1",
        "sub-01_ses-2_acq-mprage_run-2",
        "sub-02",
    ]
    assert [s.folder.as_posix() for s in scans] == [
        "sub-01/ses-1/anat",
        "sub-01/ses-2/anat",
        "sub-02/anat",
    ]
    assert len(skipped) == 3
    assert any("sub-02_T2w.nii.gz: not a T1w image" in line for line in skipped)
    assert any("sub-03_T1w.nii.gz: its name's sub-/ses- labels do not match" in s for s in skipped)
    assert any("bad name_T1w.nii.gz: not a valid BIDS T1w file name" in s for s in skipped)


def test_participant_and_session_filters(tmp_path):
    from lowlabel.bids import find_scans
    from lowlabel.errors import LowlabelError

    root = make_bids(tmp_path / "ds")
    assert [s.prefix for s in find_scans(root, participants=["02"])[0]] == ["sub-02"]
    assert [s.prefix for s in find_scans(root, participants=["sub-01"], sessions=["2"])[0]] == [
        "sub-01_ses-2_acq-mprage_run-2"
    ]
    with pytest.raises(LowlabelError, match="--participant-label 07: no sub-07 in"):
        find_scans(root, participants=["01", "07"])
    with pytest.raises(LowlabelError, match="--session-label 9: no ses-9"):
        find_scans(root, sessions=["9"])
    with pytest.raises(LowlabelError, match="not a BIDS dataset"):
        find_scans(tmp_path / "ds" / "sub-01")


@pytest.fixture(scope="module")
def derivatives(model, tmp_path_factory) -> dict:
    """Participant level (with probabilities), then group level, on the tiny BIDS dataset."""
    from lowlabel.bids import group, participant

    root = tmp_path_factory.mktemp("bidsrun")
    ds = make_bids(root / "ds")
    out = root / "derivatives" / "lowlabel"
    first = participant(ds, out, model, probabilities=True, skull_strip="no", progress=False)
    second = group(ds, out)
    return {"ds": ds, "out": out, "participant": first, "group": second}


def test_derivative_files_are_named_by_bids_and_lie_on_the_t1w_grid(derivatives):
    ds, out = derivatives["ds"], derivatives["out"]
    assert derivatives["participant"].errors == []
    assert len(derivatives["participant"].skipped) == 3
    for source, prefix in [
        ("sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", "sub-01/ses-1/anat/sub-01_ses-1"),
        (
            "sub-01/ses-2/anat/sub-01_ses-2_acq-mprage_run-2_T1w.nii.gz",
            "sub-01/ses-2/anat/sub-01_ses-2_acq-mprage_run-2",
        ),
        ("sub-02/anat/sub-02_T1w.nii.gz", "sub-02/anat/sub-02"),
    ]:
        t1 = nib.load(str(ds / source))
        seg = nib.load(str(out / f"{prefix}_dseg.nii.gz"))
        assert seg.shape == t1.shape and np.allclose(seg.affine, t1.affine)
        assert set(np.unique(np.asarray(seg.dataobj))) <= {0, 1, 2, 3}
        for tissue in ("CSF", "GM", "WM"):
            assert (out / f"{prefix}_label-{tissue}_probseg.nii.gz").is_file()
        sidecar = json.loads((out / f"{prefix}_dseg.json").read_text())
        assert sidecar["SpatialReference"] == f"bids:raw:{source}"
        assert not (out / f"{prefix}_desc-brain_mask.nii.gz").exists()  # --skull-strip no
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "lowlabel"
    assert "labelled subjects" in description["GeneratedBy"][0]["Description"]
    assert description["SourceDatasets"][0]["URL"] == ds.resolve().as_uri()
    rows = list(csv.reader((out / "dseg.tsv").read_text().splitlines(), delimiter="\t"))
    assert rows == [
        ["index", "name", "abbreviation"],
        ["1", "cerebrospinal fluid", "CSF"],
        ["2", "grey matter", "GM"],
        ["3", "white matter", "WM"],
    ]


def test_group_table_has_one_row_per_scan_with_its_volumes(derivatives):
    out = derivatives["out"]
    rows = list(csv.DictReader((out / "volumes.tsv").read_text().splitlines(), delimiter="\t"))
    assert list(rows[0]) == [
        "participant_id",
        "session_id",
        "source",
        "csf_ml",
        "gm_ml",
        "wm_ml",
        "brain_ml",
        "qc_flags",
    ]
    assert [(r["participant_id"], r["session_id"]) for r in rows] == [
        ("sub-01", "ses-1"),
        ("sub-01", "ses-2"),
        ("sub-02", "n/a"),
    ]
    for row in rows:
        prefix = row["source"].removesuffix("_T1w.nii.gz")
        seg = np.asarray(nib.load(str(out / f"{prefix}_dseg.nii.gz")).dataobj)
        counts = np.bincount(seg.ravel(), minlength=4)  # 1 mm voxels: 1000 per mL
        assert float(row["gm_ml"]) == pytest.approx(counts[2] / 1000, abs=0.06)
        assert float(row["brain_ml"]) == pytest.approx((counts[2] + counts[3]) / 1000, abs=0.06)
    columns = json.loads((out / "volumes.json").read_text())
    assert "mL" in columns["brain_ml"]["Description"]


def test_group_without_sessions_has_no_session_column(model, tmp_path):
    from lowlabel.bids import group, participant

    ds = make_bids(tmp_path / "ds")
    out = tmp_path / "out"
    participant(ds, out, model, participants=["02"], skull_strip="no", progress=False)
    group(ds, out)
    header = (out / "volumes.tsv").read_text().splitlines()[0].split("\t")
    assert header[:2] == ["participant_id", "source"]


def test_qc_page_lists_every_scan_with_existing_images(derivatives):
    out = derivatives["out"]
    page = (out / "qc.html").read_text()
    for key in ("sub-01_ses-1", "sub-01_ses-2_acq-mprage_run-2", "sub-02"):
        assert f">{key}</td>" in page
        assert (out / "qc" / f"{key}.png").is_file()
        assert (out / "qc" / f"{key}_thumb.png").is_file()
        assert f'href="qc/{key}.png"' in page and f'src="qc/{key}_thumb.png"' in page


@pytest.mark.skipif(shutil.which("bids-validator-deno") is None, reason="validator not installed")
def test_derivatives_pass_the_bids_validator(derivatives):
    done = subprocess.run(
        ["bids-validator-deno", str(derivatives["out"]), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    issues = json.loads(done.stdout)["issues"]["issues"]
    errors = [(i["code"], i.get("location")) for i in issues if i["severity"] == "error"]
    assert errors == []


def test_cli_bids_errors_are_one_line(model, tmp_path, monkeypatch, capsys):
    ds = make_bids(tmp_path / "ds")
    code, _, err = cli(
        ["bids", ds, tmp_path / "o", "subject", "--model", model], monkeypatch, capsys
    )
    assert code == 2 and err.strip().startswith("error: analysis level 'subject'")
    assert len(err.strip().splitlines()) == 1
    code, _, err = cli(
        ["bids", tmp_path, tmp_path / "o", "participant", "--model", model], monkeypatch, capsys
    )
    assert code == 2 and "not a BIDS dataset (no dataset_description.json)" in err
    code, _, err = cli(["bids", ds, tmp_path / "o", "group"], monkeypatch, capsys)
    assert code == 2 and "run the participant level first" in err
    code, _, err = cli(["bids", ds, ds, "participant", "--model", model], monkeypatch, capsys)
    assert code == 2 and "the output folder is the BIDS dataset itself" in err
    code, out, err = cli(
        [
            "bids",
            ds,
            tmp_path / "o",
            "participant",
            "--model",
            model,
            "--participant-label",
            "02",
            "--skull-strip",
            "no",
            "--quiet",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "segmented 1 scan(s)" in out
    assert err.count("skipped: ") == 3


def test_cli_takes_several_labels_after_one_flag(model, tmp_path, monkeypatch, capsys):
    ds = make_bids(tmp_path / "ds")
    args = ["bids", ds, tmp_path / "o", "participant", "--participant-label", "01", "02"]
    code, out, err = cli(
        args + ["--session-label", "2", "--model", model, "--skull-strip", "no", "-q"],
        monkeypatch,
        capsys,
    )
    assert code == 0, err
    assert "segmented 1 scan(s)" in out  # sub-01 ses-2 only: sub-02 has no sessions
    assert (tmp_path / "o/sub-01/ses-2/anat/sub-01_ses-2_acq-mprage_run-2_dseg.nii.gz").is_file()
    assert not (tmp_path / "o/sub-01/ses-1").exists()


# --- QC flags on constructed cases ---


def _assess(data, affine, labels, *, strip="no", reference=None, top=None):
    from lowlabel.qc import assess
    from lowlabel.skullstrip import decide

    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    counts = np.bincount(labels.ravel(), minlength=4) * voxel_ml
    row = {
        "scan": "x.nii.gz",
        "csf_ml": counts[1],
        "gm_ml": counts[2],
        "wm_ml": counts[3],
        "total_brain_ml": counts[2] + counts[3],
    }
    top = np.full(labels.shape, 0.95) if top is None else top
    decision = decide(strip, data, affine)
    return assess(
        data,
        affine,
        labels,
        top,
        row,
        decision=decision,
        model_spacing=(1.0, 1.0, 1.0),
        reference=reference,
    )


def brain(shape=(160, 192, 160)) -> tuple[np.ndarray, np.ndarray]:
    """An adult-sized ellipsoid brain at 1 mm: WM core, GM shell, CSF ventricles (about 1.3 L)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    r = np.sqrt(((grid / np.array([0.85, 0.85, 0.8])[:, None, None, None]) ** 2).sum(0))
    labels = np.zeros(shape, np.uint8)
    labels[r < 0.95] = 2
    labels[r < 0.7] = 3
    labels[r < 0.15] = 1
    data = np.array([0.0, 0.3, 0.6, 0.9], np.float32)[labels]
    return data, labels


REFERENCE = {
    "subjects": 3,
    "volume_ml": {"CSF": [10, 40], "GM": [600, 900], "WM": [400, 700], "brain": [1000, 1600]},
    "tissue_z": {"CSF": -1.8, "GM": -0.5, "WM": 1.1},
}


def test_qc_plain_brain_has_no_flags():
    data, labels = brain()
    record = _assess(data, np.eye(4), labels, reference=REFERENCE)
    assert 1000 < record["volumes_ml"]["brain"] < 1600, record["volumes_ml"]
    assert record["flags"] == []


def test_qc_flags_a_scan_with_its_skull_given_with_skull_strip_no():
    data, labels = brain()
    head = data.copy()
    head[head == 0] = 0.8  # scalp, skull, neck: everything around the brain is tissue
    record = _assess(head, np.eye(4), labels, reference=REFERENCE)
    assert "skull" in [f["code"] for f in record["flags"]]
    assert record["skull_strip"] == "as given (skull detected)"
    # auto would have stripped it: no skull warning then
    stripped = _assess(head, np.eye(4), labels, strip="auto", reference=REFERENCE)
    assert "skull" not in [f["code"] for f in stripped["flags"]]


def test_qc_flags_a_3mm_scan():
    data, labels = brain((54, 64, 54))
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    record = _assess(data, affine, labels, reference=REFERENCE)
    codes = [f["code"] for f in record["flags"]]
    assert codes == ["voxel_size"], record["flags"]
    assert "3x3x3 mm" in record["flags"][0]["message"]


def test_qc_flags_an_implausible_volume_and_unsure_voxels():
    data, labels = brain()
    big = labels.copy()
    big[big == 2] = 3  # all GM called WM: WM far beyond what training saw
    record = _assess(data, np.eye(4), big, reference=REFERENCE)
    volume = [f["message"] for f in record["flags"] if f["code"] == "volume"]
    assert any(m.startswith("WM") for m in volume), record["flags"]
    assert record["out_of_range"] == ["GM", "WM"]  # no GM left, too much WM
    unsure = _assess(data, np.eye(4), labels, reference=REFERENCE, top=np.full(labels.shape, 0.4))
    assert [f["code"] for f in unsure["flags"]] == ["unsure"]
    assert unsure["unsure_fraction"] == 1.0


def test_qc_flags_a_contrast_unlike_t1():
    data, labels = brain()
    t2 = np.array([0.0, 0.9, 0.6, 0.3], np.float32)[labels]  # CSF bright, WM dark
    record = _assess(t2, np.eye(4), labels, reference=REFERENCE)
    assert "contrast" in [f["code"] for f in record["flags"]]


def test_looks_unstripped_separates_heads_from_brains():
    from lowlabel.skullstrip import looks_unstripped

    data, _ = brain()
    assert not looks_unstripped(data, np.eye(4))
    head = data.copy()
    head[head == 0] = 0.5
    assert looks_unstripped(head, np.eye(4))


def test_segment_writes_qc_records_and_page(model, tmp_path):
    from lowlabel.segment import segment

    good = t1w(tmp_path / "in" / "good.nii.gz", 0)
    coarse = t1w(tmp_path / "in" / "coarse.nii.gz", 1, spacing=3.0)
    result = segment(model, [good, coarse], tmp_path / "out", skull_strip="no", progress=False)
    assert result.errors == []
    page = (tmp_path / "out" / "qc.html").read_text()
    assert ">coarse</td>" in page and ">good</td>" in page
    record = json.loads((tmp_path / "out" / "qc" / "coarse.json").read_text())
    assert "voxel_size" in [f["code"] for f in record["flags"]]
    good_record = json.loads((tmp_path / "out" / "qc" / "good.json").read_text())
    assert "voxel_size" not in [f["code"] for f in good_record["flags"]]
    assert (tmp_path / "out" / "qc" / "good.png").is_file()
    no_qc = segment(model, [good], tmp_path / "plain", skull_strip="no", qc=False, progress=False)
    assert no_qc.errors == [] and not (tmp_path / "plain" / "qc.html").exists()


def test_qc_page_puts_flagged_scans_first(tmp_path):
    from lowlabel.qc import save_record, write_page

    base = {
        "scan": "x",
        "volumes_ml": {"CSF": 1.0, "GM": 2.0, "WM": 3.0, "brain": 5.0},
        "unsure_fraction": 0.1,
        "voxel_mm": [1.0, 1.0, 1.0],
        "skull_strip": "as given",
        "snapshot": "qc/s.png",
        "thumbnail": "qc/t.png",
    }
    save_record(tmp_path / "qc", "a_clean", dict(base, flags=[]))
    flag = {"code": "volume", "message": "GM <big> mL"}
    save_record(tmp_path / "qc", "z_flagged", dict(base, flags=[flag, flag], out_of_range=["GM"]))
    page = write_page(tmp_path, "QC").read_text()
    assert "volume x2</span>" in page  # one chip per kind of warning
    assert '<td class="n bad">2.0</td>' in page and '<td class="n">2.0</td>' in page
    assert page.index(">z_flagged</td>") < page.index(">a_clean</td>")
    assert "GM &lt;big&gt; mL" in page and "<big>" not in page  # messages are escaped
    assert "<b>1</b> flagged" in page


# --- --skull-strip ---


class FakeExtractor:
    """Stands in for deepbet: the mask is a centred box (tests the plumbing, not the network)."""

    calls = 0

    def __init__(self) -> None:
        pass

    def mask(self, img):
        FakeExtractor.calls += 1
        mask = np.zeros(img.shape[:3], bool)
        mask[4:-4, 4:-4, 4:-4] = True
        return mask


def test_skull_strip_writes_the_mask_and_keeps_labels_inside(model, tmp_path, monkeypatch):
    from lowlabel import skullstrip
    from lowlabel.bids import participant

    monkeypatch.setattr(skullstrip, "BrainExtractor", FakeExtractor)
    ds = make_bids(tmp_path / "ds")
    out = tmp_path / "out"
    result = participant(ds, out, model, participants=["02"], skull_strip="yes", progress=False)
    assert result.errors == []
    mask_img = nib.load(str(out / "sub-02/anat/sub-02_desc-brain_mask.nii.gz"))
    mask = np.asarray(mask_img.dataobj) > 0
    assert mask.sum() == 24**3
    seg = np.asarray(nib.load(str(out / "sub-02/anat/sub-02_dseg.nii.gz")).dataobj)
    assert not seg[~mask].any()
    assert seg[mask].any()
    sidecar = json.loads((out / "sub-02/anat/sub-02_desc-brain_mask.json").read_text())
    assert sidecar["Type"] == "Brain"
    record = json.loads((out / "qc" / "sub-02.json").read_text())
    assert record["skull_strip"] == "stripped (forced)"


def test_skull_strip_auto_leaves_stripped_scans_alone(model, tmp_path, monkeypatch):
    from lowlabel import skullstrip
    from lowlabel.segment import segment

    monkeypatch.setattr(skullstrip, "BrainExtractor", FakeExtractor)
    FakeExtractor.calls = 0
    scan = t1w(tmp_path / "in" / "brain.nii.gz")
    result = segment(model, [scan], tmp_path / "out", skull_strip="auto", progress=False)
    assert result.errors == [] and FakeExtractor.calls == 0
    assert not (tmp_path / "out" / "brain_brainmask.nii.gz").exists()


def test_skull_strip_yes_without_deepbet_is_one_line(model, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_deepbet(name, *args, **kwargs):
        if name.startswith("deepbet"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_deepbet)
    scan = t1w(tmp_path / "in" / "brain.nii.gz")
    code, _, err = cli(
        ["segment", model, scan, "-o", tmp_path / "out", "--skull-strip", "yes"],
        monkeypatch,
        capsys,
    )
    assert code == 2 and "pip install 'lowlabel[skullstrip]'" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = cli(
        ["segment", model, scan, "-o", tmp_path / "out", "--skull-strip", "maybe"],
        monkeypatch,
        capsys,
    )
    assert code == 2 and "--skull-strip: 'maybe' is not one of auto, yes, no" in err


@pytest.mark.skipif(not (IXI / "IXI012-HH-1211_T1.nii.gz").is_file(), reason="IXI data absent")
def test_deepbet_on_a_raw_ixi_scan_matches_the_reference_mask():
    pytest.importorskip("deepbet")
    from lowlabel.skullstrip import BrainExtractor, looks_unstripped

    img = nib.load(str(IXI / "IXI012-HH-1211_T1.nii.gz"))
    data = np.asarray(img.dataobj, dtype=np.float32)
    assert looks_unstripped(data, img.affine)
    ss = nib.load(str(IXI / "IXI012-HH-1211_SS.nii.gz"))
    assert not looks_unstripped(np.asarray(ss.dataobj, dtype=np.float32), ss.affine)
    mask = BrainExtractor().mask(img)
    ref = np.asarray(nib.load(str(IXI / "IXI012-HH-1211_brainmask.nii.gz")).dataobj) > 0
    dice = 2 * (mask & ref).sum() / (mask.sum() + ref.sum())
    assert dice > 0.95


def test_participant_overlapped_gives_the_same_derivatives(model, tmp_path, monkeypatch):
    """The BIDS App runs the stages of ``segment``: with reading (brain extraction included) and
    writing (files, sidecars, QC) in threads, as on a GPU, every derivative is the same."""
    import threading

    from lowlabel import pipeline, skullstrip
    from lowlabel.bids import participant

    monkeypatch.setattr(skullstrip, "BrainExtractor", FakeExtractor)
    ds = make_bids(tmp_path / "ds")
    plain = participant(ds, tmp_path / "a", model, skull_strip="yes", progress=False, overlap=False)
    threads: set[str] = set()
    real_read = pipeline.read_scan

    def read(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(pipeline, "read_scan", read)
    over = participant(ds, tmp_path / "b", model, skull_strip="yes", progress=False, overlap=True)
    assert threads and all(t.startswith("participant-read") for t in threads)
    assert over.errors == plain.errors == [] and over.done == plain.done and len(over.done) == 3
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.*"))
    masks = [f for f in files if f.name.endswith("_desc-brain_mask.json")]
    assert len(masks) == 3  # the sidecars are written in the write stage too
    for f in files:
        a, b = tmp_path / "a" / f, tmp_path / "b" / f
        if f.name.endswith(".nii.gz"):
            assert np.array_equal(np.asarray(nib.load(str(a)).dataobj), nib.load(str(b)).dataobj)
        elif f.suffix in (".json", ".tsv"):
            assert a.read_text() == b.read_text(), f


def test_segment_into_a_used_folder_keeps_earlier_scans_in_table_and_qc_page(model, tmp_path):
    from lowlabel.segment import segment

    first = t1w(tmp_path / "in1" / "first.nii.gz", 0)
    second = t1w(tmp_path / "in2" / "second.nii.gz", 1)
    out = tmp_path / "out"
    assert segment(model, [first], out, skull_strip="no", progress=False).errors == []
    result = segment(model, [second], out, skull_strip="no", progress=False)
    assert [r["scan"] for r in result.rows] == [str(second)]
    table = (out / "volumes.csv").read_text()
    assert str(first) in table and str(second) in table
    page = (out / "qc.html").read_text()
    assert ">first</td>" in page and ">second</td>" in page
