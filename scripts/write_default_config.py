"""Regenerate src/lowlabel/configs/default.yaml from the config dataclasses' defaults."""

from pathlib import Path

import lowlabel
from lowlabel.config import RunConfig, dump_yaml

HEADER = """\
# Every setting of a lowlabel run, at its default. Copy this file, keep the keys you change,
# and pass it with `lowlabel train --config FILE`; any key can also be set with
# `--set section.key=value`. `lowlabel config --list` explains every key.
# data.dataset: null trains on the synthetic demo cohort.
# Regenerate with: python scripts/write_default_config.py
"""

if __name__ == "__main__":
    path = Path(lowlabel.__file__).parent / "configs" / "default.yaml"
    path.write_text(HEADER + dump_yaml(RunConfig()))
    print(f"wrote {path}")
