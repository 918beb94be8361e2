"""The layout is part of the design: no import cycles, `lib/` free of Dagster, commands in one place."""

from __future__ import annotations

import ast
from pathlib import Path

import cld_pipeline

PACKAGE = Path(cld_pipeline.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every cld_pipeline module this file imports, at the top or inside a function: a lazy import
    still couples the two modules, it only hides the cycle from the interpreter."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_lib_never_imports_dagster():
    offenders = []
    for path in (PACKAGE / "lib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "dagster" or n.startswith(("dagster.", "dagster_")) for n in names):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_lib_never_imports_the_dagster_layers_or_commands():
    graph = import_graph()
    bad = {m: sorted(d for d in deps if d.startswith(("cld_pipeline.defs", "cld_pipeline.commands",
                                                         "cld_pipeline.definitions")))
           for m, deps in graph.items() if m.startswith("cld_pipeline.lib")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_the_package_top_level_is_the_code_location():
    """Commands live in `commands/`; the top level holds the code location and its parts."""
    top = sorted(p.name for p in PACKAGE.iterdir() if not p.name.startswith(("_", ".")) and p.name != "__pycache__")
    assert top == ["analyst.py", "commands", "definitions.py", "defs", "environment.py", "lib", "reference",
                   "settings.py", "spec", "synthetic"]


def test_lib_is_grouped_by_concern():
    folders = sorted(p.name for p in (PACKAGE / "lib").iterdir() if p.is_dir() and p.name != "__pycache__")
    loose = sorted(p.name for p in (PACKAGE / "lib").glob("*.py") if p.name != "__init__.py")
    assert folders == ["benchmark", "ingest", "linkage", "privacy", "validation"]
    assert loose == ["warehouse.py"]     # the DuckDB helpers every concern shares
