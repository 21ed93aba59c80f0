"""The ``lowlabel`` command: parse, call one library function, print.

Heavy modules (torch, MONAI) are imported inside the commands so ``lowlabel --help`` is instant.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from lowlabel.errors import (
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Interrupted,
    LowlabelError,
    find_user_error,
)

PROG = "lowlabel"
RESUME_HINT = "interrupted; rerun with --resume to continue"

# plain help (click's layout): rich's boxes label every flag <bool> and break lines mid-cell
app = typer.Typer(
    help="Brain-tissue segmentation (CSF, GM, WM) under label budgets: train, pretrain, "
    "transfer, run studies, segment new scans.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(
    help="Inspect datasets and write the demo cohort.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(data_app, name="data")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY=VALUE",
        help="Override a config key, e.g. --set train.steps=500 (repeatable; "
        "'lowlabel config --list' shows the keys).",
    ),
]
DataOpt = Annotated[
    str | None, typer.Option("--data", help="dataset.json or folder (default: the demo cohort).")
]
RunsOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="Folder for runs (default: runs/).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="auto (a CUDA device when there is one, else the CPU), cpu, cuda or cuda:N.",
    ),
]
TtaOpt = Annotated[
    bool,
    typer.Option(
        "--tta", help="Test-time augmentation: average with the left-right mirror (2x the work)."
    ),
]


@contextlib.contextmanager
def _interruptible(hint: str = RESUME_HINT) -> Iterator[None]:
    """Turn Ctrl-C inside a long command into :class:`Interrupted` with ``hint``."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(hint) from None


def _must_exist(path: str | Path | None, what: str) -> None:
    """Refuse a missing input before torch loads (seconds): ``<path>: <what>``."""
    if path is not None and not Path(path).exists():
        raise LowlabelError(f"{path}: {what}")


NO_DATASET = "dataset not found; give a dataset.json or a folder with images/ and labels/"
NO_SOURCE = (
    "unlabelled source not found; give a dataset.json, a folder of NIfTI files (or with "
    "images/) or a .nii.gz file"
)
SkullStripOpt = Annotated[
    str,
    typer.Option(
        "--skull-strip",
        help=(
            "auto (extract the brain of scans that still have their skull), yes or no. "
            "Whatever the choice, no tissue is labelled outside the brain: the extracted brain, "
            "or, for a scan that was skull-stripped already (no more tissue than a brain, and "
            "an empty background at zero around it), its voxels with signal, holes filled."
        ),
    ),
]


def _load(config: Path | None, overrides: list[str] | None, extra: dict | None = None):
    from lowlabel.config import load_config, parse_set

    values = parse_set(overrides)
    values.update(extra or {})
    return load_config(config, values)


def _load_train(config: Path | None, overrides: list[str] | None, extra: dict):
    """The run config of ``lowlabel train``, completed from its transfer source, saying so."""
    from lowlabel.config import given_keys, load_config, parse_set, read_config
    from lowlabel.models.transfer import inherit, inherited_line

    values = parse_set(overrides)
    values.update(extra)
    cfg = load_config(config, values, check=False)
    cfg, taken = inherit(cfg, given_keys(read_config(config)) | given_keys(values))
    if taken:
        typer.echo(inherited_line(cfg, taken), err=True)
    return cfg


