"""Study file -> runs.

A study file (YAML) holds a ``base`` of config overrides, named ``axes`` whose levels are sets of
overrides, ``pretraining`` runs, ``tables`` (each the product of some axes, or the checkpoints of
one pretraining run), ``comparisons`` between table cells, ``seeds`` and ``profiles`` (quick, cpu,
paper) that rescale the step counts and set the resolution. :func:`expand` turns it into
:class:`Cell` objects, each holding one validated :class:`~lowlabel.config.RunConfig` whose folder
follows from the config; cells with the same config (the same run reached from two tables) are
one run. :func:`check` refuses, before anything runs, what cannot run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowlabel.config import (
    RunConfig,
    apply_overrides,
    given_keys,
    run_dir,
    to_dict,
    validate,
)
from lowlabel.data.size import too_small, world_extent
from lowlabel.errors import LowlabelError

STUDIES = Path(__file__).resolve().parent.parent / "studies"
PROFILES = ("quick", "cpu", "paper")
STEP_KEYS = ("train.steps", "pretrain.steps", "pretrain.save_steps")
TRAIN_METRICS = ("test_loss", "mean_dice", "dice_csf", "dice_gm", "dice_wm", "steps")
PRETRAIN_METRICS = ("train_loss", "val_mse", "val_mae")
_TOP_KEYS = {
    "name",
    "description",
    "base",
    "seeds",
    "profiles",
    "axes",
    "pretraining",
    "tables",
    "comparisons",
}
EXPECT = ("higher", "lower", "same")
"""What a comparison's ``claim`` says of ``a - b``."""
_REF = re.compile(r"^@([\w.-]+)(?::(\d+))?$")


@dataclass
class Study:
    """A parsed, schema-checked study file."""

    name: str
    description: str
    path: Path
    base: dict[str, Any]
    seeds: list[int]
    profiles: dict[str, dict]
    axes: dict[str, dict[str, dict[str, Any]]]
    pretraining: dict[str, dict[str, Any]]
    tables: dict[str, dict]
    comparisons: list[dict]
    raw: dict = field(repr=False, default_factory=dict)


@dataclass
class Cell:
    """One run of a study.

    Attributes:
        key: unique id within the study: ``<kind>/<run folder name>``, or for a transfer cell
            whose checkpoint is not known yet, a key built from its unresolved config.
        kind: ``train`` or ``pretrain``.
        cfg: the run config; a transfer cell's ``transfer.init_from`` is ``@name[:step]`` until
            its pretraining run has finished (see :func:`resolve`).
        seed: the replicate (seed and label draw) this run belongs to.
        labels: ``{table: {axis: level}}`` for every table cell this run fills.
        needs: ``(pretraining name, step)`` for a transfer cell, else None.
    """

    key: str
    kind: str
    cfg: RunConfig
    seed: int
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    needs: tuple[str, int] | None = None
    pretrain_key: str | None = None

    @property
    def run_dir(self) -> Path | None:
        """The run folder, or None while a transfer cell waits for its checkpoint."""
        waiting = self.needs and _is_ref(self.cfg.transfer.init_from)
        return None if waiting else run_dir(self.cfg, self.kind)

    def to_json(self) -> dict:
        folder = self.run_dir
        return {
            "key": self.key,
            "kind": self.kind,
            "seed": self.seed,
            "labels": self.labels,
            "needs": list(self.needs) if self.needs else None,
            "pretrain_key": self.pretrain_key,
            "run_dir": str(folder) if folder else None,
            "config": to_dict(self.cfg),
        }


def _is_ref(value: str | None) -> bool:
    return isinstance(value, str) and value.startswith("@")


# ---------------------------------------------------------------------------------------------
# loading


def builtin_studies() -> dict[str, Path]:
    """Built-in study files by name."""
    return {p.stem: p for p in sorted(STUDIES.glob("*.yaml"))}


def find_study(name_or_path: str | Path) -> Path:
    """A built-in study name or a path to a study file.

    Raises:
        LowlabelError: neither a built-in name nor an existing file.
    """
    text = str(name_or_path)
    builtins = builtin_studies()
    path = Path(text)
    if path.is_file():
        return path
    if text in builtins:
        return builtins[text]
    raise LowlabelError(
        f"study '{text}': not a built-in study ({', '.join(builtins) or 'none'}) nor an existing "
        "file; run 'lowlabel study list' or give a path to a study YAML"
    )


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LowlabelError(f"{where}: expected a mapping, got {value!r}")
    return value


