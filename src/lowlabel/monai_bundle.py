"""Export a trained run as a MONAI bundle, for MONAI users and the MONAI model zoo.

The folder follows the MONAI Bundle specification::

    configs/metadata.json    version, versions of MONAI/PyTorch/NumPy, task, network_data_format
    configs/inference.json   lowlabel's preprocessing, network and sliding-window inference,
                             all as MONAI components, ending in label maps on each scan's grid
    scripts/brain_region.py  lowlabel's brain region rule (no tissue outside the brain of a
                             skull-stripped scan), copied from lowlabel.skullstrip
    models/model.pt          the network's state dict (torch.save; MONAI's CheckpointLoader)
    docs/README.md           what the model does, how it was trained, how to run it
    LICENSE                  the licence the user chose for the weights

Run it with::

    python -m monai.bundle run --config_file configs/inference.json \\
        --bundle_root . --dataset_dir scans/ --output_dir seg/

``models/model.pt`` is a pickle, as MONAI's format requires: lowlabel writes it but never reads
it (its own bundles hold safetensors only).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from lowlabel.errors import LowlabelError

SPEC_LICENCES = ("CC-BY-4.0", "CC-BY-NC-4.0", "CC-BY-SA-4.0", "Apache-2.0", "MIT")


def network_def(cfg) -> dict:
    """The network as a MONAI config component (the arguments of
    :func:`lowlabel.models.unet.build_model`)."""
    from lowlabel.models.unet import N_CLASSES, level_channels

    m = cfg.model
    channels = level_channels(m)
    if m.name == "dynunet":
        strides = [1] + [2] * (m.levels - 1)
        return {
            "_target_": "DynUNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": N_CLASSES,
            "kernel_size": [3] * m.levels,
            "strides": strides,
            "upsample_kernel_size": strides[1:],
            "filters": channels,
            "dropout": m.dropout or None,
            "norm_name": m.norm,
            "res_block": m.num_res_units > 0,
        }
    return {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": N_CLASSES,
        "channels": channels,
        "strides": [2] * (m.levels - 1),
        "num_res_units": m.num_res_units,
        "dropout": m.dropout,
        "norm": m.norm,
    }


def inference_config(cfg) -> dict:
    """``configs/inference.json``: the same transforms :func:`lowlabel.data.transforms.preprocess`
    builds (LoadImage stands in for lowlabel's checked loader), the same sliding window, and the
    inverse of the preprocessing back onto each scan's grid."""
    from lowlabel.data.transforms import AXCODES, patch_shape

    d, t = cfg.data, cfg.train
    window = list(patch_shape(d))
    return {
        "imports": ["$import glob", "$import numpy"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/data'",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii*')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def(cfg),
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                # the scan as read, for the brain region on its own grid after inversion
                {"_target_": "CopyItemsd", "keys": "image", "names": "native"},
                {
                    "_target_": "Orientationd",
                    "keys": "image",
                    "axcodes": AXCODES,
                    "labels": [["L", "R"], ["P", "A"], ["I", "S"]],
                },
                {
                    "_target_": "Spacingd",
                    "keys": "image",
                    "pixdim": list(d.spacing),
                    "mode": "bilinear",
                },
                {
                    "_target_": "CropForegroundd",
                    "keys": "image",
                    "source_key": "image",
                    "select_fn": "$lambda x: x != 0",
                    "margin": 2,
                    "allow_smaller": True,
                },
                {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True},
                {"_target_": "SpatialPadd", "keys": "image", "spatial_size": window},
            ],
        },
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": window,
            "sw_batch_size": t.sw_batch_size,
            "overlap": t.sw_overlap,
            "mode": "gaussian",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                # as lowlabel segment: no tissue outside the brain region (scripts/, on the
                # Python path once 'monai.bundle run' has added the bundle root)
                {
                    "_target_": "Lambdad",
                    "keys": "native",
                    "func": "$__import__('scripts.brain_region').brain_region.region_of",
                },
                {"_target_": "MaskIntensityd", "keys": "pred", "mask_key": "native"},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "seg",
                    "output_dtype": "$numpy.uint8",
                    "resample": False,
                    "separate_folder": False,
                    "squeeze_end_dims": True,
                },
            ],
        },
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "run": ["$@evaluator.run()"],
    }


