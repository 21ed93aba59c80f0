"""``fit(cfg) -> RunResult``: the one training loop, readable top to bottom.

Batch ``i`` is a pure function of ``(seed, i)``, so a run resumed from a checkpoint sees exactly
the batches the uninterrupted run would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor, get_track_meta, set_track_meta
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import Compose
from torch import nn
from tqdm.auto import tqdm

from lowlabel.atomic import append_line, read_jsonl, remove_temporaries, write_json, write_text
from lowlabel.config import RunConfig, dump_yaml, run_dir, to_dict
from lowlabel.data.datasets import Dataset, check_pair, load_dataset
from lowlabel.data.demo import demo_dataset
from lowlabel.data.io import fewest_voxels, spacing_of
from lowlabel.data.splits import dataset_key, labelled, load_or_make, save
from lowlabel.data.transforms import augment, index_foreground, preprocess
from lowlabel.engine import checkpoint
from lowlabel.engine.inference import autocast, predict_logits
from lowlabel.errors import LowlabelError, unwrap
from lowlabel.models.unet import build_model, count_parameters
from lowlabel.provenance import peak_rss_mb, provenance

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run reports (also saved as ``result.json`` in its folder)."""

    run_dir: str
    steps: int
    best_step: int
    best_val_dice: float
    stopped_early: bool
    train_seconds: float
    prep_seconds: float
    peak_rss_mb: float
    n_labelled: int
    test: dict

    @classmethod
    def load(cls, path: Path) -> RunResult:
        return cls(**json.loads(Path(path).read_text()))


def seed_everything(seed: int) -> None:
    """The one place where seeds are set."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(threads: int, workers: int = 0) -> None:
    """``threads`` torch threads; 0 takes the cores that the loader ``workers`` leave free.

    On a busy machine one thread per core that nobody else needs matters more than the thread
    count: two threads that wait on each other at every layer lose whole time slices whenever
    the scheduler parks one of them (see benchmarks/results/train_speed.json).
    """
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) - workers))


def resolve_dataset(cfg: RunConfig) -> Dataset:
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


class Batches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``i`` is training batch ``i``: ``(image, label)`` tensors of
    shape ``(B, 1, *patch)``, drawn from the cache with randomness seeded by ``(seed, i)``.

    With ``track_meta=False`` the transforms run on plain tensors: the values are the same, but
    MONAI skips its per-transform metadata bookkeeping. Leave it on for transforms that read
    metadata (e.g. an uncached chain that starts by loading and resampling files).
    """

    def __init__(
        self,
        items: list[dict],
        transform: Compose,
        batch_size: int,
        seed: int,
        track_meta: bool = True,
    ) -> None:
        self.items, self.transform = items, transform
        self.batch_size, self.seed, self.track_meta = batch_size, seed, track_meta

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(step)])
        images, labels = [], []
        tracking = get_track_meta()
        set_track_meta(self.track_meta)
        try:
            for _ in range(self.batch_size):
                item = self.items[int(rng.integers(len(self.items)))]
                self.transform.set_random_state(seed=int(rng.integers(2**31)))
                sample = self.transform(item)
                sample = sample[0] if isinstance(sample, list) else sample
                images.append(_plain(sample["image"]))
                labels.append(_plain(sample["label"]))
        finally:
            set_track_meta(tracking)
        return torch.stack(images), torch.stack(labels)


def _plain(x) -> torch.Tensor:
    """A float tensor without MONAI metadata: a ``MetaTensor`` batch would make every layer of
    the network pay for metadata propagation."""
    x = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
    return x.float()


def train_loader(
    cfg: RunConfig, items: list[dict], start: int, pool: list[dict] | None = None
) -> torch.utils.data.DataLoader:
    """Batches ``start, start + 1, ...`` up to ``cfg.train.steps``; with ``train.workers`` > 0
    they are prepared in worker processes while the network trains on the previous one.

    With ``pool`` (cached unlabelled images, for a mean-teacher run) each batch also carries the
    student's and the teacher's unlabelled patches."""
    batches = Batches(
        items, augment(cfg.data, cfg.augment), cfg.train.batch_size, cfg.seed, track_meta=False
    )
    if pool is not None:
        from lowlabel.engine.semi import UnlabelledBatches, WithUnlabelled

        batches = WithUnlabelled(batches, UnlabelledBatches(pool, cfg))
    return step_loader(batches, start, cfg.train.steps, cfg)


