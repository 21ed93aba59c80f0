"""Mean teacher (Tarvainen and Valpola, 2017): unlabelled scans take part in fine-tuning.

The teacher is an exponential moving average of the trained network (the student). Each step the
student segments its labelled batch (supervised loss) and a batch of unlabelled patches shown
with noise and intensity jitter; the teacher segments the same patches clean, and the student is
pulled towards the teacher's class probabilities. The unlabelled batches are
:class:`lowlabel.data.batches.UnlabelledBatches`; the loop's side is
:class:`lowlabel.engine.objectives.MeanTeacherObjective`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from lowlabel.config import RunConfig
from lowlabel.device import Placement


class MeanTeacher:
    """The teacher network and the consistency term of a mean-teacher run."""

    def __init__(self, student: nn.Module, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.placement = Placement.of_model(student, cfg.train.precision)

    def weight(self, step: int) -> float:
        """Consistency weight at ``step``: a sigmoid ramp-up to ``semi.weight``."""
        s = self.cfg.semi
        length = s.rampup * self.cfg.train.steps
        if length <= 0 or step >= length:
            return s.weight
        return s.weight * math.exp(-5.0 * (1.0 - step / length) ** 2)

    def consistency(self, student_logits: torch.Tensor, teacher_in: torch.Tensor) -> torch.Tensor:
        """Mean squared difference between the student's and the teacher's class probabilities."""
        with torch.no_grad(), self.placement.autocast():
            target = torch.softmax(self.teacher(teacher_in).float(), dim=1)
        return F.mse_loss(torch.softmax(student_logits.float(), dim=1), target)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """Move the teacher towards the student after optimiser update number ``step`` (from 1)."""
        decay = min(self.cfg.semi.ema, 1.0 - 1.0 / (step + 1))
        for t, s in zip(self.teacher.parameters(), student.parameters(), strict=True):
            t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
        for t, s in zip(self.teacher.buffers(), student.buffers(), strict=True):
            t.copy_(s)
