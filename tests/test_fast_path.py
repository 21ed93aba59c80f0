"""The fast training path (cached volumes and foreground indices, plain tensors, prefetching
workers, channels-last) trains exactly like the plain path that decodes every scan at every step."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_dataset, tiny_overrides
from monai.data import MetaTensor, get_track_meta
from monai.losses import DiceCELoss
from monai.transforms import Compose

from lowlabel.config import RunConfig, load_config
from lowlabel.data.batches import Batches, train_loader
from lowlabel.data.cohort import cache, resolve_dataset, resolve_splits
from lowlabel.data.transforms import augment, index_foreground, preprocess
from lowlabel.engine.loop import fit, set_learning_rate
from lowlabel.engine.runtime import seed_everything, set_threads
from lowlabel.models.unet import build_model

STEPS = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), n=5, shape=(24, 24, 24))


def _cfg(dataset: Path, out: Path, **extra) -> RunConfig:
    values = {"train.steps": STEPS, "train.val_every": 1, "train.patience": 0, "data.n_test": 0}
    return load_config(None, tiny_overrides(dataset, out, **{**values, **extra}))


def fast_losses(cfg: RunConfig) -> list[float]:
    result = fit(cfg, progress=False, evaluate_test=False)
    rows = (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(row)["train_loss"] for row in rows]


class DecodeEachStep:
    """Preprocessing from the files, then the training augmentations, at every call."""

    def __init__(self, cfg: RunConfig) -> None:
        self.pre, self.aug = preprocess(cfg.data), augment(cfg.data, cfg.augment)

    def set_random_state(self, seed: int) -> None:
        self.aug.set_random_state(seed=seed)

    def __call__(self, item: dict) -> list[dict]:
        return self.aug(self.pre(item))


def plain_losses(cfg: RunConfig) -> list[float]:
    """What a user would write: decode and preprocess each scan at every step, MONAI metadata
    on, network in the default layout; same seeds, so the same batches as the fast path."""
    subjects = resolve_dataset(cfg).by_id(resolve_splits(cfg, resolve_dataset(cfg))["train"])
    items = [{"image": s["image"], "label": s["label"]} for s in subjects]
    batches = Batches(items, DecodeEachStep(cfg), cfg.train.batch_size, cfg.seed, track_meta=True)
    # the run's thread count, not whatever an earlier test left: with another count the
    # reductions sum in another order and the losses differ in the 7th digit
    threads = torch.get_num_threads()
    set_threads(cfg.train.threads, cfg.train.workers)
    try:
        return _plain_steps(cfg, batches)
    finally:
        torch.set_num_threads(threads)


def _plain_steps(cfg: RunConfig, batches: Batches) -> list[float]:
    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.data.spatial_dims)
    optimizer = torch.optim.AdamW(  # the engine's optimizer (lowlabel.engine.runtime.adamw)
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True
    )
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    losses = []
    for step in range(cfg.train.steps):
        image, label = batches[step]
        model.train()
        set_learning_rate(optimizer, cfg, step)
        loss = loss_fn(model(image), label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def plain(dataset, tmp_path_factory) -> list[float]:
    return plain_losses(_cfg(dataset, tmp_path_factory.mktemp("plain")))


def test_fast_path_gives_the_plain_paths_losses(dataset, tmp_path, plain):
    cfg = _cfg(dataset, tmp_path)
    assert cfg.train.precision == "auto" and cfg.train.workers == RunConfig().train.workers
    assert cfg.train.device == "cpu"  # fp32: what precision auto is on the CPU
    assert fast_losses(cfg) == plain  # to the last digit


@pytest.mark.parametrize("extra", [{"train.workers": 0}, {"train.channels_last": True}])
def test_speed_settings_keep_the_losses(dataset, tmp_path, plain, extra):
    losses = fast_losses(_cfg(dataset, tmp_path, **extra))
    if "train.workers" in extra:
        assert losses == plain  # prefetching in a worker (the default) moves work, not numbers
    else:  # other convolution kernels: same maths, rounding may differ
        assert losses == pytest.approx(plain, rel=1e-5)


def test_run_records_its_speed_settings(dataset, tmp_path):
    cfg = _cfg(dataset, tmp_path, **{"train.workers": 1})
    result = fit(cfg, progress=False, evaluate_test=False)
    speed = json.loads((Path(result.run_dir) / "provenance.json").read_text())["speed"]
    assert speed["workers"] == 1 and speed["threads"] == 1
    assert speed["precision"] == "fp32" and speed["device"] == "cpu"
    assert speed["compile"] is False and speed["track_meta"] is False
    assert speed["steps_per_s"] > 0 and 0 <= speed["data_share"] <= 1
    assert "workers: 1" in (Path(result.run_dir) / "config.yaml").read_text()


def _loader_start_method() -> tuple[str, str | None]:
    """This process's default start method, and how a run's loader processes would start."""
    import multiprocessing as mp

    from lowlabel.data.batches import step_loader

    cfg = RunConfig().replace(**{"train.workers": 1})
    context = step_loader(list(range(4)), 0, 4, cfg).multiprocessing_context
    return mp.get_start_method(), None if context is None else context.get_start_method()


@pytest.mark.skipif(sys.platform != "linux", reason="fork is the Linux default")
def test_loader_processes_fork_even_in_a_spawned_worker():
    """A study's local workers are spawned, so their default start method is spawn; their runs'
    loader processes used to be spawned too (a fresh interpreter and the cache pickled for every
    run: 54% of step time waiting for batches against 34% with a forked loader)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        default, loader = pool.submit(_loader_start_method).result(timeout=300)
    assert default == "spawn"
    assert loader == "fork"


def test_default_threads_leave_a_core_to_each_loader_worker():
    before = torch.get_num_threads()
    try:
        set_threads(0, workers=1)
        assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) - 1)
        set_threads(0, workers=64)
        assert torch.get_num_threads() == 1
        set_threads(3, workers=1)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def _train_items(cfg: RunConfig) -> list[dict]:
    ds = resolve_dataset(cfg)
    subjects = ds.by_id(resolve_splits(cfg, ds)["train"])
    return cache(subjects, Compose([preprocess(cfg.data), index_foreground()]), "c", False)


def test_batches_without_metadata_hold_the_same_values(dataset, tmp_path):
    cfg = _cfg(dataset, tmp_path)
    items = _train_items(cfg)
    transform = augment(cfg.data, cfg.augment)
    tracked = Batches(items, transform, 2, seed=7, track_meta=True)
    untracked = Batches(items, transform, 2, seed=7, track_meta=False)
    for step in (0, 5):
        a, b = tracked[step], untracked[step]
        for x, y in zip(a, b, strict=True):
            assert type(x) is torch.Tensor and not isinstance(y, MetaTensor)
            assert x.shape == (2, 1, 16, 16, 16) and torch.equal(x, y)
    assert get_track_meta()  # the global switch is restored for evaluation, which needs it


def test_workers_and_resume_see_the_same_batches(dataset, tmp_path):
    cfg = _cfg(dataset, tmp_path, **{"train.steps": 5})
    items = _train_items(cfg)
    inline = list(train_loader(cfg, items, 0))
    prefetched = list(train_loader(cfg.replace(**{"train.workers": 2}), items, 0))
    resumed = list(train_loader(cfg.replace(**{"train.workers": 1}), items, 3))
    assert len(inline) == len(prefetched) == 5 and len(resumed) == 2
    for a, b in zip(inline, prefetched, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(inline[3:], resumed, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(inline[0][0], inline[1][0])
