"""Prediction: test-time augmentation by flips, and ensembles of runs as one bundle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import make_tiny_dataset, tiny_overrides
from torch import nn

from lowlabel.config import RunConfig, load_config
from lowlabel.engine.inference import Ensemble, flips, labels_of, predict_logits
from lowlabel.models.unet import build_model

CFG = RunConfig().replace(**{"data.patch_size": [16, 16, 16], "model.levels": 3})


class Pointwise(nn.Module):
    """A network that looks at one voxel at a time: flipping its input flips its output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv3d(1, 8, 1), nn.Tanh(), nn.Conv3d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _image(shape=(16, 16, 16), seed: int = 0) -> torch.Tensor:
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(seed))


def test_tta_mirrors_only_the_axis_that_training_flips():
    from lowlabel.data.transforms import FLIP_AXES, augment

    assert FLIP_AXES == (0,)  # left-right in RAS
    assert flips(3) == [(), (2,)] and flips(2) == [(), (2,)]
    chain = augment(RunConfig().data, RunConfig().augment).transforms
    flip = next(t for t in chain if type(t).__name__ == "RandFlipd")
    assert tuple(flip.flipper.spatial_axis) == FLIP_AXES


class LeftRightSymmetric(nn.Module):
    """A convolution whose kernel is mirror-symmetric along X only: its output flips with its
    input along X, not along Y or Z (as a network trained with left-right flips alone)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(self.conv.weight + self.conv.weight.flip(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_tta_of_a_left_right_equivariant_network_changes_nothing():
    """Mirroring a scan the network never saw mirrored (upside down) would change the averaged
    prediction of a network that is equivariant to left-right flips only; TTA does not."""
    model, image = LeftRightSymmetric().eval(), _image()
    x = image[None]
    assert torch.allclose(model(x.flip(2)).flip(2), model(x), atol=1e-5)
    assert not torch.allclose(model(x.flip(4)).flip(4), model(x), atol=1e-3)
    plain = torch.softmax(predict_logits(model, image, CFG), 0)
    tta = torch.softmax(predict_logits(model, image, CFG, tta=True), 0)
    assert torch.allclose(plain, tta, atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 16, 16), (21, 18, 23)])
def test_tta_changes_nothing_for_a_flip_equivariant_network(shape):
    """The documented property: TTA averages predictions of flipped copies flipped back, so a
    network whose output flips with its input gets the same probabilities with TTA."""
    model, image = Pointwise().eval(), _image(shape)
    plain = torch.softmax(predict_logits(model, image, CFG), 0)
    tta = torch.softmax(predict_logits(model, image, CFG, tta=True), 0)
    assert torch.allclose(plain, tta, atol=1e-5)


def test_tta_of_a_flip_symmetric_input_equals_no_tta_for_a_symmetric_prediction():
    """A flip-symmetric scan whose plain prediction is flip-symmetric (a pointwise network on a
    mirrored scan): TTA averages two copies of the same prediction."""
    half = _image((8, 8, 8))
    image = torch.cat([half, half.flip(1)], 1)
    image = torch.cat([image, image.flip(2)], 2)
    image = torch.cat([image, image.flip(3)], 3)
    for axes in ((1,), (2,), (3,)):
        assert torch.equal(image.flip(axes), image)
    model = Pointwise().eval()
    plain = predict_logits(model, image, CFG)
    tta = predict_logits(model, image, CFG, tta=True)
    assert torch.allclose(torch.softmax(plain, 0), torch.softmax(tta, 0), atol=1e-6)
    assert torch.equal(plain.argmax(0), tta.argmax(0))


def test_tta_prediction_flips_with_its_input_whatever_the_network():
    """With TTA any network's prediction commutes with left-right flips (one window covers the
    scan, so the windows are symmetric too); without it a convolutional UNet's does not."""
    torch.manual_seed(0)
    model = build_model(CFG.model, 3).eval()
    image = _image()
    flipped = predict_logits(model, image.flip((1,)), CFG, tta=True)
    mirrored = predict_logits(model, image, CFG, tta=True).flip((1,))
    assert torch.allclose(flipped, mirrored, atol=1e-4)
    plain = predict_logits(model, image.flip((1,)), CFG)
    assert not torch.allclose(plain, predict_logits(model, image, CFG).flip((1,)), atol=1e-4)


def test_tta_leaves_the_network_in_its_mode_and_returns_log_probabilities():
    model = Pointwise().train()
    logits = predict_logits(model, _image(), CFG, tta=True)
    assert model.training and logits.shape == (4, 16, 16, 16)
    assert torch.allclose(logits.exp().sum(0), torch.ones(16, 16, 16), atol=1e-5)


