"""The data plane (router, replica, proxy and what they use) never imports the control plane.

Walks the static import graph of servekit's own modules from each data-plane module and
fails if any path reaches ``servekit._private.controller``.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

DATA_PLANE = [
    "servekit._private.router",
    "servekit._private.replica",
    "servekit._private.proxy",
    "servekit._private.transport",
    "servekit._private.batching",
    "servekit._private.asgi_app",
    "servekit._private.asgi_runner",
    "servekit._private.asgi_proxy",
    "servekit.handle",
]
CONTROL_PLANE = "servekit._private.controller"


def _imports(module: str) -> Set[str]:
    """The servekit modules ``module`` imports (at any depth in its code)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    tree = ast.parse(Path(spec.origin).read_text())
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if importlib.util.find_spec(node.module) is not None and _is_module(candidate):
                    found.add(candidate)
    return {name for name in found if name.split(".")[0] == "servekit"}


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _path_to_control_plane(start: str) -> List[str]:
    """An import chain from ``start`` into the controller package, or [] if none."""
    parents: Dict[str, str] = {}
    queue, seen = [start], {start}
    while queue:
        module = queue.pop(0)
        if module == CONTROL_PLANE or module.startswith(CONTROL_PLANE + "."):
            chain = [module]
            while chain[-1] != start:
                chain.append(parents[chain[-1]])
            return list(reversed(chain))
        for imported in _imports(module):
            if imported not in seen:
                seen.add(imported)
                parents[imported] = module
                queue.append(imported)
    return []


@pytest.mark.parametrize("module", DATA_PLANE)
def test_data_plane_module_does_not_import_the_controller(module: str) -> None:
    chain = _path_to_control_plane(module)
    assert not chain, " -> ".join(chain)


def test_the_check_finds_a_real_import_of_the_controller() -> None:
    """The walk itself works: the controller's entry point does reach the controller."""
    assert _path_to_control_plane("servekit._private.controller.main")


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