def load_study(name_or_path: str | Path) -> Study:
    """Read and schema-check a study file.

    Raises:
        LowlabelError: bad YAML, an unknown top-level key, an unknown axis, table, pretraining
            run or config key (named with its place in the file).
    """
    path = find_study(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise LowlabelError(f"{path}: not valid YAML{where}; fix the syntax") from None
    raw = _mapping(raw, str(path))
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise LowlabelError(
            f"{path}: unknown study key '{unknown[0]}' (known: {', '.join(sorted(_TOP_KEYS))})"
        )
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int):
        seeds = list(range(seeds))
    study = Study(
        name=str(raw.get("name", path.stem)),
        description=str(raw.get("description", "")).strip(),
        path=path,
        base=_mapping(raw.get("base"), f"{path}: base"),
        seeds=_seed_list(seeds, path),
        profiles=_mapping(raw.get("profiles"), f"{path}: profiles"),
        axes={
            k: _mapping(v, f"{path}: axes.{k}")
            for k, v in _mapping(raw.get("axes"), f"{path}: axes").items()
        },
        pretraining={
            k: _mapping(v, f"{path}: pretraining.{k}")
            for k, v in _mapping(raw.get("pretraining"), f"{path}: pretraining").items()
        },
        tables={
            str(k): _mapping(v, f"{path}: tables.{k}")
            for k, v in _mapping(raw.get("tables"), f"{path}: tables").items()
        },
        comparisons=list(raw.get("comparisons") or []),
        raw=raw,
    )
    _check_schema(study)
    return study


def _seed_list(seeds: Any, where: Any) -> list[int]:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise LowlabelError(f"{where}: 'seeds' must be a non-empty list of integers")
    return list(dict.fromkeys(seeds))


def _check_schema(study: Study) -> None:
    p = study.path
    for name, prof in study.profiles.items():
        if name not in PROFILES:
            raise LowlabelError(f"{p}: unknown profile '{name}' (known: {', '.join(PROFILES)})")
        bad = sorted(
            set(_mapping(prof, f"{p}: profiles.{name}"))
            - {"seeds", "scale", "min_train_steps", "set", "pretraining_set"}
        )
        if bad:
            raise LowlabelError(
                f"{p}: profiles.{name}: unknown key '{bad[0]}' "
                "(known: seeds, scale, min_train_steps, set, pretraining_set)"
            )
        _mapping(prof.get("set"), f"{p}: profiles.{name}.set")
        _mapping(prof.get("pretraining_set"), f"{p}: profiles.{name}.pretraining_set")
    if not study.tables:
        raise LowlabelError(f"{p}: a study needs at least one entry under 'tables'")
    for tname, table in study.tables.items():
        where = f"{p}: tables.{tname}"
        bad = sorted(
            set(table) - {"title", "axes", "set", "pretraining", "steps", "metrics", "claim"}
        )
        if bad:
            raise LowlabelError(
                f"{where}: unknown key '{bad[0]}' "
                "(known: title, axes, set, pretraining, steps, metrics, claim)"
            )
        if "pretraining" in table:
            if table["pretraining"] not in study.pretraining:
                raise LowlabelError(
                    f"{where}: pretraining run '{table['pretraining']}' is not "
                    f"defined under 'pretraining' "
                    f"(defined: {', '.join(study.pretraining) or 'none'})"
                )
            continue
        axes = table.get("axes") or []
        if not isinstance(axes, list):
            raise LowlabelError(f"{where}.axes: expected a list of axis names")
        for axis in axes:
            if axis not in study.axes:
                raise LowlabelError(
                    f"{where}: unknown axis '{axis}' "
                    f"(defined axes: {', '.join(study.axes) or 'none'})"
                )
            if not study.axes[axis]:
                raise LowlabelError(f"{p}: axes.{axis} has no levels")
        _mapping(table.get("set"), f"{where}.set")
    for i, comp in enumerate(study.comparisons):
        where = f"{p}: comparisons[{i}]"
        comp = _mapping(comp, where)
        for key in ("table", "a", "b"):
            if key not in comp:
                raise LowlabelError(f"{where}: missing '{key}' (needs name, table, a, b)")
        if comp.get("expect", "higher") not in EXPECT:
            raise LowlabelError(
                f"{where}.expect: '{comp['expect']}' is not one of {', '.join(EXPECT)}"
            )
        table = study.tables.get(str(comp["table"]))
        if table is None or "pretraining" in table:
            raise LowlabelError(f"{where}: '{comp['table']}' is not a training table of this study")
        for side in ("a", "b"):
            for axis, level in _mapping(comp[side], f"{where}.{side}").items():
                if axis not in (table.get("axes") or []):
                    raise LowlabelError(
                        f"{where}.{side}: table {comp['table']} has no axis '{axis}'"
                    )
                if str(level) not in map(str, study.axes[axis]):
                    raise LowlabelError(f"{where}.{side}: axis '{axis}' has no level '{level}'")


