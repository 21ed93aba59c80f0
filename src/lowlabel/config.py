"""Typed, frozen configuration: YAML in, ``--set a.b=value`` overrides, named-key validation.

A run is fully described by one :class:`RunConfig`. The YAML file mirrors it section by section;
keys left out take the defaults below. An unknown key or a value of the wrong type is a
:class:`~lowlabel.errors.LowlabelError` that names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lowlabel.data.size import patch_problem
from lowlabel.errors import LowlabelError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class DataConfig:
    """Where the scans come from and how they are preprocessed.

    Attributes:
        dataset: a ``dataset.json``, a folder with ``images/`` and ``labels/``, or null (None)
            for the embedded synthetic demo cohort.
        label_map: remaps the dataset's label values onto 0 background, 1 CSF, 2 GM, 3 WM.
        spatial_dims: 3 trains on volume patches, 2 on axial slices of the same volumes.
        spacing: target voxel spacing in mm (x, y, z) after reorientation to RAS.
        patch_size: training patch, and sliding-window size at inference; for 2D two numbers.
        n_test, n_val: sizes of the fixed test and validation sets.
        budget: labelled training subjects; 0 means all that remain after test and validation.
        split_seed: draws the fixed test and validation sets.
        draw: draws which subjects are labelled; budgets of one draw are nested.
        pos_fraction: share of training patches centred on brain tissue rather than anywhere.
        demo_subjects, demo_spacing: size and resolution of the demo cohort.
    """

    dataset: str | None = None
    label_map: dict[int, int] | None = None
    spatial_dims: Literal[2, 3] = 3
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
    patch_size: tuple[int, ...] = (64, 64, 64)
    n_test: int = 6
    n_val: int = 3
    budget: int = 3
    split_seed: int = 0
    draw: int = 0
    pos_fraction: float = 0.9
    demo_subjects: int = 16
    demo_spacing: float = 2.0


@dataclass(frozen=True)
class AugmentConfig:
    """On-the-fly random transforms for training patches (MONAI), applied after the cache.

    Attributes:
        enabled: apply the transforms below at all.
        flip_prob: probability of a left-right flip.
        affine_prob: probability of a random rotation (up to ``rotate_deg`` per axis) and
            scaling (up to ``scale``, as a fraction).
        rotate_deg, scale: the ranges of that affine transform.
        elastic_prob: probability of an elastic deformation (slow; off by default).
        intensity_prob: probability each of an intensity scaling (``intensity_scale``) and an
            intensity shift (``intensity_shift``), on the z-scored image.
        intensity_scale, intensity_shift: the ranges of those intensity changes.
        gamma_prob: probability of a random gamma (contrast) change, gamma 0.7 to 1.5.
        bias_field_prob: probability of a smooth random bias field.
        noise_prob: probability of Gaussian noise with standard deviation ``noise_std``.
        noise_std: that noise's standard deviation (the image is z-scored).
        site: a preset of the augmentations below that imitate other scanners (after
            SynthSeg's randomisation): ``none`` (today's augmentation, the site keys off) or
            ``robust`` (each site key left null takes the preset's value, and
            ``gamma_prob``, ``bias_field_prob`` and ``noise_prob`` are raised to at least
            0.5, 0.5 and 0.3). A site key you set yourself always wins.
        scanner_like: the intensity stages act as on a skull-stripped scan from a scanner:
            the zero background stays zero through every one of them (shift, gamma, bias
            field, thick slices, low resolution, blur, noise), and the bias field multiplies
            the intensities above the brain's darkest voxel, not the z-scores (whose zero is the
            brain's mean); null: false, or true under ``robust``.
        gamma: the range of the random gamma; null: [0.7, 1.5], or [0.5, 2.0] under
            ``robust``.
        bias_field_coeff: the largest coefficient of the random bias field; null: 0.2, or 0.5
            under ``robust``.
        contrast_prob: probability of a per-tissue contrast curve, drawn from the training
            label: each tissue's mean intensity moves by up to ``contrast_shift`` (SDs of the
            z-scored image) and one smooth monotone curve through the new means remaps the
            patch, so CSF < GM < WM stays (at least 30% of each contrast is kept) and no label
            edge appears in the image; null: 0, or 0.5 under ``robust``.
        contrast_shift: that largest shift of a tissue's mean.
        histogram_prob: probability of a random monotone intensity curve (MONAI
            ``RandHistogramShift``, ``histogram_points`` control points; the zero background
            stays zero); null: 0, or 0.3 under ``robust``.
        histogram_points: those control points.
        thick_slice_prob: probability of imitating a thicker slice: along one random axis, a
            Gaussian slice profile as wide as a thickness drawn from ``thick_slice_mm``, a
            sampling at that thickness and a linear return to the patch grid; null: 0, or 0.3
            under ``robust``.
        thick_slice_mm: that range of slice thickness (mm); thinner than the voxels does
            nothing.
        lowres_prob: probability of a coarser scan in every direction (MONAI
            ``RandSimulateLowResolution``, zoom ``lowres_zoom``); null: 0, or 0.2 under
            ``robust``.
        lowres_zoom: that zoom range (0.5 halves the resolution).
        blur_prob: probability of a Gaussian blur (MONAI ``RandGaussianSmooth``, sigma in
            voxels drawn from ``blur_sigma`` per axis); null: 0, or 0.2 under ``robust``.
        blur_sigma: that sigma range.
    """

    enabled: bool = True
    flip_prob: float = 0.5
    affine_prob: float = 0.3
    rotate_deg: float = 10.0
    scale: float = 0.1
    elastic_prob: float = 0.0
    intensity_prob: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    gamma_prob: float = 0.3
    bias_field_prob: float = 0.2
    noise_prob: float = 0.2
    noise_std: float = 0.05
    site: Literal["none", "robust"] = "none"
    scanner_like: bool | None = None
    gamma: tuple[float, ...] | None = None
    bias_field_coeff: float | None = None
    contrast_prob: float | None = None
    contrast_shift: float = 0.5
    histogram_prob: float | None = None
    histogram_points: int = 8
    thick_slice_prob: float | None = None
    thick_slice_mm: tuple[float, ...] = (2.0, 6.0)
    lowres_prob: float | None = None
    lowres_zoom: tuple[float, ...] = (0.5, 1.0)
    blur_prob: float | None = None
    blur_sigma: tuple[float, ...] = (0.5, 1.5)


@dataclass(frozen=True)
class ModelConfig:
    """The segmentation network (MONAI ``UNet`` unless ``name`` says otherwise).

    Attributes:
        name: ``unet`` (MONAI ``UNet``) or ``dynunet`` (MONAI ``DynUNet``, nnU-Net's network).
        levels: resolution levels, 3 to 6; channels double at each.
        channels: channels at the first level (32: against 16, +0.011 mean Dice with 3
            labels in the levers screen, at about twice the compute).
        num_res_units: residual units per block (MONAI ``UNet``).
        dropout: dropout probability in the network's blocks.
        norm: ``instance`` or ``batch`` normalisation.
        deep_supervision: ``dynunet`` only: nnU-Net's deep supervision, extra output heads at
            the lower decoder levels whose losses join the top one's with weights halving per
            level (MONAI ``DeepSupervisionLoss``); inference uses the top head only.
    """

    name: Literal["unet", "dynunet"] = "unet"
    levels: int = 4
    channels: int = 32
    num_res_units: int = 0
    dropout: float = 0.0
    norm: Literal["instance", "batch"] = "instance"
    deep_supervision: bool = False


@dataclass(frozen=True)
class LossConfig:
    """The segmentation loss: Dice + cross-entropy (MONAI ``DiceCELoss``).

    Attributes:
        batch: compute the Dice over the whole batch at once (batch Dice, as nnU-Net) instead
            of per patch and then averaged.
        class_weights: four weights (background, CSF, GM, WM) for both terms, e.g.
            ``[1, 2, 1, 1]`` to weigh CSF double; empty for equal weights.
        lambda_dice, lambda_ce: the weights of the Dice and the cross-entropy terms.
    """

    batch: bool = False
    class_weights: tuple[float, ...] = ()
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """The training loop.

    Attributes:
        steps: step budget (optimizer updates).
        batch_size: labelled patches per step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (also for pretraining).
        schedule: ``constant`` keeps the learning rate, so early stopping, not the step
            budget, ends a run that has stopped improving (+0.005 mean Dice against ``poly`` in
            the levers screen); ``poly`` decays it as ``(1 - step / steps) ** 0.9`` (nnU-Net's
            schedule), so a longer budget also changes how fast it decays; ``plateau`` keeps it
            until ``patience`` runs out, then divides it by 10 and waits ``patience`` more
            validations before stopping (early stopping that ends at a small learning rate).
        val_every: validate every this many steps.
        patience: validations without improvement of more than ``min_delta`` before stopping;
            0 disables early stopping.
        min_delta: improvement in validation Dice that counts for ``patience``.
        threads: torch threads; 0 for the cores that the loader workers leave free.
        device: ``auto`` (the first CUDA device when there is one, else the CPU), ``cpu``,
            ``cuda`` or ``cuda:N``. How a run computes, not what: it never changes the run's
            folder, and a run resumed on another device continues.
        precision: ``auto`` (bfloat16 autocast on a CUDA device that supports it, float32 on the
            CPU), ``fp32``, ``bf16`` (autocast; on the CPU too) or ``fp16`` (autocast with a
            gradient scaler whose state is checkpointed). Replaces the former ``bf16`` key.
        deterministic: PyTorch's deterministic algorithms on CUDA (slower; the CPU is
            bit-reproducible either way). How a run computes: not part of its folder.
        workers: data-loader worker processes preparing batches while the network trains on
            the previous one (same batches whatever the number).
        channels_last: channels-last memory layout for the network (same numerics up to
            rounding; measured no faster here, see benchmarks/results/train_speed.json).
        compile: ``torch.compile`` the network; pays a compile of tens of seconds up front.
        sw_batch_size, sw_overlap: sliding-window inference (validation, test, segment):
            windows per batch and their overlap (MONAI ``sliding_window_inference``).
        checkpoint_every: also save the resumable state every this many steps (0: only at
            validations).
        max_minutes: stop (after one last validation) once training has taken this long;
            0 for no limit. Wall-clock dependent, so not reproducible: for benchmarks.
    """

    steps: int = 2000
    batch_size: int = 2
    lr: float = 1e-3
    schedule: Literal["constant", "poly", "plateau"] = "constant"
    weight_decay: float = 1e-5
    val_every: int = 100
    patience: int = 5
    min_delta: float = 0.0
    threads: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    deterministic: bool = False
    workers: int = 1
    channels_last: bool = False
    compile: bool = False
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    checkpoint_every: int = 0
    max_minutes: float = 0.0


@dataclass(frozen=True)
class TransferConfig:
    """How a segmentation run starts from a pretrained or trained network.

    Attributes:
        init_from: where the weights come from: a pretraining run folder, a training run
            folder (its best weights), a model bundle folder written by ``lowlabel export``
            (a single model; an ensemble is refused) or a ``.safetensors`` checkpoint of any of
            them; None trains from scratch.
        mode: ``scratch`` ignores ``init_from``; ``frozen`` keeps the encoder fixed;
            ``finetune`` trains everything (encoder at ``encoder_lr_scale`` times the rate);
            ``gradual`` starts frozen and unfreezes after ``unfreeze_after`` steps.
        scope: ``encoder`` loads the encoder blocks level by level (any depth, e.g. from a
            pretraining run; ``model.*`` and ``data.*`` are this config's); ``all`` loads every
            tensor (encoder, decoder and head) of a trained network, e.g. a bundle to adapt to a
            new site with a few labelled scans, and takes from the source the settings that
            define its network and what it was trained to see: every ``model.*`` key and
            ``data.spatial_dims``, ``data.spacing``, ``data.patch_size``, unless set explicitly
            (config file, ``--set``, study file); an explicit value wins, and a network that then
            differs from the source's is an error that names the key.
        lr_scale: every learning rate of the run is ``train.lr`` times this (the encoder's also
            times ``encoder_lr_scale``), under the same ``train.schedule``; null means 0.1 with
            ``scope: all`` (fine-tuning a trained network: 1e-4 with the default ``train.lr``,
            so a few scans adjust the model rather than overwrite it) and 1 with
            ``scope: encoder``.
        encoder_lr_scale: the encoder's learning rate relative to the rest when fine-tuned.
        unfreeze_after: steps before a ``gradual`` transfer unfreezes the encoder.
    """

    init_from: str | None = None
    mode: Literal["scratch", "frozen", "finetune", "gradual"] = "scratch"
    scope: Literal["encoder", "all"] = "encoder"
    lr_scale: float | None = None
    encoder_lr_scale: float = 1.0
    unfreeze_after: int = 0

    @property
    def learning_rate_scale(self) -> float:
        """``lr_scale``, or its default for the ``scope`` when it is null."""
        if self.lr_scale is not None:
            return self.lr_scale
        return 0.1 if self.scope == "all" else 1.0


@dataclass(frozen=True)
class PretrainConfig:
    """Self-supervised pretraining on unlabelled scans.

    Attributes:
        method: ``autoencoder`` (UNet-shaped, reconstructs its own input, as in the original
            study; it can copy the input through the top skip connection) or ``genesis`` (Models
            Genesis style restoration of a corrupted patch: non-linear intensity transform, local
            voxel shuffling, in- and out-painting; the loss compares with the uncorrupted patch).
        steps: step budget (optimizer updates); validation every ``train.val_every`` steps.
        save_steps: steps at which a checkpoint is kept for later transfer (the final step always).
        lr: AdamW learning rate.
        unlabelled: further sources of unlabelled scans for the pool, besides the training
            pool's images and the dataset's unlabelled list: each a ``dataset.json`` (its images;
            labels ignored), a folder of NIfTI files (or with ``images/``) or one NIfTI file;
            a relative path is read from the config file's folder. Scans at other resolutions
            are resampled to ``data.spacing``. Any image of the run's validation or test
            subjects is dropped (the run says how many); ``pool.json`` lists what was used.
        nonlinear_prob, shuffle_prob, paint_prob, inpaint_prob: Models Genesis corruption
            probabilities (``inpaint_prob`` is the share of painting that is in- rather than
            out-painting).
    """

    method: Literal["autoencoder", "genesis"] = "autoencoder"
    steps: int = 1000
    save_steps: tuple[int, ...] = ()
    lr: float = 1e-3
    unlabelled: tuple[str, ...] = ()
    nonlinear_prob: float = 0.9
    shuffle_prob: float = 0.5
    paint_prob: float = 0.9
    inpaint_prob: float = 0.2


@dataclass(frozen=True)
class SemiConfig:
    """Semi-supervised training: the unlabelled scans take part in fine-tuning, not only in
    pretraining.

    Attributes:
        method: ``none``, or ``mean_teacher`` (Tarvainen and Valpola, 2017): a teacher network,
            the exponential moving average of the trained (student) network, segments clean
            patches of the unlabelled pool (the training pool's images and the dataset's
            unlabelled scans; never validation or test images); the student, shown the same
            patches with noise and intensity jitter, is pulled towards the teacher's class
            probabilities. Teacher and student are both validated; the better one is kept
            and evaluated (in a short run the moving average lags behind the student).
        weight: weight of the consistency loss (mean squared difference of class probabilities)
            against the supervised loss, reached after the ramp-up.
        rampup: share of ``train.steps`` over which the weight rises as ``exp(-5 (1 - t)^2)``.
        ema: the teacher's decay per step (``min(ema, 1 - 1 / (step + 1))``, so it follows the
            student closely at first).
        batch_size: unlabelled patches per step, besides the ``train.batch_size`` labelled ones.
        noise_std: standard deviation of the Gaussian noise added to the student's patches
            (intensities are z-scored, so this is in units of the brain's intensity SD).
    """

    method: Literal["none", "mean_teacher"] = "none"
    weight: float = 1.0
    rampup: float = 0.4
    ema: float = 0.99
    batch_size: int = 2
    noise_std: float = 0.1


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training or pretraining run.

    Attributes:
        name: a label for the run (reports, MLflow); its folder name follows from the config.
        seed: seeds the network's initialisation, the batches and the augmentation.
        out: the folder that run folders are made in.
    """

    name: str = "run"
    seed: int = 0
    out: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)

    def replace(self, **overrides: Any) -> RunConfig:
        """A copy with dotted-key overrides, e.g. ``cfg.replace(**{"train.steps": 10})``."""
        return apply_overrides(self, overrides)


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass with validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except LowlabelError as err:
                errors.append(str(err))
        raise LowlabelError(errors[0] if errors else f"config key '{key}': must not be null")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise LowlabelError(f"config key '{key}': {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise LowlabelError(f"config key '{key}': expected a mapping, got {value!r}")
        return _from_dict(tp, value, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise LowlabelError(f"config key '{key}': expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise LowlabelError(f"config key '{key}': expected a mapping, got {value!r}")
        ktp, vtp = args
        return {_coerce(k, ktp, key): _coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise LowlabelError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            known = ", ".join(sorted(names))
            raise LowlabelError(f"unknown config key '{prefix}{key}' (known keys here: {known})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """A plain, JSON- and YAML-safe dict of a config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {
        k: plain(v) if not dataclasses.is_dataclass(v) else to_dict(v)
        for k, v in ((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg))
    }


def _renamed(data: dict) -> dict:
    """Read keys renamed since earlier versions (old run folders and config files still load).

    ``train.bf16: true`` becomes ``train.precision: bf16``; ``false`` (the old default, float32
    on the CPU) becomes ``precision: auto``, which is still float32 on the CPU.
    """
    train = data.get("train")
    if not isinstance(train, dict) or "bf16" not in train:
        return data
    train = dict(train)
    old = train.pop("bf16")
    if not isinstance(old, bool):
        raise LowlabelError(f"config key 'train.bf16': expected bool, got {old!r}")
    given = train.get("precision", "auto")
    if old and given not in ("auto", "bf16"):
        raise LowlabelError(
            f"config keys 'train.bf16: true' and 'train.precision: {given}' disagree; "
            "'train.bf16' was replaced by 'train.precision', drop it"
        )
    train["precision"] = "bf16" if old else given
    if old:
        _note(
            "config key 'train.bf16' is now 'train.precision'; read 'bf16: true' as "
            "'precision: bf16' (update the config file)"
        )
    return {**data, "train": train}


_NOTED: set[str] = set()


def _note(message: str) -> None:
    """Log ``message`` once per process (a study loads the same old config many times)."""
    if message not in _NOTED:
        _NOTED.add(message)
        logging.getLogger(__name__).warning(message)


def from_dict(data: dict, check: bool = True) -> RunConfig:
    """Build a validated :class:`RunConfig`; unknown keys and wrong types name the key.

    With ``check`` off, only keys and types are checked, not :func:`validate`'s cross-field rules
    (for a config built in layers, each of which may set only one of two keys that must agree).
    """
    if not isinstance(data, dict):
        raise LowlabelError("a config must be a mapping of sections (data, model, train, ...)")
    cfg = _from_dict(RunConfig, _renamed(data))
    if check:
        validate(cfg)
    return cfg


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise LowlabelError(f"config key '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` section of a config class's docstring, one line per key."""
    docs: dict[str, str] = {}
    names: list[str] = []
    inside = False
    for line in (cls.__doc__ or "").splitlines():
        text = line.strip()
        if text == "Attributes:":
            inside = True
            continue
        if not inside or not text:
            continue
        head, sep, rest = text.partition(": ")
        if sep and all(n.strip().isidentifier() for n in head.split(",")):
            names = [n.strip() for n in head.split(",")]  # "n_test, n_val: ..." names both
            for name in names:
                docs[name] = rest
        else:
            for name in names:
                docs[name] += " " + text
    return docs


def _type_words(tp: Any) -> str:
    """A type as a user writes its values: ``int``, ``list of float``, ``'unet' or 'dynunet'``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " or ".join(json.dumps(a).replace('"', "'") for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_words(a) for a in args)
    if origin in (tuple, list):
        return f"list of {_type_words(args[0])}" if args else "list"
    if origin is dict:
        return "mapping " + " to ".join(_type_words(a) for a in args)
    return _type_name(tp)


def describe_keys() -> list[dict[str, str]]:
    """Every config key with its type, default and meaning (from the docstrings above), in
    the order of the YAML file; what ``lowlabel config --list`` prints."""
    rows = []

    def walk(cls: type, default: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        docs = _attribute_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(default, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), value, f"{prefix}{f.name}.")
                continue
            plain = to_dict(default)[f.name]
            rows.append(
                {
                    "key": prefix + f.name,
                    "type": _type_words(hints[f.name]),
                    "default": json.dumps(plain),
                    "meaning": " ".join(docs.get(f.name, "").replace("``", "'").split()),
                }
            )

    walk(RunConfig, RunConfig(), "")
    return rows


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["train.steps=10", "data.spacing=[2,2,2]"]`` -> ``{"train.steps": 10, ...}``."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise LowlabelError(f"--set '{item}': expected key=value, e.g. --set train.steps=500")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any], check: bool = True) -> RunConfig:
    """``cfg`` with dotted-key ``overrides``; ``check`` as in :func:`from_dict`."""
    data = to_dict(cfg)
    for key, value in overrides.items():
        _set_dotted(data, key, value)
    return from_dict(data, check)


def read_config(path: str | Path | None) -> dict:
    """The mapping of a YAML config file (``{}`` for None), its relative paths read from the
    file's folder; what :func:`load_config` builds on, and :func:`given_keys` reads.

    Raises:
        LowlabelError: the file is missing, not YAML, or not a mapping.
    """
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise LowlabelError(f"{path}: config file not found; pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise LowlabelError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        raise LowlabelError(f"{path}: a config must be a mapping of sections")
    dataset = data.get("data", {}).get("dataset") if isinstance(data.get("data"), dict) else None
    if isinstance(dataset, str) and not Path(dataset).is_absolute():
        candidate = path.parent / dataset
        if candidate.exists() and not Path(dataset).exists():
            data["data"]["dataset"] = str(candidate)
    section = data.get("pretrain")
    sources = section.get("unlabelled") if isinstance(section, dict) else None
    if isinstance(sources, list):
        section["unlabelled"] = [_beside(path, s) for s in sources]
    return data


def load_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None, check: bool = True
) -> RunConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides;
    ``check`` as in :func:`from_dict`."""
    data = read_config(path)
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    return from_dict(data, check)


def given_keys(layer: dict[str, Any]) -> set[str]:
    """The dotted keys that one layer of configuration sets: a config file's mapping, ``--set``
    overrides or a study's layer, e.g. ``{"model": {"levels": 3}, "train.steps": 5}`` ->
    ``{"model.levels", "train.steps"}``. A key set to its default value counts: it was given."""
    keys = set()
    for key, value in layer.items():
        if "." not in key and isinstance(value, dict):
            keys.update(f"{key}.{inner}" for inner in value)
        else:
            keys.add(key)
    return keys


def _beside(config: Path, value: Any) -> Any:
    """A relative path in a config file, read from the file's folder when it is found there and
    not from the working directory."""
    if not isinstance(value, str) or Path(value).is_absolute() or Path(value).exists():
        return value
    candidate = config.parent / value
    return str(candidate) if candidate.exists() else value


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that the types alone cannot express."""
    d, m, t = cfg.data, cfg.model, cfg.train
    if not DEVICE_PATTERN.match(t.device):
        raise LowlabelError(
            f"config key 'train.device': {t.device!r} is not auto, cpu, cuda or cuda:N"
        )
    if len(d.patch_size) != d.spatial_dims:
        raise LowlabelError(
            f"config key 'data.patch_size': {list(d.patch_size)} has {len(d.patch_size)} numbers "
            f"but data.spatial_dims is {d.spatial_dims}"
        )
    if len(d.spacing) != 3 or min(d.spacing) <= 0:
        raise LowlabelError("config key 'data.spacing': give three positive numbers in mm")
    if not 3 <= m.levels <= 6:
        raise LowlabelError(f"config key 'model.levels': {m.levels} is outside 3..6")
    problem = patch_problem(d.patch_size, m.levels, m.norm == "instance")
    if problem:
        raise LowlabelError(f"config key 'data.patch_size': {problem}")
    for key, value in (
        ("data.budget", d.budget),
        ("data.n_val", d.n_val),
        ("data.n_test", d.n_test),
        ("train.steps", t.steps),
        ("train.patience", t.patience),
    ):
        if value < 0:
            raise LowlabelError(f"config key '{key}': must be >= 0, got {value}")
    for key, value in (
        ("train.batch_size", t.batch_size),
        ("train.val_every", t.val_every),
        ("model.channels", m.channels),
        ("semi.batch_size", cfg.semi.batch_size),
    ):
        if value < 1:
            raise LowlabelError(f"config key '{key}': must be >= 1, got {value}")
    if not 0.0 <= cfg.semi.ema < 1.0 or not 0.0 <= cfg.semi.rampup <= 1.0:
        raise LowlabelError("config keys 'semi.ema' in [0, 1) and 'semi.rampup' in [0, 1]")
    if m.deep_supervision and m.name != "dynunet":
        raise LowlabelError(
            "config key 'model.deep_supervision': needs model.name dynunet (MONAI's UNet has "
            "no deep supervision heads)"
        )
    weights = cfg.loss.class_weights
    if weights and (len(weights) != 4 or min(weights) < 0 or max(weights) <= 0):
        raise LowlabelError(
            "config key 'loss.class_weights': give four weights >= 0 (background, CSF, GM, WM), "
            f"not all 0, or [] for equal weights; got {list(weights)}"
        )
    _validate_augment(cfg.augment)
    tr = cfg.transfer
    if tr.mode == "scratch" and tr.init_from:
        raise LowlabelError(
            "config keys 'transfer.init_from' and 'transfer.mode': init_from is set but the mode "
            "is scratch, which would ignore it; choose frozen, finetune or gradual, or unset "
            "init_from"
        )
    if tr.mode != "scratch" and not tr.init_from:
        raise LowlabelError(
            f"config keys 'transfer.mode' and 'transfer.init_from': mode {tr.mode} needs a "
            "pretrained checkpoint or pretraining run folder in init_from"
        )
    if tr.lr_scale is not None and tr.lr_scale <= 0:
        raise LowlabelError(
            f"config key 'transfer.lr_scale': must be > 0 (or null), got {tr.lr_scale}"
        )
    if d.label_map is not None:
        bad_targets = sorted(v for v in d.label_map.values() if v not in (0, 1, 2, 3))
        if bad_targets:
            raise LowlabelError(
                f"config key 'data.label_map': targets {bad_targets} are not 0..3 "
                "(0 background, 1 CSF, 2 GM, 3 WM)"
            )


def _validate_augment(a: AugmentConfig) -> None:
    """The site augmentation's probabilities and ranges."""
    for name in ("contrast_prob", "histogram_prob", "thick_slice_prob", "lowres_prob", "blur_prob"):
        value = getattr(a, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise LowlabelError(
                f"config key 'augment.{name}': a probability in [0, 1], got {value}"
            )
    for name in ("gamma", "thick_slice_mm", "lowres_zoom", "blur_sigma"):
        value = getattr(a, name)
        if value is not None and (len(value) != 2 or not 0 < value[0] <= value[1]):
            raise LowlabelError(
                f"config key 'augment.{name}': give [low, high] with 0 < low <= high, "
                f"got {list(value)}"
            )
    if a.lowres_zoom[1] > 1.0:
        raise LowlabelError("config key 'augment.lowres_zoom': zooms above 1 are not coarser")
    if a.histogram_points < 3:
        raise LowlabelError("config key 'augment.histogram_points': at least 3")
    for name in ("contrast_shift", "bias_field_coeff"):
        value = getattr(a, name)
        if value is not None and value < 0:
            raise LowlabelError(f"config key 'augment.{name}': must be >= 0, got {value}")


# How a run executes, not what it computes: these keys never rename a run folder. Precision
# changes numerics, so it is not one of them.
EXECUTION_KEYS = (
    "train.threads",
    "train.workers",
    "train.compile",
    "train.channels_last",
    "train.device",
    "train.deterministic",
)

# Execution keys younger than the first run folders: left out of the hash altogether.
ADDED_EXECUTION_KEYS = ("device", "deterministic")

# Keys added after run folders existed: left out of the hash while at their defaults, so a run
# that does not use them keeps the folder it always had.
LATER_KEYS = (
    "model.deep_supervision",
    "loss.batch",
    "loss.class_weights",
    "loss.lambda_dice",
    "loss.lambda_ce",
    "pretrain.unlabelled",
    "transfer.scope",
    "transfer.lr_scale",
    "augment.site",
    "augment.scanner_like",
    "augment.gamma",
    "augment.bias_field_coeff",
    "augment.contrast_prob",
    "augment.contrast_shift",
    "augment.histogram_prob",
    "augment.histogram_points",
    "augment.thick_slice_prob",
    "augment.thick_slice_mm",
    "augment.lowres_prob",
    "augment.lowres_zoom",
    "augment.blur_prob",
    "augment.blur_sigma",
)

# What a pretraining run does not read: its folder is hashed on the rest.
PRETRAIN_UNREAD = (
    "loss",
    "data.budget",
    "data.pos_fraction",
    "train.steps",
    "train.lr",
    "train.schedule",
    "train.patience",
    "train.min_delta",
    "train.max_minutes",
    "transfer",
    "semi",
)


# Keys that do not count are hashed at their value in RunConfig(), except these, whose default
# changed later: they are hashed at their former default, so the runs that ignore them (a
# pretraining run ignores train.schedule) keep their folders.
HASHED_AS = {"train.schedule": "poly"}


def _reset(data: dict, key: str, defaults: dict) -> None:
    """Put ``key`` (dotted) of ``data`` back to its value in ``defaults``."""
    *path, last = key.split(".")
    node, default = data, defaults
    for part in path:
        node, default = node[part], default[part]
    node[last] = default[last]


def _drop_if_default(data: dict, key: str, defaults: dict) -> None:
    """Remove ``key`` (dotted) from ``data`` if it holds its default; an emptied section goes."""
    *path, last = key.split(".")
    nodes, node, default = [], data, defaults
    for part in path:
        nodes.append((node, part))
        node, default = node[part], default[part]
    if last in node and node[last] == default[last]:
        del node[last]
    for parent, part in reversed(nodes):
        if not parent[part]:
            del parent[part]


def config_hash(cfg: RunConfig, kind: str = "train") -> str:
    """A short digest of everything that changes a run's results (``kind`` ``train`` or
    ``pretrain``); ``name``, ``out``, :data:`EXECUTION_KEYS` and, for a pretraining run,
    :data:`PRETRAIN_UNREAD` do not count.

    Keys that do not count are hashed at their defaults rather than dropped, so a folder made
    with default execution settings keeps its name.
    """
    data, defaults = to_dict(cfg), to_dict(RunConfig())
    hashed_at = to_dict(RunConfig().replace(**HASHED_AS))
    for key in EXECUTION_KEYS + (PRETRAIN_UNREAD if kind == "pretrain" else ()):
        _reset(data, key, hashed_at)
    for key in ADDED_EXECUTION_KEYS:  # not in older runs' configs: dropped, so they keep names
        data["train"].pop(key)
    data.pop("name")
    data.pop("out")
    for key in LATER_KEYS:
        _drop_if_default(data, key, defaults)
    if data["semi"]["method"] == "none":  # off, it changes nothing: older runs keep their folder
        data.pop("semi")
    # hashed as the bf16 key it replaced, so runs made before it keep their folder
    precision = data["train"].pop("precision")
    if precision in ("auto", "bf16"):
        data["train"]["bf16"] = precision == "bf16"
    else:
        data["train"]["precision"] = precision
    blob = json.dumps(data, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:8]


def run_dir(cfg: RunConfig, kind: str = "train") -> Path:
    """Where a run lives: ``<out>/<name>-<hash>``, so the same config always finds its folder."""
    return Path(cfg.out) / f"{cfg.name}-{config_hash(cfg, kind)}"


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
