"""Import hygiene (issue 26): no import circle inside the packages, no ``sys.path`` edits outside tests.

Both checks are static: every ``.py`` file is parsed with ``ast``, nothing is imported.

The module graph has one node per module of ``mssan_infer``, ``export`` and ``training``
(a package is its ``__init__``) and an edge for every ``import`` / ``from ... import``
that resolves to one of them -- absolute or relative, at module level or nested inside
a function, a class, a ``try`` or an ``if`` (a lazy import is still an edge: it only
moves the circle from import time to call time). ``from pkg import name`` is an edge to
the submodule ``pkg.name`` where there is one, else to ``pkg`` itself.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GRAPH_PACKAGES = ("mssan_infer", "export", "training")
NO_SYS_PATH_PACKAGES = ("mssan_infer", "export", "training", "bench")

Graph = dict[str, set[str]]


# ---- files and modules -------------------------------------------------------------
def _py_files(root: Path, package: str) -> Iterator[Path]:
    for path in sorted((root / package).rglob("*.py")):
        if "__pycache__" not in path.parts:
            yield path


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# ---- the import graph --------------------------------------------------------------
def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> Iterator[str]:
    """Dotted names an import statement in ``module`` loads (``from x import y`` -> ``x.y`` and ``x``)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        up = node.level - 1
        if up > len(package):
            raise ImportError(f"{module}: relative import beyond the top-level package (level {node.level})")
        base = package[: len(package) - up]
        if node.module:
            base = base + node.module.split(".")
        target = ".".join(base)
    else:
        target = node.module or ""
    for alias in node.names:
        if alias.name != "*":
            yield f"{target}.{alias.name}"  # a submodule if there is one ...
    yield target  # ... else the package / module itself


def _edges(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(tree):  # walks function bodies too: lazy imports count
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.ImportFrom):
            names = list(_imported(node, module, is_package))
            submodules = [n for n in names[:-1] if n in modules]
            targets = submodules if len(submodules) == len(names) - 1 else submodules + [names[-1]]
        else:
            targets = list(_imported(node, module, is_package))
        # a name outside the three packages (or a module that does not exist) is no edge
        out.update(name for name in targets if name in modules and name != module)
    return out


def import_graph(root: Path, packages: Iterable[str]) -> Graph:
    """``{module: {modules it imports}}`` over every ``.py`` file of ``packages`` under ``root``."""
    files = {_module_name(root, p): p for pkg in packages for p in _py_files(root, pkg)}
    modules = set(files)
    return {
        mod: _edges(_parse(path), mod, path.name == "__init__.py", modules)
        for mod, path in sorted(files.items())
    }


