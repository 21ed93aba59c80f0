"""Seeded, nested label budgets saved as JSON: no leakage, nesting, reuse, refusal."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_dataset

from lowlabel.data import splits as sp
from lowlabel.data.cohort import resolve_splits
from lowlabel.data.datasets import load_dataset
from lowlabel.errors import LowlabelError

IDS = [f"s{i:02d}" for i in range(20)]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_test_val_train_do_not_overlap(seed):
    splits = sp.make_splits(IDS, n_test=5, n_val=3, split_seed=seed)
    test, val, pool = set(splits["test"]), set(splits["val"]), set(splits["pool"])
    assert len(test) == 5 and len(val) == 3 and len(pool) == 12
    assert not test & val and not test & pool and not val & pool
    assert test | val | pool == set(IDS)
    for budget in (1, 3, 5, 0):
        train = set(sp.labelled(splits, budget, draw=0))
        assert not train & (test | val)
        assert len(train) == (budget or 12)


def test_budgets_are_nested_within_a_draw_and_draws_differ():
    splits = sp.make_splits(IDS, n_test=5, n_val=3, split_seed=0)
    for draw in range(3):
        sets = [sp.labelled(splits, b, draw) for b in (1, 3, 5, 8, 0)]
        for small, large in zip(sets, sets[1:], strict=False):
            assert set(small) < set(large)
            assert large[: len(small)] == small
    assert sp.labelled(splits, 5, 0) != sp.labelled(splits, 5, 1)
    # the fixed test and validation sets do not depend on the draw
    assert splits["test"] == sp.make_splits(IDS, 5, 3, 0)["test"]


def test_same_seed_same_splits_other_seed_other_test_set():
    a = sp.make_splits(IDS, 5, 3, 0)
    assert a == sp.make_splits(list(reversed(IDS)), 5, 3, 0)
    assert a["test"] != sp.make_splits(IDS, 5, 3, 1)["test"]


def test_budget_too_large_is_an_error_naming_the_key():
    splits = sp.make_splits(IDS, 5, 3, 0)
    with pytest.raises(LowlabelError, match="data.budget"):
        sp.labelled(splits, 13, 0)
    with pytest.raises(LowlabelError, match="n_test"):
        sp.make_splits(IDS[:5], 3, 2, 0)


def _cfg(tiny_config, **kw):
    return tiny_config.replace(**kw)


def test_split_file_is_saved_and_reused(tiny_config):
    ds = load_dataset(tiny_config.data.dataset)
    first = resolve_splits(tiny_config, ds)
    path = first["split_file"]
    saved = json.loads(open(path).read())
    assert saved["test"] == first["test"] and saved["val"] == first["val"]
    # a hand-edited (but consistent) file is reused as is, not regenerated
    saved["draws"]["0"] = list(reversed(saved["draws"]["0"]))
    with open(path, "w") as fh:
        json.dump(saved, fh)
    again = resolve_splits(tiny_config, ds)
    assert again["train"] == saved["draws"]["0"][: tiny_config.data.budget]
    # another budget of the same draw comes from the same file and is nested
    larger = resolve_splits(_cfg(tiny_config, **{"data.budget": 4}), ds)
    assert set(again["train"]) < set(larger["train"])
    assert larger["test"] == first["test"]


def test_changed_dataset_or_sizes_are_refused(tiny_config, tmp_path):
    ds = load_dataset(tiny_config.data.dataset)
    path = resolve_splits(tiny_config, ds)["split_file"]
    with pytest.raises(LowlabelError, match="asks for 3 and 1"):
        resolve_splits(_cfg(tiny_config, **{"data.n_test": 3}), ds)
    # same source, one subject more: the split file no longer fits and is not silently redrawn
    make_tiny_dataset(tmp_path / "data", n=9)
    grown = load_dataset(tiny_config.data.dataset)
    assert len(grown.subjects) == 9
    before = open(path).read()
    with pytest.raises(LowlabelError, match="other subjects"):
        resolve_splits(tiny_config, grown)
    assert open(path).read() == before
    open(path, "w").write("{not json")
    with pytest.raises(LowlabelError, match="corrupt"):
        resolve_splits(tiny_config, ds)


def test_budget_larger_than_dataset_via_config(tiny_config):
    ds = load_dataset(tiny_config.data.dataset)
    with pytest.raises(LowlabelError, match="data.budget"):
        resolve_splits(_cfg(tiny_config, **{"data.budget": 6}), ds)
