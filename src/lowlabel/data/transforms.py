"""The one preprocessing factory (training, validation, test, segmentation) and the augmentations.

Deterministic preprocessing runs once per scan and is cached; random transforms run per patch.
All of it is MONAI; the only hand-written transform is the checked NIfTI loader.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    FgBgToIndicesd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
)

from lowlabel.config import AugmentConfig, DataConfig
from lowlabel.data.datasets import check_same_grid, remap_labels
from lowlabel.data.io import read_nifti

AXCODES = "RAS"


class LoadScand(MapTransform):
    """Load checked NIfTI files into channel-first ``MetaTensor``s carrying their affine.

    Image and label must share a grid; labels are remapped onto 0..3 and checked.
    """

    def __init__(self, keys: Sequence[Hashable], label_map: dict[int, int] | None = None) -> None:
        super().__init__(keys)
        self.label_map = label_map

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        ref_shape = ref_path = None
        for key in self.key_iterator(d):
            path = d[key]
            kind = "image" if key == "image" else "label"
            array, affine = read_nifti(path, kind=kind)
            if key == "label":
                array = remap_labels(array, self.label_map, path).astype(np.float32)
            if ref_shape is None:
                ref_shape, ref_path, ref_affine = array.shape, path, affine
            else:
                check_same_grid(path, array.shape, affine, ref_path, ref_shape, ref_affine)
            meta = {
                "filename_or_obj": str(path),
                "original_affine": affine,
                "spatial_shape": np.array(array.shape),
                "original_channel_dim": "no_channel",
            }
            d[key] = MetaTensor(
                torch.from_numpy(np.ascontiguousarray(array))[None],
                affine=torch.as_tensor(affine, dtype=torch.float64),
                meta=meta,
            )
        return d


def patch_shape(cfg: DataConfig) -> tuple[int, int, int]:
    """The 3D window a model sees: the patch itself, or ``(H, W, 1)`` for a 2D model."""
    return tuple(cfg.patch_size) if cfg.spatial_dims == 3 else (*cfg.patch_size, 1)


def preprocess(cfg: DataConfig, keys: Sequence[str] = ("image", "label")) -> Compose:
    """Deterministic preprocessing: load, RAS, resample, crop to the brain, z-score, pad.

    Labels are resampled nearest-neighbour, never interpolated. The result is invertible with
    MONAI's ``Invertd``, which takes predictions back to each scan's own grid.
    """
    keys = list(keys)
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    pad = tuple(p if cfg.spatial_dims == 3 or i < 2 else -1 for i, p in enumerate(patch_shape(cfg)))
    return Compose(
        [
            LoadScand(keys, cfg.label_map),
            Orientationd(keys, axcodes=AXCODES, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacingd(keys, pixdim=cfg.spacing, mode=modes),
            CropForegroundd(
                keys, source_key="image", select_fn=_nonzero, margin=2, allow_smaller=True
            ),
            NormalizeIntensityd("image", nonzero=True),
            SpatialPadd(keys, spatial_size=pad),
        ]
    )


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return x != 0


def index_foreground() -> FgBgToIndicesd:
    """Cache where tissue is, so drawing a patch costs no scan of the whole volume."""
    return FgBgToIndicesd("label", fg_postfix="_fg", bg_postfix="_bg")


def augment(data: DataConfig, aug: AugmentConfig) -> Compose:
    """Random patch sampling and augmentation of a cached training subject.

    Returns a transform whose output is a one-element list of ``{"image", "label"}`` with image
    of shape ``(1, *patch_size)``.
    """
    keys = ["image", "label"]
    modes = ["bilinear", "nearest"]
    nd = data.spatial_dims
    chain = [
        RandCropByPosNegLabeld(
            keys,
            label_key="label",
            spatial_size=patch_shape(data),
            pos=data.pos_fraction,
            neg=1.0 - data.pos_fraction,
            num_samples=1,
            fg_indices_key="label_fg",
            bg_indices_key="label_bg",
        ),
    ]
    if nd == 2:
        chain.append(SqueezeDimd(keys, dim=-1))
    if aug.enabled:
        rot = np.deg2rad(aug.rotate_deg)
        chain += [
            RandFlipd(keys, prob=aug.flip_prob, spatial_axis=0),
            RandAffined(
                keys,
                prob=aug.affine_prob,
                rotate_range=(rot,) * (1 if nd == 2 else 3),
                scale_range=(aug.scale,) * nd,
                mode=modes,
                padding_mode="zeros",
            ),
        ]
        if aug.elastic_prob > 0:
            elastic = Rand3DElasticd if nd == 3 else Rand2DElasticd
            kwargs = (
                {"sigma_range": (5, 7), "magnitude_range": (50, 150)}
                if nd == 3
                else {"spacing": (20, 20), "magnitude_range": (1, 2)}
            )
            chain.append(
                elastic(keys, prob=aug.elastic_prob, mode=modes, padding_mode="zeros", **kwargs)
            )
        chain += [
            RandScaleIntensityd("image", factors=aug.intensity_scale, prob=aug.intensity_prob),
            RandShiftIntensityd("image", offsets=aug.intensity_shift, prob=aug.intensity_prob),
            RandAdjustContrastd("image", prob=aug.gamma_prob, gamma=(0.7, 1.5)),
            RandBiasFieldd("image", prob=aug.bias_field_prob, coeff_range=(0.0, 0.2)),
            RandGaussianNoised("image", prob=aug.noise_prob, std=aug.noise_std),
        ]
    return Compose(chain)
