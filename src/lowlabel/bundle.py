"""Model bundles: a trained run turned into a self-contained folder that segments new scans.

A bundle folder holds

- ``model.safetensors``: the best weights (``model.*``) with the resolved config in its metadata;
- ``config.yaml``: the resolved run config (the preprocessing is rebuilt from its ``data`` section
  by the one factory, :func:`lowlabel.data.transforms.preprocess`);
- ``bundle.json``: format version, label names, the preprocessing parameters in words and numbers,
  and provenance (dataset, label budget and labelled subjects, seed, test metrics, versions).

An ensemble bundle, exported from several runs preprocessed alike (e.g. the seeds of a study cell),
holds every member's weights (``model.members.<i>.*``) and averages their class probabilities;
its ``bundle.json`` says ``"ensemble": <members>`` (format version 2), lists each member's
provenance under ``members`` and keeps the first member's under ``provenance``, without test
metrics (no run measured the ensemble).

Loading reads JSON, YAML (``safe_load``) and safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from lowlabel import checkpoint, run_folder
from lowlabel.atomic import atomic_dir, write_json, write_text
from lowlabel.config import RunConfig, dump_yaml, from_dict, to_dict
from lowlabel.data.io import LABEL_NAMES
from lowlabel.data.transforms import preprocessing_parameters
from lowlabel.errors import LowlabelError

log = logging.getLogger(__name__)

FORMAT = "lowlabel-bundle"
VERSION = 2  # 2: ensembles; a single model's bundle is still written as version 1
WEIGHTS, CONFIG, INFO = "model.safetensors", "config.yaml", "bundle.json"


@dataclass
class Bundle:
    """A loaded bundle: the config to preprocess and infer with, the model in eval mode, and the
    contents of ``bundle.json``."""

    path: Path
    cfg: RunConfig
    model: nn.Module
    info: dict


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        log.warning("%s: unreadable, left out of the bundle's provenance", path)
        return None


def _member(run_dir: Path, allow_unfinished: bool) -> tuple[RunConfig, nn.Module, dict]:
    """The config, best model and provenance of one run to export."""
    from lowlabel.engine.runs import load_run

    cfg, model = load_run(run_dir)
    result = _read_json(run_dir / run_folder.RESULT)
    if result is None and not allow_unfinished:
        # a script 'train && export' must not ship a half-trained model after a Ctrl-C
        raise LowlabelError(
            f"{run_dir}: the run is unfinished (no result.json); finish it with 'lowlabel train "
            "--resume' and the same settings, or pass --allow-unfinished to export its best "
            "weights so far"
        )
    if result is None:
        log.warning("%s: unfinished run; exporting its best weights so far", run_dir)
    return cfg, model, run_provenance(run_dir, cfg)


def run_provenance(run_dir: Path, cfg: RunConfig | None = None) -> dict:
    """Where a training run's best weights come from: dataset, labelled subjects, seed, test
    metrics, versions and, for a run that started from another network, ``initialised_from``
    (:func:`origin`, nested as deep as the chain goes).

    Args:
        cfg: the run's config; read from its ``config.yaml`` when None.
    """
    if cfg is None:
        raw = yaml.safe_load((run_dir / run_folder.CONFIG).read_text())
        cfg = from_dict(raw, check=False)
    weights_meta = checkpoint.read_meta(run_dir / run_folder.BEST)
    split = _read_json(run_dir / run_folder.SPLITS) or {}
    result = _read_json(run_dir / run_folder.RESULT)
    trained = _read_json(run_dir / run_folder.PROVENANCE) or {}
    test = (result or {}).get("test") or None
    provenance = {
        "run_dir": str(run_dir.resolve()),
        "run_name": cfg.name,
        "dataset": split.get("source") or cfg.data.dataset or "demo cohort",
        "label_budget": cfg.data.budget,
        "labelled_subjects": split.get("train"),
        "test_subjects": split.get("test"),
        "seed": cfg.seed,
        "split_seed": cfg.data.split_seed,
        "steps": (result or {}).get("steps"),
        "best_step": weights_meta.get("step"),
        "val_dice": weights_meta.get("val_dice"),
        "test_metrics": (
            {k: v for k, v in test.items() if not k.endswith("_sd")} if test else None
        ),
        "trained_with": {k: trained.get(k) for k in ("lowlabel", "git_revision", "torch", "monai")},
    }
    transfer = _read_json(run_dir / run_folder.TRANSFER)
    if transfer and transfer.get("origin"):
        how = {k: transfer.get(k) for k in ("mode", "scope", "n_loaded")}
        provenance["initialised_from"] = {**transfer["origin"], **how}
    return provenance


def origin(source: Path, meta: dict) -> dict:
    """What a transfer's weights at ``source`` (a checkpoint file) come from: a bundle (its
    provenance), a training run (:func:`run_provenance`) or a pretraining run (method, step and
    the images it saw); recorded in ``transfer.json`` and in the provenance of a bundle exported
    from the run."""
    folder = source.parent
    out: dict = {"checkpoint": str(source.resolve()), "kind": meta.get("kind")}
    if source.name == WEIGHTS and (folder / INFO).is_file():
        info = _read_json(folder / INFO) or {}
        out.update(kind="bundle", model_dir=str(folder.resolve()))
        out["provenance"] = info.get("provenance")
    elif source.name == run_folder.BEST and (folder / run_folder.CONFIG).is_file():
        try:
            out.update(kind="run", provenance=run_provenance(folder))
        except (OSError, yaml.YAMLError, LowlabelError):
            log.warning("%s: unreadable run record, left out of the provenance", folder)
    elif str(meta.get("kind", "")).startswith("pretrain"):
        pool = _read_json(folder / run_folder.POOL) or {}
        out.update(run_dir=str(folder.resolve()), method=meta.get("method"))
        out.update(step=meta.get("step"), images=len(meta.get("images") or pool.get("images", [])))
        out["dataset"] = pool.get("source")
    return out


def _trained_on(runs: list[Path]) -> dict:
    """The ``splits.json`` of the runs taken together: their source and every labelled subject
    any of them trained on (empty when they come from different sources)."""
    splits = [_read_json(run / run_folder.SPLITS) or {} for run in runs]
    if len({s.get("source") for s in splits}) != 1:
        return {}
    train = [sid for s in splits for sid in s.get("train") or []]
    return {"source": splits[0].get("source"), "train": list(dict.fromkeys(train))}


def export(
    run_dir: str | Path | Sequence[str | Path],
    model_dir: str | Path,
    allow_unfinished: bool = False,
) -> Path:
    """Write the bundle of a finished run, or of an ensemble of runs, into ``model_dir`` (made
    whole, then renamed in place).

    Args:
        run_dir: a run folder written by ``lowlabel train``, or several: their models become one
            ensemble whose class probabilities are averaged.
        model_dir: a new (or empty) folder.
        allow_unfinished: export the best weights so far of a run without ``result.json``
            (interrupted, or still training).

    Returns:
        ``model_dir``.

    Raises:
        LowlabelError: not a run folder, an unfinished run (unless ``allow_unfinished``),
            ensemble members whose preprocessing or network differ, or ``model_dir`` exists and
            is not empty.
    """
    from lowlabel.engine.inference import Ensemble
    from lowlabel.engine.runs import check_alike, run_folders
    from lowlabel.provenance import provenance
    from lowlabel.qc import reference_for_run

    runs = run_folders(run_dir, "export")
    model_dir = Path(model_dir)
    if model_dir.exists() and (not model_dir.is_dir() or any(model_dir.iterdir())):
        raise LowlabelError(f"{model_dir}: exists and is not an empty folder; choose a new folder")
    members = [_member(run, allow_unfinished) for run in runs]
    check_alike(runs, [m[0] for m in members])
    cfg, model, first = members[0]
    ensemble = len(members) > 1
    info = {
        "format": FORMAT,
        "version": VERSION if ensemble else 1,
        "labels": dict(enumerate(LABEL_NAMES)),
        "preprocessing": preprocessing_parameters(cfg),
        "provenance": dict(first, test_metrics=None) if ensemble else first,
        # what the model saw in training, for the QC warnings of lowlabel.qc
        "qc_reference": reference_for_run(_trained_on(runs), cfg.data.label_map),
    }
    if ensemble:
        model = Ensemble([m[1] for m in members])
        info.update(ensemble=len(members), members=[m[2] for m in members])
    info.update(
        {
            "exported_with": {
                k: v
                for k, v in provenance().items()
                if k in ("lowlabel", "git_revision", "torch", "monai", "python")
            },
            "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    with atomic_dir(model_dir) as tmp:
        checkpoint.save(
            tmp / WEIGHTS,
            {f"model.{k}": v for k, v in model.state_dict().items()},
            {"kind": "bundle", "config": to_dict(cfg)},
        )
        write_text(tmp / CONFIG, dump_yaml(cfg))
        write_json(tmp / INFO, info)
    return model_dir


def load(model_dir: str | Path) -> Bundle:
    """Load a bundle for segmentation (JSON, YAML and safetensors only; never a pickle).

    Raises:
        LowlabelError: the folder is missing, is not a bundle (e.g. a run folder not yet
            exported), or its files are damaged or do not fit each other.
    """
    from lowlabel.engine.inference import Ensemble
    from lowlabel.models.unet import build_model

    path = Path(model_dir)
    if not path.is_dir():
        raise LowlabelError(
            f"{path}: model folder not found; give the folder 'lowlabel export' wrote"
        )
    info_path = path / INFO
    if not info_path.is_file():
        hint = (
            "this is a training run; make a bundle with 'lowlabel export RUN_DIR -o MODEL_DIR'"
            if (path / run_folder.BEST).is_file()
            else "make one with 'lowlabel export RUN_DIR -o MODEL_DIR'"
        )
        raise LowlabelError(f"{path}: not a lowlabel model folder (no {INFO}); {hint}")
    try:
        info = json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise LowlabelError(
            f"{info_path}: not valid JSON; the model folder is damaged, re-export it"
        ) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise LowlabelError(f"{info_path}: not a lowlabel bundle description; re-export the model")
    if info.get("version", 0) > VERSION:
        raise LowlabelError(
            f"{path}: bundle version {info.get('version')} is newer than this "
            f"lowlabel reads ({VERSION}); upgrade lowlabel"
        )
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise LowlabelError(f"{cfg_path}: missing; the model folder is incomplete, re-export it")
    try:
        raw = yaml.safe_load(cfg_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise LowlabelError(f"{cfg_path}: not valid YAML; the model folder is damaged") from None
    try:
        cfg = from_dict(raw)
    except LowlabelError as err:
        raise LowlabelError(f"{cfg_path}: {err}") from None
    weights = path / WEIGHTS
    if not weights.is_file():
        raise LowlabelError(f"{weights}: missing; the model folder is incomplete, re-export it")
    tensors, _ = checkpoint.load(weights)
    members = info.get("ensemble", 1)
    stored = {k.split(".")[2] for k in tensors if k.startswith("model.members.")}
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise LowlabelError(f"{info_path}: 'ensemble' is not a number of models; re-export it")
    if members > 1 and len(stored) != members:  # before building that many networks
        raise LowlabelError(
            f"{weights}: holds {len(stored)} models but {info_path} says {members}; re-export it"
        )
    nets = [build_model(cfg.model, cfg.data.spatial_dims) for _ in range(members)]
    model = nets[0] if members == 1 else Ensemble(nets)
    try:
        model.load_state_dict(checkpoint.split(tensors, "model"))
    except RuntimeError:
        raise LowlabelError(
            f"{weights}: weights do not fit {cfg_path}; re-export the model"
        ) from None
    model.eval()
    return Bundle(path=path, cfg=cfg, model=model, info=info)
