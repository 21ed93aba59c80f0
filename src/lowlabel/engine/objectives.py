"""What varies between kinds of training, as objects the loop asks; never branches in the loop.

An objective says what one step computes (:meth:`Objective.loss`), what happens after each
optimizer update, what a validation measures and what it keeps, and which networks the resumable
state holds besides the trained one. Segmentation has two: :class:`Supervised` (from scratch or,
with a :class:`~lowlabel.models.transfer.Transfer`, from a pretrained encoder) and
:class:`MeanTeacherObjective`; pretraining's is :class:`lowlabel.engine.pretrain.Restoration`.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch import nn

from lowlabel.config import RunConfig, to_dict
from lowlabel.data.cohort import Cohort
from lowlabel.engine.inference import labels_of, plain, predict_logits
from lowlabel.engine.runtime import Runtime, adamw
from lowlabel.engine.semi import MeanTeacher
from lowlabel.models import transfer
from lowlabel.models.transfer import Transfer
from lowlabel.models.unet import build_model, deep_supervision_heads
from lowlabel.run_folder import RunFolder


@torch.no_grad()
def validate(model: nn.Module, items: list[dict], cfg: RunConfig) -> dict:
    """Mean Dice (CSF, GM, WM) on the preprocessed grid of the validation subjects."""
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    for item in items:
        pred = labels_of(plain(predict_logits(model, item["image"], cfg)))
        truth = plain(torch.as_tensor(item["label"]))[None].long()
        metric(one_hot(pred[None, None], 4), one_hot(truth, 4))
    per_class = metric.aggregate().tolist()
    return {
        "val_dice": float(np.mean(per_class)),
        "val_dice_csf": per_class[0],
        "val_dice_gm": per_class[1],
        "val_dice_wm": per_class[2],
    }


def loss_text(row: dict) -> str:
    """A metrics row's ``train_loss`` for the progress bar (none at step 0: no update yet)."""
    return "-" if row["train_loss"] is None else f"{row['train_loss']:.3f}"


class SegmentationLoss(nn.Module):
    """Dice + cross-entropy as ``cfg.loss`` says, over every head of a deeply supervised network.

    Called with logits ``(B, 4, H, W[, D])``, or with a deeply supervised network's training
    output ``(B, 1 + heads, 4, H, W[, D])``, and labels ``(B, 1, H, W[, D])``.
    """

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__()
        spec = cfg.loss
        weight = torch.tensor(spec.class_weights) if spec.class_weights else None
        self.dice_ce = DiceCELoss(
            to_onehot_y=True,
            softmax=True,
            batch=spec.batch,
            weight=weight,
            lambda_dice=spec.lambda_dice,
            lambda_ce=spec.lambda_ce,
        )
        self.heads = deep_supervision_heads(cfg.model)
        self.deep = DeepSupervisionLoss(self.dice_ce, weight_mode="exp") if self.heads else None

    def top(self, logits: torch.Tensor) -> torch.Tensor:
        """The top head's logits ``(B, 4, H, W[, D])`` of what the network returned."""
        return logits[:, 0] if self.heads else logits

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.deep is None:
            return self.dice_ce(logits, label)
        return self.deep(list(torch.unbind(logits, 1)), label)


