"""Typed, frozen configuration: YAML + ``--set`` overrides, validation that names the key."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lowlabel.config import (
    RunConfig,
    config_hash,
    dump_yaml,
    from_dict,
    load_config,
    parse_set,
    run_dir,
    to_dict,
)
from lowlabel.errors import LowlabelError


def test_defaults_are_frozen_and_round_trip_through_yaml():
    cfg = load_config(None)
    assert cfg == RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 1  # type: ignore[misc]
    again = from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg
    assert isinstance(again.data.patch_size, tuple)


def test_yaml_file_and_set_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "name: mine\ntrain:\n  steps: 7\n  lr: 0.01\ndata:\n  patch_size: [32, 32, 32]\n"
    )
    cfg = load_config(path, parse_set(["train.steps=9", "data.spacing=[2, 2, 2]", "seed=3"]))
    assert cfg.name == "mine"
    assert cfg.train.steps == 9  # --set wins over the file
    assert cfg.train.lr == 0.01
    assert cfg.data.spacing == (2.0, 2.0, 2.0)
    assert cfg.data.patch_size == (32, 32, 32)
    assert cfg.seed == 3
    assert cfg.replace(**{"train.steps": 11}).train.steps == 11
    assert cfg.train.steps == 9  # replace() copies


def test_relative_dataset_resolves_against_the_config_file(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "ds.json").write_text("{}")
    path = tmp_path / "conf" / "c.yaml"
    path.write_text("data:\n  dataset: ds.json\n")
    assert load_config(path).data.dataset == str(tmp_path / "conf" / "ds.json")


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"train.stepz": 3}, "train.stepz"),
        ({"nonsense": 1}, "nonsense"),
        ({"train.steps": "ten"}, "train.steps"),
        ({"train.steps": 1.5}, "train.steps"),
        ({"train.bf16": "yes"}, "train.bf16"),
        ({"data.patch_size": 32}, "data.patch_size"),
        ({"data.patch_size": ["a", 2, 2]}, "data.patch_size[0]"),
        ({"model.norm": "layer"}, "model.norm"),
        ({"data.spatial_dims": 4}, "data.spatial_dims"),
        ({"model.levels": 9}, "model.levels"),
        ({"data.patch_size": [30, 30, 30]}, "data.patch_size"),
        ({"data.patch_size": [32, 32]}, "data.patch_size"),
        ({"data.spacing": [1, 0, 1]}, "data.spacing"),
        ({"train.steps": -1}, "train.steps"),
        ({"train.batch_size": 0}, "train.batch_size"),
        ({"data.budget": -2}, "data.budget"),
        ({"data.label_map": {1: 7}}, "data.label_map"),
        ({"train": 5}, "train"),
    ],
)
def test_bad_keys_and_types_name_the_key(overrides, key):
    with pytest.raises(LowlabelError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert f"'{key}'" in message
    assert "\n" not in message


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(LowlabelError, match="broken.yaml"):
        load_config(path)
    with pytest.raises(LowlabelError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(LowlabelError, match="list.yaml"):
        load_config(tmp_path / "list.yaml")


def test_parse_set_rejects_items_without_equals():
    assert parse_set(["a.b=1", "c=[1, 2]", "d=text", "e="]) == {
        "a.b": 1,
        "c": [1, 2],
        "d": "text",
        "e": None,
    }
    with pytest.raises(LowlabelError, match="train.steps"):
        parse_set(["train.steps"])


def test_run_dir_follows_from_the_config(tmp_path):
    cfg = load_config(None, {"out": str(tmp_path)})
    assert run_dir(cfg) == run_dir(load_config(None, {"out": str(tmp_path)}))
    assert run_dir(cfg).parent == tmp_path
    assert run_dir(cfg).name == f"run-{config_hash(cfg)}"
    # results-relevant keys change the hash, name and out do not
    assert config_hash(cfg.replace(**{"train.lr": 0.5})) != config_hash(cfg)
    assert config_hash(cfg.replace(**{"name": "x", "out": "elsewhere"})) == config_hash(cfg)
    assert to_dict(cfg)["data"]["patch_size"] == [64, 64, 64]