def test_an_ensemble_of_two_identical_models_equals_the_model():
    torch.manual_seed(0)
    model = build_model(CFG.model, 3).eval()
    twin = build_model(CFG.model, 3)
    twin.load_state_dict(model.state_dict())
    pair = Ensemble([model, twin]).eval()
    image = _image((20, 17, 19))
    one = torch.softmax(predict_logits(model, image, CFG), 0)
    two = torch.softmax(predict_logits(pair, image, CFG), 0)
    assert torch.allclose(one, two, atol=1e-6) and torch.equal(one.argmax(0), two.argmax(0))


def test_an_ensemble_averages_probabilities():
    torch.manual_seed(0)
    a, b = build_model(CFG.model, 3).eval(), build_model(CFG.model, 3).eval()
    x = _image()[None]
    with torch.no_grad():
        mean = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
        assert torch.allclose(torch.softmax(Ensemble([a, b])(x), 1), mean, atol=1e-6)


# --- bundles and the command line ---------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two seeds of one tiny run, and one run at another resolution."""
    from lowlabel.engine.loop import fit

    root = tmp_path_factory.mktemp("ensemble")
    dataset = make_tiny_dataset(root / "data")
    cfg = load_config(None, tiny_overrides(dataset, root / "runs", **{"train.steps": 2}))
    out = {"root": root, "cfg": cfg, "dataset": dataset}
    out["a"] = Path(fit(cfg, progress=False).run_dir)
    out["b"] = Path(fit(cfg.replace(seed=1), progress=False).run_dir)
    coarse = cfg.replace(**{"data.spacing": [1.5, 1.5, 1.5]})
    out["coarse"] = Path(fit(coarse, progress=False).run_dir)
    return out


