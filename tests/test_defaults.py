"""The shipped default config file is the code's defaults, key for key."""

from pathlib import Path

import yaml

import lowlabel
from lowlabel.config import RunConfig, load_config, to_dict


def test_default_yaml_matches_code_defaults():
    path = Path(lowlabel.__file__).parent / "configs" / "default.yaml"
    # out of date? python scripts/write_default_config.py
    assert yaml.safe_load(path.read_text()) == to_dict(RunConfig())
    assert load_config(path) == RunConfig()
