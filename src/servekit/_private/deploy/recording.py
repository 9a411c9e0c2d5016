"""A stand-in for ``Client`` that records the backends and endpoints a function declares.

``servekit run module:function`` calls the function with a ``RecordingClient``; what it
declares becomes the same dict a deploy file holds, which is then applied like a file. So a
reload is a diff against what runs (not "tag already exists"), and the function's backends
are marked as file-made, with the revision of the code they ran. ``servekit build`` writes
that dict as a deploy file.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from typing import Any, Callable, Dict, List, Optional, Union

from servekit._private.config_checks import parse_backend_config
from servekit._private.deploy.definition import forget_local_modules
from servekit._private.import_path import import_path_of
from servekit.config import BackendConfig
from servekit.env import CondaEnv, Environment, VirtualEnv
from servekit.exceptions import ServeError


def record(target: str, directory: str) -> Dict[str, Any]:
    """What ``target`` (``module:function``, imported afresh from ``directory``) declares
    when called with a ``RecordingClient``, as a deploy file's contents.

    Raises:
        ValueError: ``target`` is not ``module:function``.
        Exception: whatever importing or calling the function raises.
    """
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"{target!r} is not 'module:function' (a function that takes a "
                         "client and creates backends and endpoints).")
    forget_local_modules(directory)
    while directory in sys.path:
        sys.path.remove(directory)
    sys.path.insert(0, directory)
    function = getattr(importlib.import_module(module_name), function_name)
    recorder = RecordingClient()
    function(recorder)
    return recorder.to_deploy_dict()


class RecordingClient:
    """Records ``create_backend``, ``update_backend_config``, ``delete_backend``,
    ``create_endpoint``, ``set_traffic``, ``shadow_traffic`` and ``delete_endpoint`` calls
    (with the ``Client``'s signatures); ``to_deploy_dict()`` is what they declare."""

    def __init__(self) -> None:
        self._backends: Dict[str, Dict[str, Any]] = {}
        self._endpoints: Dict[str, Dict[str, Any]] = {}

    def create_backend(self, backend_tag: str, func_or_class: Union[Callable, type, str],
                       *actor_init_args: Any, ray_actor_options: Optional[Dict] = None,
                       config: Union[BackendConfig, Dict[str, Any], None] = None,
                       env: Optional[Environment] = None) -> None:
        if backend_tag in self._backends:
            raise ValueError(f"Backend '{backend_tag}' is already declared.")
        init_args = list(actor_init_args)
        try:
            json.dumps(init_args)
        except (TypeError, ValueError):
            raise TypeError(f"The init args of backend '{backend_tag}' must be plain data "
                            f"(str, numbers, lists, dicts), as in a deploy file; got "
                            f"{init_args!r}.") from None
        entry: Dict[str, Any] = {"name": backend_tag, "import_path": _import_path(func_or_class),
                                 "init_args": init_args,
                                 "ray_actor_options": dict(ray_actor_options or {}),
                                 "config": _set_fields(parse_backend_config(config))}
        if env is not None:
            entry["env"] = _env_entry(env)
        self._backends[backend_tag] = entry

    def update_backend_config(self, backend_tag: str,
                              config_options: Union[BackendConfig, Dict[str, Any]]) -> None:
        entry = self._backend(backend_tag)
        merged = BackendConfig.model_validate(entry["config"]).merged(config_options)
        entry["config"] = _set_fields(merged)

    def delete_backend(self, backend_tag: str, force: bool = False) -> None:
        self._backends.pop(backend_tag, None)

    def create_endpoint(self, endpoint_name: str, *, backend: Optional[str] = None,
                        route: Optional[str] = None,
                        methods: List[str] = ["GET"]) -> None:  # noqa: B006 (never mutated)
        if endpoint_name in self._endpoints:
            raise ValueError(f"Endpoint '{endpoint_name}' is already declared.")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a backend tag, got {backend!r}.")
        self._endpoints[endpoint_name] = {"name": endpoint_name, "route": route,
                                          "methods": list(methods), "traffic": {backend: 1.0},
                                          "shadows": {}}

    def set_traffic(self, endpoint_name: str, traffic_policy_dictionary: Dict[str, float]) -> None:
        self._endpoint(endpoint_name)["traffic"] = dict(traffic_policy_dictionary)

    def shadow_traffic(self, endpoint_name: str, backend_tag: str, proportion: float) -> None:
        shadows = self._endpoint(endpoint_name)["shadows"]
        if proportion == 0:
            shadows.pop(backend_tag, None)
        else:
            shadows[backend_tag] = proportion

    def delete_endpoint(self, endpoint: str) -> None:
        self._endpoints.pop(endpoint, None)

    def list_backends(self) -> Dict[str, BackendConfig]:
        return {tag: BackendConfig.model_validate(entry["config"])
                for tag, entry in self._backends.items()}

    def list_endpoints(self) -> Dict[str, Dict[str, Any]]:
        return {name: {key: entry[key] for key in ("route", "methods", "traffic", "shadows")}
                for name, entry in self._endpoints.items()}

    def to_deploy_dict(self) -> Dict[str, Any]:
        """What was declared, as a deploy file's contents."""
        return {"backends": list(self._backends.values()),
                "endpoints": list(self._endpoints.values())}

    def __getattr__(self, name: str) -> Any:
        raise ServeError(f"Client.{name} is not available while `servekit run` records the "
                         "backends and endpoints a function declares: the function should "
                         "only declare them (create_backend, create_endpoint, set_traffic, "
                         "...). Get handles from serve.connect() elsewhere.")

    def _backend(self, tag: str) -> Dict[str, Any]:
        if tag not in self._backends:
            raise ValueError(f"Backend '{tag}' is not declared. Declared backends: "
                             f"{sorted(self._backends)}.")
        return self._backends[tag]

    def _endpoint(self, name: str) -> Dict[str, Any]:
        if name not in self._endpoints:
            raise ValueError(f"Endpoint '{name}' is not declared. Declared endpoints: "
                             f"{sorted(self._endpoints)}.")
        return self._endpoints[name]


def _import_path(func_or_class: Union[Callable, type, str]) -> str:
    """The import path a replica finds ``func_or_class`` by."""
    if isinstance(func_or_class, str):
        return func_or_class
    if not (inspect.isclass(func_or_class) or inspect.isfunction(func_or_class)):
        found = import_path_of(func_or_class)  # an ASGI app, or an app factory
        if found is not None:
            return found
    module = getattr(func_or_class, "__module__", None)
    qualname = getattr(func_or_class, "__qualname__", None)
    if not (inspect.isclass(func_or_class) or inspect.isfunction(func_or_class)) or \
            module in (None, "__main__") or not qualname or "<locals>" in qualname:
        raise TypeError(f"{func_or_class!r} cannot be found by an import path: define the "
                        "backend's function or class at the top level of a module (not in "
                        "__main__, not inside a function), or pass its import path "
                        "'module:Name'.")
    return f"{module}:{qualname}"


def _set_fields(config: BackendConfig) -> Dict[str, Any]:
    return {name: getattr(config, name) for name in config.model_fields_set}


def _env_entry(env: Environment) -> Dict[str, str]:
    if isinstance(env, CondaEnv):
        return {"conda": env.name}
    if isinstance(env, VirtualEnv):
        return {"virtualenv": env.path}
    raise TypeError(f"env must be a CondaEnv or VirtualEnv, got {env!r}.")
