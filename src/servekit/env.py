"""Interpreter environments a backend's replicas can run in: conda envs and virtualenvs.

The environment must have servekit installed (the same version is safest); its own
packages are what the backend imports.
"""

from __future__ import annotations

import abc
import json
import os
import shutil
import subprocess
from typing import List, Optional

from servekit.exceptions import ServeError


class Environment(abc.ABC):
    """Base of the environments ``create_backend(env=...)`` accepts."""

    def python(self) -> str:
        """The interpreter path; checks that it exists and can import servekit."""
        path = self._interpreter()
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise ValueError(f"{self!r}: no Python interpreter at {path}.")
        check = subprocess.run([path, "-c", "import servekit"], capture_output=True,
                               text=True, timeout=60)
        if check.returncode != 0:
            raise ServeError(f"{self!r}: servekit is not installed in {path} "
                             f"({check.stderr.strip().splitlines()[-1:]}). Install it there "
                             "with `<that python> -m pip install servekit`.")
        return path

    @abc.abstractmethod
    def _interpreter(self) -> str:
        """The interpreter path this environment names (not yet checked)."""


class VirtualEnv(Environment):
    """A virtualenv directory (``.../venv``) or a path to any Python interpreter."""

    def __init__(self, path: str) -> None:
        if not isinstance(path, str) or not path:
            raise TypeError(f"VirtualEnv needs a directory or interpreter path, got {path!r}.")
        self.path = os.path.abspath(os.path.expanduser(path))

    def _interpreter(self) -> str:
        if os.path.isdir(self.path):
            for candidate in ("bin/python", "bin/python3", "Scripts/python.exe"):
                full = os.path.join(self.path, candidate)
                if os.path.exists(full):
                    return full
            raise ValueError(f"{self!r}: {self.path} is a directory without bin/python; "
                             "pass a virtualenv directory or an interpreter path.")
        if not os.path.exists(self.path):
            raise ValueError(f"{self!r}: {self.path} does not exist.")
        return self.path

    def __repr__(self) -> str:
        return f"VirtualEnv({self.path!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VirtualEnv) and other.path == self.path


class CondaEnv(Environment):
    """A conda environment, by name."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"CondaEnv needs an environment name, got {name!r}.")
        self.name = name

    def _interpreter(self) -> str:
        for env_dir in _conda_env_dirs():
            if os.path.basename(env_dir) == self.name or (
                    self.name == "base" and not os.path.basename(os.path.dirname(env_dir))
                    == "envs"):
                return os.path.join(env_dir, "bin", "python")
        raise ValueError(f"Conda environment {self.name!r} was not found. Create it with "
                         f"`conda create -n {self.name} python`, or use VirtualEnv(path).")

    def __repr__(self) -> str:
        return f"CondaEnv({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CondaEnv) and other.name == self.name


def _conda_env_dirs() -> List[str]:
    conda: Optional[str] = os.environ.get("CONDA_EXE") or shutil.which("conda")
    if conda is None:
        raise ServeError("CondaEnv needs conda, but neither $CONDA_EXE nor `conda` on PATH "
                         "was found. Use VirtualEnv(path) for other environments.")
    listing = subprocess.run([conda, "env", "list", "--json"], capture_output=True, text=True,
                             timeout=60)
    if listing.returncode != 0:
        raise ServeError(f"`conda env list` failed: {listing.stderr.strip()}")
    return list(json.loads(listing.stdout).get("envs", []))