@app.command(short_help="Train a UNet under a label budget, test it.")
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: DataOpt = None,
    out: RunsOpt = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help="Start from a model bundle (lowlabel export), a training or pretraining run "
            "folder, or a .safetensors checkpoint (transfer.init_from).",
        ),
    ] = None,
    transfer: Annotated[
        str | None,
        typer.Option(
            "--transfer", help="scratch, frozen, finetune (default with --init-from) or gradual."
        ),
    ] = None,
    scope: Annotated[
        str | None,
        typer.Option(
            "--scope",
            help="encoder (load the encoder only) or all (the whole network, e.g. a bundle to "
            "adapt to your scans: its model.* settings and data.spatial_dims, spacing and "
            "patch_size come from the source unless you set them; learning rate 0.1 x train.lr "
            "unless transfer.lr_scale says otherwise).",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue an interrupted run (or reuse a finished one)."),
    ] = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Train a segmentation UNet under a label budget and evaluate it on the test split.

    Without --data (and no data.dataset in the config) it trains on the synthetic demo cohort.
    To adapt a model to your own site: lowlabel train --data MY_DATASET --init-from MODEL_DIR
    --scope all (the network and its resolution come from the model; lowlabel config --list
    explains).
    """
    _must_exist(data, NO_DATASET)
    _must_exist(
        init_from,
        "--init-from not found; give a model bundle, a training or pretraining run folder, or "
        "a .safetensors checkpoint",
    )
    extra: dict = {}
    if device is not None:
        extra["train.device"] = device
    if data is not None:
        extra["data.dataset"] = data
    if out is not None:
        extra["out"] = str(out)
    if init_from is not None:
        extra["transfer.init_from"] = str(init_from)
        extra.setdefault("transfer.mode", "finetune")
    if transfer is not None:
        extra["transfer.mode"] = transfer
    if scope is not None:
        extra["transfer.scope"] = scope
    cfg = _load_train(config, set_, extra)
    _say_if_demo(cfg)
    with _interruptible():
        from lowlabel.engine.loop import fit

        result = fit(cfg, resume=resume, progress=not quiet)
    _print_result(result)


def _say_if_demo(cfg) -> None:
    if not cfg.data.dataset:
        typer.echo(
            f"no --data given: using the synthetic demo cohort ({cfg.data.demo_subjects} "
            f"subjects at {cfg.data.demo_spacing:g} mm, made from the MNI152 template)",
            err=True,
        )


def _print_result(result) -> None:
    test = result.test
    # best step 0 only happens from a whole trained network that fine-tuning never beat
    best = "0: the starting model" if result.best_step == 0 else result.best_step
    line = f"run {result.run_dir}: {result.steps} steps (best {best}), "
    line += f"val Dice {result.best_val_dice:.3f}"
    if test:
        line += (
            f"; test Dice {test['mean_dice']:.3f} (CSF {test['dice_csf']:.3f}, "
            f"GM {test['dice_gm']:.3f}, WM {test['dice_wm']:.3f})"
        )
    typer.echo(line)


@app.command(short_help="Evaluate a run (or an ensemble of runs): Dice, HD95, volume error.")
def evaluate(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="A finished run folder; several are evaluated as one ensemble (probabilities "
            "averaged, as 'lowlabel export' of the same runs would predict).",
            show_default=False,
        ),
    ],
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Evaluate on all subjects of this dataset instead of the run's test split.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON line (for scripts).")
    ] = False,
    device: DeviceOpt = None,
    tta: TtaOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a run's best weights at native resolution (Dice, HD95, volume error).

    With --tta, or several runs, the figures are printed only; the run's evaluation files keep
    the plain ones.
    """
    for run_dir in run_dirs:
        _must_exist(run_dir, "run folder not found; give a folder that 'lowlabel train' wrote")
    _must_exist(data, NO_DATASET)
    from lowlabel.engine.runs import evaluate_run

    summary = evaluate_run(run_dirs, data, progress=not quiet, device=device or "auto", tta=tta)
    if as_json:
        typer.echo(
            json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()})
        )
        return
    typer.echo(evaluation_table(summary))


def evaluation_table(summary: dict) -> str:
    """The summary of :func:`lowlabel.engine.runs.evaluate_run` as a small table with units."""

    def cell(key: str, digits: int) -> str:
        value, sd = summary.get(key), summary.get(f"{key}_sd")
        if value is None:
            return "-"
        text = f"{value:.{digits}f}"
        return text + (f" ± {sd:.{digits}f}" if sd is not None and n > 1 else "")

    n = summary.get("n", 0)
    lines = [
        f"{n} subject(s), mean ± SD" if n > 1 else f"{n} subject(s)",
        f"{'tissue':<8}{'Dice':>16}{'HD95 (mm)':>18}{'volume error (mL)':>20}",
    ]
    for tissue in ("csf", "gm", "wm"):
        lines.append(
            f"{tissue.upper():<8}{cell(f'dice_{tissue}', 3):>16}"
            f"{cell(f'hd95_{tissue}', 2):>18}{cell(f'avd_{tissue}_ml', 2):>20}"
        )
    lines.append(f"{'mean':<8}{cell('mean_dice', 3):>16}{cell('hd95_mean', 2):>18}")
    return "\n".join(lines)


