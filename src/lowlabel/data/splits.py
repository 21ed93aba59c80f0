"""Seeded, nested label budgets, saved as JSON and never silently regenerated.

One split file per (dataset, split seed) holds the fixed test set, the fixed validation set and,
for each labelled draw, an ordering of the remaining pool. A budget of ``k`` labelled subjects
takes the first ``k`` of its draw's ordering, so the 1-subject set lies inside the 3-subject set,
inside 5, ..., inside all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from lowlabel.atomic import write_json
from lowlabel.errors import LowlabelError


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def make_splits(ids: list[str], n_test: int, n_val: int, split_seed: int) -> dict:
    """Draw the fixed test and validation sets.

    Raises:
        LowlabelError: fewer subjects than test + validation + one to train on.
    """
    ids = sorted(ids)
    if len(ids) < n_test + n_val + 1:
        raise LowlabelError(
            f"dataset has {len(ids)} subjects but data.n_test={n_test} and data.n_val={n_val} "
            "leave none to train on; lower them"
        )
    order = [ids[i] for i in _rng(split_seed).permutation(len(ids))]
    test = sorted(order[:n_test])
    val = sorted(order[n_test : n_test + n_val])
    pool = sorted(order[n_test + n_val :])
    return {
        "split_seed": split_seed,
        "subjects": ids,
        "test": test,
        "val": val,
        "pool": pool,
        "draws": {},
    }


def draw_order(splits: dict, draw: int) -> list[str]:
    """The labelled-subject ordering for one draw (added to ``splits`` if new)."""
    key = str(draw)
    if key not in splits["draws"]:
        pool = splits["pool"]
        splits["draws"][key] = [
            pool[i] for i in _rng(splits["split_seed"], 1, draw).permutation(len(pool))
        ]
    return splits["draws"][key]


def labelled(splits: dict, budget: int, draw: int) -> list[str]:
    """The ``budget`` labelled training subjects of ``draw``; 0 means the whole pool.

    Raises:
        LowlabelError: the budget exceeds the subjects available for training.
    """
    order = draw_order(splits, draw)
    if budget == 0:
        return list(order)
    if budget > len(order):
        raise LowlabelError(
            f"config key 'data.budget': {budget} labelled subjects asked for but only {len(order)} "
            f"remain after {len(splits['test'])} test and {len(splits['val'])} validation; "
            "lower the budget"
        )
    return list(order[:budget])


def dataset_key(source: str, ids: list[str]) -> str:
    """The split file's key: the data source only, so a dataset whose subjects changed finds its
    old split file and is refused by :func:`load_or_make` instead of silently getting new splits."""
    del ids
    blob = json.dumps([str(Path(source).resolve())]).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def load_or_make(path: Path, ids: list[str], n_test: int, n_val: int, split_seed: int) -> dict:
    """Reuse the split file at ``path`` or make it; refuse one that no longer fits the data.

    Raises:
        LowlabelError: the saved file lists other subjects or other set sizes.
    """
    if path.exists():
        try:
            splits = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise LowlabelError(
                f"{path}: split file is corrupt; delete it to draw new splits"
            ) from None
        if sorted(splits.get("subjects", [])) != sorted(ids):
            raise LowlabelError(
                f"{path}: saved splits list other subjects than the dataset has now; "
                "delete the file to draw new splits (results will not be comparable)"
            )
        if len(splits["test"]) != n_test or len(splits["val"]) != n_val:
            raise LowlabelError(
                f"{path}: saved splits have {len(splits['test'])} test and {len(splits['val'])} "
                f"validation subjects, the config asks for {n_test} and {n_val}; "
                "use another split_seed or output folder"
            )
        return splits
    return make_splits(ids, n_test, n_val, split_seed)


def save(path: Path, splits: dict) -> None:
    write_json(path, splits)
