"""Everything a run reads before its first step: the dataset, its saved splits, the cached
subjects, the size check and the unlabelled pool.

Nothing here writes into a run folder; a failure here happens before any folder is made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from monai.transforms import Compose
from tqdm.auto import tqdm

from lowlabel.config import RunConfig
from lowlabel.data.datasets import (
    Dataset,
    check_pair,
    load_dataset,
    possible_ids,
    source_images,
)
from lowlabel.data.demo import demo_dataset
from lowlabel.data.size import too_small, world_extent
from lowlabel.data.splits import dataset_key, labelled, load_or_make, save
from lowlabel.data.transforms import index_foreground, preprocess
from lowlabel.errors import LowlabelError, unwrap


def resolve_dataset(cfg: RunConfig) -> Dataset:
    """The run's dataset: ``data.dataset``, or the demo cohort (made on first use)."""
    source = cfg.data.dataset or str(demo_dataset(cfg.data.demo_subjects, cfg.data.demo_spacing))
    return load_dataset(source)


def resolve_splits(cfg: RunConfig, ds: Dataset) -> dict:
    """The saved split file for this dataset and split seed, made on first use."""
    d = cfg.data
    path = Path(cfg.out) / "splits" / f"{dataset_key(ds.source, ds.ids)}-seed{d.split_seed}.json"
    splits = load_or_make(path, ds.ids, d.n_test, d.n_val, d.split_seed)
    before = json.dumps(splits, sort_keys=True)
    train_ids = labelled(splits, d.budget, d.draw)
    if json.dumps(splits, sort_keys=True) != before or not path.exists():
        save(path, splits)
    return {
        "source": ds.source,
        "split_file": str(path),
        "test": splits["test"],
        "val": splits["val"],
        "train": train_ids,
    }


def cache(subjects: list[dict], transform, desc: str, progress: bool) -> list[dict]:
    """Preprocess each subject once; epochs never decode gzip again."""
    out = []
    for subject in tqdm(subjects, desc=desc, disable=not progress, leave=False):
        keys = {k: subject[k] for k in ("image", "label")}
        out.append(unwrap(transform, keys))
    return out


def cache_images(images: list[dict], transform: Compose, desc: str, progress: bool) -> list[dict]:
    """Preprocess each image once (no label: the pool may hold unlabelled scans)."""
    return [
        unwrap(transform, {"image": item["image"]})
        for item in tqdm(images, desc=desc, disable=not progress, leave=False)
    ]


def unlabelled_pool(
    cfg: RunConfig, ds: Dataset | None = None, sources: tuple[str, ...] = ()
) -> tuple[list[dict], list[dict], dict]:
    """Training-pool images (labels ignored), the extra unlabelled ones and those of ``sources``
    (:func:`~lowlabel.data.datasets.source_images`); validation subjects.

    The pool is the split's labelled-training pool at budget 0, so no validation or test subject
    is ever pretrained on. An image of ``sources`` is dropped when its resolved path is a
    validation or test image of the run, or, for a source that is the run's own dataset, when
    its subject id is a validation or test subject's; an image already in the pool is taken once.

    Returns:
        ``(pool, val, split)``; ``split`` also holds ``sources`` (each with its image count) and
        ``dropped`` (each image left out, with the reason).
    """
    ds = ds or resolve_dataset(cfg)
    split = resolve_splits(cfg.replace(**{"data.budget": 0}), ds)
    pool = [{"image": s["image"]} for s in ds.by_id(split["train"])]
    pool += [{"image": p} for p in ds.unlabelled]
    held_out = {
        str(Path(s["image"]).resolve()): (role, s["id"])
        for role in ("val", "test")
        for s in ds.by_id(split[role])
    }
    held_ids = {sid: role for role in ("val", "test") for sid in split[role]}
    own = Path(ds.source).resolve()
    seen = {str(Path(p["image"]).resolve()) for p in pool}
    listed, dropped = [], []
    for source in sources:
        images = source_images(source)
        same_dataset = Path(source).resolve() == own
        added = 0
        for image in images:
            role, sid = held_out.get(image, (None, None))
            named = sorted(possible_ids(image) & held_ids.keys()) if same_dataset else []
            if role is None and named:
                sid, role = named[0], held_ids[named[0]]
            if role is not None:
                what = "validation" if role == "val" else "test"
                reason = f"{what} subject {sid} of this run"
                dropped.append({"image": image, "source": str(source), "reason": reason})
            elif image not in seen:
                seen.add(image)
                pool.append({"image": image})
                added += 1
        listed.append({"source": str(source), "images": len(images), "added": added})
    if not pool:
        raise LowlabelError(f"{ds.source}: no training or unlabelled images to pretrain on")
    val = [{"image": s["image"]} for s in ds.by_id(split["val"])]
    return pool, val, {**split, "sources": listed, "dropped": dropped}