def cli(args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    from lowlabel.cli import main

    monkeypatch.setattr(sys, "argv", ["lowlabel", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _segment(model_dir: Path, scan: Path, out: Path, monkeypatch, capsys, *extra) -> np.ndarray:
    code, _, err = cli(["segment", model_dir, scan, "-o", out, "-q", *extra], monkeypatch, capsys)
    assert code == 0, err
    return np.asarray(nib.load(out / f"{scan.name.split('.')[0]}_seg.nii.gz").dataobj)


def test_ensemble_bundle_of_one_run_twice_segments_like_the_run(
    runs, tmp_path, monkeypatch, capsys
):
    from lowlabel.bundle import load

    single, double = tmp_path / "single", tmp_path / "double"
    assert cli(["export", runs["a"], "-o", single], monkeypatch, capsys)[0] == 0
    code, out, _ = cli(["export", runs["a"], runs["a"], "-o", double], monkeypatch, capsys)
    assert code == 0 and "wrote model bundle" in out
    info = json.loads((double / "bundle.json").read_text())
    assert info["ensemble"] == 2 and info["version"] == 2 and len(info["members"]) == 2
    assert info["provenance"]["test_metrics"] is None
    assert json.loads((single / "bundle.json").read_text())["version"] == 1
    assert isinstance(load(double).model, Ensemble)
    scan = runs["dataset"].parent / "images" / "sub00.nii.gz"
    one = _segment(single, scan, tmp_path / "one", monkeypatch, capsys)
    two = _segment(double, scan, tmp_path / "two", monkeypatch, capsys)
    assert np.array_equal(one, two)
    # TTA from the command line: same grid, labels from the same classes
    tta = _segment(single, scan, tmp_path / "tta", monkeypatch, capsys, "--tta")
    assert tta.shape == one.shape and (tta == one).mean() > 0.5


def test_ensemble_of_two_seeds_averages_their_probabilities(runs, tmp_path, monkeypatch, capsys):
    from lowlabel.bundle import load

    pair = tmp_path / "pair"
    assert cli(["export", runs["a"], runs["b"], "-o", pair], monkeypatch, capsys)[0] == 0
    bundle = load(pair)
    a = load(_export_one(runs["a"], tmp_path / "a")).model
    b = load(_export_one(runs["b"], tmp_path / "b")).model
    x = _image()[None]
    with torch.no_grad():
        mean = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
        assert torch.allclose(torch.softmax(bundle.model(x), 1), mean, atol=1e-6)
    seeds = [m["seed"] for m in json.loads((pair / "bundle.json").read_text())["members"]]
    assert seeds == [0, 1]


def _export_one(run: Path, out: Path) -> Path:
    from lowlabel.bundle import export

    return export(run, out)


def test_ensemble_of_runs_preprocessed_differently_is_refused(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "mixed"
    code, _, err = cli(["export", runs["a"], runs["coarse"], "-o", out], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {runs['coarse']}: its preprocessing differs")
    assert "spacing_mm" in lines[0] and not out.exists()
    assert not list(tmp_path.glob(".mixed.*"))  # nothing half-written


def test_a_bundle_whose_member_count_is_wrong_is_refused(runs, tmp_path, monkeypatch, capsys):
    pair = tmp_path / "pair"
    assert cli(["export", runs["a"], runs["b"], "-o", pair], monkeypatch, capsys)[0] == 0
    info = json.loads((pair / "bundle.json").read_text())
    for bad, message in ((5, "holds 2 models but"), ("two", "'ensemble' is not a number")):
        (pair / "bundle.json").write_text(json.dumps({**info, "ensemble": bad}))
        scan = runs["dataset"].parent / "images" / "sub00.nii.gz"
        code, _, err = cli(["segment", pair, scan, "-o", tmp_path / "o"], monkeypatch, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_evaluate_with_tta_keeps_the_runs_own_evaluation(runs, monkeypatch, capsys):
    evaluation = runs["a"] / "evaluation.json"
    before = evaluation.read_bytes()
    code, out, err = cli(["evaluate", runs["a"], "--tta", "--json", "-q"], monkeypatch, capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert 0.0 <= summary["mean_dice"] <= 1.0 and summary["n"] == 2
    assert evaluation.read_bytes() == before


def test_evaluate_of_one_run_twice_equals_the_run_and_keeps_its_files(runs, monkeypatch, capsys):
    evaluation = runs["a"] / "evaluation.json"
    before = evaluation.read_bytes()
    code, out, err = cli(["evaluate", runs["a"], "--json", "-q"], monkeypatch, capsys)
    assert code == 0, err
    single = json.loads(out)
    code, out, err = cli(["evaluate", runs["a"], runs["a"], "--json", "-q"], monkeypatch, capsys)
    assert code == 0, err
    double = json.loads(out)
    assert double["n"] == single["n"] == 2
    for key in ("mean_dice", "dice_csf", "dice_gm", "dice_wm"):
        assert double[key] == pytest.approx(single[key], abs=1e-4)
    assert evaluation.read_bytes() == before


def test_evaluate_of_two_seeds_scores_the_averaged_prediction(runs, monkeypatch):
    from lowlabel.engine import evaluate as evaluate_module
    from lowlabel.engine.runs import evaluate_run

    seen = []
    real = evaluate_module.evaluate

    def spy(model, cfg, subjects, out_dir=None, progress=True, tta=False):
        seen.append((model, out_dir))
        return real(model, cfg, subjects, out_dir, progress, tta)

    monkeypatch.setattr("lowlabel.engine.runs.evaluate", spy)
    summary = evaluate_run([runs["a"], runs["b"]], progress=False)
    model, out_dir = seen[0]
    assert isinstance(model, Ensemble) and len(model.members) == 2 and out_dir is None
    assert 0.0 <= summary["mean_dice"] <= 1.0 and summary["n"] == 2


def test_evaluate_of_runs_preprocessed_differently_is_refused(runs, monkeypatch, capsys):
    code, _, err = cli(["evaluate", runs["a"], runs["coarse"], "-q"], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: {runs['coarse']}: its preprocessing differs")


def test_evaluate_of_runs_with_other_test_splits_is_refused(runs, tmp_path, monkeypatch, capsys):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(runs["b"], other)
    split = json.loads((other / "splits.json").read_text())
    split["test"] = split["test"][:1]
    (other / "splits.json").write_text(json.dumps(split))
    code, _, err = cli(["evaluate", runs["a"], other, "-q"], monkeypatch, capsys)
    assert code == 2 and f"error: {other}: its test split differs" in err
    assert len(err.strip().splitlines()) == 1


# --- the merged pipeline: TTA and ensembles in segment and bids, MONAI bundle export --------------


def _spy_on_tta(monkeypatch) -> list[bool]:
    """Record the ``tta`` argument of every prediction the pipeline makes."""
    import lowlabel.engine.inference as inference

    seen: list[bool] = []
    real = inference.predict_logits

    def spy(model, image, cfg, tta=False):
        seen.append(tta)
        return real(model, image, cfg, tta)

    monkeypatch.setattr(inference, "predict_logits", spy)
    return seen


@pytest.mark.parametrize("flag", [[], ["--tta"]])
def test_segment_and_bids_pass_tta_to_the_prediction(runs, flag, tmp_path, monkeypatch, capsys):
    from test_bids import make_bids

    model = tmp_path / "model"
    assert cli(["export", runs["a"], "-o", model], monkeypatch, capsys)[0] == 0
    seen = _spy_on_tta(monkeypatch)
    scan = runs["dataset"].parent / "images" / "sub00.nii.gz"
    _segment(model, scan, tmp_path / "seg", monkeypatch, capsys, "--no-qc", *flag)
    assert seen == [bool(flag)]
    seen.clear()
    ds = make_bids(tmp_path / "ds")
    args = ["bids", ds, tmp_path / "deriv", "participant", "--model", model]
    code, _, err = cli([*args, "--skull-strip", "no", "-q", *flag], monkeypatch, capsys)
    assert code == 0, err
    assert seen == [bool(flag)] * 3  # the three T1w scans of the tiny BIDS dataset


def test_bids_with_an_ensemble_bundle_averages_like_segment(runs, tmp_path, monkeypatch, capsys):
    from test_bids import make_bids

    pair = tmp_path / "pair"
    assert cli(["export", runs["a"], runs["b"], "-o", pair], monkeypatch, capsys)[0] == 0
    ds = make_bids(tmp_path / "ds")
    args = ["bids", ds, tmp_path / "deriv", "participant", "--model", pair, "-q"]
    code, _, err = cli([*args, "--skull-strip", "no"], monkeypatch, capsys)
    assert code == 0, err
    scan = ds / "sub-02" / "anat" / "sub-02_T1w.nii.gz"
    dseg = tmp_path / "deriv" / "sub-02" / "anat" / "sub-02_dseg.nii.gz"
    seg = _segment(pair, scan, tmp_path / "seg", monkeypatch, capsys, "--no-qc")
    assert np.array_equal(np.asarray(nib.load(dseg).dataobj), seg)


def test_an_ensemble_bundle_keeps_the_qc_reference_of_its_runs(runs, tmp_path):
    from lowlabel.bundle import export

    single = json.loads((export(runs["a"], tmp_path / "one") / "bundle.json").read_text())
    pair = export([runs["a"], runs["b"]], tmp_path / "pair")
    info = json.loads((pair / "bundle.json").read_text())
    assert single["qc_reference"] is not None
    # both seeds trained on the same labelled subjects, so the reference is the single run's
    assert info["qc_reference"] == single["qc_reference"]


def test_monai_bundle_of_an_ensemble_is_refused_in_one_line(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "mb"
    args = ["export", runs["a"], runs["b"], "-o", out, "--format", "monai-bundle"]
    code, _, err = cli([*args, "--weights-license", "CC-BY-4.0"], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("error: --format monai-bundle: exports one run, not an ensemble")
    assert not out.exists() and not list(tmp_path.glob(".mb.*"))


def test_several_runs_export_with_allow_unfinished(runs, tmp_path, monkeypatch, capsys):
    import shutil

    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["b"], unfinished)
    (unfinished / "result.json").unlink()
    out = tmp_path / "pair"
    code, _, err = cli(["export", runs["a"], unfinished, "-o", out], monkeypatch, capsys)
    assert code == 2 and "--allow-unfinished" in err and not out.exists()
    args = ["export", runs["a"], unfinished, "-o", out, "--allow-unfinished"]
    code, _, err = cli(args, monkeypatch, capsys)
    assert code == 0, err
    info = json.loads((out / "bundle.json").read_text())
    assert info["ensemble"] == 2 and info["members"][1]["steps"] is None


def test_labels_of_is_argmax_over_channels_with_the_first_of_equal_maxima():
    torch.manual_seed(0)
    scores = torch.softmax(torch.randn(4, 9, 8, 7), 0)
    # ties: channels 1 and 3 share the maximum here, all four there
    scores[:, 0, 0, 0] = torch.tensor([0.1, 0.4, 0.1, 0.4])
    scores[:, 1, 0, 0] = 0.25
    scores[:, 2, 0, 0] = torch.tensor([0.0, 0.2, 0.4, 0.4])
    labels = labels_of(scores)
    assert labels.dtype == torch.long
    assert torch.equal(labels, scores.argmax(0))
    assert labels[0, 0, 0] == 1 and labels[1, 0, 0] == 0 and labels[2, 0, 0] == 2
    assert set(labels.unique().tolist()) == {0, 1, 2, 3}
