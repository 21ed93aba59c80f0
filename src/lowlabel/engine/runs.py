"""Reading finished runs back: config, best weights, re-evaluation."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import yaml
from torch import nn

from lowlabel import checkpoint
from lowlabel.config import RunConfig, from_dict, to_dict
from lowlabel.data.datasets import load_dataset
from lowlabel.data.transforms import preprocessing_parameters
from lowlabel.device import Placement
from lowlabel.engine.evaluate import evaluate
from lowlabel.engine.inference import Ensemble
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


def run_folders(run_dir: str | Path | Sequence[str | Path], command: str) -> list[Path]:
    """One run folder or several, as a list (several make an ensemble).

    Raises:
        LowlabelError: an empty sequence.
    """
    many = not isinstance(run_dir, (str, os.PathLike))
    runs = [Path(r) for r in run_dir] if many else [Path(run_dir)]
    if not runs:
        raise LowlabelError(f"{command}: give at least one run folder")
    return runs


def check_alike(runs: list[Path], configs: list[RunConfig]) -> None:
    """Refuse an ensemble of runs that preprocess scans differently or differ in network."""
    first = configs[0]
    for run, cfg in zip(runs[1:], configs[1:], strict=True):
        for what, mine, theirs in (
            ("preprocessing", preprocessing_parameters(cfg), preprocessing_parameters(first)),
            ("network", to_dict(cfg.model), to_dict(first.model)),
        ):
            keys = [k for k in mine if mine[k] != theirs[k]]
            if keys:
                raise LowlabelError(
                    f"{run}: its {what} differs from that of {runs[0]} ({keys[0]}: "
                    f"{mine[keys[0]]} vs {theirs[keys[0]]}); an ensemble needs runs with the "
                    f"same {what}"
                )


def evaluate_run(
    run_dir: str | Path | Sequence[str | Path],
    data: str | None = None,
    progress: bool = True,
    device: str = "auto",
    tta: bool = False,
) -> dict:
    """Re-evaluate a run on its test split, or on every subject of another dataset, on
    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; whichever device the run trained on).

    Several run folders are evaluated as one ensemble (class probabilities averaged, as a bundle
    exported from them predicts); they must preprocess alike, have the same network and, without
    ``data``, the same test split. The test split's evaluation files in the run folder are
    rewritten for a single run without ``tta`` (test-time augmentation by flips); otherwise
    the figures are only returned.

    Raises:
        LowlabelError: not a finished run, a damaged split, runs that cannot form an ensemble,
            or a CUDA device that is not there.
    """
    Placement.of(device, key="--device")  # a bad or missing device, named as the option
    runs = run_folders(run_dir, "evaluate")
    loaded = [load_run(run) for run in runs]
    check_alike(runs, [cfg for cfg, _ in loaded])
    cfg = loaded[0][0].replace(**{"train.device": device})  # how it runs, not which run it is
    model = loaded[0][1] if len(runs) == 1 else Ensemble([net for _, net in loaded])
    # the thread policy of training, so evaluation runs as it did inside training
    runtime(cfg).place(model)
    if data is None:
        source, test = _test_split(runs[0])
        for run in runs[1:]:
            if _test_split(run) != (source, test):
                raise LowlabelError(
                    f"{run}: its test split differs from that of {runs[0]}; evaluate an "
                    "ensemble of runs of one split, or all of them with --data DATASET"
                )
        ds = load_dataset(source)
        gone = sorted(set(test) - set(ds.ids))
        if gone:
            raise LowlabelError(
                f"{source}: test subjects {gone[:5]} of {runs[0] / SPLITS} are no "
                "longer in the dataset; evaluate with --data DATASET instead"
            )
        subjects = ds.by_id(test)
        out = runs[0] if len(runs) == 1 and not tta else None
    else:
        ds = load_dataset(data)
        subjects, out = ds.subjects, None
    return evaluate(model, cfg, subjects, out, progress, tta)["summary"]


def _test_split(run_dir: Path) -> tuple[str, list[str]]:
    """The dataset and test subjects in a run's ``splits.json``."""
    split_path = run_dir / SPLITS
    try:
        split = json.loads(split_path.read_text())
        return split["source"], list(split["test"])
    except (OSError, ValueError, KeyError, TypeError):
        raise LowlabelError(
            f"{split_path}: missing or damaged; evaluate with --data DATASET instead"
        ) from None
