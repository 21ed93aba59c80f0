"""Pretraining objectives: what the network sees and what it must give back.

``autoencoder`` is the original study's objective: a UNet reconstructs its own input. A UNet
can pass the input straight through its top skip connection, so the deep encoder levels may
learn little. ``genesis`` (Zhou et al., Models Genesis, 2019) corrupts each patch (non-linear
intensity curve, local voxel shuffling, in- or out-painting) and asks for the original back;
the identity map through the skip connections no longer solves it.

All corruption draws come from a ``numpy.random.Generator``, so a batch is a pure function of
its seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lowlabel.config import RunConfig
from lowlabel.models.unet import build_model

METHODS = ("autoencoder", "genesis")


def build_pretrain_model(cfg: RunConfig) -> nn.Module:
    """The network of ``cfg.model`` with one output channel (the restored intensities).

    Input and output ``(B, 1, H, W[, D])``.
    """
    return build_model(
        cfg.model, cfg.data.spatial_dims, in_channels=1, out_channels=1, deep_supervision=False
    )


def corrupt(
    image: np.ndarray, cfg: RunConfig, rng: np.random.Generator, whole_volume: bool = False
) -> np.ndarray:
    """The network input for one target patch under ``cfg.pretrain.method``.

    Args:
        image: ``(1, H, W[, D])`` z-scored intensities (the target).
        rng: the generator of this sample; every random choice is drawn from it.
        whole_volume: a validation volume rather than a patch: painting is always in-painting,
            since out-painting a whole brain would leave nothing to judge the restoration by.

    Returns:
        The corrupted input, same shape; a copy of ``image`` for ``autoencoder``.
    """
    x = np.array(image, dtype=np.float32, copy=True)
    if cfg.pretrain.method == "autoencoder":
        return x
    p = cfg.pretrain
    if rng.random() < p.nonlinear_prob:
        x = nonlinear_intensity(x, rng)
    if rng.random() < p.shuffle_prob:
        x = local_shuffle(x, rng)
    if rng.random() < p.paint_prob:
        inner = rng.random() < p.inpaint_prob or whole_volume
        x = inpaint(x, rng) if inner else outpaint(x, rng)
    return x


def _bezier(rng: np.random.Generator, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """A random cubic Bezier curve from (0, 0) to (1, 1) as ``(xs, ys)``, sorted by x."""
    p1, p2 = rng.random(2), rng.random(2)
    t = np.linspace(0.0, 1.0, n)
    pts = [np.zeros(2), p1, p2, np.ones(2)]
    coef = [(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3]
    xs = sum(c * pt[0] for c, pt in zip(coef, pts, strict=True))
    ys = sum(c * pt[1] for c, pt in zip(coef, pts, strict=True))
    order = np.argsort(xs)
    return xs[order], ys[order]


def nonlinear_intensity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map intensities through a random Bezier curve (reversed half the time) on their own range.

    The network must learn tissue appearance to undo it, since the curve differs per patch.
    """
    lo, hi = float(x.min()), float(x.max())
    if hi - lo < 1e-6:
        return x
    xs, ys = _bezier(rng)
    if rng.random() < 0.5:
        ys = ys[::-1]
    u = (x - lo) / (hi - lo)
    return (np.interp(u, xs, ys) * (hi - lo) + lo).astype(np.float32)


def _box(
    rng: np.random.Generator, shape: tuple[int, ...], lo: float, hi: float
) -> tuple[slice, ...]:
    """A random box whose side along each axis is a fraction in ``[lo, hi)`` of the extent."""
    out = []
    for s in shape:
        size = max(1, int(s * rng.uniform(lo, hi)))
        start = int(rng.integers(0, s - size + 1))
        out.append(slice(start, start + size))
    return tuple(out)


def local_shuffle(x: np.ndarray, rng: np.random.Generator, n_blocks: int = 200) -> np.ndarray:
    """Shuffle the voxels inside many small blocks (up to 1/8 of each side): texture is lost,
    the global shape is kept."""
    out = x.copy()
    spatial = x.shape[1:]
    for _ in range(n_blocks):
        box = (slice(None), *_box(rng, spatial, 1 / 32, 1 / 8))
        block = out[box]
        flat = block.reshape(-1)
        out[box] = rng.permutation(flat).reshape(block.shape)
    return out


def _noise_like(x: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(float(x.min()), float(x.max()), size=shape).astype(np.float32)


def inpaint(x: np.ndarray, rng: np.random.Generator, max_boxes: int = 5) -> np.ndarray:
    """Replace up to ``max_boxes`` inner boxes (1/6 to 1/3 of each side) with uniform noise."""
    out = x.copy()
    spatial = x.shape[1:]
    for i in range(max_boxes):
        if i and rng.random() < 0.3:
            break
        box = (slice(None), *_box(rng, spatial, 1 / 6, 1 / 3))
        out[box] = _noise_like(x, out[box].shape, rng)
    return out


def outpaint(x: np.ndarray, rng: np.random.Generator, max_boxes: int = 5) -> np.ndarray:
    """Keep up to ``max_boxes`` boxes (3/7 to 4/7 of each side); fill the rest with noise."""
    out = _noise_like(x, x.shape, rng)
    spatial = x.shape[1:]
    for i in range(max_boxes):
        if i and rng.random() < 0.3:
            break
        box = (slice(None), *_box(rng, spatial, 3 / 7, 4 / 7))
        out[box] = x[box]
    return out


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all voxels; ``(B, 1, H, W[, D])`` each."""
    return torch.nn.functional.mse_loss(pred, target)
