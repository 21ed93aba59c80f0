"""``pretrain(cfg) -> PretrainResult``: self-supervised pretraining on unlabelled scans.

The network of ``cfg.model`` (one output channel) learns to restore patches of the training
pool's images (labels ignored), of the dataset's extra unlabelled images and of the sources in
``pretrain.unlabelled``; validation and test subjects are never trained on. It runs the
training loop's :func:`~lowlabel.engine.loop.train_steps` with the :class:`Restoration`
objective, so a killed run resumed from ``last.safetensors`` ends with the same weights, to the
bit, as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowlabel import checkpoint
from lowlabel.config import RunConfig, to_dict
from lowlabel.data.batches import PretrainBatches
from lowlabel.data.cohort import Pool, load_pool
from lowlabel.engine.inference import predict_logits
from lowlabel.engine.loop import new_state, say, train_steps
from lowlabel.engine.objectives import Objective
from lowlabel.engine.runtime import Runtime, adamw, runtime, seed_everything
from lowlabel.errors import LowlabelError
from lowlabel.figures import reconstruction_figure
from lowlabel.models.pretrain import build_pretrain_model, corrupt, reconstruction_loss
from lowlabel.models.unet import count_parameters
from lowlabel.provenance import provenance
from lowlabel.run_folder import POOL, RECONSTRUCTIONS, RunFolder

VAL_SEED_OFFSET = 1_000_003  # validation corruptions never coincide with a training batch's


@dataclass
class PretrainResult:
    """What a finished pretraining run reports (also ``result.json`` in its folder).

    Attributes:
        checkpoints: ``str(step)`` -> path of ``checkpoint-<step>.safetensors``.
        images: images in the pool (``pool.json`` lists them).
        dropped: images of ``pretrain.unlabelled`` left out as validation or test subjects of
            the run (``pool.json`` says which and why).
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
    images: int = 0
    dropped: int = 0

    @classmethod
    def load(cls, path: Path) -> PretrainResult:
        return cls(**json.loads(Path(path).read_text()))


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


def saved_steps(cfg: RunConfig) -> list[int]:
    """Steps that keep a checkpoint: ``pretrain.save_steps`` within budget, and the last step."""
    steps = cfg.pretrain.steps
    return sorted({s for s in cfg.pretrain.save_steps if 0 < s <= steps} | {steps})


