"""The shipped default config file is the code's defaults, key for key."""

from pathlib import Path

import lowlabel
from lowlabel.config import RunConfig, load_config


def test_default_yaml_matches_code_defaults():
    path = Path(lowlabel.__file__).parent / "configs" / "default.yaml"
    assert load_config(path) == RunConfig()
