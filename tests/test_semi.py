"""Mean teacher: the teacher is an EMA of the student, unlabelled images come only from the
training pool, the run resumes exactly, and the better of teacher and student on validation is
what gets kept."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from helpers import assert_same_run, crash_in_validation
from safetensors.torch import load_file

from lowlabel import checkpoint
from lowlabel.config import load_config, run_dir
from lowlabel.data.batches import UnlabelledBatches
from lowlabel.engine.loop import fit
from lowlabel.engine.semi import MeanTeacher
from lowlabel.errors import LowlabelError

SEMI = {
    "semi.method": "mean_teacher",
    "semi.weight": 2.0,
    "semi.rampup": 0.5,
    "train.steps": 6,
    "train.val_every": 2,
    "train.patience": 0,
    "data.budget": 1,
}


@pytest.fixture()
def semi_config(tiny_dataset, tmp_path):
    return load_config(None, tiny_overrides(tiny_dataset, tmp_path / "runs", **SEMI))


def test_teacher_is_the_moving_average_of_the_student(tiny_config):
    cfg = tiny_config.replace(**{"semi.method": "mean_teacher", "semi.ema": 0.9})
    student = torch.nn.Linear(3, 2)
    mt = MeanTeacher(student, cfg)
    before = [p.clone() for p in mt.teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    mt.update(student, step=1)  # early on the teacher follows closely: decay 1 - 1/2
    for t, b, s in zip(mt.teacher.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s)
    mid = [p.clone() for p in mt.teacher.parameters()]
    mt.update(student, step=100)  # later at semi.ema
    for t, m, s in zip(mt.teacher.parameters(), mid, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * m + 0.1 * s)
    assert not any(p.requires_grad for p in mt.teacher.parameters())


def test_consistency_weight_ramps_up_to_its_value(tiny_config):
    cfg = tiny_config.replace(
        **{"semi.method": "mean_teacher", "semi.weight": 3.0, "semi.rampup": 0.5}
    )
    mt = MeanTeacher(torch.nn.Linear(1, 1), cfg)
    ramp = cfg.train.steps * 0.5
    weights = [mt.weight(s) for s in range(cfg.train.steps + 1)]
    assert weights[0] == pytest.approx(3.0 * math.exp(-5.0))
    assert all(a <= b for a, b in zip(weights, weights[1:], strict=False))
    assert all(w == 3.0 for s, w in enumerate(weights) if s >= ramp)


def test_consistency_is_zero_when_student_and_teacher_agree(tiny_config):
    cfg = tiny_config.replace(**{"semi.method": "mean_teacher"})
    net = torch.nn.Conv3d(1, 4, 1)
    mt = MeanTeacher(net, cfg)
    x = torch.randn(2, 1, 4, 4, 4)
    assert mt.consistency(net(x), x).item() == pytest.approx(0.0, abs=1e-7)
    assert mt.consistency(net(x), x + 1.0).item() > 0


def test_unlabelled_batches_are_seeded_and_the_student_sees_a_perturbed_patch(semi_config):
    items = [{"image": torch.randn(1, 24, 24, 24)} for _ in range(3)]
    batches = UnlabelledBatches(items, semi_config)
    student, teacher = batches[5]
    assert student.shape == teacher.shape == (2, 1, 16, 16, 16)
    again = UnlabelledBatches(items, semi_config)[5]
    assert torch.equal(again[0], student) and torch.equal(again[1], teacher)
    assert not torch.equal(student, teacher)
    assert not torch.equal(batches[6][1], teacher)


def test_mean_teacher_run_trains_on_pool_images_and_validates_both_networks(semi_config):
    result = fit(semi_config, progress=False)
    out = Path(result.run_dir)
    splits = json.loads((out / "splits.json").read_text())
    seen = json.loads((out / "unlabelled.json").read_text())["images"]
    names = {Path(p).name for p in seen}
    held_out = {f"{sid}.nii.gz" for sid in splits["test"] + splits["val"]}
    assert len(splits["train"]) == 1 and len(names) == 5  # 8 subjects - 2 test - 1 val
    assert not names & held_out
    last = load_file(str(out / "last.safetensors"))
    teacher = checkpoint.split(last, "teacher")
    student = checkpoint.split(last, "model")
    assert teacher.keys() == student.keys()
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:  # both networks validated, the better one's score is the run's
        assert r["val_dice"] == max(r["val_dice_teacher"], r["val_dice_student"])
        assert r["val_dice"] == r[f"val_dice_{r['kept']}"]
    assert set(result.test) >= {"mean_dice", "dice_csf", "dice_gm", "dice_wm"}


@pytest.mark.parametrize("winner", ["teacher", "student"])
def test_the_better_network_on_validation_is_kept(semi_config, monkeypatch, winner):
    # one validation, at the last step; the network named ``winner`` scores higher there
    import lowlabel.engine.objectives as objectives

    real = objectives.validate

    def rigged(network, items, cfg):
        scores = real(network, items, cfg)
        is_teacher = not any(p.requires_grad for p in network.parameters())
        scores["val_dice"] = 0.9 if is_teacher == (winner == "teacher") else 0.1
        return scores

    monkeypatch.setattr(objectives, "validate", rigged)
    out = Path(fit(semi_config.replace(**{"train.steps": 2}), progress=False).run_dir)
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["kept"] == winner and row["val_dice"] == 0.9
    assert row[f"val_dice_{winner}"] == 0.9
    best_file = str(out / "best.safetensors")
    best = checkpoint.split(load_file(best_file), "model")
    last = load_file(str(out / "last.safetensors"))
    kept = checkpoint.split(last, "teacher" if winner == "teacher" else "model")
    other = checkpoint.split(last, "model" if winner == "teacher" else "teacher")
    assert all(torch.equal(best[k], kept[k]) for k in best)
    assert any(not torch.equal(best[k], other[k]) for k in best)
    assert checkpoint.load(best_file)[1]["network"] == winner


def test_mean_teacher_run_resumes_bit_identically(semi_config, tmp_path, monkeypatch):
    reference = fit(semi_config, progress=False)
    cfg = semi_config.replace(out=str(tmp_path / "again"))
    crash_in_validation(cfg, monkeypatch)
    assert checkpoint.read_meta(run_dir(cfg) / "last.safetensors")["state"]["step"] == 2
    fit(cfg, resume=True, progress=False)
    assert_same_run(Path(reference.run_dir), run_dir(cfg))
    a = load_file(str(Path(reference.run_dir) / "last.safetensors"))
    b = load_file(str(run_dir(cfg) / "last.safetensors"))
    for key in (k for k in a if k.startswith("teacher.")):
        assert torch.equal(a[key], b[key]), key


def test_semi_settings_change_the_run_folder_only_when_on(tiny_config):
    off = tiny_config.replace(**{"semi.weight": 5.0})
    on = tiny_config.replace(**{"semi.method": "mean_teacher"})
    assert run_dir(off) == run_dir(tiny_config)
    assert run_dir(on) != run_dir(tiny_config)


def test_bad_semi_values_name_the_key(tiny_dataset, tmp_path):
    base = tiny_overrides(tiny_dataset, tmp_path / "runs")
    with pytest.raises(LowlabelError, match="semi.method"):
        load_config(None, {**base, "semi.method": "pseudo"})
    with pytest.raises(LowlabelError, match="semi.ema"):
        load_config(None, {**base, "semi.ema": 1.0})