class Restoration(Objective):
    """Restore each pool patch from its corrupted copy (``pretrain.method``); keep checkpoints
    at :func:`saved_steps`, each saying which images (how many patches of each) it saw."""

    kind = "pretrain-state"
    verb = "pretrain"

    def __init__(
        self, cfg: RunConfig, model: nn.Module, runtime: Runtime, folder: RunFolder, pool: Pool
    ) -> None:
        super().__init__(cfg, model, runtime, folder)
        self.pool, self.val_x = pool, val_inputs(pool.val_items, cfg)
        self.images = [p["image"] for p in pool.images]
        self.saved = set(saved_steps(cfg))

    def initial_state(self) -> dict:
        nan = math.nan
        return {"seen": [0] * len(self.images), "train_loss": nan, "val_mse": nan, "val_mae": nan}

    def loss(self, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
        x, target, _ = batch
        with self.runtime.autocast():
            pred = self.net(x)
        return reconstruction_loss(pred.float(), target)

    def after_update(self, batch: tuple[torch.Tensor, ...], state: dict) -> None:
        for i in batch[2].tolist():
            state["seen"][i] += 1

    def validate(self) -> dict:
        return validate_recon(self.model, self.pool.val_items, self.val_x, self.cfg)

    def judge(self, row: dict, state: dict) -> bool:
        state.update(train_loss=row["train_loss"], val_mse=row["val_mse"], val_mae=row["val_mae"])
        return False

    def keep(self, step: int, state: dict) -> bool:
        if step not in self.saved:
            return False
        seen = {img: n for img, n in zip(self.images, state["seen"], strict=True)}
        meta = {
            "kind": "pretrain",
            "method": self.cfg.pretrain.method,
            "config": to_dict(self.cfg),
            "step": step,
            "images": self.images,
            "patches_per_image": seen,
            "val_mse": state["val_mse"],
            "val_mae": state["val_mae"],
        }
        self.folder.save_weights(self.folder.checkpoint(step), self.model, meta)
        return True

    def postfix(self, row: dict, state: dict) -> dict:
        return {"loss": f"{row['train_loss']:.4f}", "val_mse": f"{row['val_mse']:.4f}"}


def pretrain(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> PretrainResult:
    """Pretrain ``cfg.model`` with ``cfg.pretrain.method`` and keep checkpoints for transfer.

    Writes the run folder (:mod:`lowlabel.run_folder`): ``config.yaml``, ``pool.json`` (images
    trained on, the ``pretrain.unlabelled`` sources and the images dropped from them),
    ``metrics.jsonl`` (step, train_loss, val_mse, val_mae), ``last.safetensors`` (model,
    optimizer, RNG: resumable), ``checkpoint-<step>.safetensors`` for each saved step,
    ``reconstructions.png`` and ``result.json`` (marks the run finished).

    Raises:
        LowlabelError: no images, bad data, or an existing run without ``resume``.
    """
    folder = RunFolder.of(cfg, "pretrain")
    finished = folder.finished(resume, "a pretraining run")
    if finished is not None:
        return PretrainResult(**finished)
    if cfg.pretrain.steps < 1:
        raise LowlabelError("config key 'pretrain.steps': must be >= 1")
    rt = runtime(cfg)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    pool = load_pool(cfg, progress)
    dropped = pool.split["dropped"]
    if dropped:
        say(
            f"pretraining pool: left out {len(dropped)} image(s) of pretrain.unlabelled that are "
            "validation or test subjects of this run (pool.json lists them)",
            progress,
        )
    with folder.setting_up():
        folder.write_config(cfg)
        images = [p["image"] for p in pool.images]
        validation = [v["image"] for v in pool.val]
        split = {k: pool.split[k] for k in ("source", "split_file", "sources", "dropped")}
        folder.write_json(POOL, {**split, "images": images, "validation": validation})
        seed_everything(cfg.seed)
        model = rt.place(build_pretrain_model(cfg))
        optimizer = adamw(model.parameters(), cfg.pretrain.lr, cfg.train.weight_decay)
        objective = Restoration(cfg, model, rt, folder, pool)
    state = new_state(objective)
    folder.start(resume, model, optimizer, state)
    earlier = state["train_seconds"]  # training time of the sessions this run resumes
    batches = PretrainBatches(pool.items, cfg)
    run = {"steps": cfg.pretrain.steps, "schedule": False, "progress": progress}
    train_steps(objective, optimizer, batches, folder, state, rt, **run)

    checkpoints = {str(s): str(folder.checkpoint(s)) for s in sorted(objective.saved)}
    figure = None
    if pool.val_items:
        figure = str(folder / RECONSTRUCTIONS)
        x = objective.val_x[0]
        reconstruction_panels(cfg, checkpoints, pool.val_items[0], x, Path(figure), rt.device)
    result = PretrainResult(
        run_dir=str(folder.path),
        steps=state["step"],
        checkpoints=checkpoints,
        train_loss=state["train_loss"],
        val_mse=state["val_mse"],
        val_mae=state["val_mae"],
        figure=figure,
        seconds=round(earlier + time.perf_counter() - t0, 3),
        images=len(pool.images),
        dropped=len(dropped),
    )
    record = provenance(seed=cfg.seed, parameters=count_parameters(model), device=rt.record())
    folder.finish(asdict(result), record)
    return result


@torch.no_grad()
def reconstruction_panels(
    cfg: RunConfig,
    checkpoints: dict[str, str],
    item: dict,
    x: torch.Tensor,
    path: Path,
    device: torch.device | None = None,
) -> None:
    """Input, reconstruction and error of one validation volume for every saved step, computed
    on ``device`` (the CPU by default)."""
    model = build_pretrain_model(cfg).to(device or "cpu")
    target = np.asarray(item["image"])[0]
    rows = []
    for step, ckpt in checkpoints.items():
        tensors, _ = checkpoint.load(ckpt)
        model.load_state_dict(checkpoint.split(tensors, "model"))
        pred = predict_logits(model, x, cfg)[0].numpy()
        rows.append((f"step {step}", np.asarray(x)[0], pred, target))
    name = Path(str(item["image"].meta["filename_or_obj"])).name
    reconstruction_figure(rows, path, title=f"{cfg.pretrain.method}: {name}")
