"""Errors raised by servekit.

The tree::

    Exception
     ├── ServeError (alias RayServeException)   lifecycle errors: no instance running, a client
     │    │                                      used after shutdown, a replica that died, ...
     │    ├── BackendUnavailableError           a request could not reach any replica, or
     │    │                                      the replica running it died
     │    ├── BackendOverloadedError            shed at once: every replica was full and the
     │    │                                      router's queue for the backend too (HTTP 503)
     │    ├── RequestTimeoutError               no reply within request_timeout_s (HTTP 504);
     │    │                                      also a TimeoutError
     │    ├── HostNotFoundError                 http_options' host does not resolve; also a
     │    │                                      socket.gaierror
     │    ├── EndpointNotFoundError             a handle call to an endpoint that was deleted
     │    │                                      or not created in time
     │    ├── MethodNotFoundError               a method name the backend does not serve
     │    └── BatchOutputError                  a batched function returned the wrong shape
     ├── TypeError                              an argument of the wrong type or shape
     ├── ValueError                             a state conflict (duplicate, unknown backend, ...)
     ├── KeyError                               a handle to an endpoint that does not exist
     └── pydantic.ValidationError               a bad field in BackendConfig / HTTPOptions

An exception raised by user code inside a replica reaches a handle caller re-raised with its
own type; the replica-side traceback is attached as its ``__cause__`` (a ``RemoteTraceback``).
"""

from __future__ import annotations

import socket


class ServeError(Exception):
    """Root of servekit's own errors."""


RayServeException = ServeError


class BackendUnavailableError(ServeError):
    """A request could not be delivered: the replica it was sent to died or was force-stopped."""


class BackendOverloadedError(ServeError):
    """A request was refused at once: every replica of its backend was at its cap and the
    router already held ``max_queued_requests`` for it. Nothing ran; retry later."""


class RequestTimeoutError(ServeError, TimeoutError):
    """A request did not end within its ``request_timeout_s`` (the backend's, or a handle's
    ``options(timeout_s=...)``): it was cancelled (HTTP 504). A sync call already running
    finishes on its thread, holding its place on the replica until then."""


class HostNotFoundError(ServeError, socket.gaierror):
    """``http_options['host']`` does not resolve. Also a ``socket.gaierror``, as Ray Serve
    1.x raised."""


class EndpointNotFoundError(ServeError):
    """A handle call's endpoint was deleted, or was not created within the deadline."""


class MethodNotFoundError(ServeError):
    """A request named a method that the backend does not serve (HTTP 404)."""


class BatchOutputError(ServeError):
    """A batched function (``@serve.batch``, ``@accept_batch``) returned something other
    than one result per request."""


class RemoteTraceback(Exception):
    """Carries the formatted traceback of an exception raised in another process."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f"\n\nTraceback from the servekit process that raised it:\n{self.tb}"
