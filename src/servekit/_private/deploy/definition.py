"""What a backend of a deploy spec runs: its import resolved here, its ``source`` and its
``ReplicaConfig``.

Each backend is imported in this process first (with its working directory on
``sys.path``), so that an import error, init args its constructor cannot take or a config
the class cannot take is a validation error before anything changes. Replicas import the
same path themselves, with the same directory on their ``sys.path``: what they run is the
code on disk when they start.

``source`` is the mark of a file-made backend and what "the same definition" means: the
import path, init args, actor options, env, working directory and the local files the
backend's imports reach (``local_code``), hashed together as its ``revision``; and
``deploy``, the name of the file that made it. An edit to a module the backend imports is a
changed definition; a new file, or an edit to another backend's module, is not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import sys
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Tuple

from servekit._private import user_errors
from servekit._private.asgi_app import ASGIFactory
from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig
from servekit._private.config_checks import validate_backend_against_config
from servekit._private.deploy.local_code import local_code
from servekit._private.deploy.schema import BackendSpec, DeploySpec, Problem
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
    source: Dict[str, Any]
    metadata: BackendMetadata
    python: Optional[str]
    # The endpoints it may get handles to: the names its code passes to get_handle, and the
    # strings of its init args (a name it is given).
    handles: FrozenSet[str] = frozenset()

    def replica_config(self) -> ReplicaConfig:
        """The ``ReplicaConfig`` of this definition, marked with its ``source``."""
        serialized = user_errors.dumps_by_value(
            (_ImportInReplica(self.spec.working_dir, self.spec.import_path),
             tuple(self.spec.init_args)))
        return ReplicaConfig(serialized, dict(self.spec.ray_actor_options),
                             self.spec.import_path, self.python, source=self.source)


def local_modules(directory: str) -> Dict[str, str]:
    """The modules imported in this process from ``directory`` as their import root (its
    own modules and packages, not a virtualenv inside it nor a project installed from a
    folder of it, as servekit itself from ``src/`` of a checkout), by name -> file."""
    root = os.path.abspath(directory)
    found = {}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not isinstance(path, str):
            continue
        relative = os.path.relpath(os.path.abspath(path), root)
        top = name.partition(".")[0]
        if relative in (f"{top}.py", os.path.join(top, "__init__.py")) or \
                (name != top and relative.startswith(top + os.sep)):
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


# What a backend runs, in its ``source``: a change of any is a replacement.
DEFINITION_KEYS = ("import_path", "init_args", "ray_actor_options", "env", "working_dir",
                   "files")


def load_definitions(spec: DeploySpec) -> Dict[str, BackendDefinition]:
    """Import and check every backend of ``spec``, freshly from disk.

    Raises:
        DeployFileError: as ``check_definitions`` finds.
    """
    definitions, problems = check_definitions(spec)
    if problems:
        raise spec.error(problems)
    return definitions


def check_definitions(spec: DeploySpec) -> Tuple[Dict[str, BackendDefinition], List[Problem]]:
    """Import and check every backend of ``spec``, freshly from disk, each from its working
    directory: the definitions of those that pass, and every problem of the others (a
    backend that cannot be imported, is not a function or class, takes init args it cannot,
    whose config asks for what it cannot do, or whose env is not found)."""
    problems: List[Problem] = []
    definitions: Dict[str, BackendDefinition] = {}
    for directory in sorted({backend.working_dir for backend in spec.backends.values()}):
        forget_local_modules(directory)
        while directory in sys.path:
            sys.path.remove(directory)
        sys.path.insert(0, directory)  # first: its modules win over another directory's
        for backend in spec.backends.values():
            if backend.working_dir != directory:
                continue
            metadata, python, found = _check(backend)
            problems += [(backend.place + (field,), message) for field, message in found]
            if metadata is None or found:
                continue
            # "module:Name", or "module.Name" (whose module is found among its parents)
            code = local_code(directory, backend.import_path.partition(":")[0])
            definitions[backend.name] = BackendDefinition(
                backend, source_of(backend, code.files, spec.name), metadata, python,
                code.handles | frozenset(_strings(backend.init_args)))
    return definitions, problems


def _strings(value: Any) -> Iterator[str]:
    """The strings in plain data (lists and dicts, keys too)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)


def source_of(backend: BackendSpec, files: Dict[str, str], deploy: str) -> Dict[str, Any]:
    """The ``ReplicaConfig.source`` of a file-made backend (JSON-able): its definition
    (``DEFINITION_KEYS``), their hash ``revision``, and the name of the file that made it."""
    definition = {"import_path": backend.import_path, "init_args": list(backend.init_args),
                  "ray_actor_options": dict(backend.ray_actor_options), "env": backend.env,
                  "working_dir": backend.working_dir, "files": files}
    text = json.dumps(definition, sort_keys=True, default=repr).encode()
    return {**definition, "revision": hashlib.sha256(text).hexdigest()[:16],
            "deploy": deploy}


def _check(backend: BackendSpec) -> Tuple[Optional[BackendMetadata], Optional[str],
                                         List[Tuple[str, str]]]:
    """A backend imported here: its metadata (None if it cannot be imported), the
    interpreter of its env, and its problems, (field, what is wrong) each."""
    problems: List[Tuple[str, str]] = []
    python = None
    try:
        python = _python(backend.env)
    except Exception as exc:  # an environment not found, or without servekit
        problems.append(("env", str(exc)))
    try:
        target = import_attribute(backend.import_path)
    except Exception as exc:  # the module's own code may raise anything
        problems.append(("import_path", f"cannot import {backend.import_path!r}: "
                                        f"{type(exc).__name__}: {exc}"))
        return None, python, problems
    try:
        metadata = BackendMetadata.inspect(target)
    except TypeError as exc:  # neither a function nor a class
        problems.append(("import_path", str(exc)))
        return None, python, problems
    if not metadata.is_class and not isinstance(target, ASGIFactory) and backend.init_args:
        kind = "an ASGI app" if metadata.asgi else "a function"
        problems.append(("init_args", f"{backend.import_path} is {kind}: it takes no init "
                                      "args (use a class, or an ASGI app factory, to take "
                                      "them)"))
    else:
        problems += _init_args_problems(backend, target)
    try:
        validate_backend_against_config(metadata, backend.config)
    except ValueError as exc:
        problems.append(("config", str(exc)))
    return metadata, python, problems


def _init_args_problems(backend: BackendSpec, target: Any) -> Iterator[Tuple[str, str]]:
    """Init args the constructor (or app factory) cannot be called with."""
    constructor = target.function if isinstance(target, ASGIFactory) else \
        target if inspect.isclass(target) else None
    if constructor is None:
        return
    try:
        signature = inspect.signature(constructor)
    except (TypeError, ValueError):
        return  # a builtin, or a signature Python cannot tell
    try:
        signature.bind(*backend.init_args)
    except TypeError as exc:
        yield "init_args", f"{backend.import_path}{signature} cannot take " \
                           f"{backend.init_args!r}: {exc}; give init_args one value per " \
                           "parameter, in order"


def _python(env: Optional[Dict[str, str]]) -> Optional[str]:
    """The interpreter of ``env`` (None: this one's)."""
    if env is None:
        return None
    environment: Environment = CondaEnv(env["conda"]) if "conda" in env else \
        VirtualEnv(env["virtualenv"])
    return environment.python()
