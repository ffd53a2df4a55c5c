"""The package's layout: imports run one way, and no module imports one that imports it back.

Layers, lowest first (DESIGN.md): core, then the shared layers (runtime, zoo, data, device), then the
stages, then the build runner, then the command line. A module may import its own layer or a lower one,
never a higher one; calibrate never imports export. The graph is read from the source with ``ast``, so
imports inside functions count too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edgetl"

LAYERS: dict[str, int] = {
    "edgetl.errors": 0, "edgetl._io": 0, "edgetl.folders": 0, "edgetl.options": 0, "edgetl.plots": 0,
    "edgetl.runtime": 1,
    "edgetl.zoo": 2,
    "edgetl.data": 3,
    "edgetl.device": 4,
    "edgetl.select": 5, "edgetl.predict": 5, "edgetl.validate": 5, "edgetl.finetune": 5, "edgetl.export": 5,
    "edgetl.calibrate": 5, "edgetl.board": 5,
    "edgetl.report": 6, "edgetl.buildfile": 6, "edgetl.pipeline": 6, "edgetl.demo": 7,
    "edgetl.cli": 8, "edgetl.__main__": 8,
}
FORBIDDEN = {("edgetl.calibrate", "edgetl.export")}
MAX_TOP_LEVEL = 15


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _target(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: Path) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            target = _target(candidate) if candidate.startswith("edgetl") else None
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items() if name != "edgetl"}


def _layer(module: str) -> tuple[str, int]:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, LAYERS[prefix]
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS")


def test_every_module_has_a_layer():
    for module in GRAPH:
        _layer(module)


def test_imports_run_one_way():
    wrong = []
    for module, targets in GRAPH.items():
        home, rank = _layer(module)
        for target in targets:
            where, target_rank = _layer(target)
            if target_rank > rank or (home, where) in FORBIDDEN:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layering: " + ", ".join(sorted(wrong))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (``a -> b -> ... -> a``), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_few_modules_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL, top


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_moved_modules_still_import_with_a_deprecation_warning():
    code = textwrap.dedent("""
        import importlib, json, warnings
        import edgetl
        out = {}
        for old, new in edgetl._MOVED.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                module = importlib.import_module(old)
            out[old] = [module is importlib.import_module(new), module.__spec__.name,
                        [str(w.message) for w in caught if w.category is DeprecationWarning]]
        print(json.dumps(out))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seen = json.loads(result.stdout)
    assert seen, "no moved modules listed"
    for old, (same, spec_name, warned) in seen.items():
        assert same, old
        assert spec_name != old, f"{old}: the moved-to module lost its own spec"
        assert len(warned) == 1 and old in warned[0] and "moved to" in warned[0], (old, warned)
