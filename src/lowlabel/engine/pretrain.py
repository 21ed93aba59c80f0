"""``pretrain(cfg) -> PretrainResult``: self-supervised pretraining on unlabelled scans.

The network of ``cfg.model`` (one output channel) learns to restore patches of the training
pool's images (labels ignored) and of the dataset's extra unlabelled images; validation and test
subjects are never trained on. Batch ``i`` is a pure function of ``(seed, i)`` as in
:mod:`lowlabel.engine.loop`, so a killed run resumed from ``last.safetensors`` ends with the same
weights, to the bit, as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose, RandFlipd, RandSpatialCropd, SqueezeDimd
from torch import nn
from tqdm.auto import tqdm

from lowlabel.atomic import append_line, remove_temporaries, write_json, write_text
from lowlabel.config import RunConfig, dump_yaml, run_dir, to_dict
from lowlabel.data.transforms import patch_shape, preprocess
from lowlabel.engine import checkpoint
from lowlabel.engine.inference import autocast, predict_logits
from lowlabel.engine.loop import (
    Batches,
    check_size,
    resolve_dataset,
    resolve_splits,
    seed_everything,
    set_threads,
    step_loader,
    truncate_metrics,
)
from lowlabel.errors import LowlabelError, unwrap
from lowlabel.models.pretrain import build_pretrain_model, corrupt, reconstruction_loss
from lowlabel.models.unet import count_parameters
from lowlabel.provenance import provenance

log = logging.getLogger(__name__)

VAL_SEED_OFFSET = 1_000_003  # validation corruptions never coincide with a training batch's


@dataclass
class PretrainResult:
    """What a finished pretraining run reports (also ``result.json`` in its folder).

    Attributes:
        checkpoints: ``str(step)`` -> path of ``checkpoint-<step>.safetensors``.
        figure: the reconstruction figure, or None without validation subjects.
    """

    run_dir: str
    steps: int
    checkpoints: dict[str, str]
    train_loss: float
    val_mse: float
    val_mae: float
    figure: str | None
    seconds: float

    @classmethod
    def load(cls, path: Path) -> PretrainResult:
        return cls(**json.loads(Path(path).read_text()))


class PretrainBatches(Batches):
    """Item ``i`` is pretraining batch ``i``: ``(input, target, index)`` with input and target of
    shape ``(B, 1, *patch)`` and ``index`` ``(B,)`` the pool images drawn; randomness (image,
    crop, flip, corruption) comes from ``(seed, i)`` alone."""

    def __init__(
        self, items: list[dict], transform: Compose, batch_size: int, seed: int, cfg: RunConfig
    ) -> None:
        super().__init__(items, transform, batch_size, seed)
        self.cfg = cfg

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(step)])
        inputs, targets, index = [], [], []
        for _ in range(self.batch_size):
            i = int(rng.integers(len(self.items)))
            self.transform.set_random_state(seed=int(rng.integers(2**31)))
            target = np.asarray(self.transform(self.items[i])["image"], dtype=np.float32)
            inputs.append(torch.from_numpy(corrupt(target, self.cfg, rng)))
            targets.append(torch.from_numpy(target))
            index.append(i)
        return torch.stack(inputs), torch.stack(targets), torch.tensor(index)


def patch_sampler(cfg: RunConfig) -> Compose:
    """Random patch of a cached image (mostly brain: the cache is cropped to it) and a flip."""
    chain = [RandSpatialCropd("image", roi_size=patch_shape(cfg.data), random_size=False)]
    if cfg.data.spatial_dims == 2:
        chain.append(SqueezeDimd("image", dim=-1))
    if cfg.augment.enabled:
        chain.append(RandFlipd("image", prob=cfg.augment.flip_prob, spatial_axis=0))
    return Compose(chain)


def val_inputs(items: list[dict], cfg: RunConfig) -> list[torch.Tensor]:
    """Each validation volume corrupted once, with a seed of its own: ``(1, X, Y, Z)`` each."""
    out = []
    for j, item in enumerate(items):
        rng = np.random.default_rng([cfg.seed, VAL_SEED_OFFSET + j])
        x = corrupt(np.asarray(item["image"]), cfg, rng, whole_volume=True)
        out.append(torch.from_numpy(x))
    return out


@torch.no_grad()
def validate_recon(
    model: nn.Module, items: list[dict], inputs: list[torch.Tensor], cfg: RunConfig
) -> dict:
    """Mean squared and absolute error of the restored validation volumes (whole grid)."""
    if not items:
        return {"val_mse": math.nan, "val_mae": math.nan}
    se = ae = n = 0.0
    for item, x in zip(items, inputs, strict=True):
        pred = predict_logits(model, x, cfg)
        diff = pred - torch.as_tensor(item["image"]).float()
        se += float((diff**2).sum())
        ae += float(diff.abs().sum())
        n += diff.numel()
    return {"val_mse": se / n, "val_mae": ae / n}


def cache_images(images: list[dict], transform: Compose, desc: str, progress: bool) -> list[dict]:
    """Preprocess each image once (no label: the pool may hold unlabelled scans)."""
    return [
        unwrap(transform, {"image": item["image"]})
        for item in tqdm(images, desc=desc, disable=not progress, leave=False)
    ]


def unlabelled_pool(cfg: RunConfig) -> tuple[list[dict], list[dict], dict]:
    """Training-pool images (labels ignored) plus the extra unlabelled ones; validation subjects.

    The pool is the split's labelled-training pool at budget 0, so no validation or test subject
    is ever pretrained on.
    """
    ds = resolve_dataset(cfg)
    split = resolve_splits(cfg.replace(**{"data.budget": 0}), ds)
    pool = [{"image": s["image"]} for s in ds.by_id(split["train"])]
    pool += [{"image": p} for p in ds.unlabelled]
    if not pool:
        raise LowlabelError(f"{ds.source}: no training or unlabelled images to pretrain on")
    val = [{"image": s["image"]} for s in ds.by_id(split["val"])]
    return pool, val, split


def saved_steps(cfg: RunConfig) -> list[int]:
    """Steps that keep a checkpoint: ``pretrain.save_steps`` within budget, and the last step."""
    steps = cfg.pretrain.steps
    return sorted({s for s in cfg.pretrain.save_steps if 0 < s <= steps} | {steps})


def pretrain(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> PretrainResult:
    """Pretrain ``cfg.model`` with ``cfg.pretrain.method`` and keep checkpoints for transfer.

    Writes into :func:`lowlabel.config.run_dir`: ``config.yaml``, ``pool.json`` (images trained
    on), ``metrics.jsonl`` (step, train_loss, val_mse, val_mae), ``last.safetensors`` (model,
    optimizer, RNG: resumable), ``checkpoint-<step>.safetensors`` for each saved step,
    ``reconstructions.png`` and ``result.json`` (marks the run finished).

    Raises:
        LowlabelError: no images, bad data, or an existing run without ``resume``.
    """
    out = run_dir(cfg)
    done, last = out / "result.json", out / "last.safetensors"
    if done.exists() and resume:
        return PretrainResult.load(done)
    if (done.exists() or last.exists()) and not resume:
        raise LowlabelError(
            f"{out}: a pretraining run with this config exists; pass --resume to continue or "
            "reuse it, or --set name=... for a new run"
        )
    if cfg.pretrain.steps < 1:
        raise LowlabelError("config key 'pretrain.steps': must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out)
    set_threads(cfg.train.threads, cfg.train.workers)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    pool, val, split = unlabelled_pool(cfg)
    write_text(out / "config.yaml", dump_yaml(cfg))
    images = [p["image"] for p in pool]
    write_json(
        out / "pool.json",
        {
            "source": split["source"],
            "split_file": split["split_file"],
            "images": images,
            "validation": [v["image"] for v in val],
        },
    )
    pre = preprocess(cfg.data, keys=("image",))
    pool_items = cache_images(pool, pre, "cache pool", progress)
    val_items = cache_images(val, pre, "cache val", progress)
    check_size(pool_items + val_items, cfg)
    val_x = val_inputs(val_items, cfg)

    seed_everything(cfg.seed)
    model = build_pretrain_model(cfg)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.pretrain.lr, weight_decay=cfg.train.weight_decay
    )
    # "losses" since the last validation live in the checkpoint too, so a run resumed between
    # validations logs the same train_loss as an uninterrupted one
    state: dict = {
        "step": 0,
        "seconds": 0.0,
        "seen": [0] * len(pool),
        "train_loss": math.nan,
        "val_mse": math.nan,
        "val_mae": math.nan,
        "losses": [],
    }
    metrics_path = out / "metrics.jsonl"
    if resume and last.exists():
        state.update(checkpoint.restore_state(last, model, optimizer)["state"])
        truncate_metrics(metrics_path, state["step"])
        log.info("resuming %s at step %d", out, state["step"])
    elif metrics_path.exists():
        metrics_path.unlink()

    def save_state() -> None:
        checkpoint.save_state(
            last,
            model,
            optimizer,
            {"kind": "pretrain-state", "config": to_dict(cfg), "state": state},
        )

    def save_checkpoint(step: int) -> None:
        # each checkpoint says which images (and how many patches of each) it was trained on
        seen = {img: n for img, n in zip(images, state["seen"], strict=True)}
        checkpoint.save(
            out / f"checkpoint-{step}.safetensors",
            {f"model.{k}": v for k, v in model.state_dict().items()},
            {
                "kind": "pretrain",
                "method": cfg.pretrain.method,
                "config": to_dict(cfg),
                "step": step,
                "images": images,
                "patches_per_image": seen,
                "val_mse": state["val_mse"],
                "val_mae": state["val_mae"],
            },
        )

    steps, val_every, keep = cfg.pretrain.steps, cfg.train.val_every, set(saved_steps(cfg))
    loader = step_loader(
        PretrainBatches(pool_items, patch_sampler(cfg), cfg.train.batch_size, cfg.seed, cfg),
        state["step"],
        steps,
        cfg,
    )
    bar = tqdm(
        total=steps,
        initial=state["step"],
        desc=f"pretrain {out.name}",
        disable=not progress,
        dynamic_ncols=True,
    )
    tick = time.perf_counter()
    for x, target, index in loader if state["step"] < steps else []:
        model.train()
        with autocast(cfg.train.bf16):
            pred = model(x)
        loss = reconstruction_loss(pred.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state["step"] += 1
        for i in index.tolist():
            state["seen"][i] += 1
        state["losses"].append(loss.item())
        bar.update(1)
        step = state["step"]
        validated = step % val_every == 0 or step == steps
        if validated:
            row = {"step": step, "train_loss": float(np.mean(state["losses"]))}
            row.update(validate_recon(model, val_items, val_x, cfg))
            state["seconds"] += time.perf_counter() - tick
            tick = time.perf_counter()
            row["seconds"] = round(state["seconds"], 3)
            state["losses"] = []
            state.update(
                train_loss=row["train_loss"], val_mse=row["val_mse"], val_mae=row["val_mae"]
            )
            append_line(metrics_path, json.dumps(row))
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", val_mse=f"{row['val_mse']:.4f}")
        if step in keep:
            save_checkpoint(step)
        if (
            validated
            or step in keep
            or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
        ):
            save_state()
    bar.close()

    checkpoints = {str(s): str(out / f"checkpoint-{s}.safetensors") for s in sorted(keep)}
    figure = None
    if val_items:
        figure = str(out / "reconstructions.png")
        reconstruction_panels(cfg, checkpoints, val_items[0], val_x[0], Path(figure))
    result = PretrainResult(
        run_dir=str(out),
        steps=state["step"],
        checkpoints=checkpoints,
        train_loss=state["train_loss"],
        val_mse=state["val_mse"],
        val_mae=state["val_mae"],
        figure=figure,
        seconds=round(state["seconds"] + time.perf_counter() - t0, 3),
    )
    write_json(
        out / "provenance.json", provenance(seed=cfg.seed, parameters=count_parameters(model))
    )
    write_json(done, asdict(result))
    return result


@torch.no_grad()
def reconstruction_panels(
    cfg: RunConfig, checkpoints: dict[str, str], item: dict, x: torch.Tensor, path: Path
) -> None:
    """Input, reconstruction and error of one validation volume for every saved step."""
    from lowlabel.figures import reconstruction_figure

    model = build_pretrain_model(cfg)
    target = np.asarray(item["image"])[0]
    rows = []
    for step, ckpt in checkpoints.items():
        tensors, _ = checkpoint.load(ckpt)
        model.load_state_dict(checkpoint.split(tensors, "model"))
        pred = predict_logits(model, x, cfg)[0].numpy()
        rows.append((f"step {step}", np.asarray(x)[0], pred, target))
    name = Path(str(item["image"].meta["filename_or_obj"])).name
    reconstruction_figure(rows, path, title=f"{cfg.pretrain.method}: {name}")