# ---------------------------------------------------------------------------------------------
# expansion


def _scaled(overrides: dict[str, Any], scale: float) -> dict[str, Any]:
    """Step counts given at the original scale, multiplied by the profile's ``scale``."""
    out = dict(overrides)
    for key in STEP_KEYS:
        if key in out and scale != 1.0:
            value = out[key]
            if isinstance(value, list):
                out[key] = sorted({max(1, round(v * scale)) for v in value})
            elif isinstance(value, (int, float)):
                out[key] = max(1, round(value * scale))
    return out


def scale_step(step: int, profile: dict) -> int:
    return max(1, round(step * float(profile.get("scale", 1.0))))


def _config(
    layers: list[tuple[str, dict]], scale: float, where: str, cfg: RunConfig | None = None
) -> RunConfig:
    cfg = cfg or RunConfig()
    for name, overrides in layers:
        try:
            cfg = apply_overrides(cfg, _scaled(overrides, scale), check=False)
        except LowlabelError as err:
            raise LowlabelError(f"{where} ({name}): {err}") from None
    try:  # the layers together, as train would see them: the same rules, the same refusals
        validate(cfg)
    except LowlabelError as err:
        raise LowlabelError(f"{where}: {err}") from None
    return cfg


def _from_source(cfg: RunConfig, given: set[str], where: str) -> RunConfig:
    """``cfg`` completed from a literal ``transfer.init_from`` as ``lowlabel train`` completes
    it (:func:`lowlabel.models.transfer.inherit`), before the cell's folder is named. A
    reference to the study's own pretraining run (``@name``) is left as it is: its network is
    the study's, and ``transfer.scope: all`` refuses a pretraining network anyway."""
    if not cfg.transfer.init_from or _is_ref(cfg.transfer.init_from):
        return cfg
    from lowlabel.models.transfer import inherit  # loads torch: only for such a cell

    try:
        return inherit(cfg, given)[0]
    except LowlabelError as err:
        raise LowlabelError(f"{where}: {err}") from None


def _finish(cfg: RunConfig, kind: str, seed: int, out: Path, min_steps: int) -> RunConfig:
    t = cfg.train
    values: dict[str, Any] = {"seed": seed, "data.draw": seed, "out": str(out)}
    if kind == "train":
        steps = max(t.steps, min_steps)
        values.update({"train.steps": steps, "train.val_every": min(t.val_every, steps)})
        values["name"] = (
            f"seg-L{cfg.model.levels}R{cfg.model.num_res_units}"
            f"P{t.patience}-N{cfg.data.budget or 'all'}-{cfg.transfer.mode}-s{seed}"
        )
    else:
        steps = cfg.pretrain.steps
        saves = sorted({s for s in cfg.pretrain.save_steps if s <= steps} | {steps})
        values.update({"pretrain.save_steps": saves, "train.val_every": min(t.val_every, steps)})
        values["name"] = f"pre-{cfg.pretrain.method}-L{cfg.model.levels}-s{seed}"
    return cfg.replace(**values)


def profile_of(study: Study, profile: str) -> dict:
    if profile not in PROFILES:
        raise LowlabelError(f"--profile '{profile}': choose one of {', '.join(PROFILES)}")
    return study.profiles.get(profile, {"scale": 1.0})


