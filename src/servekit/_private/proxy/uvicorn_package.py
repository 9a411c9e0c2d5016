"""uvicorn's package without its command line.

Importing any of uvicorn's modules runs its package's ``__init__``, which imports
``uvicorn.main``: the command line, and with it click, watchfiles, multiprocessing and
importlib.metadata, none of which a proxy runs (about 2.5 MB of every proxy's memory, and
its start-up time). ``install()`` puts the package in ``sys.modules`` without running that
file: the proxy imports the modules it serves with (config, server, protocols), and the
names the package's ``__init__`` defines are imported on first use, so ``uvicorn.run`` or
``from uvicorn import Config`` still work wherever they are asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any

# The names uvicorn's __init__ binds, and the module each is imported from there.
_NAMES = {"__version__": "uvicorn._version", "Config": "uvicorn.config",
          "Server": "uvicorn.server", "main": "uvicorn.main", "run": "uvicorn.main"}


def install() -> None:
    """Put uvicorn's package in ``sys.modules``, its ``__init__`` not run (nothing if it is
    imported already, or not installed: then importing from it fails as usual)."""
    if "uvicorn" in sys.modules:
        return
    spec = importlib.util.find_spec("uvicorn")
    if spec is None:
        return
    package = importlib.util.module_from_spec(spec)
    package.__all__ = ["main", "run", "Config", "Server"]  # type: ignore[attr-defined]
    package.__getattr__ = _package_name  # type: ignore[method-assign]
    sys.modules["uvicorn"] = package


def _package_name(name: str) -> Any:
    """What uvicorn's ``__init__`` binds ``name`` to, imported on first use."""
    source = _NAMES.get(name)
    if source is None:
        raise AttributeError(f"module 'uvicorn' has no attribute {name!r}")
    module = importlib.import_module(source)
    # (all the names from that module: importing uvicorn.main bound "main" to the module)
    for bound, its_source in _NAMES.items():
        if its_source == source:
            setattr(sys.modules["uvicorn"], bound, getattr(module, bound))
    return getattr(module, name)
