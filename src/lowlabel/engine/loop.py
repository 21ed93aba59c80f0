"""``fit(cfg) -> RunResult``: the one training loop, readable top to bottom.

:func:`train_steps` is the loop both :func:`fit` and :func:`lowlabel.engine.pretrain.pretrain`
run: batches in, optimizer updates, validation, early stopping, resumable state. What one step
computes and what a validation keeps is the objective's (:mod:`lowlabel.engine.objectives`);
where the work runs is the runtime's (:mod:`lowlabel.engine.runtime`); which files a run writes
is the run folder's (:mod:`lowlabel.run_folder`). Batch ``i`` is a pure function of
``(seed, i)`` (:mod:`lowlabel.data.batches`), so a run resumed from its last checkpoint sees
exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lowlabel.config import RunConfig
from lowlabel.data.batches import step_loader, train_batches
from lowlabel.data.cohort import load_cohort
from lowlabel.engine.evaluate import evaluate
from lowlabel.engine.objectives import Objective, segmentation
from lowlabel.engine.runtime import Runtime, runtime, seed_everything
from lowlabel.models.unet import count_parameters
from lowlabel.provenance import peak_rss_mb, provenance
from lowlabel.run_folder import SPLITS, UNLABELLED, RunFolder

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a finished run reports (also saved as ``result.json`` in its folder)."""

    run_dir: str
    steps: int
    best_step: int
    best_val_dice: float
    stopped_early: bool
    train_seconds: float
    prep_seconds: float
    peak_rss_mb: float
    n_labelled: int
    test: dict

    @classmethod
    def load(cls, path: Path) -> RunResult:
        return cls(**json.loads(Path(path).read_text()))


def fit(
    cfg: RunConfig, *, resume: bool = False, progress: bool = True, evaluate_test: bool = True
) -> RunResult:
    """Train a segmentation network under a label budget, with early stopping.

    Writes the run folder (:mod:`lowlabel.run_folder`): ``config.yaml``, ``splits.json``,
    ``metrics.jsonl``, ``last.safetensors`` (resumable state), ``best.safetensors`` (best
    weights), ``evaluation.{csv,json}`` (native-resolution test metrics) and ``result.json``.
    A run that fails before its first step leaves no folder behind.

    Raises:
        LowlabelError: bad data, an impossible budget, or an existing run without ``resume``.
    """
    folder = RunFolder.of(cfg)
    finished = folder.finished(resume)
    if finished is not None:
        return RunResult(**finished)
    rt = runtime(cfg)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    cohort = load_cohort(cfg, progress, check_test=evaluate_test)
    with folder.setting_up():
        folder.write_config(cfg)
        folder.write_json(SPLITS, cohort.split)
        if cohort.pool is not None:
            folder.write_json(UNLABELLED, {"images": [p["image"] for p in cohort.pool]})
        seed_everything(cfg.seed)
        objective, optimizer = segmentation(cfg, cohort, rt, folder)
    prep_seconds = time.perf_counter() - t0

    state = new_state(objective)
    folder.start(resume, objective.model, optimizer, state, objective.modules)
    batches = train_batches(cfg, cohort.train_items, cohort.pool_items)
    timing = train_steps(objective, optimizer, batches, folder, state, rt, progress=progress)

    model = objective.model
    folder.load_weights(folder.best, model)
    test = {}
    if evaluate_test and cohort.split["test"]:
        test = evaluate_model(model, cfg, cohort.test_subjects, folder.path, progress)["summary"]
    result = RunResult(
        run_dir=str(folder.path),
        steps=state["step"],
        best_step=state["best_step"],
        best_val_dice=state["best_metric"],
        stopped_early=state["stopped"],
        train_seconds=round(state["train_seconds"], 3),
        prep_seconds=round(prep_seconds, 3),
        peak_rss_mb=round(peak_rss_mb(), 1),
        n_labelled=len(cohort.split["train"]),
        test=test,
    )
    speed = rt.settings(timing)
    params = count_parameters(model)
    record = provenance(seed=cfg.seed, parameters=params, speed=speed, device=rt.record())
    folder.finish(asdict(result), record)
    return result


def new_state(objective: Objective) -> dict:
    """The loop's state, saved in ``last.safetensors`` at every validation.

    ``losses`` since the last validation live in it too, so a run resumed between validations
    logs the same ``train_loss`` as an uninterrupted one.
    """
    return {"step": 0, "train_seconds": 0.0, "losses": [], **objective.initial_state()}