def region_script() -> str:
    """``scripts/brain_region.py``: :func:`lowlabel.skullstrip.brain_region` and what it needs,
    copied from lowlabel's source (so the bundle runs without lowlabel), and ``region_of``, the
    MONAI-facing call."""
    import inspect

    from lowlabel import skullstrip

    constants = "\n".join(
        f"{name} = {getattr(skullstrip, name)!r}"
        for name in ("SKULL_ML", "FOREGROUND", "EMPTY_SHARE", "EMPTY_FACES")
    )
    functions = "\n\n".join(
        inspect.getsource(f) for f in (skullstrip.head_volume_ml, skullstrip.brain_region)
    )
    return f'''"""lowlabel's brain region of a scan (copied from lowlabel.skullstrip).

On a skull-stripped scan, the model's tissue outside the brain region is cleared.
"""

from __future__ import annotations

import numpy as np
import torch

{constants}


{functions}

def region_of(image):
    """``(1, X, Y, Z)`` scan as read -> ``(1, X, Y, Z)`` mask of where tissue may be (all of
    the scan when it does not look skull-stripped)."""
    data = np.asarray(image[0].detach().cpu(), dtype=np.float32)
    region = brain_region(data, np.asarray(image.affine, dtype=np.float64))
    if region is None:
        region = np.ones(data.shape, bool)
    return torch.from_numpy(region[None])
'''


def metadata(cfg, info: dict, licence: str) -> dict:
    """``configs/metadata.json`` with the keys the MONAI Bundle specification requires."""
    import monai
    import numpy
    import torch

    from lowlabel import __version__
    from lowlabel.data.io import LABEL_NAMES

    prov = info.get("provenance", {})
    test = prov.get("test_metrics") or {}
    spacing = "x".join(f"{s:g}" for s in cfg.data.spacing)
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by lowlabel {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": {"nibabel": _version("nibabel")},
        "optional_packages_version": {},
        "name": f"lowlabel brain tissue segmentation ({prov.get('run_name') or 'run'})",
        "task": "Brain tissue segmentation of skull-stripped T1-weighted MRI (CSF, GM, WM)",
        "description": (
            f"A {cfg.model.levels}-level 3D {cfg.model.name} trained by lowlabel on "
            f"{prov.get('dataset')} with {len(prov.get('labelled_subjects') or [])} labelled "
            f"subjects at {spacing} mm"
            + (f"; test mean Dice {test['mean_dice']:.3f}" if "mean_dice" in test else "")
            + ". Input: a skull-stripped T1 scan (zero outside the brain)."
        ),
        "authors": "the owner of the lowlabel run (see docs/README.md)",
        "copyright": "see LICENSE",
        "data_source": str(prov.get("dataset")),
        "data_type": "nibabel",
        "image_classes": "single-channel T1-weighted MRI, skull-stripped",
        "label_classes": dict(enumerate(LABEL_NAMES)),
        "intended_use": "research only",
        "license": licence,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "MR",
                    "num_channels": 1,
                    "spatial_shape": list(cfg.data.patch_size),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {"0": "T1"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": 4,
                    "spatial_shape": list(cfg.data.patch_size),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): n for i, n in enumerate(LABEL_NAMES)},
                }
            },
        },
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _licence_text(weights_license: str | None) -> tuple[str, str]:
    """(name, LICENSE text) from an SPDX id or a licence file."""
    if not weights_license:
        raise LowlabelError(
            "--weights-license: say under which licence the weights are shared, an SPDX id "
            f"(e.g. {', '.join(SPEC_LICENCES[:3])}) or a licence file; mind the training "
            "data's licence"
        )
    path = Path(weights_license)
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            raise LowlabelError(f"{path}: cannot read the licence file as text") from None
        return path.name, text
    return weights_license, (
        f"The model weights in models/model.pt are licensed under {weights_license}\n"
        f"(https://spdx.org/licenses/{weights_license}.html).\n"
    )


