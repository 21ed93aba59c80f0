"""Device selection and precision: the CPU goes through the code a GPU runs, a missing GPU is one
line, old configs load, the device never renames a run, studies place runs on GPUs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import helpers
import pytest
import torch
from conftest import make_tiny_dataset, tiny_overrides
from helpers import assert_same_run, assert_same_weights, crash_in_validation

from lowlabel import checkpoint
from lowlabel import device as device_mod
from lowlabel.config import config_hash, load_config, run_dir
from lowlabel.device import Placement, resolve_device, resolve_precision
from lowlabel.engine.loop import fit
from lowlabel.engine.runtime import Runtime
from lowlabel.errors import LowlabelError
from lowlabel.study import runner
from lowlabel.study.runner import (
    Slot,
    check_paper_profile,
    choose_gpus,
    on_device,
    plan_slots,
    ray_plan,
    visible_gpus,
)

STEPS = {"train.steps": 6, "train.val_every": 2, "train.patience": 0}
NO_CUDA = not torch.cuda.is_available()
needs_no_cuda = pytest.mark.skipif(not NO_CUDA, reason="checks the behaviour without a GPU")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("data"), n=5, shape=(24, 24, 24))


def _cfg(dataset: Path, out: Path, **extra):
    return load_config(None, tiny_overrides(dataset, out, **{**STEPS, **extra}))


def _cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """:func:`helpers.cli` with stdout and stderr together."""
    code, out, err = helpers.cli(list(args), monkeypatch, capsys)
    return code, out + err


# --- resolving names -----------------------------------------------------------------------------


def test_cpu_and_auto_resolve_to_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


@pytest.mark.parametrize("name", ["gpu", "cuda:", "CUDA", "cuda:x", ""])
def test_bad_device_names_are_refused_with_the_key(name):
    with pytest.raises(LowlabelError, match="train.device"):
        resolve_device(name)
    with pytest.raises(LowlabelError, match="train.device"):
        load_config(None, {"train.device": name})


@needs_no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_one_line(name):
    with pytest.raises(LowlabelError, match=f"train.device '{name}': no CUDA device here"):
        Placement.of(name)


@needs_no_cuda
@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_cli_cuda_without_a_gpu_exits_2_and_writes_nothing(
    command, dataset, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "runs"
    code, text = _cli(
        monkeypatch, capsys, command, "--data", dataset, "--out", out, "--device", "cuda", "-q"
    )
    assert code == 2
    assert text.count("\n") == 1 and text.startswith("error: ") and "Traceback" not in text
    assert "no CUDA device here" in text and "cpu or auto" in text
    assert not out.exists()  # refused before any folder is made
    # the same through the config key
    code, text = _cli(
        monkeypatch, capsys, command, "--data", dataset, "-o", out, "--set", "train.device=cuda:1"
    )
    assert code == 2 and text.startswith("error: train.device 'cuda:1'") and not out.exists()


@needs_no_cuda
def test_cli_segment_and_evaluate_with_cuda_without_a_gpu_exit_2(tmp_path, monkeypatch, capsys):
    code, text = _cli(
        monkeypatch, capsys, "segment", tmp_path, tmp_path, "-o", tmp_path / "o", "--device", "cuda"
    )
    assert code == 2 and text.startswith("error: --device 'cuda': no CUDA device here")
    assert text.count("\n") == 1 and not (tmp_path / "o").exists()
    code, text = _cli(monkeypatch, capsys, "evaluate", tmp_path, "--device", "cuda:0")
    assert code == 2 and text.startswith("error: --device 'cuda:0': no CUDA device here")


# --- config: old keys, run folders ---------------------------------------------------------------


def test_old_bf16_configs_load_with_a_message(tmp_path, caplog):
    from lowlabel import config as config_mod

    config_mod._NOTED.clear()
    path = tmp_path / "old.yaml"
    path.write_text("train:\n  bf16: true\n  steps: 10\n")
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path)
    assert cfg.train.precision == "bf16" and cfg.train.steps == 10
    assert "'train.bf16' is now 'train.precision'" in caplog.text
    path.write_text("train:\n  bf16: false\n")
    assert load_config(path).train.precision == "auto"  # the old default: still fp32 on a CPU
    # the override of old scripts still works; a contradiction is refused
    assert load_config(None, {"train.bf16": True}).train.precision == "bf16"
    with pytest.raises(LowlabelError, match="'train.bf16: true' and 'train.precision: fp16'"):
        load_config(None, {"train.bf16": True, "train.precision": "fp16"})
    with pytest.raises(LowlabelError, match="train.bf16"):
        load_config(None, {"train.bf16": "yes"})


def test_run_folders_keep_their_names():
    # the hashes of the version before train.precision existed: old runs are found and resumed
    # (with the defaults of that time, 16 channels and the poly schedule, set explicitly)
    old = {"model.channels": 16, "train.schedule": "poly"}
    assert config_hash(load_config(None, old)) == "a337aef2"
    assert config_hash(load_config(None, {**old, "train.bf16": True})) == "83d46813"
    assert config_hash(load_config(None, {**old, "train.precision": "bf16"})) == "83d46813"
    assert config_hash(load_config(None, {**old, "model.levels": 3})) == "e05ebbd8"
    # fp16 and an explicit fp32 change numerics everywhere: runs of their own
    assert config_hash(load_config(None, {**old, "train.precision": "fp16"})) != "a337aef2"
    assert config_hash(load_config(None, {**old, "train.precision": "fp32"})) != "a337aef2"
    # new defaults are new runs
    assert config_hash(load_config(None, {})) != "a337aef2"


def test_pretraining_folders_survive_a_change_of_the_schedule_default():
    """A pretraining run ignores train.schedule, so the change of its default (poly to
    constant) must not rename pretraining folders made before it: these are their names."""
    pretrain = {"model.channels": 16, "pretrain.method": "autoencoder", "model.levels": 6}
    assert config_hash(load_config(None, {"model.channels": 16}), "pretrain") == "a337aef2"
    assert config_hash(load_config(None, pretrain), "pretrain") == "10e0cb0b"
    for schedule in ("poly", "constant"):
        cfg = load_config(None, {**pretrain, "train.schedule": schedule})
        assert config_hash(cfg, "pretrain") == "10e0cb0b"


@pytest.mark.parametrize(
    "extra",
    [{"train.device": "cpu"}, {"train.device": "cuda:1"}, {"train.deterministic": True}],
)
def test_execution_keys_do_not_change_the_run_folder(extra, tmp_path):
    base = load_config(None, {"out": str(tmp_path)})
    assert run_dir(base.replace(**extra)) == run_dir(base)


# --- the CPU runs the device path ----------------------------------------------------------------


def test_explicit_cpu_goes_through_the_device_path(dataset, tmp_path, monkeypatch):
    """Every batch reaches the network through Placement.to, under Placement.autocast, stepped by
    the scaler: the calls a GPU run makes, with the same numbers as ``auto`` on this machine."""
    calls = {"to": 0, "autocast": 0, "scaler": 0}
    real_to, real_autocast, real_scaler = Placement.to, Placement.autocast, Placement.scaler

    def to(self, batch):
        calls["to"] += 1
        assert self.device == torch.device("cpu")
        return real_to(self, batch)

    def autocast(self):
        calls["autocast"] += 1
        return real_autocast(self)

    def scaler(self):
        calls["scaler"] += 1
        return real_scaler(self)

    with monkeypatch.context() as m:
        m.setattr(Placement, "to", to)
        m.setattr(Placement, "autocast", autocast)
        m.setattr(Placement, "scaler", scaler)
        cpu = fit(_cfg(dataset, tmp_path / "a", **{"train.device": "cpu"}), progress=False)
    assert calls["scaler"] == 1
    assert calls["to"] >= STEPS["train.steps"]  # each batch, and each validation volume
    assert calls["autocast"] >= STEPS["train.steps"]
    if NO_CUDA:
        auto = fit(_cfg(dataset, tmp_path / "b"), progress=False)
        assert Path(auto.run_dir).name == Path(cpu.run_dir).name
        assert_same_run(Path(cpu.run_dir), Path(auto.run_dir))  # to the bit
    record = json.loads((Path(cpu.run_dir) / "provenance.json").read_text())["device"]
    assert record["device"] == "cpu" and record["precision"] == "fp32"
    assert record["device_name"] and "cuda_runtime" in record


def test_fp16_scaler_state_is_checkpointed_and_resumed(dataset, tmp_path, monkeypatch):
    """fp16 with its gradient scaler (on the CPU here, on a GPU the same code): a run killed
    after its first validation resumes with the scaler's state and ends as the uninterrupted."""
    extra = {"train.device": "cpu", "train.precision": "fp16", "train.val_every": 2}
    whole = fit(_cfg(dataset, tmp_path / "whole", **extra), progress=False)
    meta = checkpoint.read_meta(Path(whole.run_dir) / "last.safetensors")["state"]
    assert meta["scaler"]["scale"] > 0 and "_growth_tracker" in meta["scaler"]
    cfg = _cfg(dataset, tmp_path / "crash", **extra)
    crash_in_validation(cfg, monkeypatch)
    saved = checkpoint.read_meta(run_dir(cfg) / "last.safetensors")["state"]["scaler"]
    assert saved["scale"] > 0 and "_growth_tracker" in saved
    seen = {}
    real = torch.amp.GradScaler.load_state_dict

    def spy(self, state):
        seen.update(state)
        return real(self, state)

    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", spy)
    fit(cfg, resume=True, progress=False)
    assert seen == saved
    assert_same_run(Path(whole.run_dir), run_dir(cfg))


