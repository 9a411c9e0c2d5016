"""Importing a backend given as a string: "pkg.module:Name" or "pkg.module.Name"."""

from __future__ import annotations

import importlib
from typing import Any


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
