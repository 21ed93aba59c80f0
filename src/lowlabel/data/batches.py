"""Every batch dataset of lowlabel, and the one step loader.

Item ``i`` of each dataset is training batch ``i``, a pure function of ``(seed, i)``: a run
resumed at step ``i`` sees exactly the batches an uninterrupted run would have seen, whatever the
number of loader workers.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor, get_track_meta, set_track_meta
from monai.transforms import Compose, RandFlipd, RandSpatialCropd, SqueezeDimd

from lowlabel.config import RunConfig
from lowlabel.data.transforms import augment, patch_shape
from lowlabel.models.pretrain import corrupt

STREAM = 7  # the unlabelled batches' random stream, apart from the labelled batches'


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
        # one seed per batch, not per sample: MONAI reseeds by building a new RandomState for
        # every random transform (about 85 us each), which cost the loader 40% of its time
        self.transform.set_random_state(seed=int(rng.integers(2**31)))
        try:
            for _ in range(self.batch_size):
                item = self.items[int(rng.integers(len(self.items)))]
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


def patch_sampler(cfg: RunConfig) -> Compose:
    """Random patch of a cached image (mostly brain: the cache is cropped to it) and a flip."""
    chain = [RandSpatialCropd("image", roi_size=patch_shape(cfg.data), random_size=False)]
    if cfg.data.spatial_dims == 2:
        chain.append(SqueezeDimd("image", dim=-1))
    if cfg.augment.enabled:
        chain.append(RandFlipd("image", prob=cfg.augment.flip_prob, spatial_axis=0))
    return Compose(chain)


class PretrainBatches(Batches):
    """Item ``i`` is pretraining batch ``i``: ``(input, target, index)`` with input and target of
    shape ``(B, 1, *patch)`` and ``index`` ``(B,)`` the pool images drawn; randomness (image,
    crop, flip, corruption) comes from ``(seed, i)`` alone."""

    def __init__(self, items: list[dict], cfg: RunConfig) -> None:
        super().__init__(items, patch_sampler(cfg), cfg.train.batch_size, cfg.seed)
        self.cfg = cfg

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(step)])
        inputs, targets, index = [], [], []
        self.transform.set_random_state(seed=int(rng.integers(2**31)))
        for _ in range(self.batch_size):
            i = int(rng.integers(len(self.items)))
            target = np.asarray(self.transform(self.items[i])["image"], dtype=np.float32)
            inputs.append(torch.from_numpy(corrupt(target, self.cfg, rng)))
            targets.append(torch.from_numpy(target))
            index.append(i)
        return torch.stack(inputs), torch.stack(targets), torch.tensor(index)


class UnlabelledBatches(torch.utils.data.Dataset):
    """Item ``i`` is ``(student_input, teacher_input)``, each ``(B, 1, *patch)``: random patches of
    the cached pool images, the student's with Gaussian noise and a random intensity scale and
    shift, the teacher's clean; the same voxels, so their predictions compare voxel by voxel."""

    def __init__(self, items: list[dict], cfg: RunConfig) -> None:
        self.items, self.cfg = items, cfg
        self.transform = patch_sampler(cfg)

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.cfg.semi
        rng = np.random.default_rng([self.cfg.seed, int(step), STREAM])
        clean = []
        self.transform.set_random_state(seed=int(rng.integers(2**31)))
        for _ in range(s.batch_size):
            item = self.items[int(rng.integers(len(self.items)))]
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


def train_batches(
    cfg: RunConfig, items: list[dict], pool: list[dict] | None = None
) -> torch.utils.data.Dataset:
    """The batches of a segmentation run: augmented labelled patches, and with ``pool`` (cached
    unlabelled images, for a mean-teacher run) the student's and the teacher's unlabelled
    patches after them."""
    batches = Batches(
        items, augment(cfg.data, cfg.augment), cfg.train.batch_size, cfg.seed, track_meta=False
    )
    return batches if pool is None else WithUnlabelled(batches, UnlabelledBatches(pool, cfg))


def step_loader(
    batches: torch.utils.data.Dataset,
    start: int,
    steps: int,
    cfg: RunConfig,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A loader over batch indices ``start .. steps - 1`` of a dataset whose item i is batch i;
    with ``train.workers`` > 0 they are prepared in worker processes while the network trains
    on the previous one; with ``pin_memory`` they come in page-locked memory (faster copies to
    a GPU)."""
    # its own generator: iterating a DataLoader otherwise draws from the global torch RNG, which
    # a resumed run has restored, so dropout would differ from the uninterrupted run
    return torch.utils.data.DataLoader(
        batches,
        sampler=range(start, steps),
        batch_size=None,
        num_workers=cfg.train.workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(cfg.seed),
        multiprocessing_context=loader_context() if cfg.train.workers else None,
    )


def loader_context() -> str | None:
    """How loader processes start: forked on Linux, whatever this process's default.

    A process that was itself spawned (a study's local worker) has ``spawn`` as its default, so
    its loader would start a fresh interpreter, import torch and MONAI again and receive the
    cached volumes pickled: measured on 2 cores, its runs waited for batches 54% of their step
    time against 34% with a forked loader (as ``lowlabel train`` and Ray's workers have). A
    forked loader shares the cache copy-on-write; PyTorch's loader processes set their own
    thread count to 1. Elsewhere (macOS, Windows) the platform's default stays.
    """
    import multiprocessing as mp
    import sys

    return "fork" if sys.platform == "linux" and "fork" in mp.get_all_start_methods() else None


def train_loader(
    cfg: RunConfig,
    items: list[dict],
    start: int,
    pool: list[dict] | None = None,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """Batches ``start, start + 1, ...`` up to ``cfg.train.steps`` of :func:`train_batches`."""
    batches = train_batches(cfg, items, pool)
    return step_loader(batches, start, cfg.train.steps, cfg, pin_memory)