def test_the_model_is_placed_before_a_resumed_state_is_loaded(dataset, tmp_path, monkeypatch):
    """torch loads optimizer state onto its parameters' device at load time: the model must be
    on the run's device first, or a run resumed on a GPU would step CPU state with GPU weights."""
    cfg = _cfg(dataset, tmp_path, **{"train.device": "cpu"})
    crash_in_validation(cfg, monkeypatch)
    order = []
    real_place, real_restore = Runtime.place, checkpoint.restore_state

    def place(self, model):
        order.append("place")
        return real_place(self, model)

    def restore(*args, **kwargs):
        order.append("restore")
        return real_restore(*args, **kwargs)

    monkeypatch.setattr(Runtime, "place", place)
    monkeypatch.setattr(checkpoint, "restore_state", restore)
    done = fit(cfg, resume=True, progress=False)
    assert order[:2] == ["place", "restore"] and done.steps == STEPS["train.steps"]


def test_bf16_autocast_on_the_cpu_changes_the_forward_dtype():
    net = torch.nn.Conv3d(1, 2, 3)
    x = torch.randn(1, 1, 8, 8, 8)
    with Placement(torch.device("cpu"), "bf16").autocast():
        assert net(x).dtype == torch.bfloat16
    with Placement(torch.device("cpu"), "fp32").autocast():
        assert net(x).dtype == torch.float32
    assert not Placement(torch.device("cpu"), "bf16").scaler().is_enabled()
    assert Placement(torch.device("cpu"), "fp16").scaler().is_enabled()


