"""The package's shape: imports flow one way, and the loop stays short enough to read at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lowlabel"

# function-local imports that are allowed: heavy or optional packages only, never lowlabel
# modules (a local import of a lowlabel module would only hide a cycle)
LAZY_LOWLABEL_ALLOWED: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lowlabel_imports(tree: ast.AST, name: str) -> list[tuple[str, bool]]:
    """``(imported lowlabel module, at module level?)`` for every import in a module."""
    top = {id(node) for node in tree.body}
    modules = {module_name(p) for p in SRC.rglob("*.py")}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from lowlabel import checkpoint" imports the module lowlabel.checkpoint
            targets = [f"{node.module}.{a.name}" for a in node.names]
            targets = [t if t in modules else node.module for t in targets]
        else:
            continue
        out += [(t, id(node) in top) for t in targets if t.split(".")[0] == "lowlabel"]
    return out


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    graph, lazy = {}, []
    for path in sorted(SRC.rglob("*.py")):
        name = module_name(path)
        edges = graph.setdefault(name, set())
        for target, at_top in lowlabel_imports(ast.parse(path.read_text()), name):
            if target != name and target != "lowlabel":
                edges.add(target)
                if not at_top:
                    lazy.append((name, target))
    return graph, lazy


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_lowlabel_counting_function_local_imports():
    graph, _ = import_graph()
    assert len(graph) > 30
    assert find_cycle(graph) is None


# Modules a lower layer must never import: engine code from data/models, anything from the CLI.
LAYERS = {
    "lowlabel.data": ("lowlabel.engine", "lowlabel.study", "lowlabel.cli"),
    "lowlabel.models": ("lowlabel.engine", "lowlabel.study", "lowlabel.cli"),
    "lowlabel.engine": ("lowlabel.study", "lowlabel.cli"),
}


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_flow_one_way(package):
    graph, _ = import_graph()
    upward = [
        (src, dst)
        for src, targets in graph.items()
        if src.startswith(package)
        for dst in targets
        if dst.startswith(LAYERS[package])
    ]
    assert upward == []


def test_lowlabel_modules_are_imported_at_module_level_in_the_core():
    # the CLI and the study runner import lazily so that --help and 'study list' stay instant
    _, lazy = import_graph()
    core = ("lowlabel.engine", "lowlabel.data", "lowlabel.models", "lowlabel.run_folder")
    hidden = [(a, b) for a, b in lazy if a.startswith(core) and (a, b) not in LAZY_LOWLABEL_ALLOWED]
    assert hidden == []


def test_no_function_in_engine_is_longer_than_about_100_lines():
    lengths = {}
    for path in (SRC / "engine").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{path.stem}.{node.name}"] = node.end_lineno - node.lineno + 1
    assert lengths["loop.fit"] <= 100
    assert max(lengths.values()) <= 100, max(lengths, key=lengths.get)


def test_the_study_report_only_reads_files():
    # no training, no network, no data pipeline: tables and figures from what the runs wrote
    graph, _ = import_graph()
    report = {m: t for m, t in graph.items() if m.startswith("lowlabel.study.report")}
    assert len(report) >= 4
    computing = ("lowlabel.engine", "lowlabel.models", "lowlabel.data", "lowlabel.study.runner")
    assert [(m, t) for m, ts in report.items() for t in ts if t.startswith(computing)] == []


def test_the_loop_and_the_objectives_never_name_a_device():
    # the device enters through engine/runtime.py: the loop and what a step computes only ask it
    words = ("cuda", ".to(", "torch.autocast", "GradScaler", "lowlabel.device", "Placement")
    for name in ("loop.py", "objectives.py"):
        text = (SRC / "engine" / name).read_text()
        assert [w for w in words if w in text] == [], name
