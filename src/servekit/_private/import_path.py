"""Import paths of backends: "pkg.module:Name" or "pkg.module.Name"; importing one, and
finding the one of an object."""

from __future__ import annotations

import importlib
import sys
from typing import Any

# Modules a replica cannot import by their name: the user's script.
_SCRIPT_MODULES = ("__main__", "__mp_main__")


def import_attribute(path: str) -> Any:
    """Import the object that ``path`` names; raise ImportError saying what was tried."""
    if ":" in path:
        module_name, _, attribute = path.partition(":")
    else:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"Import path {path!r} must look like 'pkg.module:Name' or "
                         "'pkg.module.Name'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"Could not import module {module_name!r} of backend {path!r}: "
                          f"{exc}") from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ImportError(f"Module {module_name!r} has no attribute {attribute!r} "
                              f"(backend {path!r}).") from None
    return target


def import_path_of(obj: Any) -> str | None:
    """An import path "module:name" that names ``obj`` itself, or None if there is none.

    Looks through the globals of the imported modules that come from a file, but the
    script (``__main__``); the first module that holds ``obj`` wins.
    """
    for module_name, module in list(sys.modules.items()):
        if module_name in _SCRIPT_MODULES or getattr(module, "__file__", None) is None:
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if value is obj:
                return f"{module_name}:{name}"
    return None