def test_batches_move_as_nested_structures():
    place = Placement(torch.device("cpu"))
    a, b = torch.zeros(2), torch.ones(3)
    moved = place.to((a, [b], {"k": a}, 7))
    assert moved[0] is a and moved[1][0] is b and moved[2]["k"] is a and moved[3] == 7
    assert not place.pin_memory


def test_deterministic_setup_sets_the_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        device_mod.deterministic_setup(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        device_mod.deterministic_setup(False)
    assert not torch.are_deterministic_algorithms_enabled()


# --- studies -------------------------------------------------------------------------------------


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpus(0) == []
    assert visible_gpus(2) == ["0", "1"]
    assert visible_gpus(2, "3,5") == ["3", "5"]
    assert visible_gpus(0, "") == []


def test_choose_gpus():
    assert choose_gpus("auto", ["0", "1"]) == ["0", "1"]
    assert choose_gpus("auto", []) == []
    assert choose_gpus("cpu", ["0", "1"]) == []
    assert choose_gpus("cuda", ["0", "1"]) == ["0", "1"]
    assert choose_gpus("cuda:1", ["4", "7"]) == ["7"]
    with pytest.raises(LowlabelError, match="--device cuda: no GPU is visible"):
        choose_gpus("cuda", [])
    with pytest.raises(LowlabelError, match="only 2 GPU"):
        choose_gpus("cuda:2", ["0", "1"])


def test_runs_are_placed_on_gpus_or_cpu_processes():
    # no GPU: CPU processes, one per core by default, the cores shared as threads
    assert plan_slots([], 1, 0, 16) == [Slot(None, 16, 1)]
    assert plan_slots([], 1, 4, 16) == [Slot(None, 4, 4)]
    # GPUs: runs_per_gpu processes per GPU, each seeing its own GPU as cuda
    slots = plan_slots(["0", "1"], 3, 0, 16)
    assert slots == [Slot("0", 3, 2), Slot("1", 3, 2)]
    assert [s.device for s in slots] == ["cuda", "cuda"] and Slot(None, 1, 1).device == "cpu"
    with pytest.raises(LowlabelError, match="--runs-per-gpu"):
        plan_slots(["0"], 0, 0, 16)


def test_ray_asks_for_gpu_shares_when_the_cluster_has_gpus():
    plan = ray_plan({"CPU": 32, "GPU": 4}, 0, 2, "auto")
    assert (plan.jobs, plan.num_cpus, plan.num_gpus, plan.device) == (8, 4, 0.5, "cuda")
    plan = ray_plan({"CPU": 32, "GPU": 4}, 0, 1, "cpu")
    assert (plan.jobs, plan.num_cpus, plan.num_gpus, plan.device) == (32, 1, 0.0, "cpu")
    plan = ray_plan({"CPU": 8}, 2, 1, "auto")
    assert (plan.jobs, plan.num_cpus, plan.num_gpus) == (2, 4, 0.0)
    with pytest.raises(LowlabelError, match="no GPUs"):
        ray_plan({"CPU": 8}, 0, 1, "cuda")


def test_a_run_placed_on_a_device_keeps_its_folder(tmp_path):
    from lowlabel.config import from_dict, to_dict

    cfg = load_config(None, {"out": str(tmp_path)})
    moved = from_dict(on_device(to_dict(cfg), "cuda"))
    assert moved.train.device == "cuda" and run_dir(moved) == run_dir(cfg)


def test_paper_profile_needs_a_gpu_unless_the_cpu_is_asked_for():
    with pytest.raises(LowlabelError, match="--profile paper: .* needs a GPU .* --device cpu"):
        check_paper_profile("paper", "auto", 0)
    check_paper_profile("paper", "cpu", 0)
    check_paper_profile("paper", "auto", 1)
    check_paper_profile("cpu", "auto", 0)


@needs_no_cuda
def test_cli_paper_study_on_a_cpu_exits_2_before_writing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    code, text = _cli(monkeypatch, capsys, "study", "seed", "--profile", "paper", "-o", out)
    assert code == 2 and text.startswith("error: --profile paper:") and text.count("\n") == 1
    assert not out.exists()
    code, text = _cli(monkeypatch, capsys, "study", "seed", "-o", out, "--device", "cuda")
    assert code == 2 and "--device cuda: no GPU is visible" in text and not out.exists()


def test_local_backend_sends_runs_to_the_freest_slot(monkeypatch):
    """Two GPU slots of two workers: runs alternate between them and carry device cuda."""
    submitted = []

    class FakePool:
        def __init__(self, max_workers, mp_context, initializer, initargs):
            self.gpu = initargs[0]

        def submit(self, fn, kind, config, threads):
            import concurrent.futures as cf

            submitted.append((self.gpu, config["train"]["device"]))
            return cf.Future()

        def shutdown(self, wait=True, cancel_futures=False):
            pass

    monkeypatch.setattr(runner.cf, "ProcessPoolExecutor", FakePool)
    backend = runner.LocalBackend([Slot("0", 2, 1), Slot("1", 2, 1)])
    futures = [backend.submit("train", {"train": {"device": "auto"}}) for _ in range(4)]
    assert submitted == [("0", "cuda"), ("1", "cuda"), ("0", "cuda"), ("1", "cuda")]
    futures[2].set_result({})  # a run on GPU 0 ends: the next one goes there
    backend.submit("train", {"train": {"device": "auto"}})
    assert submitted[-1] == ("0", "cuda")
    assert backend.busy == [2, 2]
    backend.close()


def test_worker_start_shows_one_gpu(monkeypatch):
    import os
    import signal

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    handlers = {n: signal.getsignal(n) for n in (signal.SIGINT, runner.STOP_SIGNAL)}
    try:
        runner._start_worker("2")
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # a worker ignores Ctrl-C
    finally:
        for n, handler in handlers.items():
            signal.signal(n, handler)


# --- runs moving between devices (needs a GPU) ---------------------------------------------------


@pytest.mark.cuda
def test_a_few_training_steps_on_the_gpu(dataset, tmp_path):
    result = fit(_cfg(dataset, tmp_path, **{"train.device": "cuda"}), progress=False)
    record = json.loads((Path(result.run_dir) / "provenance.json").read_text())["device"]
    assert record["device"].startswith("cuda") and record["device_name"]
    assert record["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert record["cuda_runtime"] and record["peak_device_mb"] > 0
    assert result.steps == STEPS["train.steps"] and 0 <= result.best_val_dice <= 1


@pytest.mark.cuda
def test_resume_on_the_gpu_and_across_devices(dataset, tmp_path, monkeypatch):
    extra = {"train.device": "cuda", "train.deterministic": True, "train.precision": "fp32"}
    whole = fit(_cfg(dataset, tmp_path / "whole", **extra), progress=False)
    cfg = _cfg(dataset, tmp_path / "crash", **extra)
    crash_in_validation(cfg, monkeypatch)
    fit(cfg, resume=True, progress=False)
    assert_same_run(Path(whole.run_dir), run_dir(cfg))
    # started on the CPU, continued on the GPU: same folder, finishes, optimizer state moved
    moved = _cfg(dataset, tmp_path / "moved", **{**extra, "train.device": "cpu"})
    crash_in_validation(moved, monkeypatch)
    done = fit(moved.replace(**{"train.device": "cuda"}), resume=True, progress=False)
    assert Path(done.run_dir) == run_dir(moved) and done.steps == STEPS["train.steps"]


@pytest.mark.cuda
def test_fp16_scaler_resumes_on_the_gpu(dataset, tmp_path, monkeypatch):
    extra = {"train.device": "cuda", "train.precision": "fp16", "train.deterministic": True}
    whole = fit(_cfg(dataset, tmp_path / "whole", **extra), progress=False)
    cfg = _cfg(dataset, tmp_path / "crash", **extra)
    crash_in_validation(cfg, monkeypatch)
    assert checkpoint.read_meta(run_dir(cfg) / "last.safetensors")["state"]["scaler"]["scale"] > 0
    fit(cfg, resume=True, progress=False)
    assert_same_weights(Path(whole.run_dir) / "last.safetensors", run_dir(cfg) / "last.safetensors")


@pytest.mark.cuda
def test_models_segment_on_either_device(dataset, tmp_path):
    """A CPU-trained model segments on the GPU and a GPU-trained one on the CPU; the label maps
    agree with the other device's on almost every voxel (TF32 convolutions round differently)."""
    import nibabel as nib
    import numpy as np

    from lowlabel.bundle import export
    from lowlabel.segment import segment

    scans = sorted((dataset.parent / "images").glob("*.nii.gz"))[:2]
    for trained_on in ("cpu", "cuda"):
        # fp32 both ways: bf16 would flip the argmax where a briefly trained net hesitates
        extra = {"train.device": trained_on, "train.precision": "fp32"}
        run = fit(_cfg(dataset, tmp_path / trained_on, **extra), progress=False)
        bundle = export(run.run_dir, tmp_path / f"bundle-{trained_on}")
        outs = {}
        for dev in ("cpu", "cuda"):
            res = segment(bundle, scans, tmp_path / f"seg-{trained_on}-{dev}", device=dev)
            assert not res.errors and len(res.rows) == 2
            outs[dev] = [
                np.asarray(nib.load(str(res.out_dir / f"{p.name[:-7]}_seg.nii.gz")).dataobj)
                for p in scans
            ]
        for a, b in zip(outs["cpu"], outs["cuda"], strict=True):
            assert (a == b).mean() > 0.98
