"""ASGI applications (FastAPI, Starlette) as backends, and how a replica builds one.

Three kinds of backend serve HTTP through an ASGI app:

- an app object (``is_asgi_app``), which the client ships by import path when a module
  holds it, so it is never pickled;
- an ``ASGIFactory`` (``asgi_factory``): a function that builds the app in each replica;
- an ``@ingress(app)`` class, constructed in each replica with its init args; the routes of
  ``app`` defined in the class reach that instance as ``self``.

``load_app`` builds any of them in a replica.
"""

from __future__ import annotations

import copyreg
import dataclasses
import inspect
import sys
from typing import Any, Callable, Sequence

from servekit._private.import_path import import_attribute

# The attribute ``@ingress`` marks a class with: its ``_Ingress``.
_INGRESS = "__servekit_ingress__"
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class ASGIFactory:
    """Builds a backend's ASGI app in each replica: ``factory(*init_args)``.

    Holds the function, or its import path ("pkg.module:create_app"), never the app, so the
    app is not pickled. Calling it calls the function. Made by ``asgi_factory``.
    """

    def __init__(self, factory: Callable[..., Any] | str) -> None:
        if is_asgi_app(factory):
            raise TypeError(
                f"serve.asgi_factory takes the function that builds an ASGI app, got the app "
                f"{factory!r} itself. Pass the app to create_backend directly, or pass the "
                "function that returns it.")
        if not isinstance(factory, str) and not callable(factory):
            raise TypeError(
                f"serve.asgi_factory takes a function or an import path 'pkg.module:create_app', "
                f"got {factory!r} ({type(factory).__name__}).")
        self._factory = factory

    @property
    def name(self) -> str:
        """The function's qualified name, or the import path."""
        if isinstance(self._factory, str):
            return self._factory
        return getattr(self._factory, "__qualname__", repr(self._factory))

    @property
    def function(self) -> Callable[..., Any] | None:
        """The function that builds the app (None: an import path, not imported here)."""
        return None if isinstance(self._factory, str) else self._factory

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        factory = self._factory
        if isinstance(factory, str):
            factory = import_attribute(factory)
        return factory(*args, **kwargs)

    def __repr__(self) -> str:
        return f"asgi_factory({self.name})"


def asgi_factory(func_or_import_path: Callable[..., Any] | str) -> ASGIFactory:
    """A backend that builds its ASGI app in each replica, so the app is never pickled.

    Give ``client.create_backend`` the result; its init args are the function's arguments.
    Works as a decorator; the decorated function can still be called directly::

        @serve.asgi_factory
        def create_app(greeting: str) -> FastAPI:
            app = FastAPI()

            @app.get("/hello")
            def hello() -> str:
                return greeting

            return app

        client.create_backend("hello", create_app, "hi")

    Args:
        func_or_import_path: the function, or its import path "pkg.module:create_app"
            (imported in the replica only). It must return a FastAPI or Starlette app (any
            ASGI 3 app).

    Raises:
        TypeError: neither callable nor a string, or an app instead of the function.
    """
    return ASGIFactory(func_or_import_path)


def is_asgi_app(obj: Any) -> bool:
    """Whether ``obj`` is an ASGI 3 app: a Starlette (or FastAPI) app, or a function or
    object whose call is ``async (scope, receive, send)``. A class is not an app."""
    # (Starlette is not imported for this: an app exists only once its module does.)
    applications = sys.modules.get("starlette.applications")
    if applications is not None and isinstance(obj, applications.Starlette):
        return True
    if inspect.isclass(obj) or not callable(obj):
        return False
    call = obj if inspect.isroutine(obj) else obj.__call__
    if not inspect.iscoroutinefunction(call):
        return False
    try:
        parameters = inspect.signature(call).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature
        return False
    return sum(parameter.kind in _POSITIONAL for parameter in parameters) == 3


def is_asgi_backend(target: Any) -> bool:
    """Whether ``target`` serves HTTP as an ASGI app: an ``ASGIFactory``, an ``@ingress``
    class, or an ASGI app."""
    return isinstance(target, ASGIFactory) or is_ingress_class(target) or is_asgi_app(target)


# --------------------------------------------------------------------------- ingress


