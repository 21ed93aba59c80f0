"""``transfer.scope: all`` takes the source's network and resolution unless the user set them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_dataset, tiny_overrides
from helpers import cli

from lowlabel.config import RunConfig, load_config, run_dir
from lowlabel.errors import LowlabelError

# what the source was trained with, none of it the default
SOURCE = {
    "model.levels": 3,
    "model.channels": 4,
    "model.num_res_units": 1,
    "data.spacing": [2.0, 2.0, 2.0],
    "data.patch_size": [16, 16, 16],
}
# how long the adapting run is: none of these keys comes from the source
SHORT = {
    "data.n_test": 1,
    "data.n_val": 1,
    "data.budget": 1,
    "train.steps": 2,
    "train.val_every": 1,
    "train.batch_size": 1,
    "train.threads": 1,
    "train.device": "cpu",
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> dict:
    """A bundle trained at 2 mm with a 3-level, 4-channel residual UNet, and a second site."""
    from lowlabel.bundle import export
    from lowlabel.engine.loop import fit

    root = tmp_path_factory.mktemp("inherit")
    first = make_tiny_dataset(root / "site_a", shape=(40, 40, 40))
    second = make_tiny_dataset(root / "site_b", n=4, shape=(40, 40, 40), seed=40)
    values = tiny_overrides(first, root / "runs", **SOURCE, **{"train.steps": 2})
    result = fit(load_config(None, values), progress=False)
    assert RunConfig().model.levels != 3 and RunConfig().data.spacing != (2.0, 2.0, 2.0)
    return {"bundle": export(result.run_dir, root / "model"), "site_b": second}


def _sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={yaml.safe_dump(v).strip()}")]


def _adapt_args(bundle: dict, out: Path, *more: str) -> list:
    args = ["train", "--data", bundle["site_b"], "--out", out, "--init-from", bundle["bundle"]]
    return [*args, "--scope", "all", "-q", *_sets(SHORT), *more]


def test_a_bundle_is_adapted_with_only_init_from_and_scope_all(
    bundle, tmp_path, monkeypatch, capsys
):
    code, out, err = cli(_adapt_args(bundle, tmp_path / "runs"), monkeypatch, capsys)
    assert code == 0, err
    run = Path(out.split()[1].rstrip(":"))
    said = [line for line in err.splitlines() if line.startswith("from the source")]
    assert len(said) == 1
    for shown in (
        "model.levels=3",
        "model.channels=4",
        "model.num_res_units=1",
        "data.spacing=[2.0, 2.0, 2.0]",
        "data.patch_size=[16, 16, 16]",
    ):
        assert shown in said[0]
    assert "model.name" not in said[0]  # the source's agrees with the default: nothing taken

    # config.yaml holds the resolved values, and the folder's name follows from them
    saved = load_config(run / "config.yaml")
    assert saved.model.levels == 3 and saved.model.channels == 4
    assert saved.model.num_res_units == 1
    assert saved.data.spacing == (2.0, 2.0, 2.0) and saved.data.patch_size == (16, 16, 16)
    assert run == run_dir(saved)
    report = yaml.safe_load((run / "transfer.json").read_text())
    assert report["scope"] == "all" and report["n_loaded"] == report["of"]


def test_an_explicit_setting_wins_and_a_different_network_is_one_line(
    bundle, tmp_path, monkeypatch, capsys
):
    args = _adapt_args(bundle, tmp_path / "runs", "--set", "model.channels=8")
    code, out, err = cli(args, monkeypatch, capsys)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert err.startswith("error: ")
    assert "model.channels is 4 in the source, 8 in this run" in err
    assert "leave model.* unset to take the source's" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

    # a key set in a config file is explicit too
    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({"model": {"levels": 4}}))
    args = _adapt_args(bundle, tmp_path / "runs", "--config", config)
    code, out, err = cli(args, monkeypatch, capsys)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert "model.levels is 3 in the source, 4 in this run" in err


def test_explicit_keys_are_kept_the_rest_comes_from_the_source(bundle, tmp_path):
    from lowlabel.models.transfer import inherit

    values = tiny_overrides(bundle["site_b"], tmp_path, **SHORT)
    values = {k: v for k, v in values.items() if k not in SOURCE}
    values.update({"transfer.init_from": str(bundle["bundle"]), "transfer.mode": "finetune"})
    values.update({"transfer.scope": "all", "data.spacing": [1.5, 1.5, 1.5]})
    cfg = load_config(None, values, check=False)
    done, taken = inherit(cfg, set(values))
    assert done.data.spacing == (1.5, 1.5, 1.5)  # given: it wins
    assert done.model.levels == 3 and done.data.patch_size == (16, 16, 16)
    assert taken == ["model.levels", "model.channels", "model.num_res_units", "data.patch_size"]

    # a file given as the config counts as explicit too, key by key
    from lowlabel.config import given_keys

    assert given_keys({"model": {"levels": 4}, "data.spacing": [1, 1, 1]}) == {
        "model.levels",
        "data.spacing",
    }

    # an explicit patch for 2D without spatial_dims: the source's spatial_dims (3) is taken,
    # so the patch no longer fits; the config error names the key
    flat = {**values, "data.patch_size": [16, 16]}
    with pytest.raises(LowlabelError, match="data.patch_size"):
        inherit(load_config(None, flat, check=False), set(flat))


@pytest.mark.parametrize("scope", ["encoder", "scratch"])
def test_scope_encoder_or_scratch_inherits_nothing(bundle, tmp_path, scope):
    from lowlabel.models.transfer import inherit

    values = tiny_overrides(bundle["site_b"], tmp_path, **SHORT)
    values = {k: v for k, v in values.items() if k not in SOURCE}
    if scope == "encoder":
        values["transfer.init_from"] = str(bundle["bundle"])
        values.update({"transfer.mode": "finetune", "transfer.scope": "encoder"})
    else:  # scope all, but no source to take anything from
        values.update({"transfer.mode": "scratch", "transfer.scope": "all"})
    cfg = load_config(None, values)
    done, taken = inherit(cfg, set(values))
    assert done == cfg and taken == []
    assert run_dir(done) == run_dir(cfg) and done.model == RunConfig().model


def test_the_cli_config_of_scope_encoder_is_unchanged(bundle, monkeypatch, capsys, tmp_path):
    from lowlabel.cli import _load_train

    extra = {
        "data.dataset": str(bundle["site_b"]),
        "transfer.init_from": str(bundle["bundle"]),
        "transfer.mode": "finetune",
        "transfer.scope": "encoder",
    }
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": {"steps": 3}}))
    cfg = _load_train(config, ["model.channels=8"], extra)
    assert cfg == load_config(config, {"model.channels": 8, **extra})
    assert capsys.readouterr().err == ""


def test_a_study_cell_takes_the_source_settings_before_its_folder_is_named(bundle, tmp_path):
    from lowlabel.study import spec

    base = {
        **SHORT,
        "data.dataset": str(bundle["site_b"]),
        "transfer.init_from": str(bundle["bundle"]),
        "transfer.mode": "finetune",
    }
    study = {
        "name": "adapt",
        "base": base,
        "seeds": [0],
        "axes": {
            "scope": {"all": {"transfer.scope": "all"}, "enc": {"transfer.scope": "encoder"}},
            "spacing": {"src": {}, "fine": {"data.spacing": [1.5, 1.5, 1.5]}},
        },
        "tables": {"t": {"axes": ["scope", "spacing"]}},
    }
    path = tmp_path / "adapt.yaml"
    path.write_text(yaml.safe_dump(study))
    cells = spec.expand(spec.load_study(path), "quick", None, tmp_path / "st")
    by = {(c.labels["t"]["scope"], c.labels["t"]["spacing"]): c for c in cells}
    src = by[("all", "src")].cfg
    assert src.model.levels == 3 and src.model.channels == 4 and src.model.num_res_units == 1
    assert src.data.spacing == (2.0, 2.0, 2.0) and src.data.patch_size == (16, 16, 16)
    assert by[("all", "src")].run_dir == run_dir(src)
    assert by[("all", "src")].run_dir.name.startswith("seg-L3R1")
    assert by[("all", "fine")].cfg.data.spacing == (1.5, 1.5, 1.5)  # the axis sets it
    assert by[("all", "fine")].cfg.model.levels == 3
    enc = by[("enc", "src")].cfg
    assert enc.model == RunConfig().model and enc.data.spacing == RunConfig().data.spacing
