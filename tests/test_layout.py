"""The package's layout: no two modules of promptehr/ import each other, directly or around a cycle.

The import graph is read with `ast` from the source (imports at module level and inside functions
alike, so a lazy import cannot hide a cycle). `from a import b` where `a.b` is a module counts as an
import of `a.b` only: Python runs `a/__init__.py` first either way, and counting that would make every
package whose `__init__` re-exports its submodules a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "promptehr"


def module_names(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `package` (a package is its __init__.py)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph(package: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module of the same package: line of the first such import}."""
    modules = module_names(package)
    root = package.name
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the package holding this module, `level - 1` packages up
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                submodules = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules]
                names_only = len(submodules) < len(node.names)
                targets = submodules + ([source] if names_only else [])
            for target in targets:
                # `import a.b.c` binds `a` but loads a.b.c: the deepest module of the package named
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target.split(".")[0] == root and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a closed path
    [a, b, ..., a]; [] when the graph has none."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_through(graph, component) for component in components]


def _cycle_through(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """A shortest closed path inside `component` from its first module (by name) back to it."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt == start:
                    return paths[node] + [start]
                if nxt in component and nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    """`a (a.py:12) -> b (b.py:3) -> a`: each module with the line of its import of the next."""
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps + [cycle[-1]])


def test_no_two_modules_of_the_package_import_each_other():
    graph = import_graph(PACKAGE)
    assert len(graph) > 20 and graph["promptehr.data"], "the graph was not read"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (module (line of its import of the next) -> ...):\n" + "\n".join(
        describe(graph, c) for c in cycles
    )


def test_the_patient_schema_stands_alone():
    """What a patient record is depends on no other module: loaders, cohorts and the model build on it."""
    graph = import_graph(PACKAGE)
    assert graph["promptehr.schema"] == {}
    assert "promptehr.data" not in graph["promptehr.mimic"] and "promptehr.data" not in graph["promptehr.meds"]


def test_a_cycle_is_found_and_named_even_through_a_lazy_or_relative_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("VERSION = 1\n")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("import os\n\n\ndef f():\n    from pkg.sub.c import thing\n    return thing\n")
    (package / "sub" / "__init__.py").write_text("from .c import thing\n")  # a package re-exporting: no cycle
    (package / "sub" / "c.py").write_text("thing = 1\n\n\ndef g():\n    from .. import VERSION\n")
    (package / "d.py").write_text("from pkg.a import x\nimport pkg.e\n")
    (package / "e.py").write_text("from . import d\n")
    graph = import_graph(package)
    assert graph["pkg.b"] == {"pkg.sub.c": 5} and graph["pkg.sub.c"] == {"pkg": 5}
    assert graph["pkg.sub"] == {"pkg.sub.c": 1}
    assert graph["pkg.a"] == {"pkg.b": 1} and graph["pkg.d"] == {"pkg.a": 1, "pkg.e": 2} and graph["pkg.e"] == {"pkg.d": 1}
    cycles = find_cycles(graph)
    assert sorted(map(tuple, cycles)) == [("pkg.d", "pkg.e", "pkg.d")]  # pkg.sub.c imports pkg's name, not pkg.a
    (package / "sub" / "c.py").write_text("thing = 1\n\n\ndef g():\n    from ..a import y\n")
    graph = import_graph(package)
    cycles = sorted(map(tuple, find_cycles(graph)))
    assert cycles == [("pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"), ("pkg.d", "pkg.e", "pkg.d")]
    assert describe(graph, list(cycles[0])) == "pkg.a (line 1) -> pkg.b (line 5) -> pkg.sub.c (line 5) -> pkg.a"


def test_the_readme_layout_names_every_module_of_the_package():
    """A reader finds each stage by its file name: every top-level module of promptehr/ is named in the
    README's Layout section (subpackages by their folder)."""
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.index("\n## ", 1)]
    missing = [
        path.name
        for path in sorted(PACKAGE.iterdir())
        if (path.suffix == ".py" and path.name != "__init__.py" and path.name not in layout)
        or (path.is_dir() and (path / "__init__.py").exists() and f"promptehr/{path.name}/" not in layout)
    ]
    assert not missing, f"README.md, Layout: no word of {missing}"
