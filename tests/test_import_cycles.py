"""No import cycle between chinwag's modules, counting the imports Python runs late.

A cycle hidden in a function-level import or under ``TYPE_CHECKING`` still
works today, by the luck of which module loads first; the next edit that
moves one of those imports to the top turns it into an ImportError. So every
import at any depth counts here, resolved to the module it loads, and the test
fails naming each cycle with the lines that close it.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Import:
    """One import statement: which module holds it, where, and which module it loads."""

    source: str
    target: str
    where: str  # "path:line"


def package_dirs(root: Path) -> dict[str, Path]:
    """The import name of each folder, from pyproject.toml's ``package-dir``."""
    with (root / "pyproject.toml").open("rb") as file:
        mapping = tomllib.load(file)["tool"]["setuptools"]["package-dir"]
    return {name: root / folder for name, folder in mapping.items()}


def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """Every module of the packages by its dotted name; a package is its ``__init__``."""
    modules: dict[str, Path] = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path], root: Path) -> Iterator[Import]:
    """The imports in ``path`` that load one of ``modules``, wherever they sit in it."""
    is_package = path.name == "__init__.py"
    # What a relative import is relative to: the package itself, or the module's package.
    here = name.split(".") if is_package else name.split(".")[:-1]
    shown = path.relative_to(root)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [_deepest(alias.name, modules) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level > len(here):
                    raise AssertionError(f"{shown}:{node.lineno}: a relative import beyond the top")
                base = ".".join([*here[: len(here) - node.level + 1], *filter(None, [node.module])])
            else:
                base = node.module or ""
            # `from package import submodule` loads the submodule; a name loads the base.
            targets = [
                f"{base}.{alias.name}"
                if f"{base}.{alias.name}" in modules
                else _deepest(base, modules)
                for alias in node.names
            ]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target is not None:
                yield Import(name, target, f"{shown}:{node.lineno}")


def _deepest(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``dotted`` that is one of ``modules`` (`import a.b.c` loads a.b.c)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if (prefix := ".".join(parts[:end])) in modules:
            return prefix
    return None


def import_graph(root: Path) -> dict[str, dict[str, Import]]:
    """Each module's imports of the others, one (the first) statement per target."""
    modules = module_files(package_dirs(root))
    graph: dict[str, dict[str, Import]] = {name: {} for name in modules}
    for name, path in modules.items():
        for edge in imports_of(name, path, modules, root):
            graph[name].setdefault(edge.target, edge)
    return graph


def strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit to meet)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(graph[successor])))
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def cycles(graph: dict[str, dict[str, Import]]) -> list[list[Import]]:
    """The shortest cycle through each module of each tangle (a component of several
    modules, or a module importing itself), as the imports that close it; each once."""
    found: dict[frozenset[Import], list[Import]] = {}
    for component in strongly_connected(graph):
        members = set(component)
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        for start in component:
            cycle = _shortest_cycle(graph, start, members)
            found.setdefault(frozenset(cycle), cycle)
    return list(found.values())


def _shortest_cycle(
    graph: dict[str, dict[str, Import]], start: str, within: set[str]
) -> list[Import]:
    """Breadth first from ``start`` back to it, through ``within`` only."""
    came_by: dict[str, Import] = {}
    frontier = [start]
    while start not in came_by:
        following: list[str] = []
        for node in frontier:
            for target, edge in graph[node].items():
                if target in within and target not in came_by:
                    came_by[target] = edge
                    following.append(target)
        frontier = following
    path = [came_by[start]]
    while path[0].source != start:
        path.insert(0, came_by[path[0].source])
    return path


def describe(cycle: list[Import]) -> str:
    steps = "\n".join(f"  {edge.source} -> {edge.target}  ({edge.where})" for edge in cycle)
    return f"{' -> '.join([cycle[0].source, *(edge.target for edge in cycle)])}\n{steps}"


def test_no_module_imports_another_that_imports_it_back() -> None:
    found = cycles(import_graph(ROOT))
    assert not found, "import cycles:\n" + "\n".join(describe(cycle) for cycle in found)


def test_every_package_is_read() -> None:
    graph = import_graph(ROOT)
    for package in package_dirs(ROOT):
        assert any(name.startswith(f"{package}.") for name in graph), package
    assert graph["chinwag.clients"], "clients/__init__.py's imports were not seen"


def _write(root: Path, files: dict[str, str]) -> None:
    (root / "pyproject.toml").write_text(
        '[tool.setuptools]\npackage-dir = { "pkg.a" = "a", "pkg.b" = "b" }\n'
    )
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {
                "a/__init__.py": "from ._one import run\n",
                "a/_one.py": "def run():\n    from ._two import go\n",
                "a/_two.py": "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from . import _one\n",
                "b/__init__.py": "",
            },
            "pkg.a._one -> pkg.a._two -> pkg.a._one",
            id="lazy-and-type-checking",
        ),
        pytest.param(
            {
                "a/__init__.py": "from pkg.b import thing\n",
                "b/__init__.py": "from .sub import thing\n",
                "b/sub.py": "import pkg.a\nthing = 1\n",
            },
            "pkg.a -> pkg.b -> pkg.b.sub -> pkg.a",
            id="across-packages",
        ),
        pytest.param(
            {"a/__init__.py": "", "a/_one.py": "from . import _one\n", "b/__init__.py": ""},
            "pkg.a._one -> pkg.a._one",
            id="itself",
        ),
    ],
)
def test_a_cycle_is_found_however_its_imports_hide(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    _write(tmp_path, files)
    found = cycles(import_graph(tmp_path))
    assert [describe(cycle).splitlines()[0] for cycle in found] == [expected]


def test_imports_that_only_look_alike_are_no_cycle(tmp_path: Path) -> None:
    # A sibling imported by name from the package's __init__, and a name taken
    # from a package that imports its modules, load nothing that comes back.
    _write(
        tmp_path,
        {
            "a/__init__.py": "from ._one import run\nfrom ._two import go\n",
            "a/_one.py": "from ._two import go\ndef run():\n    import json\n",
            "a/_two.py": "import pkg.b\ngo = 1\n",
            "b/__init__.py": "from ._base import Base\n",
            "b/_base.py": "Base = object\n",
        },
    )
    assert cycles(import_graph(tmp_path)) == []