class _Ingress:
    """What ``@ingress`` marks a class with: its app, and the instance its routes reach as
    ``self`` in this process."""

    def __init__(self, cls: type, app: Any) -> None:
        self.name = cls.__qualname__
        self.app = app
        self.instance: Any = None

    async def current_instance(self) -> Any:
        """The instance, as a FastAPI dependency (async: no thread per request)."""
        if self.instance is None:
            from starlette.exceptions import HTTPException

            raise HTTPException(
                503, f"{self.name} has no instance yet: servekit constructs it in each "
                     "replica before the replica serves requests.")
        return self.instance


def ingress(app: Any) -> Callable[[type], type]:
    """Serve HTTP through ``app`` in a class backend; its routes defined in the class get
    ``self``, the instance built in each replica.

    A class decorator; it returns the class itself, so handle calls to its methods work
    as for any class backend::

        app = FastAPI()

        @serve.ingress(app)
        class Model:
            def __init__(self, scale: int) -> None:
                self.scale = scale

            @app.get("/predict/{x}")
            def predict(self, x: int) -> dict:
                return {"y": x * self.scale}

        client.create_backend("model", Model, 3)

    Only routes declared on ``app`` itself (``@app.get``, ``@app.websocket``...) bind to
    ``self``, not those of an ``APIRouter`` it includes. Define the class in a module:
    servekit then ships it by reference; from a script it must pickle the app, which
    FastAPI does not always allow.

    Args:
        app: a FastAPI app. A Starlette app (any ASGI app) is accepted too; its routes take
            a request, never ``self``.

    Raises:
        TypeError: ``app`` is not an ASGI app; the decorated object is not a class, or is
            already decorated.
    """
    if not is_asgi_app(app):
        raise TypeError(
            f"serve.ingress takes an ASGI app (FastAPI, Starlette), got {app!r} "
            f"({type(app).__name__}). Write @serve.ingress(app) above the class, with the app "
            "its routes are declared on.")

    def decorate(cls: type) -> type:
        if not inspect.isclass(cls):
            raise TypeError(
                f"@serve.ingress(app) decorates a class, got {cls!r} ({type(cls).__name__}). "
                "To serve an app that a function builds, use serve.asgi_factory.")
        if _INGRESS in vars(cls):
            raise TypeError(f"{cls.__qualname__} is already decorated with @serve.ingress; "
                            "apply it once.")
        marker = _Ingress(cls, app)
        _bind_routes(app, cls, marker)
        setattr(cls, _INGRESS, marker)
        return cls

    return decorate


def is_ingress_class(target: Any) -> bool:
    """Whether ``target`` is a class decorated with ``@ingress`` (or a subclass of one)."""
    return inspect.isclass(target) and isinstance(getattr(target, _INGRESS, None), _Ingress)


def bind_instance(cls: type, instance: Any) -> None:
    """Make ``instance`` the ``self`` of the routes of ``@ingress`` class ``cls``.

    Raises:
        TypeError: ``cls`` is not an ``@ingress`` class, or ``instance`` is not one of its.
    """
    if not is_ingress_class(cls):
        raise TypeError(f"{cls!r} is not a class decorated with @serve.ingress.")
    if not isinstance(instance, cls):
        raise TypeError(f"{instance!r} is not an instance of {cls.__qualname__}.")
    getattr(cls, _INGRESS).instance = instance


def _bind_routes(app: Any, cls: type, marker: _Ingress) -> None:
    """Rebuild the routes of FastAPI ``app`` whose endpoints are functions of ``cls`` so
    that their first parameter is ``marker``'s instance, a FastAPI dependency."""
    try:
        import fastapi
        from fastapi.routing import APIRoute, APIWebSocketRoute
    except ImportError:  # without FastAPI, ``app`` is another ASGI app: no route takes self
        return
    if not isinstance(app, fastapi.FastAPI):
        return
    functions = {id(value) for value in vars(cls).values() if inspect.isfunction(value)}
    routes = app.router.routes
    bound = [route for route in routes
             if isinstance(route, (APIRoute, APIWebSocketRoute))
             and id(route.endpoint) in functions and _takes_self(route.endpoint)]
    if not bound:
        return
    self_dependency = fastapi.Depends(marker.current_instance)
    for route in bound:
        signature = _signature_with_self(route.endpoint, self_dependency)
        route.endpoint.__signature__ = signature  # type: ignore[attr-defined]
    # FastAPI reads an endpoint's parameters when it makes the route: included in the app
    # through a router, the routes are made again from their attributes (response_model,
    # status_code, dependencies...) with the new signatures.
    first = next(index for index, route in enumerate(routes) if route is bound[0])
    moved = {id(route) for route in bound}
    routes[:] = [route for route in routes if id(route) not in moved]
    router = fastapi.APIRouter()
    router.routes.extend(bound)
    before = len(routes)
    app.include_router(router)
    # Back where the first of them was: FastAPI tries routes in order, so routes declared
    # before the class still match first. (Routes declared in the class body but not bound,
    # static methods, now come after the bound ones.)
    added = routes[before:]
    del routes[before:]
    routes[first:first] = added


