"""The local code of a backend: its module and the modules of its working directory that its
import statements reach, found by reading their source (``ast``), never by running it.

This is what a backend's revision hashes: a module of the working directory that the backend
does not reach (another backend's, a new file) or one from elsewhere (site-packages, the
standard library) is not part of it. Every import statement counts, also one inside a
function or under an ``if``; a module imported by name at run time
(``importlib.import_module``) is not seen. The same reading finds the endpoints the code gets
handles to (``get_handle("name")`` with a literal name), so that an apply creates those
endpoints before the backend.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
from typing import Dict, FrozenSet, Iterator, List, Optional, Set


@dataclasses.dataclass(frozen=True)
class LocalCode:
    """``files``: a short hash of each local file a backend runs, by its path relative to
    the working directory; ``handles``: the endpoint names its code passes to
    ``get_handle``."""

    files: Dict[str, str]
    handles: FrozenSet[str]


def local_code(directory: str, module: str) -> LocalCode:
    """The local code of a backend whose import path names ``module``, in ``directory``."""
    directory = os.path.abspath(directory)
    files: Dict[str, str] = {}
    handles: Set[str] = set()
    seen: Set[str] = set()
    pending: List[str] = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending += _parents(name)
        path = module_file(directory, name)
        if path is None:
            continue  # not a file of the working directory
        with open(path, "rb") as f:
            source = f.read()
        files[os.path.relpath(path, directory)] = hashlib.sha256(source).hexdigest()[:16]
        try:
            tree = ast.parse(source, filename=path)
        except (SyntaxError, ValueError):
            continue  # importing it fails, and says why; its bytes are hashed all the same
        package = name if os.path.basename(path) == "__init__.py" else name.rpartition(".")[0]
        pending += _imported(tree, package)
        handles.update(_handle_names(tree))
    return LocalCode(dict(sorted(files.items())), frozenset(handles))


def module_file(directory: str, name: str) -> Optional[str]:
    """The file of module ``name`` under ``directory`` (``a/b.py`` or ``a/b/__init__.py``),
    if there is one."""
    base = os.path.join(directory, *name.split("."))
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _parents(name: str) -> List[str]:
    """The packages importing ``name`` runs first: ``a.b.c`` -> ``a``, ``a.b``."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def _imported(tree: ast.AST, package: str) -> Iterator[str]:
    """The modules a module's import statements may import (``from a import b``: ``a``, and
    ``a.b`` in case ``b`` is a submodule); relative ones resolved against ``package``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            if base is None:
                continue
            if base:
                yield base
            yield from (f"{base}.{alias.name}" if base else alias.name
                        for alias in node.names if alias.name != "*")


def _absolute(module: Optional[str], level: int, package: str) -> Optional[str]:
    """The absolute name of ``from <level dots><module> import``; None if it climbs out of
    the top-level package."""
    if level == 0:
        return module or ""
    parts = package.split(".") if package else []
    if level - 1 > len(parts) or (level - 1 == len(parts) and not module):
        return None
    kept = parts[:len(parts) - (level - 1)]
    return ".".join(kept + ([module] if module else []))


def _handle_names(tree: ast.AST) -> Iterator[str]:
    """The literal endpoint names of ``get_handle(...)`` calls."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        called = function.attr if isinstance(function, ast.Attribute) else \
            function.id if isinstance(function, ast.Name) else None
        if called != "get_handle":
            continue
        arguments = node.args[:1] + [k.value for k in node.keywords
                                     if k.arg == "endpoint_name"]
        yield from (arg.value for arg in arguments
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str))