def train_steps(
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    batches: torch.utils.data.Dataset,
    folder: RunFolder,
    state: dict,
    rt: Runtime,
    *,
    steps: int | None = None,
    schedule: bool = True,
    progress: bool = True,
) -> dict:
    """Run optimizer updates ``state["step"] + 1 .. steps`` (default ``train.steps``), validating
    every ``train.val_every`` steps and at the end, until the objective or the wall-clock budget
    (``train.max_minutes``, with ``schedule``) stops the run. When the objective asks
    (:meth:`~lowlabel.engine.objectives.Objective.validates_first`), the starting weights are
    validated at step 0 first, like any later validation.

    With ``schedule`` the learning rate follows :func:`set_learning_rate`. Returns the time spent
    waiting for batches and in steps (``data``, ``steps``, ``n``).
    """
    cfg = rt.cfg
    steps = steps or cfg.train.steps
    max_minutes = cfg.train.max_minutes if schedule else 0.0
    every = cfg.train.checkpoint_every
    if state["step"]:
        say(f"resuming {folder.path} at step {state['step']}", progress)
    objective.net = rt.prepare(objective.model)  # the device, memory format and compile
    rt.resume(state)
    loader = step_loader(batches, state["step"], steps, cfg, rt.pin_memory)
    desc = f"{objective.verb} {folder.path.name}"
    bar = tqdm(
        total=steps, initial=state["step"], desc=desc, disable=not progress, dynamic_ncols=True
    )
    tick = ready = time.perf_counter()
    timing = {"data": 0.0, "steps": 0.0, "n": 0}  # time waiting for batches, and in steps
    saved = (objective.model, optimizer, state, objective.modules)
    if objective.validates_first(state):  # a trained network competes with its fine-tuning
        tick = ready = validation(objective, folder, state, tick, bar)
        folder.save_state(objective.kind, cfg, *saved)  # so a resumed run does not redo it
    running = not state.get("stopped") and state["step"] < steps
    for batch in loader if running else []:
        batch = rt.to_device(batch)
        timing["data"] += time.perf_counter() - ready
        objective.train_mode(state["step"], optimizer)
        if schedule:
            seconds = state["train_seconds"] + time.perf_counter() - tick
            set_learning_rate(optimizer, cfg, state["step"], seconds, state.get("drops", 0))
        loss = objective.loss(batch, state["step"])
        optimizer.zero_grad(set_to_none=True)
        rt.update(loss, optimizer, state)
        state["losses"].append(loss.item())
        state["step"] += 1
        objective.after_update(batch, state)
        timing["steps"] += time.perf_counter() - ready
        timing["n"] += 1
        bar.update(1)
        step = state["step"]
        out_of_time = bool(max_minutes) and (
            state["train_seconds"] + time.perf_counter() - tick > 60 * max_minutes
        )
        validated = step % cfg.train.val_every == 0 or step == steps or out_of_time
        if validated:
            tick = validation(objective, folder, state, tick, bar, out_of_time)
        kept = objective.keep(step, state)
        if validated or kept or (every and step % every == 0):
            folder.save_state(objective.kind, cfg, *saved)
        if state.get("stopped"):
            log.info("early stop at step %d (best %s)", step, state.get("best_step"))
            break
        ready = time.perf_counter()
    bar.close()
    return timing


def validation(
    objective: Objective,
    folder: RunFolder,
    state: dict,
    tick: float,
    bar: tqdm,
    out_of_time: bool = False,
) -> float:
    """Validate at ``state["step"]``: the row goes to ``metrics.jsonl``, the objective keeps what
    it earned and may stop the run (as does ``out_of_time``). The row's ``train_loss`` is the mean
    since the last validation (null at step 0, before any update). Returns the new ``tick``: the
    time since the last one counts as training time."""
    losses = state["losses"]
    row = {"step": state["step"], "train_loss": float(np.mean(losses)) if losses else None}
    row.update(objective.validate())
    state["train_seconds"] += time.perf_counter() - tick
    tick = time.perf_counter()
    row["seconds"] = round(state["train_seconds"], 3)
    state["losses"] = []
    if objective.judge(row, state) or out_of_time:
        state["stopped"] = True
    folder.append_metrics(row)
    bar.set_postfix(objective.postfix(row, state))
    return tick


def say(line: str, progress: bool) -> None:
    """A line for the user: above the progress bar when there is one, else to the log."""
    if progress:
        tqdm.write(line, file=sys.stderr)
    else:
        log.info(line)


def set_learning_rate(
    optimizer: torch.optim.Optimizer,
    cfg: RunConfig,
    step: int,
    seconds: float = 0.0,
    drops: int = 0,
) -> None:
    """Learning rate as a pure function of the step and the run's state (``drops``: how often
    a ``plateau`` schedule has divided it by 10), so a resumed run continues the schedule.

    Under a wall-clock budget (``train.max_minutes``) the poly decay follows whichever runs out
    first, steps or time, so a budgeted run still ends at a small learning rate.
    """
    done = step / cfg.train.steps
    if cfg.train.max_minutes:
        done = max(done, seconds / (60.0 * cfg.train.max_minutes))
    factor = (1.0 - min(done, 1.0)) ** 0.9 if cfg.train.schedule == "poly" else 1.0
    if cfg.train.schedule == "plateau":
        factor = 0.1**drops
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor


def evaluate_model(
    model: nn.Module, cfg: RunConfig, subjects: list[dict], out: Path, progress: bool
) -> dict:
    """Native-resolution test metrics of the kept weights (a seam for the tests)."""
    return evaluate(model, cfg, subjects, out, progress)