def _takes_self(func: Callable[..., Any]) -> bool:
    parameters = list(inspect.signature(func).parameters.values())
    return bool(parameters) and parameters[0].kind in _POSITIONAL


def _signature_with_self(func: Callable[..., Any], self_dependency: Any) -> inspect.Signature:
    """``func``'s signature with its first parameter defaulting to ``self_dependency`` and
    the others keyword-only (they follow a parameter with a default)."""
    signature = inspect.signature(func)
    first, *others = signature.parameters.values()
    others = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
              if parameter.kind in _POSITIONAL else parameter for parameter in others]
    # Parameter kinds must stay in order: *args before the keyword-only ones.
    return signature.replace(parameters=[first.replace(default=self_dependency),
                                         *sorted(others, key=lambda parameter: parameter.kind)])


# --------------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class LoadedApp:
    """An ASGI backend as a replica runs it: its app, and the instance of its ``@ingress``
    class (None for an app or a factory)."""

    app: Any
    instance: Any = None


def load_app(target: Any, init_args: Sequence[Any]) -> LoadedApp:
    """Build the app of ASGI backend ``target`` (see ``is_asgi_backend``) in this process.

    A factory is called with ``init_args``; an ``@ingress`` class is constructed with them
    and its routes bound to the instance; an app object is used as it is.

    Raises:
        TypeError: a factory returned something else than an ASGI app, or ``target`` is no
            ASGI backend.
        ValueError: init args given with an app object.
    """
    if isinstance(target, ASGIFactory):
        app = target(*init_args)
        if not is_asgi_app(app):
            raise TypeError(
                f"The ASGI factory {target.name} returned {app!r} ({type(app).__name__}), "
                "not an ASGI app. Return the FastAPI or Starlette app it builds.")
        return LoadedApp(app)
    if is_ingress_class(target):
        instance = target(*init_args)
        bind_instance(target, instance)
        return LoadedApp(getattr(target, _INGRESS).app, instance)
    if is_asgi_app(target):
        if init_args:
            raise ValueError(
                f"The backend is an ASGI app, built already, but init args {tuple(init_args)!r} "
                "were given. Build the app in each replica with serve.asgi_factory(create_app) "
                "to pass it arguments.")
        return LoadedApp(target)
    raise TypeError(f"{target!r} ({type(target).__name__}) is not an ASGI backend: an ASGI "
                    "app, a serve.asgi_factory or a @serve.ingress class.")


# --------------------------------------------------------------------------- pickling


def allow_pickling_apps() -> None:
    """Let an app defined in a script (or a function) be pickled by value, as a backend
    the client sends: starlette's ``State`` cannot be unpickled as it is (its attribute
    lookup recurses before its state is set), and FastAPI's included routers hold a lock.
    Both are sent as what rebuilds them. Idempotent."""
    from starlette.datastructures import State

    copyreg.pickle(State, _reduce_state)
    included = _included_router_type()
    if included is not None:
        copyreg.pickle(included, _reduce_included_router)


def _reduce_state(state: Any) -> tuple:
    from starlette.datastructures import State

    return State, (dict(state._state),)


def _included_router_type() -> Any:
    """FastAPI's router-inclusion record (its versions from 0.16x), or None."""
    try:
        from fastapi import routing
    except ImportError:
        return None
    return getattr(routing, "_IncludedRouter", None)


def _reduce_included_router(included: Any) -> tuple:
    return _rebuild_included_router, (included.original_router, included.include_context)


def _rebuild_included_router(original_router: Any, include_context: Any) -> Any:
    """An included router as FastAPI makes one (its caches and lock made anew)."""
    return _included_router_type()(original_router=original_router,
                                   include_context=include_context)