# ---- cycles ------------------------------------------------------------------------
def _strong_components(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    comp: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        comp.append(member)
                        if member == node:
                            break
                    comps.append(sorted(comp))
    return comps


def _shortest_cycle(graph: Mapping[str, set[str]], comp: list[str]) -> list[str]:
    """One shortest cycle through the first module of a strongly connected ``comp``."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph.get(node, ())):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if child not in prev:
                prev[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start} in {comp}")  # pragma: no cover


def find_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per import circle (strongly connected component) of ``graph``."""
    return [_shortest_cycle(graph, comp) for comp in _strong_components(graph) if len(comp) > 1]


def _describe(cycles: list[list[str]], graph: Mapping[str, set[str]]) -> str:
    lines = []
    for cycle in cycles:
        members = next(c for c in _strong_components(graph) if cycle[0] in c)
        extra = (
            f" (circle of {len(members)} modules: {', '.join(members)})"
            if len(members) > len(cycle) - 1
            else ""
        )
        lines.append("  " + " -> ".join(cycle) + extra)
    return "\n".join(lines)


# ---- sys.path edits ----------------------------------------------------------------
_MUTATORS = {
    "insert",
    "append",
    "extend",
    "remove",
    "pop",
    "clear",
    "reverse",
    "sort",
    "__setitem__",
    "__delitem__",
    "__iadd__",
}


def sys_path_edits(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, what)`` for each edit of ``sys.path`` in ``tree`` (however ``sys`` / ``path`` is bound)."""
    sys_names = {"sys"}
    path_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            sys_names |= {a.asname or a.name for a in node.names if a.name == "sys"}
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and not node.level:
            path_names |= {a.asname or a.name for a in node.names if a.name == "path"}

    def is_sys_path(expr: ast.AST) -> bool:
        if isinstance(expr, ast.Attribute) and expr.attr == "path":
            return isinstance(expr.value, ast.Name) and expr.value.id in sys_names
        return isinstance(expr, ast.Name) and expr.id in path_names

    def targets_sys_path(target: ast.AST) -> bool:
        if isinstance(target, (ast.Tuple, ast.List)):
            return any(targets_sys_path(t) for t in target.elts)
        if isinstance(target, ast.Starred):
            return targets_sys_path(target.value)
        if isinstance(target, ast.Subscript):
            return is_sys_path(target.value)
        # ``sys.path = ...``; a bare ``path = ...`` rebinds a local name, it edits nothing
        return isinstance(target, ast.Attribute) and is_sys_path(target)

    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in _MUTATORS and is_sys_path(node.func.value):
                found.append((node.lineno, f"sys.path.{node.func.attr}(...)"))
            elif (
                node.func.attr == "addsitedir"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "site"
            ):
                found.append((node.lineno, "site.addsitedir(...)"))
        elif (
            (isinstance(node, ast.Assign) and any(targets_sys_path(t) for t in node.targets))
            or (isinstance(node, ast.AnnAssign) and targets_sys_path(node.target))
            or (isinstance(node, ast.AugAssign) and is_sys_path(node.target))  # also ``path += [...]``
            or (isinstance(node, ast.AugAssign) and targets_sys_path(node.target))
        ):
            found.append((node.lineno, "assignment to sys.path"))
        elif isinstance(node, ast.Delete) and any(targets_sys_path(t) for t in node.targets):
            found.append((node.lineno, "del sys.path[...]"))
    return sorted(found)


# ---- the checks on this repository -------------------------------------------------
def test_no_import_cycles() -> None:
    graph = import_graph(ROOT, GRAPH_PACKAGES)
    assert len(graph) > 20, f"found only {len(graph)} modules under {ROOT}: is ROOT right?"
    cycles = find_cycles(graph)
    assert not cycles, "import circles (lazy imports inside functions count):\n" + _describe(cycles, graph)


def test_no_sys_path_edits() -> None:
    offenders = [
        f"  {path.relative_to(ROOT)}:{line}: {what}"
        for pkg in NO_SYS_PATH_PACKAGES
        for path in _py_files(ROOT, pkg)
        for line, what in sys_path_edits(_parse(path))
    ]
    assert not offenders, (
        "sys.path is edited outside tests/ (import the package normally; run scripts with "
        "`python -m`):\n" + "\n".join(offenders)
    )


# ---- the checkers themselves can fail ----------------------------------------------
def _write(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_import_graph_finds_lazy_and_submodule_circles(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import run\n",
            # lazy, from-package-import-submodule
            "pkg/a.py": "def run():\n    from .sub import b\n    return b\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/b.py": "import pkg.sub.c\n",
            "pkg/sub/c.py": "from ..a import run\n",  # back to pkg.a
            "pkg/d.py": "from pkg import run\nimport json\n",  # a name of pkg/__init__
        },
    )
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg"] == {"pkg.a"}
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg"}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]]

    (tmp_path / "pkg/sub/c.py").write_text("from .. import d\n", encoding="utf-8")  # -> pkg.d -> pkg -> pkg.a
    cycles = find_cycles(import_graph(tmp_path, ["pkg"]))
    assert cycles == [["pkg", "pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.d", "pkg"]]

    (tmp_path / "pkg/sub/c.py").write_text("import json\n", encoding="utf-8")
    assert find_cycles(import_graph(tmp_path, ["pkg"])) == []


@pytest.mark.parametrize(
    "source",
    [
        "import sys\nsys.path.insert(0, 'x')\n",
        "import sys\ndef f():\n    sys.path.append('x')\n",
        "import sys as s\ns.path.extend(['x'])\n",
        "import sys\nsys.path = ['x']\n",
        "import sys\nsys.path[:0] = ['x']\n",
        "import sys\nsys.path += ['x']\n",
        "from sys import path\npath.insert(0, 'x')\n",
        "import site\nsite.addsitedir('x')\n",
    ],
)
def test_sys_path_edits_are_found(source: str) -> None:
    assert sys_path_edits(ast.parse(source))


@pytest.mark.parametrize(
    "source",
    [
        "import sys\npaths = list(sys.path)\n",
        "import os\nos.path.join('a', 'b')\n",
        "S = '''\nimport sys\nsys.path.insert(0, sys.argv[1])\n'''\n",  # a child script's text, not an edit
        "from pathlib import Path\npath = Path('x')\npath.parent\n",
    ],
)
def test_sys_path_reads_are_not_edits(source: str) -> None:
    assert sys_path_edits(ast.parse(source)) == []


# ---- no shims: every runtime module defines something --------------------------------------------
def reexports_only(tree: ast.Module) -> bool:
    """Whether a module only imports names (and lists them in ``__all__``): a shim.

    A docstring, imports and ``__all__`` do not count as definitions; a package ``__init__`` that is
    only a docstring is not a shim (it defines the package).
    """
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    imports = [
        n
        for n in body
        if isinstance(n, (ast.Import, ast.ImportFrom))
        and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")
    ]
    rest = [
        n
        for n in body
        if not isinstance(n, (ast.Import, ast.ImportFrom))
        and not (
            isinstance(n, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)
        )
    ]
    return bool(imports) and not rest


def test_no_runtime_module_only_reexports_another() -> None:
    shims = [
        _module_name(ROOT, p)
        for package in ("mssan_infer", "export", "training")
        for p in _py_files(ROOT, package)
        if p.name != "__init__.py" and reexports_only(_parse(p))
    ]
    assert shims == [], f"modules that only re-export others (import from the defining module): {shims}"


def test_a_module_of_imports_alone_is_a_shim() -> None:
    assert reexports_only(ast.parse('"""Moved."""\nfrom a.b import c, d\n__all__ = ["c", "d"]\n'))
    assert not reexports_only(ast.parse('"""Defines."""\nfrom a import b\n\ndef f() -> None:\n    b()\n'))
    assert not reexports_only(ast.parse('"""A package."""\n'))
