"""List the longest functions and methods in bayeslmm.

Two counts: all lines from ``def`` to the last line, and the code alone (without the
docstring), since a long docstring that states the maths is not a long function.

Run:  python tools/largest_functions.py [N]   (default: the 15 longest)
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path


def functions(root: Path):
    for path in sorted((root / "bayeslmm").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = 0
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                        and isinstance(first.value.value, str):
                    doc = first.end_lineno - first.lineno + 1
                total = node.end_lineno - node.lineno + 1
                yield total - doc, total, f"{path.relative_to(root)}:{node.lineno}", node.name


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 15
    root = Path(__file__).resolve().parents[1]
    found = sorted(functions(root), reverse=True)
    print(" code  total  function                         where")
    for code, total, where, name in found[:n]:
        print(f"{code:5d}  {total:5d}  {name:<32s} {where}")
    print(f"{len(found)} functions; median {sorted(f[0] for f in found)[len(found) // 2]} lines of code")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
