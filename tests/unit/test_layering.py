"""The package's import graph: no cycles, and every import goes down the layers.

The graph is read statically from ``src/`` (every ``import`` at any depth of a module, those
under ``TYPE_CHECKING`` and inside functions included). Two rules:

- no two modules import each other, directly or through others;
- each folder of ``servekit._private`` imports only the layers below it (``ALLOWED``): the
  data plane (wire, routing, proxy, replica, and the public ``handle``) never reaches the
  control plane (controller, runtime, deploy, workers, ``api``, ``cli``); ``wire/`` imports
  nothing but the bottom layer; the bottom layer (the modules directly in ``_private`` and
  the public ``config``, ``exceptions``, ``types``, ``request``, ``env``, ``metrics``)
  imports only itself.
"""

from __future__ import annotations

import ast
import gc
import subprocess
import sys
from pathlib import Path
from typing import Dict, FrozenSet, List, Mapping, Set, Tuple

import pytest

import servekit

SRC = Path(servekit.__file__).resolve().parent.parent
Graph = Mapping[str, Set[str]]

# layer -> the layers its modules may import
ALLOWED: Dict[str, FrozenSet[str]] = {
    "base": frozenset({"base"}),
    "wire": frozenset({"base", "wire"}),
    "routing": frozenset({"base", "wire", "routing"}),
    "handle": frozenset({"base", "wire", "routing", "handle"}),
    "proxy": frozenset({"base", "wire", "routing", "proxy"}),
    "replica": frozenset({"base", "wire", "routing", "handle", "replica"}),
}
DATA_PLANE = frozenset({"wire", "routing", "handle", "proxy", "replica"})
_PUBLIC_LAYERS = {
    "servekit.config": "base", "servekit.exceptions": "base", "servekit.types": "base",
    "servekit.request": "base", "servekit.env": "base", "servekit.metrics": "base",
    "servekit.handle": "handle", "servekit.api": "api", "servekit.cli": "cli",
    "servekit": "api",
}


def module_graph(src: Path = SRC) -> Dict[str, Set[str]]:
    """Each servekit module -> the servekit modules it imports."""
    files = {}
    for path in (src / "servekit").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    graph: Dict[str, Set[str]] = {}
    # The cyclic collector is held off while parsing: a finalizer it ran meanwhile (an
    # earlier test's task logging "exception was never retrieved", whose traceback Python
    # 3.11 formats with ``ast``) would nest in a parse, and 3.11 then fails that parse with
    # "AST constructor recursion depth mismatch" (CPython gh-106905).
    gc.collect()
    gc.disable()
    try:
        trees = {name: ast.parse(path.read_text()) for name, path in files.items()}
    finally:
        gc.enable()
    for name, tree in trees.items():
        imported: Set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {module for module in imported if module in files and module != name}
    return graph


def layer(module: str) -> str:
    """The layer a module belongs to: its folder under ``_private``, or ``base``."""
    if module in _PUBLIC_LAYERS:
        return _PUBLIC_LAYERS[module]
    parts = module.split(".")
    if parts[:2] != ["servekit", "_private"]:
        raise AssertionError(f"{module}: a public module missing from _PUBLIC_LAYERS")
    if len(parts) == 2:
        return "base"  # the package itself, empty
    if len(parts) == 3 and (SRC / "servekit" / "_private" / f"{parts[2]}.py").exists():
        return "base"
    return parts[2]


def cycles(graph: Graph) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.get(module, ())):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def layer_violations(graph: Graph) -> List[Tuple[str, str]]:
    """Imports that go up or across the layers: (importer, imported)."""
    bad = []
    for module, imported in sorted(graph.items()):
        allowed = ALLOWED.get(layer(module))
        if allowed is None:
            continue  # the control plane and the entry points may import any layer below
        bad.extend((module, other) for other in sorted(imported) if layer(other) not in allowed)
    return bad


def test_no_module_imports_itself_through_others() -> None:
    found = cycles(module_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_import_goes_down_the_layers() -> None:
    bad = layer_violations(module_graph())
    assert not bad, "\n".join(f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, b in bad)


def test_every_private_folder_has_a_place_in_the_layers() -> None:
    """A new folder is placed on purpose: in the data plane's table, or above it."""
    folders = {layer(module) for module in module_graph()} - {"base", "handle", "api", "cli"}
    above_data_plane = {"controller", "runtime", "deploy", "workers"}
    assert folders == (DATA_PLANE - {"handle"}) | above_data_plane


def test_the_checks_find_what_they_look_for() -> None:
    """A cycle through three modules, and data-plane imports of the control plane and of a
    higher data-plane layer, are each reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    graph = {
        "servekit._private.routing.router": {"servekit._private.controller.controller"},
        "servekit._private.wire.transport": {"servekit._private.routing.router"},
        "servekit._private.controller.controller": {"servekit._private.routing.router"},
    }
    assert layer_violations(graph) == [
        ("servekit._private.routing.router", "servekit._private.controller.controller"),
        ("servekit._private.wire.transport", "servekit._private.routing.router"),
    ]


@pytest.mark.parametrize("module", ["servekit.handle", "servekit._private.proxy.proxy",
                                    "servekit._private.replica.replica"])
def test_the_data_plane_reaches_no_control_plane_module(module: str) -> None:
    """Transitively, too: nothing a request's path loads is controller, runtime or deploy."""
    graph = module_graph()
    seen, queue = {module}, [module]
    while queue:
        for imported in graph[queue.pop()]:
            if imported not in seen:
                seen.add(imported)
                queue.append(imported)
    assert {layer(m) for m in seen} <= DATA_PLANE | {"base"}


def test_servekit_never_imports_ray_unless_the_ray_runtime_is_used() -> None:
    """Importing servekit, and choosing the runtime for a script that has not initialized
    Ray, leave Ray unimported (the core install does not need it)."""
    probe = ("import sys, servekit\n"
             "from servekit._private.runtime import choice\n"
             "assert not choice.uses_ray(None)\n"
             "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"
