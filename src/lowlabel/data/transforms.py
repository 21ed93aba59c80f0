"""The one preprocessing factory (training, validation, test, segmentation) and the augmentations.

Deterministic preprocessing runs once per scan and is cached; random transforms run per patch.
All of it is MONAI; the only hand-written transform is the checked NIfTI loader.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
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
    RandGaussianSmoothd,
    RandHistogramShiftd,
    Randomizable,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
)
from monai.utils import convert_to_dst_type

from lowlabel.config import AugmentConfig, DataConfig, RunConfig
from lowlabel.data.datasets import check_same_grid, remap_labels
from lowlabel.data.io import read_nifti

AXCODES = "RAS"
FLIP_AXES = (0,)
"""The spatial axes that training augmentation flips: left-right (RAS), the brain's symmetry;
test-time augmentation mirrors the same axes and no others."""


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
            RandFlipd(keys, prob=aug.flip_prob, spatial_axis=FLIP_AXES),
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
        site = site_settings(aug)

        def stage(transform, positive: bool = False):
            return KeepBackgroundd(transform, positive) if site.scanner_like else transform

        if site.contrast_prob > 0:
            chain.append(
                RandTissueContrastd("image", "label", site.contrast_prob, aug.contrast_shift)
            )
        chain += [
            RandScaleIntensityd("image", factors=aug.intensity_scale, prob=aug.intensity_prob),
            stage(
                RandShiftIntensityd("image", offsets=aug.intensity_shift, prob=aug.intensity_prob)
            ),
        ]
        if site.histogram_prob > 0:
            shift = RandHistogramShiftd(
                "image", num_control_points=aug.histogram_points, prob=site.histogram_prob
            )
            chain.append(KeepBackgroundd(shift))  # its curve spans the zero background
        bias = RandBiasFieldd(
            "image", prob=site.bias_field_prob, coeff_range=(0.0, site.bias_field_coeff)
        )
        chain += [
            stage(RandAdjustContrastd("image", prob=site.gamma_prob, gamma=site.gamma)),
            stage(bias, positive=True),
        ]
        if site.thick_slice_prob > 0:
            thick = RandThickSlicesd(
                "image", site.thick_slice_prob, aug.thick_slice_mm, data.spacing[:nd]
            )
            chain.append(stage(thick))
        if site.lowres_prob > 0:
            lowres = RandSimulateLowResolutiond(
                "image",
                prob=site.lowres_prob,
                zoom_range=aug.lowres_zoom,
                upsample_mode="trilinear" if nd == 3 else "bilinear",
            )
            chain.append(stage(lowres))
        if site.blur_prob > 0:
            sigma = {f"sigma_{a}": tuple(aug.blur_sigma) for a in "xyz"[:nd]}
            chain.append(stage(RandGaussianSmoothd("image", prob=site.blur_prob, **sigma)))
        chain.append(stage(RandGaussianNoised("image", prob=site.noise_prob, std=aug.noise_std)))
    return Compose(chain)


@dataclasses.dataclass(frozen=True)
class SiteSettings:
    """The augmentation values that ``augment.site`` decides, resolved (see
    :class:`lowlabel.config.AugmentConfig`)."""

    gamma_prob: float
    gamma: tuple[float, float]
    bias_field_prob: float
    bias_field_coeff: float
    noise_prob: float
    scanner_like: bool
    contrast_prob: float
    histogram_prob: float
    thick_slice_prob: float
    lowres_prob: float
    blur_prob: float


# ``none`` is today's augmentation; ``robust`` imitates other scanners. Probabilities are per
# patch; SynthSeg applies its randomisation to every sample, but a model must still see scans
# like its own site's, so each stage here runs on a share of them.
SITE_PRESETS: dict[str, dict] = {
    "none": {
        "scanner_like": False,
        "gamma": (0.7, 1.5),
        "bias_field_coeff": 0.2,
        "contrast_prob": 0.0,
        "histogram_prob": 0.0,
        "thick_slice_prob": 0.0,
        "lowres_prob": 0.0,
        "blur_prob": 0.0,
    },
    "robust": {
        "scanner_like": True,
        "gamma": (0.5, 2.0),
        "bias_field_coeff": 0.5,
        "contrast_prob": 0.5,
        "histogram_prob": 0.3,
        "thick_slice_prob": 0.3,
        "lowres_prob": 0.2,
        "blur_prob": 0.2,
    },
}
# Under ``robust``, these keys are raised to at least these probabilities.
SITE_FLOORS: dict[str, dict[str, float]] = {
    "none": {},
    "robust": {"gamma_prob": 0.5, "bias_field_prob": 0.5, "noise_prob": 0.3},
}


def site_settings(aug: AugmentConfig) -> SiteSettings:
    """The values the augmentation uses: a site key set in the config wins, a null one takes
    the ``augment.site`` preset's value."""
    preset, floors = SITE_PRESETS[aug.site], SITE_FLOORS[aug.site]
    values = {}
    for name, default in preset.items():
        given = getattr(aug, name)
        values[name] = tuple(given) if isinstance(given, tuple) else given
        if given is None:
            values[name] = default
    for name in ("gamma_prob", "bias_field_prob", "noise_prob"):
        values[name] = max(getattr(aug, name), floors.get(name, 0.0))
    return SiteSettings(**values)


