"""The package's shape (issue 13): stages in data-flow order, small modules and functions.

A module may import from its own stage or an earlier one, never from a later one, so a reader can follow
the data from `data/` to the commands without climbing back up. The stages are listed in
docs/architecture.md.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moleflow"

# Stage of each top-level module or package of moleflow, in data-flow order.
STAGES = [
    ("config", "atomic", "integrity"),  # configuration, atomic file writes, digests of what we read back
    ("data",),  # images, labels, masks
    ("features",),  # frozen backbone, weights, feature cache
    ("router",),  # which task an image belongs to
    ("model",),  # per-task adapters + shared flow, loss, model files
    ("scoring",),  # the one scorer: route → flow → patch scores → map → image score
    ("metrics",),
    ("results",),  # typed results, tables, plots, HTML, run directory
    ("continual",),  # scenarios, methods, training, evaluation, jobs
    ("research",),  # grids, comparisons, analyses
    ("api", "export", "predict", "predict_ray", "demo", "verify"),  # the Python API and the commands built on it
    ("service",),  # the HTTP service and its page
    ("cli",),
]
FACADE = "moleflow"  # the package's __init__: the public names, imported lazily from any stage
STAGE = {name: i for i, names in enumerate(STAGES) for name in names}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LONG_MARK = "# long function:"  # a comment right above the def that says why it may be longer


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def _stage_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "moleflow":
        return None
    if len(parts) == 1:
        return 0
    if parts[1] not in STAGE:
        raise AssertionError(f"moleflow.{parts[1]} has no stage in tests/test_layout.py STAGES (and docs/architecture.md)")
    return STAGE[parts[1]]


def _name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.AST, own: str) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            if node.module == "moleflow":  # `from moleflow import x`: x is a subpackage or module
                out += [(node.lineno, f"moleflow.{a.name}") for a in node.names]
    return out


def test_every_module_belongs_to_a_stage():
    for path in _modules():
        assert _stage_of(_name(path)) is not None


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_a_later_stage(path: Path):
    own = _name(path)
    mine = len(STAGES) if own == FACADE else _stage_of(own)
    later = [(line, m) for line, m in _imports(ast.parse(path.read_text()), own)
             if (s := _stage_of(m)) is not None and s > mine]
    assert not later, f"{own} (stage {mine}) imports later stages: " + ", ".join(f"{m} (line {line})" for line, m in later)


def test_modules_are_small():
    long = {str(p.relative_to(SRC)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_functions_are_short_or_say_why():
    long = []
    for path in _modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and not lines[first - 2].strip().startswith(LONG_MARK):
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines without a '{LONG_MARK} why' comment above: {long}"


def test_no_test_imports_another_test_module():
    tests = Path(__file__).resolve().parent
    names = {p.stem for p in tests.glob("test_*.py")}
    bad = [f"{p.name}: {m}" for p in sorted(tests.glob("*.py")) for _, m in _imports(ast.parse(p.read_text()), p.stem)
           if m.split(".")[-1] in names or m.startswith("tests.test_")]
    assert not bad, f"test modules importing test modules: {bad}"
