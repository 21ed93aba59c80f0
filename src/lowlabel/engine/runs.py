"""Reading finished runs back: config, best weights, re-evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from torch import nn

from lowlabel import checkpoint
from lowlabel.config import RunConfig, from_dict
from lowlabel.data.datasets import load_dataset
from lowlabel.device import Placement
from lowlabel.engine.evaluate import evaluate
from lowlabel.engine.runtime import runtime
from lowlabel.errors import LowlabelError
from lowlabel.models.unet import build_model
from lowlabel.run_folder import BEST, CONFIG, SPLITS


def load_run(run_dir: str | Path) -> tuple[RunConfig, nn.Module]:
    """The config and best model of a run folder (safetensors only).

    Raises:
        LowlabelError: the folder is not a run or has no best weights yet.
    """
    run_dir = Path(run_dir)
    cfg_path, weights = run_dir / CONFIG, run_dir / BEST
    if not cfg_path.is_file() or not weights.is_file():
        raise LowlabelError(
            f"{run_dir}: not a finished training run (needs config.yaml and best.safetensors); "
            "give the folder that 'lowlabel train' printed"
        )
    try:
        cfg = from_dict(yaml.safe_load(cfg_path.read_text()))
    except yaml.YAMLError:
        raise LowlabelError(f"{cfg_path}: not valid YAML; the run folder is damaged") from None
    except LowlabelError as err:  # name the file the bad key is in
        raise LowlabelError(f"{cfg_path}: {err}") from None
    tensors, _ = checkpoint.load(weights)
    model = build_model(cfg.model, cfg.data.spatial_dims)
    try:
        model.load_state_dict(checkpoint.split(tensors, "model"))
    except RuntimeError:
        raise LowlabelError(f"{weights}: weights do not fit the run's config.yaml") from None
    model.eval()
    return cfg, model


def evaluate_run(
    run_dir: str | Path,
    data: str | None = None,
    progress: bool = True,
    device: str = "auto",
    tta: bool = False,
) -> dict:
    """Re-evaluate a run on its test split, or on every subject of another dataset, on
    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; whichever device the run trained on).

    The test split's evaluation files in the run folder are rewritten, except with ``tta``
    (test-time augmentation by flips), whose figures are only returned.

    Raises:
        LowlabelError: not a finished run, a damaged split, or a CUDA device that is not there.
    """
    Placement.of(device, key="--device")  # a bad or missing device, named as the option
    run_dir = Path(run_dir)
    cfg, model = load_run(run_dir)
    cfg = cfg.replace(**{"train.device": device})  # how it runs, not which run it is
    # the thread policy of training, so evaluation runs as it did inside training
    runtime(cfg).place(model)
    if data is None:
        split_path = run_dir / SPLITS
        try:
            split = json.loads(split_path.read_text())
            source, test = split["source"], list(split["test"])
        except (OSError, ValueError, KeyError, TypeError):
            raise LowlabelError(
                f"{split_path}: missing or damaged; evaluate with --data DATASET instead"
            ) from None
        ds = load_dataset(source)
        gone = sorted(set(test) - set(ds.ids))
        if gone:
            raise LowlabelError(
                f"{source}: test subjects {gone[:5]} of {split_path} are no "
                "longer in the dataset; evaluate with --data DATASET instead"
            )
        subjects, out = ds.by_id(test), None if tta else run_dir
    else:
        ds = load_dataset(data)
        subjects, out = ds.subjects, None
    return evaluate(model, cfg, subjects, out, progress, tta)["summary"]