class RandTissueContrastd(RandomizableTransform, MapTransform):
    """A random per-tissue contrast, drawn from the patch's label (training only).

    Each tissue present (1 CSF, 2 GM, 3 WM) has its mean intensity moved by up to ``shift``;
    one monotone piecewise-linear curve through the old and new means remaps every nonzero
    voxel, so the tissues keep their order (each contrast keeps at least ``KEEP`` of itself),
    intensities within a tissue keep their order, and the zero background stays zero. Unlike
    SynthSeg's per-label intensities, no edge along the label's boundaries enters the image,
    which a network could learn to find instead of the tissue's own edges.
    """

    KEEP = 0.3

    def __init__(self, image_key: str, label_key: str, prob: float, shift: float) -> None:
        MapTransform.__init__(self, [image_key])
        RandomizableTransform.__init__(self, prob)
        self.image_key, self.label_key, self.shift = image_key, label_key, shift
        self.offsets = np.zeros(3)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.offsets = self.R.uniform(-self.shift, self.shift, size=3)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        self.randomize()
        if self._do_transform:
            d[self.image_key] = tissue_contrast(
                d[self.image_key], d[self.label_key], self.offsets, self.KEEP
            )
        return d


def tissue_contrast(
    image: torch.Tensor, label: torch.Tensor, offsets: np.ndarray, keep: float
) -> torch.Tensor:
    """Move the mean of tissue ``k`` (1..3) by ``offsets[k - 1]`` with one monotone curve.

    Args:
        image, label: ``(1, *spatial)``, the same grid.
        offsets: ``(3,)`` shifts of the CSF, GM and WM means.
        keep: the least share of each contrast between successive tissues that is kept.

    Returns:
        The remapped image, of ``image``'s type and metadata; unchanged when the tissues'
        means are not in the order CSF < GM < WM in this patch.
    """
    x = np.asarray(torch.as_tensor(image).detach().cpu(), dtype=np.float32)
    lab = np.asarray(torch.as_tensor(label).detach().cpu())
    fg = x != 0
    present = [k for k in (1, 2, 3) if (fg & (lab == k)).any()]
    if not present:
        return image
    means = np.array([x[fg & (lab == k)].mean() for k in present], dtype=np.float64)
    if (np.diff(means) <= 0).any():
        return image
    moved = means + np.asarray(offsets, dtype=np.float64)[[k - 1 for k in present]]
    for i in range(1, len(moved)):
        moved[i] = max(moved[i], moved[i - 1] + keep * (means[i] - means[i - 1]))
    lo, hi = float(x[fg].min()), float(x[fg].max())
    knots_x = np.concatenate([[min(lo, means[0] - 1e-3)], means, [max(hi, means[-1] + 1e-3)]])
    knots_y = np.concatenate(
        [[knots_x[0] + moved[0] - means[0]], moved, [knots_x[-1] + moved[-1] - means[-1]]]
    )
    out = x.copy()
    out[fg] = np.interp(x[fg], knots_x, knots_y)
    return convert_to_dst_type(torch.from_numpy(out), image)[0]


