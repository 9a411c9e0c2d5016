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
    "connect",
    "get_current_backend_tag",
    "get_current_replica_tag",
    "get_request_id",
    "ingress",
    "metrics_text",
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
