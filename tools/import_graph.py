"""Print bayeslmm's module import graph and its cycles.

Every ``import`` / ``from ... import`` of a bayeslmm module counts, whether it sits at
the top of a file or inside a function (a deferred import is still a dependency: it
only hides the cycle from the interpreter).  Strongly connected components with more
than one module are cycles.  Run:  python tools/import_graph.py [--edges]
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "bayeslmm"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path, name: str, modules: set[str]) -> dict[str, bool]:
    """Modules imported by ``path``: name -> True if any import of it is top-level."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found: dict[str, bool] = {}

    def add(target: str, node: ast.AST) -> None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found[target] = found.get(target, False) or id(node) in top

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node, name, path.name == "__init__.py")
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in modules else base, node)
    return found


def graph(root: Path) -> dict[str, dict[str, bool]]:
    files = {module_name(p, root): p for p in (root / PACKAGE).rglob("*.py")}
    modules = set(files)
    return {m: imports_of(p, m, modules) for m, p in sorted(files.items())}


def cycles(edges: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Tarjan's strongly connected components of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parents[1]
    edges = graph(root)
    if "--edges" in argv:
        for m, targets in edges.items():
            inner = [t + ("" if top else " (deferred)") for t, top in sorted(targets.items())]
            print(f"{m} -> {', '.join(inner) or '-'}")
    found = cycles(edges)
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} import edges, "
          f"{len(found)} cycle(s)")
    for comp in found:
        print("cycle:", " <-> ".join(comp))
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
