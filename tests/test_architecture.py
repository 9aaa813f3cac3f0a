"""The package's shape (issue 23): short functions, one-way imports, nothing private crossing a module.

Every module of `jaxbench/` is parsed with `ast` (nothing is imported), so this file costs no JAX start-up.
Each rule has a test on a small hand-made package too, so a checker that finds nothing cannot pass silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxbench"
MAX_FUNCTION_LINES = 120


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the package root."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def analyse(root: Path):
    """(long functions, import edges, private names used across modules) of the package at root."""
    modules = module_files(root)
    top = root.name
    long_functions, edges, private = [], {m: set() for m in modules}, []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases = {}  # local name -> jaxbench module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                span = node.end_lineno - node.lineno + 1
                if span > MAX_FUNCTION_LINES:
                    long_functions.append((module, node.name, span))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, path, node)
                if not (target == top or target.startswith(top + ".")):
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    imported = full if full in modules else target
                    if imported in modules and imported != module:
                        edges[module].add(imported)
                    if full in modules:
                        aliases[alias.asname or alias.name] = full
                    elif alias.name.startswith("_") and not alias.name.startswith("__") and target != module:
                        private.append((module, f"{target}.{alias.name}"))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.name != module:
                        edges[module].add(alias.name)
                        if alias.asname:
                            aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != module):
                private.append((module, f"{aliases[node.value.id]}.{node.attr}"))
    return long_functions, edges, sorted(set(private))


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. the import cycles."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


@pytest.fixture(scope="module")
def package():
    return analyse(PACKAGE)


def test_no_function_over_the_limit(package):
    long_functions = package[0]
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_no_import_cycle(package):
    cycles = import_cycles(package[1])
    assert not cycles, f"import cycles among jaxbench's modules: {cycles}"


def test_no_private_name_crosses_a_module(package):
    assert not package[2], f"private names used from another module: {package[2]}"


def test_the_checker_finds_each_violation(tmp_path):
    """A hand-made package with one of each violation: the analysis must report all three."""
    pkg = tmp_path / "jaxbench"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import helper\n")
    (pkg / "a.py").write_text("from .sub import b\n\ndef long():\n" + "    x = 1\n" * 130 + "    return b._hidden\n")
    (pkg / "sub" / "b.py").write_text("from ..a import long\n\ndef helper():\n    return 1\n")
    (pkg / "sub" / "c.py").write_text("from .b import _secret\nimport jaxbench.a as a\n\ndef f():\n    return a._x\n")
    long_functions, edges, private = analyse(pkg)
    assert [(m, f) for m, f, _ in long_functions] == [("jaxbench.a", "long")]
    assert ["jaxbench.a", "jaxbench.sub.b"] in import_cycles(edges)
    assert ("jaxbench.a", "jaxbench.sub.b._hidden") in private
    assert ("jaxbench.sub.c", "jaxbench.sub.b._secret") in private
    assert ("jaxbench.sub.c", "jaxbench.a._x") in private