@data_app.command("check", short_help="Validate and summarise a dataset.")
def data_check(
    dataset: Annotated[
        Path, typer.Argument(help="dataset.json or folder with images/ and labels/.")
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Validate a dataset and summarise it: subjects, shapes, spacings, labels, problems."""
    from lowlabel.data.datasets import check_dataset

    cfg = _load(config, set_)
    report = check_dataset(dataset, cfg.data.label_map)
    subjects = report["subjects"]
    typer.echo(
        f"{report['source']}: {len(subjects)} labelled subjects readable, "
        f"{report['unlabelled']} unlabelled images"
    )
    if subjects:
        shapes = sorted({tuple(s["shape"]) for s in subjects})
        spacings = sorted({tuple(s["spacing"]) for s in subjects})
        counts = [sum(s["label_counts"][i] for s in subjects) for i in range(4)]
        total = max(sum(counts), 1)
        typer.echo(
            f"  shapes: {', '.join('x'.join(map(str, s)) for s in shapes[:6])}"
            + (" ..." if len(shapes) > 6 else "")
        )
        typer.echo(f"  spacings (mm): {', '.join('x'.join(map(str, s)) for s in spacings[:6])}")
        typer.echo(
            "  labels: "
            + ", ".join(
                f"{n} {100 * c / total:.1f}%"
                for n, c in zip(("bg", "CSF", "GM", "WM"), counts, strict=True)
            )
        )
    for problem in report["problems"]:
        typer.echo(f"  problem: {problem}")
    if report["problems"]:
        # the one error line names the first offending file; the others are listed above
        raise LowlabelError(
            f"{len(report['problems'])} problem(s) in {dataset}, the first: {report['problems'][0]}"
        )


@data_app.command("demo", short_help="Write the synthetic demo cohort.")
def data_demo(
    outdir: Annotated[Path, typer.Argument(help="Folder to write the demo cohort into.")],
    subjects: Annotated[int, typer.Option(help="Number of synthetic subjects.")] = 16,
    spacing: Annotated[float, typer.Option(help="Voxel size in mm.")] = 2.0,
) -> None:
    """Write the synthetic demo cohort (made from nilearn's MNI152 template) as a dataset.json."""
    from lowlabel.data.demo import make_demo

    if subjects < 3:
        raise LowlabelError("--subjects: at least 3 are needed for train, validation and test")
    if outdir.exists() and any(outdir.iterdir()):
        raise LowlabelError(f"{outdir}: folder exists and is not empty; choose a new folder")
    index = make_demo(outdir, subjects, spacing)
    typer.echo(f"wrote {subjects} synthetic subjects: {index}")


@app.command(name="config", short_help="Show the resolved config; --list: all keys.")
def config_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    list_keys: Annotated[
        bool,
        typer.Option("--list", help="List every key with its type, default and meaning."),
    ] = False,
) -> None:
    """Print the resolved config (defaults, --config file, --set overrides) as YAML, or with
    --list every key that --config and --set accept."""
    import textwrap

    from lowlabel.config import describe_keys, dump_yaml

    if list_keys:
        for row in describe_keys():
            typer.echo(f"{row['key']} ({row['type']}; default {row['default']})")
            if row["meaning"]:
                typer.echo(
                    textwrap.fill(
                        row["meaning"], 96, initial_indent="    ", subsequent_indent="    "
                    )
                )
        return
    typer.echo(dump_yaml(_load(config, set_)), nl=False)


# --- pretraining commands ---


@app.command(short_help="Pretrain a UNet on scans, no labels needed.")
def pretrain(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: DataOpt = None,
    out: RunsOpt = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue an interrupted run (or reuse a finished one)."),
    ] = False,
    unlabelled: Annotated[
        list[Path] | None,
        typer.Option(
            "--unlabelled",
            help="More scans for the pool: a dataset.json, a folder of NIfTI files or one "
            "NIfTI file (repeatable; added to pretrain.unlabelled).",
        ),
    ] = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Pretrain a UNet on the training pool's images (labels ignored) and the unlabelled scans.

    The method is pretrain.method (autoencoder or genesis); checkpoints for transfer are kept at
    pretrain.save_steps and the last step. Use one with: lowlabel train --init-from RUN_FOLDER.
    Scans from --unlabelled (or pretrain.unlabelled) join the pool, except any image of the
    run's validation or test subjects; pool.json lists the images used and those left out.
    """
    _must_exist(data, NO_DATASET)
    for source in unlabelled or []:
        _must_exist(source, NO_SOURCE)
    extra: dict = {}
    if device is not None:
        extra["train.device"] = device
    if data is not None:
        extra["data.dataset"] = data
    if out is not None:
        extra["out"] = str(out)
    cfg = _load(config, set_, extra)
    if unlabelled:
        sources = [*cfg.pretrain.unlabelled, *map(str, unlabelled)]
        cfg = cfg.replace(**{"pretrain.unlabelled": sources})
    _say_if_demo(cfg)
    with _interruptible():
        from lowlabel.engine.pretrain import pretrain as run_pretrain

        result = run_pretrain(cfg, resume=resume, progress=not quiet)
    on = f" on {result.images} images" if result.images else ""
    typer.echo(
        f"run {result.run_dir}: {result.steps} steps{on}, train loss {result.train_loss:.4f}, "
        f"val MSE {result.val_mse:.4f}, val MAE {result.val_mae:.4f}"
    )
    if result.dropped:
        typer.echo(
            f"  left out {result.dropped} image(s) of the unlabelled sources: validation or "
            "test subjects of this run (see pool.json)"
        )
    for step, path in result.checkpoints.items():
        typer.echo(f"  checkpoint {step}: {path}")
    if result.figure:
        typer.echo(f"  reconstructions: {result.figure}")


# --- study and report commands ---


@app.command(name="study", short_help="Run a grid of runs, write its report.")
def study_cmd(
    study: Annotated[
        str,
        typer.Argument(
            help="A built-in study name (see 'lowlabel study list'), a study YAML file, or 'list'."
        ),
    ],
    data: Annotated[
        str | None,
        typer.Option(
            "--data", help="dataset.json or folder for every run (default: the demo cohort)."
        ),
    ] = None,
    profile: Annotated[
        str,
        typer.Option(
            "--profile",
            "-p",
            help="quick (demo, minutes), cpu (a dataset in 2D at 2 mm, 5 seeds: about 2.5 h "
            "on 2 idle cores) or paper (original scale, GPU).",
        ),
    ] = "quick",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Study folder (default: studies/<name>-<profile>)."),
    ] = None,
    backend: Annotated[
        str, typer.Option("--backend", help="local (worker processes) or ray.")
    ] = "local",
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster address (with --backend ray).")
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs", "-j", help="Runs at once (0: one per core); each gets cores // jobs threads."
        ),
    ] = 0,
    mlflow: Annotated[
        str | None,
        typer.Option(
            "--mlflow", help="Log every run to this MLflow URI, e.g. sqlite:///mlflow.db."
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="auto (the visible GPUs when there are any, else CPU processes), cpu, cuda "
            "(refuse to start without a GPU) or cuda:N (that GPU only).",
        ),
    ] = None,
    runs_per_gpu: Annotated[
        int,
        typer.Option("--runs-per-gpu", help="Runs sharing one GPU at a time (when memory allows)."),
    ] = 1,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Run a study (a grid of runs and the tables that compare them), then write its report.

    Finished runs are skipped and interrupted ones resume, so rerunning finishes only what is
    missing. 'lowlabel study list' shows the built-in studies.
    """
    if study == "list":
        from lowlabel.study.spec import builtin_studies, load_study

        for name, path in builtin_studies().items():
            spec = load_study(path)
            typer.echo(
                f"{name}: {len(spec.tables)} tables ({', '.join(spec.tables)}); "
                f"profiles {', '.join(spec.profiles)}; {path}"
            )
        return
    _must_exist(data, NO_DATASET)
    from lowlabel.config import parse_set

    overrides = parse_set(set_)
    with _interruptible("interrupted; rerun the same study command to continue"):
        from lowlabel.study.runner import run_study

        result = run_study(
            study,
            profile=profile,
            data=data,
            study_dir=out,
            backend=backend,
            address=address,
            jobs=jobs,
            mlflow_uri=mlflow,
            overrides=overrides,
            device=device,
            runs_per_gpu=runs_per_gpu,
            progress=not quiet,
        )
    typer.echo(
        f"study {result.study_dir}: {result.runs} runs ({result.ran} ran, "
        f"{result.skipped} already finished) in {result.seconds:.0f} s; "
        f"report: {result.report}"
    )


@app.command(short_help="Rebuild a study's report, no training.")
def report(
    study_dir: Annotated[Path, typer.Argument(help="A study folder written by 'lowlabel study'.")],
    no_overlays: Annotated[
        bool,
        typer.Option("--no-overlays", help="Skip the figure of test-slice segmentations."),
    ] = False,
) -> None:
    """Rebuild a study's report (report.md, report.html, runs.csv) without training."""
    from lowlabel.study.report import build_report

    path = build_report(study_dir, overlays_on=not no_overlays)
    typer.echo(f"report: {path} and {path.with_suffix('.md')}")


# --- export and segment commands ---


@app.command(short_help="Turn a finished run (or several: an ensemble) into a model bundle.")
def export(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN_DIR",
            help="A finished run folder; several make an ensemble (probabilities averaged).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder for the model bundle.")],
    allow_unfinished: Annotated[
        bool,
        typer.Option(
            "--allow-unfinished",
            help="Export the best weights so far of a run that has not finished.",
        ),
    ] = False,
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="lowlabel (for 'lowlabel segment') or monai-bundle (MONAI Bundle specification).",
        ),
    ] = "lowlabel",
    weights_license: Annotated[
        str | None,
        typer.Option(
            "--weights-license",
            help="monai-bundle: the weights' licence, an SPDX id (e.g. CC-BY-4.0) or a file.",
        ),
    ] = None,
) -> None:
    """Turn a finished run into a self-contained model bundle (safetensors weights, config,
    provenance), or into a MONAI bundle with --format monai-bundle. Several runs preprocessed
    alike (e.g. a study cell's seeds) make one ensemble bundle whose class probabilities are
    averaged; segment and bids use it like a single model."""
    if format_ not in ("lowlabel", "monai-bundle"):
        raise LowlabelError(f"--format: '{format_}' is not one of lowlabel, monai-bundle")
    for run_dir in run_dirs:
        _must_exist(run_dir, "run folder not found; give a folder that 'lowlabel train' wrote")
    if format_ == "monai-bundle":
        if len(run_dirs) > 1:
            raise LowlabelError(
                "--format monai-bundle: exports one run, not an ensemble of "
                f"{len(run_dirs)}; give one RUN_DIR, or drop --format for a lowlabel bundle"
            )
        from lowlabel.monai_bundle import export_monai

        path = export_monai(run_dirs[0], out, weights_license, allow_unfinished=allow_unfinished)
        typer.echo(f"wrote MONAI bundle {path}")
        return
    from lowlabel.bundle import export as export_bundle

    runs = run_dirs[0] if len(run_dirs) == 1 else run_dirs
    typer.echo(f"wrote model bundle {export_bundle(runs, out, allow_unfinished)}")


