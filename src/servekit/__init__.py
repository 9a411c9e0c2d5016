"""servekit: serve machine-learning models and Python code behind HTTP and Python handles."""

from __future__ import annotations

from servekit.api import (
    Client,
    accept_batch,
    connect,
    get_current_backend_tag,
    get_current_replica_tag,
    get_request_id,
    metrics_text,
    start,
)
from servekit.config import BackendConfig, DeploymentMode, HTTPOptions
from servekit.env import CondaEnv, VirtualEnv
from servekit.exceptions import RayServeException, ServeError
from servekit.handle import ServeHandle, ServeResponse, ServeSyncHandle
from servekit.request import ServeRequest

__version__ = "0.1.0"

__all__ = [
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
    "connect",
    "get_current_backend_tag",
    "get_current_replica_tag",
    "get_request_id",
    "metrics_text",
    "start",
]
