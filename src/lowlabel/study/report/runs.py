"""The runs of a study as the report sees them: ``plan.json`` and each run folder's
``result.json`` and ``metrics.jsonl``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lowlabel.atomic import read_jsonl
from lowlabel.errors import LowlabelError
from lowlabel.run_folder import METRICS, RESULT

log = logging.getLogger(__name__)


TRAIN_COLUMNS = {
    "test_loss": "Test loss",
    "mean_dice": "Mean Dice",
    "dice_csf": "Dice CSF",
    "dice_gm": "Dice GM",
    "dice_wm": "Dice WM",
    "steps": "Steps run",
    "best_step": "Best step",
}


SURFACE_COLUMNS = {
    "hd95_csf": "HD95 CSF (mm)",
    "hd95_gm": "HD95 GM (mm)",
    "hd95_wm": "HD95 WM (mm)",
    "avd_csf_ml": "Vol. error CSF (mL)",
    "avd_gm_ml": "Vol. error GM (mL)",
    "avd_wm_ml": "Vol. error WM (mL)",
}
"""Boundary distance and absolute volume error per tissue, CSF, GM, WM (test subjects' means)."""


PRETRAIN_COLUMNS = {"train_loss": "Train loss", "val_mse": "Val loss (MSE)", "val_mae": "Val MAE"}


@dataclass
class Run:
    """One run folder as the report sees it."""

    key: str
    kind: str
    seed: int
    labels: dict[str, dict[str, str]]
    folder: Path | None
    result: dict | None
    metrics: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.folder is None:
            return "waiting"
        if self.result is not None:
            return "finished"
        return "interrupted" if self.folder.exists() else "not started"

    def value(self, metric: str) -> float:
        """A table metric of a finished training run (NaN when absent)."""
        if self.result is None:
            return float("nan")
        if metric in ("steps", "best_step"):
            return float(self.result.get(metric, float("nan")))
        return float((self.result.get("test") or {}).get(metric, float("nan")))


def load_runs(study_dir: Path) -> tuple[dict, list[Run]]:
    """The plan and one :class:`Run` per distinct run folder.

    Raises:
        LowlabelError: the folder holds no study (no ``plan.json``).
    """
    plan_path = study_dir / "plan.json"
    if not plan_path.is_file():
        raise LowlabelError(f"{study_dir}: no plan.json; give a folder written by 'lowlabel study'")
    try:
        plan = json.loads(plan_path.read_text())
    except json.JSONDecodeError:
        raise LowlabelError(f"{plan_path}: damaged; rerun 'lowlabel study' to rewrite it") from None
    runs, seen = [], set()
    by_key = {c["key"]: c for c in plan["cells"]}
    for cell in plan["cells"]:
        if not cell.get("run_dir") and cell.get("needs"):
            cell = _resolved(cell, by_key.get(cell.get("pretrain_key")))
        folder = _in_study(study_dir, Path(cell["run_dir"])) if cell.get("run_dir") else None
        ident = str(folder) if folder else cell["key"]
        if ident in seen:
            continue
        seen.add(ident)
        result = None
        if folder is not None and (folder / RESULT).exists():
            try:
                result = json.loads((folder / RESULT).read_text())
            except json.JSONDecodeError:
                result = None
        metrics = read_jsonl(folder / METRICS) if folder else []
        runs.append(
            Run(
                cell["key"],
                cell["kind"],
                cell["seed"],
                cell["labels"],
                folder,
                result,
                metrics,
                cell["config"],
            )
        )
    return plan, runs


def _in_study(study_dir: Path, folder: Path) -> Path:
    """A run's folder, read from the study's own ``runs/`` when it is there: a study folder that
    was moved or copied reports on its own runs, not on the folders its plan first named."""
    own = study_dir / "runs" / folder.name
    return own if own.is_dir() or not folder.exists() else folder


def _resolved(cell: dict, pre: dict | None) -> dict:
    """A transfer cell whose plan entry predates its pretraining run's end (an interrupted study):
    its folder follows from the checkpoint that run kept."""
    from lowlabel.config import from_dict, run_dir

    result = Path(pre["run_dir"]) / RESULT if pre and pre.get("run_dir") else None
    if result is None or not result.exists():
        return cell
    try:
        checkpoints = json.loads(result.read_text()).get("checkpoints") or {}
    except json.JSONDecodeError:
        return cell
    path = checkpoints.get(str(cell["needs"][1]))
    if path is None:
        return cell
    config = json.loads(json.dumps(cell["config"]))
    config["transfer"]["init_from"] = str(path)
    return {**cell, "config": config, "run_dir": str(run_dir(from_dict(config)))}
