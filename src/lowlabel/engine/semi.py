"""Mean teacher (Tarvainen and Valpola, 2017): unlabelled scans take part in fine-tuning.

The teacher is an exponential moving average of the trained network (the student). Each step the
student segments its labelled batch (supervised loss) and a batch of unlabelled patches shown
with noise and intensity jitter; the teacher segments the same patches clean, and the student is
pulled towards the teacher's class probabilities. Unlabelled batch ``i`` is, like labelled batch
``i``, a pure function of ``(seed, i)``, so a resumed run sees what the uninterrupted run saw.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lowlabel.config import RunConfig
from lowlabel.engine.inference import autocast

STREAM = 7  # the unlabelled batches' random stream, apart from the labelled batches'


class UnlabelledBatches(torch.utils.data.Dataset):
    """Item ``i`` is ``(student_input, teacher_input)``, each ``(B, 1, *patch)``: random patches of
    the cached pool images, the student's with Gaussian noise and a random intensity scale and
    shift, the teacher's clean; the same voxels, so their predictions compare voxel by voxel."""

    def __init__(self, items: list[dict], cfg: RunConfig) -> None:
        from lowlabel.engine.pretrain import patch_sampler

        self.items, self.cfg = items, cfg
        self.transform = patch_sampler(cfg)

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.cfg.semi
        rng = np.random.default_rng([self.cfg.seed, int(step), STREAM])
        clean = []
        for _ in range(s.batch_size):
            item = self.items[int(rng.integers(len(self.items)))]
            self.transform.set_random_state(seed=int(rng.integers(2**31)))
            clean.append(np.asarray(self.transform(item)["image"], dtype=np.float32))
        teacher = torch.from_numpy(np.stack(clean))
        scale = rng.uniform(0.9, 1.1, size=(s.batch_size,) + (1,) * (teacher.dim() - 1))
        shift = rng.uniform(-0.1, 0.1, size=scale.shape)
        noise = rng.normal(0.0, s.noise_std, size=teacher.shape)
        student = (teacher.numpy() * scale + shift + noise).astype(np.float32)
        return torch.from_numpy(student), teacher


class WithUnlabelled(torch.utils.data.Dataset):
    """Item ``i``: labelled batch ``i`` followed by unlabelled batch ``i``."""

    def __init__(self, labelled: torch.utils.data.Dataset, unlabelled: UnlabelledBatches) -> None:
        self.labelled, self.unlabelled = labelled, unlabelled

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, step: int) -> tuple[torch.Tensor, ...]:
        return (*self.labelled[step], *self.unlabelled[step])


class MeanTeacher:
    """The teacher network and the consistency term of a mean-teacher run."""

    def __init__(self, student: nn.Module, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def weight(self, step: int) -> float:
        """Consistency weight at ``step``: a sigmoid ramp-up to ``semi.weight``."""
        s = self.cfg.semi
        length = s.rampup * self.cfg.train.steps
        if length <= 0 or step >= length:
            return s.weight
        return s.weight * math.exp(-5.0 * (1.0 - step / length) ** 2)

    def consistency(self, student_logits: torch.Tensor, teacher_in: torch.Tensor) -> torch.Tensor:
        """Mean squared difference between the student's and the teacher's class probabilities."""
        with torch.no_grad(), autocast(self.cfg.train.bf16):
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