class Objective:
    """The interface the loop uses; defaults for what most objectives leave alone.

    Attributes:
        kind: the ``kind`` recorded in ``last.safetensors``.
        verb: the progress bar's label.
        model: the trained network (its weights are ``model.*`` in every checkpoint).
        net: what the loop calls to train ``model`` (set by the loop: maybe compiled).
        modules: further networks of the resumable state, by name (e.g. a mean teacher).
    """

    kind = "train"
    verb = "train"
    modules: dict[str, nn.Module] | None = None

    def __init__(self, cfg: RunConfig, model: nn.Module, runtime: Runtime, folder: RunFolder):
        self.cfg, self.model, self.net = cfg, model, model
        self.runtime, self.folder = runtime, folder

    def initial_state(self) -> dict:
        """What the loop state holds besides ``step``, ``train_seconds`` and ``losses``."""
        return {}

    def train_mode(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        self.model.train()

    def loss(self, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
        raise NotImplementedError

    def after_update(self, batch: tuple[torch.Tensor, ...], state: dict) -> None:
        """Called after optimizer update number ``state["step"]`` (from 1)."""

    def validate(self) -> dict:
        raise NotImplementedError

    def validates_first(self, state: dict) -> bool:
        """Whether the loop validates the starting weights, at step 0, before any update."""
        return False

    def judge(self, row: dict, state: dict) -> bool:
        """Keep what a validation earned (``row`` is its metrics line); True stops the run."""
        return False

    def keep(self, step: int, state: dict) -> bool:
        """Keep a checkpoint at ``step`` if this objective keeps one there; True if it did."""
        return False

    def postfix(self, row: dict, state: dict) -> dict:
        return {"loss": loss_text(row)}


class Supervised(Objective):
    """Dice + cross-entropy (:class:`SegmentationLoss`) on labelled patches; the best
    validation's weights are kept."""

    def __init__(
        self,
        cfg: RunConfig,
        model: nn.Module,
        runtime: Runtime,
        folder: RunFolder,
        val_items: list[dict],
        setup: Transfer | None = None,
    ) -> None:
        super().__init__(cfg, model, runtime, folder)
        self.val_items, self.setup = val_items, setup
        self.loss_fn = SegmentationLoss(cfg)
        self.judged = {"model": model}  # the networks validated; the better one is kept
        self.kept = "model"

    def initial_state(self) -> dict:
        return {"best_metric": -1.0, "best_step": 0, "bad": 0, "stopped": False, "drops": 0}

    def train_mode(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.setup:
            self.setup.train_mode(self.model, step, optimizer)
        else:
            self.model.train()

    def loss(self, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
        image, label = batch
        with self.runtime.autocast():
            logits = self.net(image)
        return self.loss_fn(logits.float(), label)

    def validates_first(self, state: dict) -> bool:
        """A whole trained network (``transfer.scope: all``) is validated at step 0, so it can be
        the best checkpoint itself when fine-tuning only makes it worse, and ``metrics.jsonl``
        starts where it starts. Not again when a resumed run's state holds that validation."""
        whole = self.setup is not None and self.cfg.transfer.scope == "all"
        return whole and state["step"] == 0 and state["best_metric"] < 0

    def validate(self) -> dict:
        scores = {
            name: validate(net, self.val_items, self.cfg) for name, net in self.judged.items()
        }
        self.kept = max(scores, key=lambda name: scores[name]["val_dice"])
        row = dict(scores[self.kept])
        if len(scores) > 1:
            row.update({f"val_dice_{name}": scores[name]["val_dice"] for name in scores})
            row["kept"] = self.kept
        return row

    def judge(self, row: dict, state: dict) -> bool:
        t = self.cfg.train
        row["best"] = row["val_dice"] > state["best_metric"] + t.min_delta
        if row["best"]:
            state.update(best_metric=row["val_dice"], best_step=row["step"], bad=0)
            meta = {"kind": "train", "config": to_dict(self.cfg), "step": row["step"]}
            meta.update(val_dice=row["val_dice"], network=self.kept)
            self.folder.save_weights(self.folder.best, self.judged[self.kept], meta)
        else:
            state["bad"] += 1
        waited = bool(t.patience and state["bad"] >= t.patience)
        if waited and t.schedule == "plateau" and not state.get("drops"):
            state.update(drops=1, bad=0)  # the learning rate drops (set_learning_rate); go on
            row["lr_drop"] = True
            return False
        return waited

    def postfix(self, row: dict, state: dict) -> dict:
        best = f"{state['best_metric']:.3f}"
        return {"loss": loss_text(row), "val": f"{row['val_dice']:.3f}", "best": best}


class MeanTeacherObjective(Supervised):
    """:class:`Supervised` plus a consistency term on unlabelled patches towards a mean teacher.

    The student segments its labelled and unlabelled patches in one pass. Teacher and student are
    both validated and the better is kept: in a short run the moving average lags the student.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.mean_teacher = MeanTeacher(self.model, self.cfg)
        self.modules = {"teacher": self.mean_teacher.teacher}
        self.judged = {"teacher": self.mean_teacher.teacher, "student": self.model}

    def loss(self, batch: tuple[torch.Tensor, ...], step: int) -> torch.Tensor:
        image, label, student_in, teacher_in = batch
        with self.runtime.autocast():
            logits = self.net(torch.cat([image, student_in]))
        n = label.shape[0]
        mt = self.mean_teacher
        supervised = self.loss_fn(logits[:n].float(), label)
        student = self.loss_fn.top(logits[n:])
        return supervised + mt.weight(step) * mt.consistency(student, teacher_in)

    def after_update(self, batch: tuple[torch.Tensor, ...], state: dict) -> None:
        self.mean_teacher.update(self.model, state["step"])


def segmentation(
    cfg: RunConfig, cohort: Cohort, runtime: Runtime, folder: RunFolder
) -> tuple[Supervised, torch.optim.Optimizer]:
    """The network, its optimizer and the objective of a segmentation run (seed first)."""
    model = build_model(cfg.model, cfg.data.spatial_dims)
    setup = transfer.prepare(model, cfg, folder.path) if cfg.transfer.mode != "scratch" else None
    runtime.place(model)  # before the optimizer state is restored and a mean teacher copied
    groups = setup.param_groups(cfg.train.lr) if setup else model.parameters()
    optimizer = adamw(groups, cfg.train.lr, cfg.train.weight_decay)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    kind = Supervised if cohort.pool_items is None else MeanTeacherObjective
    return kind(cfg, model, runtime, folder, cohort.val_items, setup), optimizer
