"""The ``lowlabel`` command: parse, call one library function, print.

Heavy modules (torch, MONAI) are imported inside the commands so ``lowlabel --help`` is instant.
"""

from __future__ import annotations

import errno
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from lowlabel.errors import EXIT_USAGE, LowlabelError, find_user_error

app = typer.Typer(
    help="Brain-tissue segmentation (CSF, GM, WM) under label budgets: train, pretrain, "
    "transfer, run studies, segment new scans.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect datasets and write the demo cohort.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a config key, e.g. --set train.steps=500 (repeatable)."
    ),
]
DataOpt = Annotated[
    str | None, typer.Option("--data", help="dataset.json or folder (default: the demo cohort).")
]
RunsOpt = Annotated[
    Path | None, typer.Option("--out", "-o", help="Folder for runs (default: runs/).")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
SkullStripOpt = Annotated[
    str,
    typer.Option(
        "--skull-strip",
        help="auto (extract the brain of scans that still have their skull), yes or no.",
    ),
]


def _load(config: Path | None, overrides: list[str] | None, extra: dict | None = None):
    from lowlabel.config import load_config, parse_set

    values = parse_set(overrides)
    values.update(extra or {})
    return load_config(config, values)


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: DataOpt = None,
    out: RunsOpt = None,
    init_from: Annotated[
        Path | None,
        typer.Option("--init-from", help="Pretrained checkpoint or pretraining run folder."),
    ] = None,
    transfer: Annotated[
        str | None, typer.Option("--transfer", help="scratch, frozen, finetune or gradual.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue an interrupted run (or reuse a finished one)."),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a segmentation UNet under a label budget and evaluate it on the test split."""
    extra: dict = {}
    if data is not None:
        extra["data.dataset"] = data
    if out is not None:
        extra["out"] = str(out)
    if init_from is not None:
        extra["transfer.init_from"] = str(init_from)
        extra.setdefault("transfer.mode", "finetune")
    if transfer is not None:
        extra["transfer.mode"] = transfer
    cfg = _load(config, set_, extra)
    from lowlabel.engine.loop import fit

    result = fit(cfg, resume=resume, progress=not quiet)
    _print_result(result)


def _print_result(result) -> None:
    test = result.test
    line = (
        f"run {result.run_dir}: {result.steps} steps (best {result.best_step}), "
        f"val Dice {result.best_val_dice:.3f}"
    )
    if test:
        line += (
            f"; test Dice {test['mean_dice']:.3f} (CSF {test['dice_csf']:.3f}, "
            f"GM {test['dice_gm']:.3f}, WM {test['dice_wm']:.3f})"
        )
    typer.echo(line)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Evaluate on all subjects of this dataset instead of the run's test split.",
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a run's best weights at native resolution (Dice, HD95, volume error)."""
    from lowlabel.engine.runs import evaluate_run

    summary = evaluate_run(run_dir, data, progress=not quiet)
    typer.echo(
        json.dumps(
            {
                k: round(v, 4) if isinstance(v, float) else v
                for k, v in summary.items()
                if not k.endswith("_sd")
            }
        )
    )


@data_app.command("check")
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


@data_app.command("demo")
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


# --- pretraining commands ---


@app.command()
def pretrain(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data: DataOpt = None,
    out: RunsOpt = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue an interrupted run (or reuse a finished one)."),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Pretrain a UNet on the training pool's images (labels ignored) and the unlabelled scans.

    The method is pretrain.method (autoencoder or genesis); checkpoints for transfer are kept at
    pretrain.save_steps and the last step. Use one with: lowlabel train --init-from RUN_FOLDER.
    """
    extra: dict = {}
    if data is not None:
        extra["data.dataset"] = data
    if out is not None:
        extra["out"] = str(out)
    cfg = _load(config, set_, extra)
    from lowlabel.engine.pretrain import pretrain as run_pretrain

    result = run_pretrain(cfg, resume=resume, progress=not quiet)
    typer.echo(
        f"run {result.run_dir}: {result.steps} steps, train loss {result.train_loss:.4f}, "
        f"val MSE {result.val_mse:.4f}, val MAE {result.val_mae:.4f}"
    )
    for step, path in result.checkpoints.items():
        typer.echo(f"  checkpoint {step}: {path}")
    if result.figure:
        typer.echo(f"  reconstructions: {result.figure}")


# --- study and report commands ---


@app.command(name="study")
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
            help="quick (demo, minutes), cpu (an hour on 2 cores) or paper (original scale, GPU).",
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
    from lowlabel.config import parse_set
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
        overrides=parse_set(set_),
        progress=not quiet,
    )
    typer.echo(
        f"study {result.study_dir}: {result.runs} runs ({result.ran} ran, "
        f"{result.skipped} already finished) in {result.seconds:.0f} s; "
        f"report: {result.report}"
    )


@app.command()
def report(
    study_dir: Annotated[Path, typer.Argument(help="A study folder written by 'lowlabel study'.")],
    no_overlays: Annotated[
        bool,
        typer.Option("--no-overlays", help="Skip the segmentation overlays (no model is loaded)."),
    ] = False,
) -> None:
    """Rebuild a study's report (report.md, report.html, runs.csv) without training."""
    from lowlabel.study.report import build_report

    path = build_report(study_dir, overlays_on=not no_overlays)
    typer.echo(f"report: {path} and {path.with_suffix('.md')}")


# --- export and segment commands ---


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="New folder for the model bundle.")],
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
    """Turn a run into a self-contained model bundle (safetensors weights, config, provenance)."""
    if format_ == "monai-bundle":
        from lowlabel.monai_bundle import export_monai

        typer.echo(f"wrote MONAI bundle {export_monai(run_dir, out, weights_license)}")
        return
    if format_ != "lowlabel":
        raise LowlabelError(f"--format: '{format_}' is not one of lowlabel, monai-bundle")
    from lowlabel.bundle import export as export_bundle

    typer.echo(f"wrote model bundle {export_bundle(run_dir, out)}")


@app.command()
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
    quiet: QuietOpt = False,
) -> None:
    """Segment scans into CSF, GM and WM on each scan's own grid; tissue volumes in volumes.csv,
    QC snapshots and warnings in qc.html."""
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
    )
    if result.rows:
        typer.echo(
            f"segmented {len(result.rows)} scan(s) into {out}; volumes in {result.volumes_csv}"
        )
    for line in result.errors:
        typer.echo(f"error: {line}", err=True)
    if result.errors:
        sys.exit(EXIT_USAGE)  # after the good scans are written; typer.Exit would be swallowed


@app.command()
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
    analysis level."""
    if len(argv) < 2 or argv[1] != "bids":
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


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.argv = bids_argv(sys.argv)
    try:
        app(standalone_mode=False)
    except LowlabelError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun with --resume to continue", err=True)
        sys.exit(130)
    except OSError as err:
        # an output that cannot be written (a file in the way, read-only, disk full), met
        # outside the atomic writers: still one line that names the path
        if err.errno not in _WRITE_ERRNOS or not err.filename:
            raise
        from lowlabel.atomic import _write_error

        typer.echo(f"error: {_write_error(Path(err.filename), err)}", err=True)
        sys.exit(EXIT_USAGE)
    except Exception as err:  # a user error wrapped by a library keeps its one line
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Exit):
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort):
            sys.exit(1)
        user = find_user_error(err)
        if user is None:
            raise
        typer.echo(f"error: {user}", err=True)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    main()
