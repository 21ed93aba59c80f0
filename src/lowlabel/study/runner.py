"""Run a study's cells: locally in worker processes, or on a Ray cluster.

Pretraining cells run first; a transfer cell starts as soon as its pretraining run has finished
and its ``transfer.init_from`` is known. A cell whose folder holds ``result.json`` is skipped; one
that was interrupted resumes from its last checkpoint (``fit(cfg, resume=True)``). Every result
lands in ``<study_dir>/runs``, whichever backend ran it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lowlabel.atomic import read_jsonl, write_json, write_text
from lowlabel.config import from_dict, run_dir, to_dict
from lowlabel.errors import LowlabelError, find_user_error
from lowlabel.run_folder import CONFIG, EVALUATION_CSV, METRICS, RESULT
from lowlabel.study.spec import Cell, Study, check, expand, load_study, plan_json, resolve

log = logging.getLogger(__name__)


@dataclass
class StudyResult:
    """What :func:`run_study` did."""

    study_dir: str
    runs: int
    ran: int
    skipped: int
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    report: str | None = None


def default_jobs(threads_per_job: int = 1) -> int:
    """Parallel runs for this machine: one per core by default (2 x 1 thread beats 1 x 2)."""
    return max(1, (os.cpu_count() or 1) // max(1, threads_per_job))


def cell_steps(cell: Cell) -> int:
    """The most steps a cell can run (a training run may stop early)."""
    return max(1, cell.cfg.pretrain.steps if cell.kind == "pretrain" else cell.cfg.train.steps)


def estimate_left(
    done: list[tuple[str, int, float]], todo: list[tuple[str, int]], jobs: int
) -> float | None:
    """Seconds left for the runs still to do, from the runs finished so far.

    Each kind (train, pretrain) has its seconds per step, measured as the runs ran on this
    machine (so with the other jobs of the study beside them); a kind with no finished run takes
    the rate of all finished runs. The work is spread over ``jobs`` workers but cannot take less
    than its longest run. Training runs that stop early make this an upper bound.

    Args:
        done: ``(kind, steps, seconds)`` of finished runs.
        todo: ``(kind, steps)`` of the runs still to do.
        jobs: runs at once.

    Returns:
        Seconds, or None when no run has finished yet (nothing to estimate from).
    """
    if not todo:
        return 0.0
    done = [d for d in done if d[1] > 0 and d[2] > 0]
    if not done:
        return None
    overall = sum(d[2] for d in done) / sum(d[1] for d in done)
    rate = {}
    for kind in {d[0] for d in done}:
        mine = [d for d in done if d[0] == kind]
        rate[kind] = sum(d[2] for d in mine) / sum(d[1] for d in mine)
    each = [steps * rate.get(kind, overall) for kind, steps in todo]
    return max(sum(each) / max(1, jobs), max(each))


def duration(seconds: float | None) -> str:
    """``4 min 10 s``, ``1 h 05 min``, or ``unknown``."""
    if seconds is None:
        return "unknown until the first run finishes"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _run_seconds(result: dict) -> float:
    """How long a finished run took, from its result (an earlier session's run)."""
    if "seconds" in result:
        return float(result["seconds"])
    return float(result.get("train_seconds", 0.0)) + float(result.get("prep_seconds", 0.0))


# ---------------------------------------------------------------------------------------------
# which device each run gets (pure functions, testable without a GPU)


@dataclass(frozen=True)
class Slot:
    """Worker processes that share one placement.

    Attributes:
        gpu: the GPU its workers see (a ``CUDA_VISIBLE_DEVICES`` value: each process sees this
            one GPU as ``cuda``), or None for CPU processes.
        workers: runs in it at a time.
        threads: torch threads per worker.
    """

    gpu: str | None
    workers: int
    threads: int

    @property
    def device(self) -> str:
        return "cpu" if self.gpu is None else "cuda"


def visible_gpus(count: int, env: str | None = None) -> list[str]:
    """The ids of the ``count`` GPUs this process sees, as ``CUDA_VISIBLE_DEVICES`` names them
    (``env`` is its value here, None when unset)."""
    if env is None:
        return [str(i) for i in range(count)]
    return [g.strip() for g in env.split(",") if g.strip()][:count]


def choose_gpus(device: str, gpus: list[str]) -> list[str]:
    """The GPUs a study's ``--device`` asks for among the visible ``gpus``.

    Raises:
        LowlabelError: ``cuda`` or ``cuda:N`` without such a GPU.
    """
    if device == "cpu":
        return []
    if device == "auto":
        return gpus
    if not gpus:
        raise LowlabelError(f"--device {device}: no GPU is visible here; use --device cpu or auto")
    index = int(device.split(":", 1)[1]) if ":" in device else None
    if index is None:
        return gpus
    if index >= len(gpus):
        raise LowlabelError(
            f"--device {device}: only {len(gpus)} GPU(s) visible (cuda:0..cuda:{len(gpus) - 1})"
        )
    return [gpus[index]]


def plan_slots(gpus: list[str], runs_per_gpu: int, jobs: int, cores: int) -> list[Slot]:
    """Worker slots: ``runs_per_gpu`` processes per GPU, or ``jobs`` CPU processes (0: one per
    core) without one; the cores are shared out as torch threads."""
    if runs_per_gpu < 1:
        raise LowlabelError(f"--runs-per-gpu {runs_per_gpu}: must be >= 1")
    cores = max(1, cores)
    if not gpus:
        jobs = jobs or cores
        return [Slot(None, jobs, max(1, cores // jobs))]
    threads = max(1, cores // (len(gpus) * runs_per_gpu))
    return [Slot(gpu, runs_per_gpu, threads) for gpu in gpus]


def check_paper_profile(profile: str, device: str, gpus: int) -> None:
    """The ``paper`` profile needs a GPU unless the CPU is asked for by name.

    Raises:
        LowlabelError: ``paper`` with no GPU and ``device`` not ``cpu``.
    """
    if profile == "paper" and gpus == 0 and device != "cpu":
        raise LowlabelError(
            "--profile paper: the original study's scale (96^3 patches, batch 16, 5000 steps "
            "a run) needs a GPU and none is visible; pass --device cpu to run it on the CPU "
            "anyway (weeks on a few cores), or use --profile cpu"
        )


@dataclass(frozen=True)
class RayPlan:
    """What each Ray task asks for: ``num_cpus`` and ``num_gpus`` (fractional: runs share a
    GPU), and how many run at once."""

    jobs: int
    num_cpus: int
    num_gpus: float
    gpus: int

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus else "cpu"


def ray_plan(cluster: dict, jobs: int, runs_per_gpu: int, device: str) -> RayPlan:
    """Resources per run on a Ray cluster with ``cluster`` resources (``ray.cluster_resources()``).

    Raises:
        LowlabelError: ``--device cuda`` on a cluster without GPUs.
    """
    if runs_per_gpu < 1:
        raise LowlabelError(f"--runs-per-gpu {runs_per_gpu}: must be >= 1")
    cpus = max(1, int(cluster.get("CPU", 1)))
    gpus = int(cluster.get("GPU", 0)) if device != "cpu" else 0
    if device.startswith("cuda") and not gpus:
        raise LowlabelError(f"--device {device}: the Ray cluster has no GPUs; use cpu or auto")
    if gpus:
        jobs = jobs or gpus * runs_per_gpu
        return RayPlan(jobs, max(1, cpus // jobs), 1.0 / runs_per_gpu, gpus)
    # size the runs by the cluster, not by this machine: a task asking for more CPUs than the
    # cluster has would wait forever
    jobs = jobs or cpus
    return RayPlan(jobs, max(1, cpus // jobs), 0.0, 0)


def on_device(config: dict, device: str) -> dict:
    """``config`` with ``train.device`` set (an execution key: the run's folder is the same)."""
    return {**config, "train": {**config["train"], "device": device}}


# ---------------------------------------------------------------------------------------------
# what a worker does


# How the study stops a local worker's run: not SIGINT, which the workers ignore so that the
# processes they spawn (data-loader workers, importing torch for seconds) inherit the ignoring and
# a terminal's Ctrl-C, which reaches the whole process group, kills none of them mid-import
STOP_SIGNAL = getattr(signal, "SIGUSR1", signal.SIGTERM)  # Windows: no SIGUSR1, a plain stop
WORKER_LOG = "workers.log"  # in the study folder: the local workers' standard error


def _start_worker(gpu: str | None, log_path: str | None = None) -> None:
    """Initialise a local worker process: deaf to Ctrl-C (see STOP_SIGNAL), seeing only ``gpu``
    (set before CUDA starts) as ``cuda`` when there is one, and writing its standard error (and
    that of the loader processes it starts) to ``log_path``.

    The study reports each run's outcome itself (and a failed run's traceback in its
    ``error.txt``); what a worker's libraries print goes to the log, so a stopped worker's last
    words (a C++ runtime's "terminate called without an active exception" as its threads are torn
    down) never reach the user's terminal between the study's own lines.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(STOP_SIGNAL, signal.SIG_IGN)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if log_path is not None:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 2)
        os.close(fd)


def _stop_once(signum, frame) -> None:
    """STOP_SIGNAL handler while a run executes: one KeyboardInterrupt, so that the run stops
    at once and its cleanup (closing its data loader) still finishes."""
    signal.signal(STOP_SIGNAL, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_handled(handler, *signums: int) -> Iterator[None]:
    """Handle these signals with ``handler`` for the duration (in the main thread; elsewhere
    they cannot be set), then restore what was there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {n: signal.signal(n, handler) for n in signums}
    try:
        yield
    finally:
        for n, old in previous.items():
            signal.signal(n, old)


def _signals_ignored(*signums: int) -> contextlib.AbstractContextManager[None]:
    """Ignore these signals for the duration.

    A process spawned meanwhile starts ignoring them too: Python installs its KeyboardInterrupt
    handler only over SIGINT's default action.
    """
    return _signals_handled(signal.SIG_IGN, *signums)


def _interrupt(signum, frame) -> None:
    """SIGTERM (``kill PID``, a batch scheduler's notice) taken as Ctrl-C while a study runs: its
    workers are stopped and each run stays resumable, instead of running on without a parent."""
    raise KeyboardInterrupt


def _local_run_cell(kind: str, config: dict, threads: int) -> dict:
    """:func:`run_cell` in a local worker; STOP_SIGNAL interrupts the run (and only the run)."""
    signal.signal(STOP_SIGNAL, _stop_once)
    try:
        return run_cell(kind, config, threads)
    finally:
        signal.signal(STOP_SIGNAL, signal.SIG_IGN)


def run_cell(kind: str, config: dict, threads: int = 0) -> dict:
    """Execute one cell in this process; the result as a plain dict (also in ``result.json``).

    A finished run returns its saved result; an interrupted one resumes. ``threads`` (chosen by
    the runner: cores // jobs) replaces ``train.threads``, an execution key that never renames a
    run folder.
    """
    cfg = from_dict(config)
    if threads:
        cfg = cfg.replace(**{"train.threads": threads})
    if kind == "pretrain":
        from lowlabel.engine.pretrain import pretrain

        result = pretrain(cfg, resume=True, progress=False)
    else:
        from lowlabel.engine.loop import fit

        result = fit(cfg, resume=True, progress=False)
    return dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)


def _ray_run_cell(kind: str, config: dict, threads: int) -> dict:
    try:
        return run_cell(kind, config, threads)
    except Exception as err:  # Ray would wrap a user error in its own type; keep the line
        user = find_user_error(err)
        if user is not None:
            raise LowlabelError(str(user)) from None
        raise


# ---------------------------------------------------------------------------------------------
# backends: each turns (kind, config) into a concurrent.futures.Future


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""The thread pools a worker's libraries size from the environment when they load."""


@contextlib.contextmanager
def worker_env(threads: int) -> Iterator[None]:
    """The environment a worker starts with: every thread pool sized to its ``threads``.

    ``torch.set_num_threads`` pins only torch's own pool, and only in the process that calls it.
    Without these variables the OpenMP and BLAS runtimes that load with torch and numpy size
    their pools to every core, in the worker and again in each of its data-loader processes, and
    their idle threads spin on the cores that the other runs need. Ray sets
    ``OMP_NUM_THREADS`` in its workers for the same reason. A value the user set is kept.
    """
    previous = {k: os.environ.get(k) for k in THREAD_ENV}
    for key in THREAD_ENV:
        os.environ.setdefault(key, str(threads))
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class LocalBackend:
    """Worker processes on this machine: one pool per :class:`Slot` (per GPU, or one of CPU
    processes); a run goes to the slot with the most free workers. Each worker has its slot's
    torch threads and its other thread pools sized to match (:func:`worker_env`)."""

    def __init__(self, slots: list[Slot], log_path: Path | None = None) -> None:
        import multiprocessing as mp

        self.slots = slots
        log = None if log_path is None else str(log_path)
        self.jobs = sum(s.workers for s in slots)
        # spawn, not fork: forking a parent that loaded torch can deadlock OpenMP in the child
        self.pools = [
            cf.ProcessPoolExecutor(
                max_workers=slot.workers,
                mp_context=mp.get_context("spawn"),
                initializer=_start_worker,
                initargs=(slot.gpu, log),
            )
            for slot in slots
        ]
        self.busy = [0] * len(slots)
        self.lock = threading.Lock()

    def submit(self, kind: str, config: dict) -> cf.Future:
        with self.lock:
            i = max(range(len(self.slots)), key=lambda j: self.slots[j].workers - self.busy[j])
            self.busy[i] += 1
        slot = self.slots[i]
        fut = self.call(_local_run_cell, kind, on_device(config, slot.device), slot.threads, slot=i)
        fut.add_done_callback(lambda _f: self._release(i))
        return fut

    def call(self, fn, *args, slot: int = 0) -> cf.Future:
        """``fn(*args)`` in a worker of pool ``slot``."""
        # workers are spawned on demand, inside submit: one spawned now starts deaf to Ctrl-C
        # (and to STOP_SIGNAL until it runs a cell), even while it still imports torch, and
        # with its thread pools sized
        with _signals_ignored(signal.SIGINT, STOP_SIGNAL), worker_env(self.slots[slot].threads):
            return self.pools[slot].submit(fn, *args)

    def _release(self, i: int) -> None:
        with self.lock:
            self.busy[i] -= 1

    def close(self, cancel: bool = False) -> None:
        if not cancel:
            for pool in self.pools:
                pool.shutdown(wait=True)
            return
        # stop the runs in progress (each resumes from its last checkpoint), drop the waiting
        # ones; the workers then exit and the pools close cleanly
        workers = [p for pool in self.pools for p in (pool._processes or {}).values()]
        for pool in self.pools:
            pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers:
            with contextlib.suppress(OSError):
                os.kill(proc.pid, STOP_SIGNAL)
        for proc in workers:
            proc.join(timeout=60)
            if proc.is_alive():  # stuck: stop it the hard way
                proc.terminate()


def _send_ray_token() -> None:
    """Authenticate to a cluster at an explicit address when a Ray token is at hand.

    Ray 2.5x turns token authentication on for 'ray start --head' when ``~/.ray/auth_token``
    exists, but its client sends the token to an explicit address only with
    ``RAY_AUTH_MODE=token``: without it, 20 s of InvalidAuthToken, then a connection error.
    Ray does the same for the address it finds by itself (``auto``); a cluster without
    authentication accepts a client that sends a token. An explicit ``RAY_AUTH_MODE`` wins.
    """
    try:
        from ray._private.authentication import authentication_token_setup as setup
    except ImportError:  # a Ray without token authentication
        return
    quiet = logging.getLogger(setup.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its warning speaks to one starting a cluster, not a client
    try:
        setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except Exception as err:  # a private Ray function: never worse than not calling it
        log.debug("Ray token detection failed: %s", err)
    finally:
        quiet.setLevel(level)


class RayBackend:
    """Ray tasks on a cluster (``address``) or on a local Ray; one CPU slot per thread, and a
    share of a GPU per run when the cluster has GPUs (Ray shows each task its GPU)."""

    def __init__(
        self, jobs: int, address: str | None, runs_per_gpu: int = 1, device: str = "auto"
    ) -> None:
        try:
            import ray
        except ImportError:
            raise LowlabelError("--backend ray needs Ray: pip install 'lowlabel[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            if address:
                _send_ray_token()
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except ConnectionError as err:
                raise LowlabelError(
                    f"--address {address}: cannot reach a Ray cluster ({err}); start one with "
                    "'ray start --head' or drop --address (a cluster with token authentication "
                    "also needs its token here: ~/.ray/auth_token or RAY_AUTH_TOKEN)"
                ) from None
        self.plan = ray_plan(ray.cluster_resources(), jobs, runs_per_gpu, device)
        self.jobs, self.threads, self.gpus = self.plan.jobs, self.plan.num_cpus, self.plan.gpus
        self.task = ray.remote(num_cpus=self.plan.num_cpus, num_gpus=self.plan.num_gpus)(
            _ray_run_cell
        )

    def submit(self, kind: str, config: dict) -> cf.Future:
        config = on_device(config, self.plan.device)
        return self.task.remote(kind, config, self.threads).future()

    def close(self, cancel: bool = False) -> None:
        pass  # a cluster (or a Ray the caller started) outlives the study


# ---------------------------------------------------------------------------------------------
# the study


def prepare(
    study: Study | str | Path,
    profile: str = "quick",
    data: str | None = None,
    study_dir: str | Path | None = None,
    seeds: list[int] | None = None,
    overrides: dict | None = None,
) -> tuple[Study, Path, list[Cell]]:
    """Load, expand and check a study; write its plan. Nothing runs yet.

    Raises:
        LowlabelError: anything in the study that cannot run (before any run starts).
    """
    if not isinstance(study, Study):
        study = load_study(study)
    # absolute, so that Ray workers (whose working folder differs) write into the same place
    study_dir = Path(study_dir or Path("studies") / f"{study.name}-{profile}").resolve()
    if data is not None and Path(data).exists():
        data = str(Path(data).resolve())
    cells = expand(study, profile, data, study_dir, seeds, overrides)
    if any(c.kind == "pretrain" for c in cells):
        try:
            import lowlabel.engine.pretrain  # noqa: F401
        except ImportError:
            raise LowlabelError(
                f"{study.path}: the study has pretraining runs but this "
                "installation has no lowlabel.engine.pretrain"
            ) from None
    check(cells)
    _make_splits(cells)
    write_text(study_dir / "plan.json", plan_json(study, profile, cells))
    write_text(study_dir / "study.yaml", study.path.read_text())
    return study, study_dir, cells


def _make_splits(cells: list[Cell]) -> None:
    """Write every split file the runs will read before any of them starts, so parallel runs
    never race to create the same file (and an impossible budget fails now)."""
    from lowlabel.data.cohort import resolve_dataset, resolve_splits  # loads torch and MONAI

    seen = set()
    datasets: dict = {}
    for cell in cells:
        d = cell.cfg.data
        key = (
            d.dataset,
            d.demo_subjects,
            d.demo_spacing,
            d.split_seed,
            d.n_test,
            d.n_val,
            d.budget,
            d.draw,
            cell.cfg.out,
        )
        if key in seen:
            continue
        seen.add(key)
        src = (d.dataset, d.demo_subjects, d.demo_spacing)
        if src not in datasets:
            datasets[src] = resolve_dataset(cell.cfg)
        resolve_splits(cell.cfg, datasets[src])


def run_study(
    study: Study | str | Path,
    profile: str = "quick",
    data: str | None = None,
    study_dir: str | Path | None = None,
    backend: str = "local",
    address: str | None = None,
    jobs: int = 0,
    mlflow_uri: str | None = None,
    seeds: list[int] | None = None,
    overrides: dict | None = None,
    progress: bool = True,
    report: bool = True,
    device: str | None = None,
    runs_per_gpu: int = 1,
) -> StudyResult:
    """Expand, check and run a study, then write its report.

    Args:
        study: a :class:`Study`, a built-in name or a path.
        profile: ``quick``, ``cpu`` or ``paper``.
        data: dataset for every run (default: the study's, i.e. the demo cohort).
        study_dir: the study folder (default ``studies/<name>-<profile>``).
        backend: ``local`` (worker processes) or ``ray``.
        address: Ray cluster address (default: a running or new local Ray).
        jobs: runs at once (0: one per core); each gets ``cores // jobs`` torch threads.
        mlflow_uri: log every run to this MLflow tracking URI.
        seeds: override the profile's seeds.
        overrides: dotted config overrides for every run, applied last (``--set``).
        device: ``auto`` (the visible GPUs, else CPU processes), ``cpu``, ``cuda`` or ``cuda:N``
            (that GPU only); default ``train.device`` of ``overrides``, else ``auto``.
        runs_per_gpu: runs sharing one GPU at a time.

    Raises:
        LowlabelError: a bad study (before any run), the ``paper`` profile without a GPU
            unless ``device`` is ``cpu``, or runs that failed (after the others).
    """
    t0 = time.perf_counter()
    if backend not in ("local", "ray"):
        raise LowlabelError(f"--backend '{backend}': choose local or ray")
    from lowlabel.device import check_device_name

    device = check_device_name(
        device or str((overrides or {}).get("train.device") or "auto"), "--device"
    )
    tracker = _mlflow(mlflow_uri) if mlflow_uri else None
    if backend == "local":
        import torch

        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpus = choose_gpus(device, visible_gpus(count, env))
        check_paper_profile(profile, device, len(gpus))
        slots = plan_slots(gpus, runs_per_gpu, jobs, os.cpu_count() or 1)
    else:
        exe = RayBackend(jobs, address, runs_per_gpu, device)
        check_paper_profile(profile, device, exe.gpus)
    study, study_dir, cells = prepare(study, profile, data, study_dir, seeds, overrides)
    if backend == "local":
        exe = LocalBackend(slots, study_dir / WORKER_LOG)
    jobs = min(jobs, exe.jobs) if jobs else exe.jobs
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    ran = skipped = 0
    by_key = {c.key: c for c in cells}
    waiting = list(cells)  # pretraining first, then plain runs, then transfer runs
    bar = tqdm(
        total=len(cells),
        desc=f"study {study.name} ({profile})",
        unit="run",
        disable=not progress,
        dynamic_ncols=True,
    )
    timed: list[tuple[str, int, float]] = []  # (kind, steps, seconds) of finished runs
    started: dict[str, float] = {}
    finished_before = {c.key: r for c in cells if (r := _finished(c)) is not None}
    for cell in cells:
        if cell.key in finished_before:
            timed.append((cell.kind, cell_steps(cell), _run_seconds(finished_before[cell.key])))

    def left(done: set[str]) -> float | None:
        todo = [(c.kind, cell_steps(c)) for c in cells if c.key not in done]
        return estimate_left(timed, todo, jobs)

    headline = (
        f"study {study.name} ({profile}): {len(cells)} runs, {len(finished_before)} done, "
        f"{len(cells) - len(finished_before)} to run, {jobs} at a time; estimated time left "
        f"on this machine: {duration(left(set(finished_before)))}"
    )
    if progress:
        bar.write(headline)
    log.info(headline)

    def ready(cell: Cell) -> Cell | None | bool:
        """The cell to submit (transfer cells resolved), False to wait, None if it cannot run."""
        if not cell.needs:
            return cell
        if cell.pretrain_key in failed:
            return None
        pre = results.get(cell.pretrain_key)
        if pre is None:
            return False
        try:
            state = resolve(cell, pre.get("checkpoints") or {})
        except LowlabelError as err:
            failed[cell.key] = str(err)
            return None
        if by_key[cell.key] is cell:  # first resolution: keep the plan current, so that the
            by_key[cell.key] = state  # report of an interrupted study finds this run
            write_text(
                study_dir / "plan.json", plan_json(study, profile, [by_key[c.key] for c in cells])
            )
        return state

    running: dict[cf.Future, Cell] = {}
    term = contextlib.ExitStack()
    term.enter_context(_signals_handled(_interrupt, signal.SIGTERM))
    try:
        while waiting or running:
            # pretraining first, then transfer runs whose checkpoint is ready, then the rest
            for cell in sorted(waiting, key=lambda c: (c.kind != "pretrain", c.needs is None)):
                if len(running) >= jobs:
                    break
                state = ready(cell)
                if state is False:
                    continue
                waiting.remove(cell)
                if state is None:
                    failed.setdefault(cell.key, f"its pretraining run {cell.pretrain_key} failed")
                    bar.update(1)
                    continue
                by_key[cell.key] = state
                done = _finished(state)
                if done is not None:
                    results[cell.key] = done
                    skipped += 1
                    bar.update(1)
                    continue
                started[cell.key] = time.perf_counter()
                running[exe.submit(state.kind, to_dict(state.cfg))] = state
            if not running:
                if waiting and not any(ready(c) is not False for c in waiting):
                    raise RuntimeError("study scheduler stalled")  # cannot happen: deps run first
                continue
            finished, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                cell = running.pop(fut)
                try:
                    results[cell.key] = fut.result()
                    ran += 1
                    seconds = time.perf_counter() - started.pop(cell.key, time.perf_counter())
                    timed.append((cell.kind, cell_steps(cell), seconds))
                except Exception as err:  # one bad run must not sink the others
                    user = find_user_error(err)
                    failed[cell.key] = str(user) if user else f"{type(err).__name__}: {err}"
                    _record_error(cell, err)
                bar.set_postfix_str(f"left ~{duration(left(set(results) | set(failed)))}")
                bar.update(1)
                if tracker and cell.key in results:
                    try:
                        tracker(cell, results[cell.key])
                    except Exception as err:  # tracking is a side channel; the run is done
                        log.warning("MLflow logging failed for %s: %s", cell.key, err)
    except KeyboardInterrupt:
        # a second Ctrl-C (or SIGTERM) must not cut short the closing of the workers
        with _signals_ignored(signal.SIGINT, signal.SIGTERM):
            exe.close(cancel=True)
        raise
    else:
        exe.close()
    finally:
        term.close()
        bar.close()
        final = [by_key[c.key] for c in cells]
        write_text(study_dir / "plan.json", plan_json(study, profile, final))
    out = StudyResult(
        study_dir=str(study_dir),
        runs=len(cells),
        ran=ran,
        skipped=skipped,
        failed=failed,
        seconds=round(time.perf_counter() - t0, 1),
    )
    if report:
        from lowlabel.study.report import build_report

        out.report = str(build_report(study_dir))
    write_json(study_dir / "study_result.json", dataclasses.asdict(out))
    if failed:
        key, why = next(iter(failed.items()))
        raise LowlabelError(
            f"{len(failed)} of {len(cells)} runs failed (first: {key}: {why}); "
            f"fix the cause and rerun to finish only what is missing"
        )
    return out


def _finished(cell: Cell) -> dict | None:
    path = run_dir(cell.cfg, cell.kind) / RESULT
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _record_error(cell: Cell, err: BaseException) -> None:
    folder = cell.run_dir
    if folder is None:
        return
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    try:
        write_text(folder / "error.txt", text)
    except LowlabelError:
        log.warning("could not write %s/error.txt", folder)


# ---------------------------------------------------------------------------------------------
# MLflow


def _mlflow(uri: str):
    """A function logging one finished run to MLflow at ``uri``.

    Raises:
        LowlabelError: MLflow is not installed or the URI is one it refuses.
    """
    try:
        import mlflow
    except ImportError:
        raise LowlabelError("--mlflow needs MLflow: pip install 'lowlabel[mlflow]'") from None
    if not uri.startswith(("sqlite:", "http:", "https:", "postgresql", "mysql", "databricks")):
        raise LowlabelError(
            f"--mlflow {uri}: give a database or server URI such as "
            "sqlite:///mlflow.db (plain folders are refused by current MLflow)"
        )
    mlflow.set_tracking_uri(uri)

    def log_run(cell: Cell, result: dict) -> None:
        folder = Path(result.get("run_dir") or run_dir(cell.cfg, cell.kind))
        mlflow.set_experiment(Path(cell.cfg.out).parent.name)
        with mlflow.start_run(run_name=folder.name):
            mlflow.log_params(_flat(to_dict(cell.cfg)))
            mlflow.set_tags(
                {"kind": cell.kind, "seed": cell.seed, "tables": ",".join(sorted(cell.labels))}
            )
            for row in read_jsonl(folder / METRICS):
                step = int(row.pop("step", 0))
                mlflow.log_metrics(
                    {
                        k: float(v)
                        for k, v in row.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)
                    },
                    step=step,
                )
            test = result.get("test") or {}
            mlflow.log_metrics(
                {
                    f"test_{k}" if not k.startswith("test") else k: float(v)
                    for k, v in test.items()
                    if isinstance(v, (int, float))
                }
            )
            for name in (
                CONFIG,
                RESULT,
                METRICS,
                EVALUATION_CSV,
                "reconstructions.png",
            ):
                if (folder / name).exists():
                    mlflow.log_artifact(str(folder / name))

    return log_run


def _flat(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "label_map":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
