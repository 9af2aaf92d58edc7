"""The package's seams: no import cycles, no private names used across modules.

Deferred (in-function) imports count: they hide a cycle from the interpreter, not from
the reader.  The graph is read from the source by ``tools/import_graph.py``.
"""

import ast
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


import_graph = _tool("import_graph")


def test_the_graph_finds_a_cycle_when_there_is_one():
    edges = {"a": {"b": False}, "b": {"c": True}, "c": {"a": True}, "d": {"a": True}}
    assert import_graph.cycles(edges) == [["a", "b", "c"]]
    assert import_graph.cycles({"a": {"b": True}, "b": {}}) == []


def test_the_package_has_no_import_cycle():
    edges = import_graph.graph(ROOT)
    assert len(edges) > 30 and sum(map(len, edges.values())) > 100  # the walk saw the package
    assert import_graph.cycles(edges) == []


def _private_imports(path: Path, package_modules: set[str], own: str | None) -> list[str]:
    """``from m import _x`` and ``m._x`` where m is another bayeslmm module."""
    tree = ast.parse(path.read_text())
    found, aliases = [], {}
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = import_graph.resolve(node, own or "", is_pkg) if node.level else (node.module or "")
            if not base.startswith("bayeslmm"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in package_modules:
                    aliases[alias.asname or alias.name] = full
                elif alias.name.startswith("_") and not alias.name.startswith("__") and base != own:
                    found.append(f"{path.name}:{node.lineno} from {base} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("bayeslmm") and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and aliases.get(node.value.id, own) != own):
            found.append(f"{path.name}:{node.lineno} {aliases[node.value.id]}.{node.attr}")
    return found


def test_the_checker_sees_a_private_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from bayeslmm.io import _x\nfrom bayeslmm import io as m\nm._y\nfrom bayeslmm.io import load\n")
    modules = set(import_graph.graph(ROOT))
    assert _private_imports(f, modules, "bayeslmm.other") == ["m.py:1 from bayeslmm.io import _x",
                                                              "m.py:3 bayeslmm.io._y"]


@pytest.mark.parametrize("where", ["bayeslmm", "tests", "benchmarks", "examples"])
def test_no_module_uses_another_modules_private_names(where):
    modules = set(import_graph.graph(ROOT))
    found = []
    for path in sorted((ROOT / where).rglob("*.py")):
        own = import_graph.module_name(path, ROOT) if where == "bayeslmm" else None
        found += _private_imports(path, modules, own)
    assert found == []
