"""The public names of ``servekit``: ``__all__`` is pinned so the API cannot drift by accident."""

from __future__ import annotations

import importlib
import inspect

import pytest

import servekit

EXPECTED_ALL = sorted([
    "AutoscalingConfig",
    "BackendConfig",
    "Client",
    "CondaEnv",
    "DeploymentMode",
    "HTTPOptions",
    "RayServeException",
    "ServeError",
    "ServeHandle",
    "ServeRequest",
    "ServeResponse",
    "ServeSyncHandle",
    "VirtualEnv",
    "__version__",
    "accept_batch",
    "asgi_factory",
    "batch",
    "connect",
    "get_current_backend_tag",
    "get_current_replica_tag",
    "get_multiplexed_model_id",
    "get_request_id",
    "ingress",
    "metrics_text",
    "multiplexed",
    "start",
])


def test_all_is_pinned_sorted_and_unique() -> None:
    assert servekit.__all__ == EXPECTED_ALL
    assert len(set(servekit.__all__)) == len(servekit.__all__)


@pytest.mark.parametrize("name", EXPECTED_ALL)
def test_each_public_name_is_importable(name: str) -> None:
    module = importlib.import_module("servekit")
    assert getattr(module, name) is not None
    namespace: dict = {}
    exec(f"from servekit import {name}", namespace)
    assert namespace[name] is getattr(servekit, name)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict = {}
    exec("from servekit import *", namespace)
    namespace.pop("__builtins__", None)
    assert sorted(namespace) == EXPECTED_ALL


def test_no_public_name_is_left_out_of_all() -> None:
    public = {
        name for name in dir(servekit)
        if not name.startswith("_") and not inspect.ismodule(getattr(servekit, name))
        and name != "annotations"  # from __future__ import annotations
    }
    assert public <= set(servekit.__all__)


def test_ray_serve_exception_is_an_alias_of_serve_error() -> None:
    assert servekit.RayServeException is servekit.ServeError
    assert isinstance(servekit.__version__, str) and servekit.__version__


# The names users import from the public modules (their implementations may live under
# ``_private``): each keeps working from where it was.
PUBLIC_MODULE_NAMES = {
    "servekit.config": ["AutoscalingConfig", "BackendConfig", "BackendMetadata",
                        "DeploymentMode", "HTTPOptions", "ReplicaConfig"],
    "servekit.request": ["HTTPRequest", "HTTPRequestWire", "HTTPResponseWire", "KwargParams",
                         "ServeRequest", "error_response", "json_dumps", "json_response",
                         "request_from_wire", "text_response", "to_http_response",
                         "wire_from_scope"],
    "servekit.handle": ["ServeHandle", "ServeResponse", "ServeSyncHandle"],
    "servekit.exceptions": ["RayServeException", "ServeError"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC_MODULE_NAMES))
def test_public_modules_keep_their_names(module: str) -> None:
    imported = importlib.import_module(module)
    for name in PUBLIC_MODULE_NAMES[module]:
        assert getattr(imported, name) is not None, f"{module}.{name}"
    declared = getattr(imported, "__all__", None)
    if declared is not None:
        assert set(PUBLIC_MODULE_NAMES[module]) <= set(declared)