def check_size(items: list[dict], cfg: RunConfig) -> None:
    """A scan smaller than the network's coarsest level is refused rather than padded.

    Args:
        items: preprocessed subjects whose ``image`` carries its file name and original affine.
    """
    for item in items:
        meta = item["image"].meta
        extent = world_extent(meta["spatial_shape"], meta["original_affine"])
        d = cfg.data
        problem = too_small(extent, d.spacing, d.spatial_dims, cfg.model.levels)
        if problem:
            raise LowlabelError(f"{meta['filename_or_obj']}: {problem}")


@dataclass
class Cohort:
    """The data of one segmentation run, cached and checked.

    Attributes:
        split: ``source``, ``split_file`` and the ``train`` / ``val`` / ``test`` subject ids.
        pool: the unlabelled images of a mean-teacher run (``None`` otherwise), and
            ``pool_items`` the same, preprocessed.
    """

    dataset: Dataset
    split: dict
    train_items: list[dict]
    val_items: list[dict]
    pool: list[dict] | None = None
    pool_items: list[dict] | None = field(default=None, repr=False)

    @property
    def test_subjects(self) -> list[dict]:
        return self.dataset.by_id(self.split["test"])


def load_cohort(cfg: RunConfig, progress: bool = True, check_test: bool = True) -> Cohort:
    """Resolve, split, cache and check the data of a training run.

    With ``check_test`` a bad test scan is found now, not after the whole training budget.

    Raises:
        LowlabelError: unreadable or mismatched scans, an impossible budget, a scan too small.
    """
    ds = resolve_dataset(cfg)
    split = resolve_splits(cfg, ds)
    pre = preprocess(cfg.data)
    train_items = cache(
        ds.by_id(split["train"]), Compose([pre, index_foreground()]), "cache train", progress
    )
    val_items = cache(ds.by_id(split["val"]), pre, "cache val", progress)
    cohort = Cohort(ds, split, train_items, val_items)
    if cfg.semi.method != "none":
        cohort.pool, _, _ = unlabelled_pool(cfg, ds)
        cohort.pool_items = cache_images(
            cohort.pool, preprocess(cfg.data, keys=("image",)), "cache unlabelled", progress
        )
    check_size(train_items + val_items, cfg)
    if check_test:
        for subject in cohort.test_subjects:
            check_pair(subject, cfg.data.label_map)
    return cohort


@dataclass
class Pool:
    """The data of one pretraining run: the pool's images and the validation images, cached.

    Attributes:
        split: as :func:`unlabelled_pool` returns it (with ``sources`` and ``dropped``).
    """

    split: dict
    images: list[dict]
    val: list[dict]
    items: list[dict] = field(repr=False)
    val_items: list[dict] = field(repr=False)


def load_pool(cfg: RunConfig, progress: bool = True) -> Pool:
    """Resolve, cache and check the unlabelled pool of a pretraining run."""
    pool, val, split = unlabelled_pool(cfg, sources=cfg.pretrain.unlabelled)
    pre = preprocess(cfg.data, keys=("image",))
    items = cache_images(pool, pre, "cache pool", progress)
    val_items = cache_images(val, pre, "cache val", progress)
    check_size(items + val_items, cfg)
    return Pool(split, pool, val, items, val_items)