@app.command(short_help="Segment scans; volumes in volumes.csv.")
def segment(
    model_dir: Annotated[Path, typer.Argument(help="A model bundle made by 'lowlabel export'.")],
    inputs: Annotated[list[Path], typer.Argument(help="NIfTI scans or folders of them.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for label maps, volumes.csv.")],
    probabilities: Annotated[
        bool, typer.Option("--probabilities", help="Also write one probability map per tissue.")
    ] = False,
    skull_strip: SkullStripOpt = "auto",
    no_qc: Annotated[
        bool, typer.Option("--no-qc", help="Skip the QC snapshots and qc.html.")
    ] = False,
    device: DeviceOpt = None,
    tta: TtaOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Segment scans into CSF, GM and WM on each scan's own grid; tissue volumes in volumes.csv,
    QC snapshots and warnings in qc.html.

    An existing volumes.csv in the output folder keeps its rows; a scan segmented again gets its
    row replaced. Tissue predicted outside the brain (see --skull-strip) is cleared; each scan's
    qc/<scan>.json records how much under outside_brain.
    """
    _must_exist(model_dir, "model folder not found; give the folder 'lowlabel export' wrote")
    import os

    # idle OpenMP threads sleep instead of spinning (read when torch loads): on a shared CPU,
    # spinning threads took half of a segmentation's time
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from lowlabel.segment import segment as segment_scans

    result = segment_scans(
        model_dir,
        inputs,
        out,
        probabilities=probabilities,
        progress=not quiet,
        skull_strip=skull_strip,
        qc=not no_qc,
        device=device or "auto",
        tta=tta,
    )
    if result.rows:
        typer.echo(
            f"segmented {len(result.rows)} scan(s) into {out}; volumes in {result.volumes_csv}"
        )
    for line in result.errors:
        typer.echo(f"error: {line}", err=True)
    if result.errors:
        sys.exit(EXIT_USAGE)  # after the good scans are written; typer.Exit would be swallowed


@app.command(short_help="BIDS App: T1w scans to BIDS derivatives, volumes, QC.")
def bids(
    bids_dir: Annotated[Path, typer.Argument(help="The BIDS dataset (its root folder).")],
    output_dir: Annotated[Path, typer.Argument(help="Folder for the BIDS derivatives.")],
    analysis_level: Annotated[str, typer.Argument(help="participant or group.")],
    model: Annotated[
        Path | None,
        typer.Option("--model", help="A model bundle (participant level)."),
    ] = None,
    participant_label: Annotated[
        list[str] | None,
        typer.Option("--participant-label", help="Only these participants, e.g. 01 02."),
    ] = None,
    session_label: Annotated[
        list[str] | None,
        typer.Option("--session-label", help="Only these sessions, e.g. pre post."),
    ] = None,
    probabilities: Annotated[
        bool, typer.Option("--probabilities", help="Also write _probseg maps per tissue.")
    ] = False,
    skull_strip: SkullStripOpt = "auto",
    device: DeviceOpt = None,
    tta: TtaOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """BIDS App: segment T1w scans into derivatives (participant), then tabulate volumes (group).

    lowlabel bids BIDS_DIR OUTPUT_DIR participant --model MODEL_DIR; then
    lowlabel bids BIDS_DIR OUTPUT_DIR group. Both write qc.html.
    """
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from lowlabel import bids as bids_app

    if analysis_level == "group":
        result = bids_app.group(bids_dir, output_dir)
        typer.echo(f"volumes of all scans in {result.volumes_tsv}; QC page {result.qc_html}")
        return
    if analysis_level != "participant":
        raise LowlabelError(
            f"analysis level '{analysis_level}': give participant or group (BIDS-Apps convention)"
        )
    if model is None:
        raise LowlabelError("--model: the participant level needs a model bundle folder")
    result = bids_app.participant(
        bids_dir,
        output_dir,
        model,
        participants=participant_label,
        sessions=session_label,
        probabilities=probabilities,
        skull_strip=skull_strip,
        progress=not quiet,
        device=device or "auto",
        tta=tta,
    )
    for line in result.skipped:
        typer.echo(f"skipped: {line}", err=True)
    if result.done:
        typer.echo(
            f"segmented {len(result.done)} scan(s) into {output_dir}; QC page {result.qc_html}"
        )
    for line in result.errors:
        typer.echo(f"error: {line}", err=True)
    if result.errors:
        sys.exit(EXIT_USAGE)


_WRITE_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EISDIR,
}


_BIDS_LISTS = ("--participant-label", "--session-label")


def bids_argv(argv: list[str]) -> list[str]:
    """BIDS Apps give several labels after one flag (``--participant-label 01 02``); typer takes a
    repeated flag, so ``lowlabel bids`` spreads them out. Labels end at the next option or at an
    analysis level.

    Args:
        argv: the command line without the program name.
    """
    if not argv or argv[0] != "bids":
        return argv
    out: list[str] = []
    flag = None
    for token in argv:
        if token in _BIDS_LISTS:
            flag = token
            continue
        if flag and not token.startswith("-") and token not in ("participant", "group"):
            out += [flag, token]
            continue
        flag = None
        out.append(token)
    return out


def _click_exception(name: str) -> tuple[type, ...]:
    """The exception class ``name`` of whichever click the installed typer uses.

    typer 0.29 carries its own copy (``typer._click``), older ones use the click package; both
    are looked up among the modules already imported, so neither is imported for this.
    """
    found = []
    for module in ("typer.exceptions", "typer._click.exceptions", "click.exceptions"):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def _usage_line(err: Exception, args: list[str]) -> str:
    """One line for a command-line usage error, keeping click's suggestion ("Did you mean")."""
    message = " ".join(err.format_message().split())
    if "unexpected extra argument" in message:
        # the one usage error with a likely cause: '--set key value' instead of '--set key=value'
        for i, arg in enumerate(args[:-1]):
            value = args[i + 1]
            if arg in ("--set", "-s") and "=" not in value and not value.startswith("-"):
                example = f"{value}={args[i + 2]}" if i + 2 < len(args) else f"{value}=VALUE"
                message = f"--set {value}: write key=value without spaces, e.g. --set {example}"
                break
    ctx = getattr(err, "ctx", None)
    if ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return f"error: {message}"


def main(args: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 2; Ctrl-C exits 130
    with a line that says how to continue."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = bids_argv(sys.argv[1:] if args is None else list(args))
    try:
        code = app(args=args, prog_name=PROG, standalone_mode=False)
    except Interrupted as stop:
        typer.echo(str(stop), err=True)
        sys.exit(EXIT_INTERRUPTED)
    except LowlabelError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        typer.echo(RESUME_HINT, err=True)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as err:
        # an output that cannot be written (a file in the way, read-only, disk full), met
        # outside the atomic writers: still one line that names the path
        if err.errno not in _WRITE_ERRNOS or not err.filename:
            raise
        from lowlabel.atomic import _write_error

        typer.echo(f"error: {_write_error(Path(err.filename), err)}", err=True)
        sys.exit(EXIT_USAGE)
    except Exception as err:
        if isinstance(err, _click_exception("NoArgsIsHelpError")):
            # nothing to do: the help, as a usage error (click's convention)
            typer.echo(err.format_message(), err=True)
            sys.exit(EXIT_USAGE)
        if isinstance(err, _click_exception("UsageError")):
            typer.echo(_usage_line(err, args), err=True)
            sys.exit(EXIT_USAGE)
        if isinstance(err, _click_exception("ClickException")):
            typer.echo(f"error: {' '.join(err.format_message().split())}", err=True)
            sys.exit(err.exit_code)
        if isinstance(err, _click_exception("Exit")):
            sys.exit(err.exit_code)
        if isinstance(err, _click_exception("Abort")):
            typer.echo("aborted", err=True)
            sys.exit(1)
        user = find_user_error(err)  # a user error wrapped by a library keeps its one line
        if user is None:
            raise
        typer.echo(f"error: {user}", err=True)
        sys.exit(EXIT_USAGE)
    if code == EXIT_INTERRUPTED:  # typer's answer to Ctrl-C outside _interruptible
        typer.echo("interrupted", err=True)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
