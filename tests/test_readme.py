"""The README tells a new user the truth: CI installs exactly what it says, and the commands and
options it names exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(heading: str) -> list[str]:
    section = README.split(f"## {heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_ci_installs_and_tests_exactly_what_the_readme_says():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    install = [line for line in _block_after("Install") if line.startswith("pip ")]
    assert install and all("torch" not in line or "whl/cpu" in line for line in install)
    positions = [ci.index(line) for line in install]  # each line verbatim, in order
    assert positions == sorted(positions)
    assert _block_after("Test") == ["pytest"] and "pytest" in ci[positions[-1] :]


def test_every_command_and_option_the_readme_names_exists():
    import typer.main

    from lowlabel.cli import app

    group = typer.main.get_command(app)
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", README, flags=re.S))
    code = "\n".join(blocks + spans).replace("\\\n", " ")
    used = re.findall(r"lowlabel ((?:data )?[a-z]+)((?: [^\n#]*)?)", code)
    assert len(used) > 15
    for name, rest in used:
        words = name.split()
        command = group.commands[words[0]]
        if len(words) > 1:
            command = command.commands[words[1]]
        known = {opt for param in command.params for opt in param.opts}
        for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest):
            assert option in known | {"--help"}, f"lowlabel {name} {option}"