def step_loader(
    batches: torch.utils.data.Dataset, start: int, steps: int, cfg: RunConfig
) -> torch.utils.data.DataLoader:
    """A loader over batch indices ``start .. steps - 1`` of a dataset whose item i is batch i."""
    # its own generator: iterating a DataLoader otherwise draws from the global torch RNG, which
    # a resumed run has restored, so dropout would differ from the uninterrupted run
    return torch.utils.data.DataLoader(
        batches,
        sampler=range(start, steps),
        batch_size=None,
        num_workers=cfg.train.workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def speed_settings(cfg: RunConfig, timing: dict | None = None) -> dict:
    """The settings that change speed (and, for bf16, numerics), and with ``timing`` the
    measured steps per second and share of step time spent waiting for batches."""
    t = cfg.train
    out = {
        "threads": torch.get_num_threads(),
        "workers": t.workers,
        "bf16": t.bf16,
        "channels_last": t.channels_last,
        "compile": t.compile,
        "track_meta": False,
    }
    if timing and timing["steps"] > 0:
        out["steps_per_s"] = round(timing["n"] / timing["steps"], 3)
        out["data_share"] = round(timing["data"] / timing["steps"], 4)
    return out


def prepare_model(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """Apply the memory-format and compile settings; returns the module to call for training
    (the compiled wrapper shares its parameters with ``model``)."""
    if cfg.train.channels_last:
        fmt = torch.channels_last_3d if cfg.data.spatial_dims == 3 else torch.channels_last
        model.to(memory_format=fmt)
    return torch.compile(model) if cfg.train.compile else model


def train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    bf16: bool,
    unlabelled: tuple[torch.Tensor, torch.Tensor] | None = None,
    semi=None,
    step: int = 0,
) -> float:
    """One optimizer update on a batch ``(B, 1, H, W[, D])``; returns the loss.

    With ``semi`` (a :class:`~lowlabel.engine.semi.MeanTeacher`) and ``unlabelled`` (student and
    teacher inputs), the student segments both batches in one pass and the consistency term,
    weighted for ``step``, joins the supervised loss."""
    if unlabelled is not None:
        image = torch.cat([image, unlabelled[0]])
    with autocast(bf16):
        logits = net(image)
    n = label.shape[0]
    loss = loss_fn(logits[:n].float(), label)
    if unlabelled is not None:
        loss = loss + semi.weight(step) * semi.consistency(logits[n:], unlabelled[1])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def validate(model: nn.Module, items: list[dict], cfg: RunConfig) -> dict:
    """Mean Dice (CSF, GM, WM) on the preprocessed grid of the validation subjects."""
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    for item in items:
        pred = predict_logits(model, item["image"], cfg).argmax(0)
        truth = torch.as_tensor(item["label"])[None].long()
        metric(one_hot(pred[None, None], 4), one_hot(truth, 4))
    per_class = metric.aggregate().tolist()
    return {
        "val_dice": float(np.mean(per_class)),
        "val_dice_csf": per_class[0],
        "val_dice_gm": per_class[1],
        "val_dice_wm": per_class[2],
    }


def truncate_metrics(path: Path, upto: int) -> None:
    """Keep the lines of ``metrics.jsonl`` up to step ``upto``: those a checkpoint covers."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= upto]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def prepare_run_dir(cfg: RunConfig, resume: bool) -> tuple[Path, RunResult | None]:
    """Make the run folder; a finished run is returned as is when resuming.

    Raises:
        LowlabelError: the folder already holds a run and ``resume`` is off.
    """
    path = run_dir(cfg)
    done = path / "result.json"
    if done.exists() and resume:
        return path, RunResult.load(done)
    if (done.exists() or (path / "last.safetensors").exists()) and not resume:
        raise LowlabelError(
            f"{path}: a run with this config exists; pass --resume to continue or reuse it, "
            "or --set name=... for a new run"
        )
    path.mkdir(parents=True, exist_ok=True)
    remove_temporaries(path)
    return path, None


def fit(
    cfg: RunConfig, *, resume: bool = False, progress: bool = True, evaluate_test: bool = True
) -> RunResult:
    """Train a segmentation network under a label budget, with early stopping.

    Writes into the run folder: ``config.yaml``, ``splits.json``, ``metrics.jsonl``,
    ``last.safetensors`` (resumable state), ``best.safetensors`` (best weights),
    ``evaluation.{csv,json}`` (native-resolution test metrics) and ``result.json``.

    Raises:
        LowlabelError: bad data, an impossible budget, or an existing run without ``resume``.
    """
    out, finished = prepare_run_dir(cfg, resume)
    if finished is not None:
        return finished
    set_threads(cfg.train.threads, cfg.train.workers)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    ds = resolve_dataset(cfg)
    split = resolve_splits(cfg, ds)
    write_text(out / "config.yaml", dump_yaml(cfg))
    write_json(out / "splits.json", split)

    pre = preprocess(cfg.data)
    train_items = cache(
        ds.by_id(split["train"]), Compose([pre, index_foreground()]), "cache train", progress
    )
    val_items = cache(ds.by_id(split["val"]), pre, "cache val", progress)
    pool_items = None
    if cfg.semi.method != "none":
        from lowlabel.engine.pretrain import cache_images, unlabelled_pool

        pool, _, _ = unlabelled_pool(cfg)
        write_json(out / "unlabelled.json", {"images": [p["image"] for p in pool]})
        pool_items = cache_images(
            pool, preprocess(cfg.data, keys=("image",)), "cache unlabelled", progress
        )
    check_size(train_items + val_items, cfg)
    if evaluate_test:
        # a bad test scan is found now, not after the whole training budget has been spent
        for subject in ds.by_id(split["test"]):
            check_pair(subject, cfg.data.label_map)
    prep_seconds = time.perf_counter() - t0

    seed_everything(cfg.seed)
    model = build_model(cfg.model, cfg.data.spatial_dims)
    setup = None
    if cfg.transfer.mode != "scratch":
        from lowlabel.models import transfer

        setup = transfer.prepare(model, cfg, out)
    groups = setup.param_groups(cfg.train.lr) if setup else model.parameters()
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    semi = None
    if pool_items is not None:
        from lowlabel.engine.semi import MeanTeacher

        semi = MeanTeacher(model, cfg)
    # the networks validated; the better one is kept as best and evaluated. In a mean-teacher run
    # both: in a short run the moving average lags the student and may be the worse of the two
    judged = {"teacher": semi.teacher, "student": model} if semi else {"model": model}
    modules = {"teacher": semi.teacher} if semi else None

    # "losses" since the last validation live in the checkpoint too, so a run resumed between
    # validations logs the same train_loss as an uninterrupted one
    state = {
        "step": 0,
        "best_metric": -1.0,
        "best_step": 0,
        "bad": 0,
        "stopped": False,
        "train_seconds": 0.0,
        "losses": [],
    }
    metrics_path = out / "metrics.jsonl"
    last, best = out / "last.safetensors", out / "best.safetensors"
    if resume and last.exists():
        state.update(checkpoint.restore_state(last, model, optimizer, modules)["state"])
        truncate_metrics(metrics_path, state["step"])
        log.info("resuming %s at step %d", out, state["step"])
    elif metrics_path.exists():
        metrics_path.unlink()

    def save_state() -> None:
        checkpoint.save_state(
            last,
            model,
            optimizer,
            {"kind": "train", "config": to_dict(cfg), "state": state},
            modules,
        )

    steps, val_every = cfg.train.steps, cfg.train.val_every
    net = prepare_model(model, cfg)
    loader = train_loader(cfg, train_items, state["step"], pool_items)
    bar = tqdm(
        total=steps,
        initial=state["step"],
        desc=f"train {out.name}",
        disable=not progress,
        dynamic_ncols=True,
    )
    tick = ready = time.perf_counter()
    timing = {"data": 0.0, "steps": 0.0, "n": 0}  # time waiting for batches, and in steps
    running = not state["stopped"] and state["step"] < steps
    for image, label, *unlabelled in loader if running else []:
        timing["data"] += time.perf_counter() - ready
        if setup:
            setup.train_mode(model, state["step"], optimizer)
        else:
            model.train()
        set_learning_rate(
            optimizer, cfg, state["step"], state["train_seconds"] + time.perf_counter() - tick
        )
        state["losses"].append(
            train_step(
                net,
                optimizer,
                loss_fn,
                image,
                label,
                cfg.train.bf16,
                tuple(unlabelled) or None,
                semi,
                state["step"],
            )
        )
        state["step"] += 1
        if semi:
            semi.update(model, state["step"])
        timing["steps"] += time.perf_counter() - ready
        timing["n"] += 1
        bar.update(1)
        step = state["step"]
        out_of_time = bool(cfg.train.max_minutes) and (
            state["train_seconds"] + time.perf_counter() - tick > 60 * cfg.train.max_minutes
        )
        if step % val_every == 0 or step == steps or out_of_time:
            row = {"step": step, "train_loss": float(np.mean(state["losses"]))}
            scores = {name: validate(network, val_items, cfg) for name, network in judged.items()}
            kept = max(scores, key=lambda name: scores[name]["val_dice"])
            row.update(scores[kept])
            if semi:
                row.update({f"val_dice_{name}": scores[name]["val_dice"] for name in scores})
                row["kept"] = kept
            state["train_seconds"] += time.perf_counter() - tick
            tick = time.perf_counter()
            row["seconds"] = round(state["train_seconds"], 3)
            state["losses"] = []
            improved = row["val_dice"] > state["best_metric"] + cfg.train.min_delta
            if improved:
                state.update(best_metric=row["val_dice"], best_step=step, bad=0)
                checkpoint.save(
                    best,
                    {f"model.{k}": v for k, v in judged[kept].state_dict().items()},
                    {
                        "kind": "train",
                        "config": to_dict(cfg),
                        "step": step,
                        "val_dice": row["val_dice"],
                        "network": kept,
                    },
                )
            else:
                state["bad"] += 1
            patience = cfg.train.patience
            state["stopped"] = bool(patience and state["bad"] >= patience) or out_of_time
            row["best"] = improved
            append_line(metrics_path, json.dumps(row))
            save_state()
            bar.set_postfix(
                loss=f"{row['train_loss']:.3f}",
                val=f"{row['val_dice']:.3f}",
                best=f"{state['best_metric']:.3f}",
            )
            if state["stopped"]:
                log.info("early stop at step %d (best %d)", step, state["best_step"])
                break
        elif cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            save_state()
        ready = time.perf_counter()
    bar.close()

    tensors, _ = checkpoint.load(best)
    model.load_state_dict(checkpoint.split(tensors, "model"))
    test = {}
    if evaluate_test and split["test"]:
        test = evaluate_model(model, cfg, ds.by_id(split["test"]), out, progress)["summary"]
    result = RunResult(
        run_dir=str(out),
        steps=state["step"],
        best_step=state["best_step"],
        best_val_dice=state["best_metric"],
        stopped_early=state["stopped"],
        train_seconds=round(state["train_seconds"], 3),
        prep_seconds=round(prep_seconds, 3),
        peak_rss_mb=round(peak_rss_mb(), 1),
        n_labelled=len(split["train"]),
        test=test,
    )
    write_json(
        out / "provenance.json",
        provenance(
            seed=cfg.seed, parameters=count_parameters(model), speed=speed_settings(cfg, timing)
        ),
    )
    write_json(out / "result.json", asdict(result))
    return result


def set_learning_rate(
    optimizer: torch.optim.Optimizer, cfg: RunConfig, step: int, seconds: float = 0.0
) -> None:
    """Learning rate as a pure function of the step, so a resumed run continues the schedule.

    Under a wall-clock budget (``train.max_minutes``) the poly decay follows whichever runs out
    first, steps or time, so a budgeted run still ends at a small learning rate.
    """
    done = step / cfg.train.steps
    if cfg.train.max_minutes:
        done = max(done, seconds / (60.0 * cfg.train.max_minutes))
    factor = (1.0 - min(done, 1.0)) ** 0.9 if cfg.train.schedule == "poly" else 1.0
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor


def evaluate_model(
    model: nn.Module, cfg: RunConfig, subjects: list[dict], out: Path, progress: bool
) -> dict:
    from lowlabel.engine.evaluate import evaluate

    return evaluate(model, cfg, subjects, out, progress)


def check_size(items: list[dict], cfg: RunConfig) -> None:
    """A scan smaller than the network's coarsest level is refused rather than padded.

    Args:
        items: preprocessed subjects whose ``image`` carries its file name and original affine.
    """
    need = 2 ** (cfg.model.levels - 1)
    for item in items:
        meta = item["image"].meta
        extent = np.asarray(meta["spatial_shape"]) * np.asarray(spacing_of(meta["original_affine"]))
        fewest = fewest_voxels(extent, cfg.data.spacing, cfg.data.spatial_dims)
        if fewest < need:
            raise LowlabelError(
                f"{meta['filename_or_obj']}: about {int(fewest)} voxels along an axis at "
                f"data.spacing is too small for a {cfg.model.levels}-level network (needs "
                f"{need}); use fewer model.levels or a finer data.spacing"
            )