class KeepBackgroundd(Randomizable, MapTransform):
    """Run an image transform on the brain only: voxels at exactly zero before it (the
    background of a skull-stripped scan, and the padding of a warp) are zero after it.

    Args:
        transform: a dictionary transform of the ``image`` key; its random state is its own, so
            wrapping it does not change what it draws.
        positive: give ``transform`` the intensities above the brain's darkest voxel and shift
            them back after, e.g. for a multiplicative bias field, which on z-scores would
            scale them about the brain's mean rather than about zero signal.
    """

    def __init__(self, transform: MapTransform, positive: bool = False) -> None:
        MapTransform.__init__(self, transform.keys)
        self.transform, self.positive = transform, positive

    def set_random_state(self, seed: int | None = None, state=None) -> KeepBackgroundd:
        self.transform.set_random_state(seed=seed, state=state)
        return self

    def randomize(self, data=None) -> None:
        """The wrapped transform draws its own parameters."""

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        zero, low = {}, {}
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            zero[key] = x == 0
            low[key] = float(x[~zero[key]].min()) if self.positive and (~zero[key]).any() else 0.0
            if low[key]:
                d[key] = convert_to_dst_type(x - low[key], d[key])[0]
        d = dict(self.transform(d))
        for key, mask in zero.items():
            x = torch.as_tensor(d[key]) + low[key]
            d[key] = convert_to_dst_type(x.masked_fill(mask, 0.0), d[key])[0]
        return d


class RandThickSlicesd(RandomizableTransform, MapTransform):
    """Imitate a scan of thicker slices along one random axis (SynthSeg's random resolution).

    Draws an axis and a slice thickness (mm), then calls :func:`thick_slices`; thicknesses at
    or below the voxel size leave the image as it is.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] | str,
        prob: float,
        thickness_mm: Sequence[float],
        spacing: Sequence[float],
    ) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.thickness_mm, self.spacing = tuple(thickness_mm), tuple(spacing)
        self.axis, self.factor = 0, 1.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.axis = int(self.R.randint(len(self.spacing)))
            thickness = self.R.uniform(*self.thickness_mm)
            self.factor = float(thickness / self.spacing[self.axis])

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        self.randomize()
        if self._do_transform and self.factor > 1.0:
            for key in self.key_iterator(d):
                d[key] = thick_slices(d[key], self.axis, self.factor)
        return d


def thick_slices(image: torch.Tensor, axis: int, factor: float) -> torch.Tensor:
    """The image as a scan with slices ``factor`` voxels thick along spatial ``axis`` would
    show it, on the same grid.

    A Gaussian slice profile whose full width at half maximum is the thickness, sampling
    every ``factor`` voxels, and linear interpolation back.

    Args:
        image: ``(C, *spatial)``; spatial axis ``axis`` is ``image``'s axis ``axis + 1``.
        axis: the slice axis, 0-based among the spatial axes.
        factor: slice thickness over voxel size, > 1.

    Returns:
        The image, of ``image``'s type, shape and metadata.
    """
    x = torch.as_tensor(image).float()
    x = x.movedim(axis + 1, -1)
    shape, length = x.shape, x.shape[-1]
    rows = x.reshape(-1, 1, length)
    sigma = factor / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=rows.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).view(1, 1, -1)
    rows = F.conv1d(F.pad(rows, (radius, radius), mode="replicate"), kernel)
    coarse = max(2, round(length / factor))
    rows = F.interpolate(rows, size=coarse, mode="linear", align_corners=True)
    rows = F.interpolate(rows, size=length, mode="linear", align_corners=True)
    out = rows.reshape(shape).movedim(-1, axis + 1).contiguous()
    return convert_to_dst_type(out, image)[0]


def preprocessing_parameters(cfg: RunConfig) -> dict:
    """What the preprocessing factory does with this config, for readers of ``bundle.json``."""
    d = cfg.data
    return {
        "orientation": AXCODES,
        "spacing_mm": list(d.spacing),
        "image_interpolation": "bilinear",
        "crop": "foreground (image != 0), margin 2 voxels",
        "intensity": "z-score over nonzero voxels",
        "spatial_dims": d.spatial_dims,
        "window": list(patch_shape(d)),
        "sliding_window": {
            "overlap": cfg.train.sw_overlap,
            "batch_size": cfg.train.sw_batch_size,
            "mode": "gaussian",
            "precision": cfg.train.precision,
        },
        "label_map": {str(k): v for k, v in d.label_map.items()} if d.label_map else None,
    }