def expand(
    study: Study,
    profile: str = "quick",
    data: str | None = None,
    study_dir: str | Path = "study",
    seeds: list[int] | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[Cell]:
    """Every run of ``study`` under ``profile``, pretraining runs first.

    Args:
        study: from :func:`load_study`.
        profile: ``quick``, ``cpu`` or ``paper``.
        data: a dataset (``dataset.json`` or folder); None keeps the study's (the demo cohort).
        study_dir: runs go to ``<study_dir>/runs``.
        seeds: replace the profile's seeds (e.g. for smoke tests).
        overrides: dotted config overrides applied to every run last, unscaled (``--set``);
            e.g. ``{"train.steps": 2, "pretrain.steps": 2}`` for a smoke run.

    Raises:
        LowlabelError: an unknown config key or value in any cell, or a transfer cell that refers
            to a pretraining run or step the study does not make.
    """
    prof = profile_of(study, profile)
    scale = float(prof.get("scale", 1.0))
    overrides = dict(overrides or {})
    min_steps = 1 if "train.steps" in overrides else int(prof.get("min_train_steps", 1))
    seeds = seeds or _seed_list(prof.get("seeds", study.seeds), f"{study.path}: profiles.{profile}")
    out = Path(study_dir) / "runs"
    head = [("base", study.base), (f"profile {profile}", prof.get("set") or {})]
    if data is not None:
        head.append(("--data", {"data.dataset": str(data)}))
    cells: dict[str, Cell] = {}

    def add(cell: Cell, table: str, labels: dict[str, str]) -> None:
        have = cells.setdefault(cell.key, cell)
        have.labels[table] = labels

    pre_cfgs: dict[tuple[str, int], RunConfig] = {}
    for seed in seeds:
        for name, pre_set in study.pretraining.items():
            layers = [
                *head,
                (f"pretraining.{name}", pre_set),
                (f"profiles.{profile}.pretraining_set", prof.get("pretraining_set") or {}),
            ]
            cfg = _config(layers, scale, f"{study.path}: pretraining.{name}")
            cfg = _config([("--set", overrides)], 1.0, f"{study.path}: pretraining.{name}", cfg)
            cfg = _finish(cfg, "pretrain", seed, out, min_steps)
            pre_cfgs[(name, seed)] = cfg
            cell = Cell(
                key=f"pretrain/{run_dir(cfg, 'pretrain').name}", kind="pretrain", cfg=cfg, seed=seed
            )
            cells.setdefault(cell.key, cell)
        for tname, table in study.tables.items():
            if "pretraining" in table:
                cfg = pre_cfgs[(table["pretraining"], seed)]
                cells[f"pretrain/{run_dir(cfg, 'pretrain').name}"].labels[tname] = {}
                continue
            axes = table.get("axes") or []
            for levels in itertools.product(*(list(study.axes[a]) for a in axes)):
                labels = {a: str(lv) for a, lv in zip(axes, levels, strict=True)}
                layers = [*head, (f"tables.{tname}.set", table.get("set") or {})]
                layers += [
                    (f"axes.{a}.{lv}", study.axes[a][lv] or {})
                    for a, lv in zip(axes, levels, strict=True)
                ]
                where = f"{study.path}: tables.{tname} cell {labels}"
                cfg = _config([("--set", overrides)], 1.0, where, _config(layers, scale, where))
                given = set().union(*(given_keys(o) for _, o in [*layers, ("--set", overrides)]))
                cfg = _from_source(cfg, given, where)
                cfg = _finish(cfg, "train", seed, out, min_steps)
                needs = pre_key = None
                if _is_ref(cfg.transfer.init_from):
                    needs = _parse_ref(cfg.transfer.init_from, study, pre_cfgs, seed, scale, where)
                    pre_key = f"pretrain/{run_dir(pre_cfgs[(needs[0], seed)], 'pretrain').name}"
                    if cfg.transfer.mode == "scratch":
                        raise LowlabelError(
                            f"{where}: transfer.init_from is set but "
                            "transfer.mode is scratch; choose frozen or finetune"
                        )
                    cfg = cfg.replace(**{"transfer.init_from": f"@{needs[0]}:{needs[1]}"})
                elif cfg.transfer.mode != "scratch" and not cfg.transfer.init_from:
                    raise LowlabelError(
                        f"{where}: transfer.mode is {cfg.transfer.mode} but "
                        "transfer.init_from is not set"
                    )
                add(
                    Cell(
                        key=f"train/{run_dir(cfg).name}",
                        kind="train",
                        cfg=cfg,
                        seed=seed,
                        needs=needs,
                        pretrain_key=pre_key,
                    ),
                    tname,
                    labels,
                )
    ordered = sorted(cells.values(), key=lambda c: (c.kind != "pretrain", c.needs is not None))
    return ordered


def _parse_ref(
    ref: str, study: Study, pre_cfgs: dict, seed: int, scale: float, where: str
) -> tuple[str, int]:
    match = _REF.match(ref)
    if not match or match.group(1) not in study.pretraining:
        raise LowlabelError(
            f"{where}: transfer.init_from '{ref}' names no pretraining run of this study "
            f"(defined: {', '.join('@' + n for n in study.pretraining) or 'none'}); add it under "
            "'pretraining' or give a checkpoint path"
        )
    name = match.group(1)
    pre = pre_cfgs[(name, seed)]
    steps = pre.pretrain.steps
    saved = set(pre.pretrain.save_steps) | {steps}
    step = steps
    if match.group(2):
        # the step is given at the original scale, like every step count in a study file
        step = max(1, round(int(match.group(2)) * scale))
    if step not in saved:
        raise LowlabelError(
            f"{where}: transfer.init_from '{ref}': pretraining run '{name}' keeps "
            f"no checkpoint at step {step} (kept: {sorted(saved)})"
        )
    return name, step


def resolve(cell: Cell, checkpoints: dict[str, str]) -> Cell:
    """A transfer cell with ``init_from`` set to its pretraining run's checkpoint path.

    Raises:
        LowlabelError: the pretraining run kept no checkpoint at the step the cell needs.
    """
    if not cell.needs:
        return cell
    name, step = cell.needs
    path = checkpoints.get(str(step))
    if path is None:
        raise LowlabelError(
            f"pretraining run '{name}' (seed {cell.seed}) has no checkpoint at "
            f"step {step} (has: {sorted(checkpoints, key=int)}); rerun the study"
        )
    cfg = cell.cfg.replace(**{"transfer.init_from": str(path)})
    return dataclasses.replace(cell, cfg=cfg)


# ---------------------------------------------------------------------------------------------
# checks that need the data


def check(cells: list[Cell]) -> None:
    """Refuse, before any run starts, runs that cannot work on their data.

    Checks every cell's label budget against the subjects available and the network depth
    against the smallest scan at the cell's spacing (:func:`lowlabel.data.size.too_small`; the
    patch size is checked with the config), and that a transfer cell's pretraining run
    is part of the study and a literal ``init_from`` exists.

    Raises:
        LowlabelError: naming the cell and the key to change.
    """
    from lowlabel.data.cohort import resolve_dataset  # loads torch and MONAI: only when checking

    keys = {c.key for c in cells}
    sizes: dict[tuple, tuple[int, list[tuple[str, tuple[float, ...]]]]] = {}
    for cell in cells:
        cfg = cell.cfg
        where = f"run '{cfg.name}'"
        if cell.needs and cell.pretrain_key not in keys:
            raise LowlabelError(
                f"{where}: transfer.init_from '@{cell.needs[0]}' needs a "
                "pretraining run that is not part of this study"
            )
        init = cfg.transfer.init_from
        if cfg.transfer.mode != "scratch" and not _is_ref(init) and not Path(str(init)).exists():
            raise LowlabelError(
                f"{where}: transfer.init_from '{init}' does not exist; give an "
                "existing checkpoint or a pretraining run of the study"
            )
        src = (cfg.data.dataset, cfg.data.demo_subjects, cfg.data.demo_spacing)
        if src not in sizes:
            ds = resolve_dataset(cfg)
            extents = [(s["image"], _extent(s["image"])) for s in ds.subjects]
            sizes[src] = (len(ds.subjects), extents)
        n, extents = sizes[src]
        pool = n - cfg.data.n_test - cfg.data.n_val
        if pool < 1 or cfg.data.budget > pool:
            raise LowlabelError(
                f"{where}: data.budget={cfg.data.budget} with data.n_test={cfg.data.n_test} and "
                f"data.n_val={cfg.data.n_val} needs more than the {n} subjects of the dataset; "
                "lower them in the study or profile"
            )
        for image, extent in extents:
            d = cfg.data
            problem = too_small(extent, d.spacing, d.spatial_dims, cfg.model.levels)
            if problem:
                raise LowlabelError(f"{where}: {image}: {problem}")


def _extent(path: str) -> tuple[float, ...]:
    """Physical size (mm) of a scan along R, A and S, from the header alone."""
    import nibabel as nib

    img = nib.load(path)
    return tuple(world_extent(img.shape, img.affine))


def _saved_steps(table: str, cells: list[Cell]) -> list[int]:
    """The steps at which a pretraining table's runs keep checkpoints (what the table shows):
    the profile may pretrain for fewer steps than the table's scaled ``steps``."""
    for cell in cells:
        if cell.kind == "pretrain" and table in cell.labels:
            return sorted(cell.cfg.pretrain.save_steps)
    return []


def plan_json(study: Study, profile: str, cells: list[Cell]) -> str:
    """The expanded study, as written to ``<study_dir>/plan.json``."""
    return json.dumps(
        {
            "study": study.name,
            "source": str(study.path),
            "profile": profile,
            "tables": study.tables,
            "axes": {a: list(v) for a, v in study.axes.items()},
            "comparisons": study.comparisons,
            "steps": {
                t: _saved_steps(t, cells)
                or [scale_step(s, profile_of(study, profile)) for s in tab.get("steps", [])]
                for t, tab in study.tables.items()
                if "pretraining" in tab
            },
            "description": study.description,
            "cells": [c.to_json() for c in cells],
        },
        indent=1,
    )
