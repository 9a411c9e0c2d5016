"""What a backend of a deploy spec runs: its import resolved here, its ``source`` and its
``ReplicaConfig``.

Each backend is imported in this process first (with the file's directory on ``sys.path``),
so that an import error, a bad init-args shape or a config the class cannot take is a
validation error before anything changes. Replicas import the same path themselves, with
the same directory on their ``sys.path``: what they run is the code on disk when they start.

``source`` is the mark of a file-made backend and what "the same definition" means: the
import path, init args, actor options, env, and ``revision``, a hash of the local modules
(those under the file's directory) as imported now, so that edited code under the same
import path is a changed definition.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import sys
from typing import Any, Dict, List, Optional

from servekit._private import user_errors
from servekit._private.asgi_app import ASGIFactory
from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig
from servekit._private.config_checks import validate_backend_against_config
from servekit._private.deploy.schema import BackendSpec, DeployFileError, DeploySpec
from servekit._private.import_path import import_attribute
from servekit.env import CondaEnv, Environment, VirtualEnv


def import_from_directory(directory: str, import_path: str) -> Any:
    """Import ``import_path`` with ``directory`` first on ``sys.path`` (run in replicas,
    when their backend definition is unpickled)."""
    if directory not in sys.path:
        sys.path.insert(0, directory)
    return import_attribute(import_path)


class _ImportInReplica:
    """Pickles as a call of ``import_from_directory``: the replica imports the backend."""

    def __init__(self, directory: str, import_path: str) -> None:
        self.directory = directory
        self.import_path = import_path

    def __reduce__(self) -> Any:
        return import_from_directory, (self.directory, self.import_path)


@dataclasses.dataclass(frozen=True)
class BackendDefinition:
    """A backend of a spec, imported and checked: what ``create_backend`` and
    ``redeploy_backend`` are given."""

    spec: BackendSpec
    directory: str
    source: Dict[str, Any]
    metadata: BackendMetadata
    python: Optional[str]

    def replica_config(self) -> ReplicaConfig:
        """The ``ReplicaConfig`` of this definition, marked with its ``source``."""
        serialized = user_errors.dumps_by_value(
            (_ImportInReplica(self.directory, self.spec.import_path),
             tuple(self.spec.init_args)))
        return ReplicaConfig(serialized, dict(self.spec.ray_actor_options),
                             self.spec.import_path, self.python, source=self.source)


def local_modules(directory: str) -> Dict[str, str]:
    """The modules imported in this process from files under ``directory`` (not from a
    virtualenv inside it), by name -> file."""
    prefix = os.path.join(os.path.abspath(directory), "")
    found = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if isinstance(path, str) and os.path.abspath(path).startswith(prefix) and \
                "-packages" + os.sep not in path:
            found[name] = os.path.abspath(path)
    return found


def forget_local_modules(directory: str) -> None:
    """Drop the local modules from ``sys.modules``, so the next import reads the files
    again (how a reload sees edited code); and the modules imported from elsewhere under a
    name the directory has a module of (``models`` of another project), so the next import
    finds the directory's own."""
    for name in local_modules(directory):
        sys.modules.pop(name, None)
    shadowed = {top for top in {n.partition(".")[0] for n in sys.modules}
                if _shadowed_by(top, directory)}
    for name in [n for n in sys.modules if n.partition(".")[0] in shadowed]:
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


def _shadowed_by(top_level: str, directory: str) -> bool:
    """Whether ``directory`` has a module or package named ``top_level`` other than the
    one imported under that name."""
    candidates = (os.path.join(directory, f"{top_level}.py"),
                  os.path.join(directory, top_level, "__init__.py"))
    if not any(os.path.isfile(path) for path in candidates):
        return False
    imported = getattr(sys.modules.get(top_level), "__file__", None)
    return not (isinstance(imported, str) and os.path.abspath(imported) in
                {os.path.abspath(path) for path in candidates})


def revision(directory: str) -> str:
    """A hash of the local modules' files as they are now (names, paths and contents)."""
    digest = hashlib.sha256()
    for name, path in sorted(local_modules(directory).items()):
        digest.update(f"{name}\0{os.path.relpath(path, directory)}\0".encode())
        try:
            with open(path, "rb") as f:
                digest.update(f.read())
        except OSError:
            digest.update(b"(unreadable)")
    return digest.hexdigest()[:16]


def load_definitions(spec: DeploySpec) -> Dict[str, BackendDefinition]:
    """Import and check every backend of ``spec``, freshly from disk.

    Raises:
        DeployFileError: a backend cannot be imported, is not a function or class, takes
            init args it cannot (a function), its config asks for what it cannot do, or its
            env is not found — every problem, each with its place.
    """
    directory = os.path.abspath(spec.directory)
    forget_local_modules(directory)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    problems: List[str] = []
    checked: Dict[str, tuple] = {}
    for backend in spec.backends.values():
        try:
            checked[backend.name] = _check(backend)
        except _Problem as problem:
            problems.append(f"{spec.where(backend.place + (problem.field,))}: {problem}")
    if problems:
        raise DeployFileError(problems)
    current = revision(directory)
    return {name: BackendDefinition(spec.backends[name], directory,
                                    source_of(spec.backends[name], current), metadata, python)
            for name, (metadata, python) in checked.items()}


def source_of(backend: BackendSpec, current_revision: str) -> Dict[str, Any]:
    """The ``ReplicaConfig.source`` of a file-made backend (JSON-able)."""
    return {"import_path": backend.import_path, "init_args": list(backend.init_args),
            "ray_actor_options": dict(backend.ray_actor_options), "env": backend.env,
            "revision": current_revision}


class _Problem(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _check(backend: BackendSpec) -> tuple:
    """(metadata, python) of a backend, imported here; ``_Problem`` naming the field."""
    try:
        target = import_attribute(backend.import_path)
    except Exception as exc:  # the module's own code may raise anything
        raise _Problem("import_path", f"cannot import {backend.import_path!r}: "
                                      f"{type(exc).__name__}: {exc}") from None
    try:
        metadata = BackendMetadata.inspect(target)
    except TypeError as exc:
        raise _Problem("import_path", str(exc)) from None
    if not metadata.is_class and not isinstance(target, ASGIFactory) and backend.init_args:
        kind = "an ASGI app" if metadata.asgi else "a function"
        raise _Problem("init_args", f"{backend.import_path} is {kind}: it takes no init "
                                    "args (use a class, or an ASGI app factory, to take them)")
    try:
        validate_backend_against_config(metadata, backend.config)
    except ValueError as exc:
        raise _Problem("config", str(exc)) from None
    return metadata, _python(backend.env)


def _python(env: Optional[Dict[str, str]]) -> Optional[str]:
    if env is None:
        return None
    environment: Environment = CondaEnv(env["conda"]) if "conda" in env else \
        VirtualEnv(env["virtualenv"])
    try:
        return environment.python()
    except Exception as exc:
        raise _Problem("env", str(exc)) from None