def readme(cfg, info: dict, licence: str) -> str:
    prov = info.get("provenance", {})
    pre = info.get("preprocessing", {})
    test = prov.get("test_metrics") or {}
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in test.items() if k.startswith(("mean_", "dice_")))
    return f"""# lowlabel brain tissue segmentation

Segments skull-stripped T1-weighted brain MRI into background (0), CSF (1), grey matter (2) and
white matter (3), on each scan's own voxel grid.

## Run

```bash
python -m monai.bundle run --config_file configs/inference.json \\
    --bundle_root . --dataset_dir /path/to/scans --output_dir /path/to/out
```

Every `*.nii` / `*.nii.gz` in `dataset_dir` gives `<name>_seg.nii.gz` in `output_dir`. The scans
must be skull-stripped (zero outside the brain), as in training; `lowlabel segment
--skull-strip auto` does that step for you. No tissue is labelled where a skull-stripped scan
is empty (`scripts/brain_region.py`: the voxels that are not background, holes filled).

## Preprocessing (as in training)

Orientation {pre.get("orientation")}, resampling to {pre.get("spacing_mm")} mm (bilinear),
crop to the nonzero voxels with a 2-voxel margin, z-score over the nonzero voxels, padding to
the {pre.get("window")} window; sliding-window inference (overlap {cfg.train.sw_overlap},
Gaussian blending), softmax, inverse of the preprocessing, argmax.

## Training

Run {prov.get("run_name")} of lowlabel: dataset {prov.get("dataset")}, label budget
{prov.get("label_budget")} (labelled subjects: {prov.get("labelled_subjects")}), seed
{prov.get("seed")}, {prov.get("steps")} steps (best {prov.get("best_step")}).
Test metrics at training: {metrics or "not recorded"}.

## Licence

Weights: {licence} (see `LICENSE`). Check that it is compatible with the licence of the
training data.
"""


def export_monai(
    run_dir: str | Path,
    out_dir: str | Path,
    weights_license: str | None,
    allow_unfinished: bool = False,
) -> Path:
    """Write a run's best weights as a MONAI bundle into ``out_dir`` (made whole, then renamed).

    Args:
        allow_unfinished: export the best weights so far of a run without ``result.json``
            (as :func:`lowlabel.bundle.export`).

    Raises:
        LowlabelError: not a run folder, an unfinished run (unless ``allow_unfinished``), a 2D
            model, no licence given, or ``out_dir`` not empty.
    """
    import torch

    from lowlabel.atomic import atomic_dir, write_json, write_text
    from lowlabel.bundle import export as export_lowlabel
    from lowlabel.bundle import load as load_bundle

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    licence, licence_text = _licence_text(weights_license)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LowlabelError(f"{out_dir}: exists and is not an empty folder; choose a new folder")
    with atomic_dir(out_dir) as tmp:
        # the lowlabel bundle gives the checked config, weights and provenance in one place
        bundle = load_bundle(export_lowlabel(run_dir, tmp / "lowlabel", allow_unfinished))
        cfg = bundle.cfg
        if cfg.data.spatial_dims != 3:
            raise LowlabelError(
                f"{run_dir}: a 2D model; the MONAI bundle export supports 3D models only"
            )
        (tmp / "models").mkdir()
        torch.save(bundle.model.state_dict(), tmp / "models" / "model.pt")
        write_json(tmp / "configs" / "inference.json", inference_config(cfg))
        info = dict(bundle.info, exported=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_json(tmp / "configs" / "metadata.json", metadata(cfg, info, licence))
        write_text(tmp / "docs" / "README.md", readme(cfg, info, licence))
        write_text(tmp / "LICENSE", licence_text)
        write_text(tmp / "scripts" / "__init__.py", "")
        write_text(tmp / "scripts" / "brain_region.py", region_script())
        # lowlabel's own description of the model, for provenance
        shutil.move(str(tmp / "lowlabel" / "bundle.json"), tmp / "docs" / "lowlabel_bundle.json")
        shutil.rmtree(tmp / "lowlabel")
    return out_dir
