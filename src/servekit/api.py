"""The public API: ``start``, ``connect``, ``Client``, replica-context getters, ``accept_batch``."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import logging
import os
import uuid
import warnings
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Tuple,
    TypeVar,
    Union,
)

import cloudpickle

from servekit._private import constants, metrics, user_errors, versions
from servekit._private.asgi_app import ASGIFactory, allow_pickling_apps, is_asgi_backend
from servekit._private.backend_metadata import BATCH_MARKER, BackendMetadata, ReplicaConfig
from servekit._private.backend_settings import BackendSettings, given_fields
from servekit._private.config_checks import (
    check_methods,
    check_name,
    check_route,
    checked,
    parse_backend_config,
    parse_http_options,
    validate_actor_options,
    validate_backend_against_config,
)
from servekit._private.context import (
    ReplicaContext,
    current_model_id,
    current_replica_context,
    current_request_id,
)
from servekit._private.event_loop import run_sync
from servekit._private.import_path import import_path_of
from servekit._private.runtime import choice
from servekit._private.runtime.base import Instance
from servekit._private.wire.discovery import current_controller
from servekit._private.wire.transport import ConnectFailed, RpcClient, is_remote_error
from servekit.config import BackendConfig, HTTPOptions
from servekit.env import Environment
from servekit.exceptions import BackendUnavailableError, ServeError
from servekit.handle import HandleOptions, ServeHandle, ServeSyncHandle, routers
from servekit.types import BackendTag, EndpointTag, TrafficDict

if TYPE_CHECKING:
    from servekit._private.deploy.plan import DeployPlan

F = TypeVar("F", bound=Callable[..., Any])

_UNSET: Any = object()
# Tries of a controller call whose controller died under it (each restart is one).
_CALL_ATTEMPTS = 5
logger = logging.getLogger("servekit")


def _config_of(settings: BackendSettings) -> BackendConfig:
    """The config of the plain data a controller holds it as."""
    return BackendConfig.model_validate(settings.fields())


def _check_tag(value: Any, what: str) -> None:
    """A backend tag or endpoint name: 1 to 128 printable characters (TypeError or
    ValueError naming ``what`` and the value otherwise)."""
    checked(what, check_name, value)


def _guarded(method: F) -> F:
    def wrapper(self: "Client", *args: Any, **kwargs: Any) -> Any:
        if self._shut_down:
            raise ServeError("Client has already been shut down.")
        return method(self, *args, **kwargs)

    wrapper.__name__ = method.__name__
    wrapper.__qualname__ = method.__qualname__
    wrapper.__doc__ = method.__doc__
    wrapper.__wrapped__ = method  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


_ASGI_PICKLING_HINT = (
    ". A module's ASGI app, factory or @serve.ingress class is sent by reference and never "
    "pickled: define it in a module (and pass the app as \"module:app\"), or build the app "
    "in each replica with serve.asgi_factory(create_app).")


def _asgi_target(app_or_factory: Any, init_args: Tuple[Any, ...]) -> Tuple[Any, str]:
    """What ``create_backend`` sends for an ASGI app or ``serve.asgi_factory``, and its
    description: the import path of the object when a module holds it (the replica imports
    it, so the app is never pickled), else the object itself.

    Raises:
        ValueError: init args given with an app object.
    """
    if not isinstance(app_or_factory, ASGIFactory) and init_args:
        raise ValueError(
            f"init args {init_args!r} were given with an ASGI app, which is built already. "
            "To build the app with arguments in each replica, pass "
            "serve.asgi_factory(create_app) instead.")
    path = import_path_of(app_or_factory)
    if path is not None:
        return path, path
    if isinstance(app_or_factory, ASGIFactory):
        return app_or_factory, app_or_factory.name
    return app_or_factory, getattr(app_or_factory, "__qualname__", type(app_or_factory).__name__)


class Client:
    """A connection to one servekit instance; returned by ``start`` and ``connect``."""

    def __init__(self, controller_address: str, instance: Optional[Instance] = None) -> None:
        """``instance``: what the runtime needs to end it; None inside a backend."""
        self._controller_address = controller_address
        self._instance = instance
        self._shut_down = False
        self._controller: Optional[RpcClient] = None
        self._waits = True  # for the replicas of the calls that start or stop some

    def __reduce__(self) -> Any:
        raise ServeError("A servekit Client cannot be pickled. Inside a backend, call "
                         "serve.connect() to get a client of the same instance.")

    # ------------------------------------------------------------- plumbing

    def _call(self, name: str, *args: Any) -> Any:
        return run_sync(self._call_async(name, *args))

    async def _call_async(self, name: str, *args: Any) -> Any:
        """Call the controller. If it dies with the call in flight, the call is made again
        once a new controller serves the same socket (every call is idempotent); if
        nothing serves it, the instance is gone and this raises ``ServeError``."""
        for attempt in range(_CALL_ATTEMPTS):
            try:
                if self._controller is None or self._controller.is_closed:
                    controller = await RpcClient.connect(
                        await current_controller(self._controller_address),
                        "servekit controller")
                    await self._check_versions(controller)
                    self._controller = controller
                return await self._controller.call(name, *args)
            except ConnectFailed:
                instance = self._instance
                if attempt < _CALL_ATTEMPTS - 1 and instance is not None and \
                        await asyncio.get_running_loop().run_in_executor(
                            None, instance.controller_returns):
                    continue
                raise ServeError(f"The servekit instance at {self._controller_address} is "
                                 "not running (it was shut down, or its processes died).") \
                    from None
            except BackendUnavailableError as exc:
                if is_remote_error(exc) or attempt == _CALL_ATTEMPTS - 1:
                    raise
                logger.warning("The servekit controller went away during %s; calling "
                               "again once it is back.", name)
        raise AssertionError("unreachable")

    async def _check_versions(self, controller: RpcClient) -> None:
        """Raise ``ServeError`` (closing ``controller``) if the instance runs another
        servekit or Python than this process."""
        try:
            instance = await controller.call("version")
        except ServeError as exc:
            if not (is_remote_error(exc) and "'version'" in str(exc)):
                raise
            instance = None  # (a controller from before the call existed)
        problem = versions.mismatch(instance, self._controller_address)
        if problem is not None:
            controller.close()
            raise ServeError(problem)

    def _wait_for_goal(self, goal_id: Optional[str]) -> None:
        if goal_id is not None and self._waits:
            self._call("wait_for_goal", goal_id)

    @contextlib.contextmanager
    def _without_waiting(self) -> Iterator[None]:
        """Calls made within return once the controller accepted them (checked and saved),
        without waiting for replicas to start or stop (``servekit deploy --no-wait``)."""
        self._waits = False
        try:
            yield
        finally:
            self._waits = True

    # ------------------------------------------------------------- backends

    @_guarded
    def create_backend(self, backend_tag: BackendTag, func_or_class: Union[Callable, type, str],
                       *actor_init_args: Any, ray_actor_options: Optional[Dict] = None,
                       config: Union[BackendConfig, Dict[str, Any], None] = None,
                       env: Optional[Environment] = None) -> None:
        """Create a backend and return once all its replicas finished their constructors.

        Args:
            backend_tag: a unique name for this version of the model: 1 to 128 printable
                characters.
            func_or_class: a function, a class (constructed once per replica with
                ``actor_init_args``), or an import path "pkg.module:Name". To serve HTTP
                through an ASGI app (FastAPI, Starlette), whose endpoint's route is then a
                prefix: the app itself (sent by import path when a module defines it, so it
                is never pickled; no init args), ``serve.asgi_factory(create_app)`` (the app
                built in each replica by ``create_app(*actor_init_args)``), or a class
                decorated with ``@serve.ingress(app)``.
            ray_actor_options: resources per replica: ``num_cpus``, ``num_gpus``, ``memory``,
                ``resources``. Default: none reserved.
            config: a ``BackendConfig`` or a dict of its fields (default: 1 replica).
            env: run the replicas with another interpreter (``CondaEnv``, ``VirtualEnv``).

        Raises:
            TypeError / ValueError / pydantic.ValidationError: bad arguments;
            ValueError: the tag exists; the constructor's own exception if it raised.
        """
        _check_tag(backend_tag, "backend_tag")
        if isinstance(func_or_class, str):
            metadata: Optional[BackendMetadata] = None
            description = func_or_class
        elif is_asgi_backend(func_or_class) and not inspect.isclass(func_or_class):
            metadata = BackendMetadata.inspect(func_or_class)
            func_or_class, description = _asgi_target(func_or_class, actor_init_args)
        elif inspect.isfunction(func_or_class) or inspect.isclass(func_or_class) or \
                inspect.ismethod(func_or_class):
            if not inspect.isclass(func_or_class) and actor_init_args:
                raise ValueError("actor_init_args not supported for function backend: "
                                 f"got {actor_init_args!r}. Use a class to take init args.")
            metadata = BackendMetadata.inspect(func_or_class)
            description = getattr(func_or_class, "__qualname__", repr(func_or_class))
        else:
            raise TypeError(f"Backend must be a function, a class, an import path string or "
                            f"an ASGI app; it is {type(func_or_class).__name__}: "
                            f"{func_or_class!r}.")
        actor_options = validate_actor_options(ray_actor_options)
        backend_config = parse_backend_config(config)
        if metadata is not None:
            validate_backend_against_config(metadata, backend_config)
        python = None
        if env is not None:
            if not isinstance(env, Environment):
                raise TypeError(f"env must be a CondaEnv or VirtualEnv, got {env!r}.")
            python = env.python()
        by_value_app = metadata is not None and metadata.asgi and \
            not isinstance(func_or_class, str)
        if by_value_app:
            allow_pickling_apps()
        try:
            serialized = user_errors.dumps_by_value((func_or_class, actor_init_args))
            if by_value_app:
                # An app sent by value that cannot be rebuilt from its pickle fails here,
                # not in every replica.
                cloudpickle.loads(serialized)
        except Exception as exc:
            hint = _ASGI_PICKLING_HINT if metadata is not None and metadata.asgi else ""
            raise TypeError(f"The backend {description} or its init args cannot be pickled: "
                            f"{exc}{hint}") from exc
        replica_config = ReplicaConfig(serialized, actor_options, description, python)
        goal = self._call("create_backend", backend_tag, replica_config,
                          given_fields(backend_config), metadata,
                          uuid.uuid4().hex)  # the same id if the call is retried
        self._wait_for_goal(goal)

    @_guarded
    def list_backends(self) -> Dict[BackendTag, BackendConfig]:
        """Every backend's tag and config."""
        return {tag: _config_of(settings)
                for tag, settings in self._call("list_backends").items()}

    @_guarded
    def get_backend_config(self, backend_tag: BackendTag) -> BackendConfig:
        """The config of a backend; ValueError if it is not registered."""
        _check_tag(backend_tag, "backend_tag")
        return _config_of(self._call("get_backend_config", backend_tag))

    @_guarded
    def update_backend_config(self, backend_tag: BackendTag,
                              config_options: Union[BackendConfig, Dict[str, Any]]) -> None:
        """Change some config fields of a backend; return when every replica runs with them.

        Only the fields given are changed. Changing ``num_replicas`` starts or drains
        replicas; other fields are applied in place by the running replicas.
        """
        _check_tag(backend_tag, "backend_tag")
        if isinstance(config_options, dict):
            update = BackendConfig.model_validate(config_options)
        elif isinstance(config_options, BackendConfig):
            update = config_options
        else:
            raise TypeError("config_options must be a BackendConfig or a dict, got "
                            f"{type(config_options).__name__} {config_options!r}.")
        goal = self._call("update_backend_config", backend_tag, given_fields(update),
                          uuid.uuid4().hex)  # the same id if the call is retried
        self._wait_for_goal(goal)

    @_guarded
    def delete_backend(self, backend_tag: BackendTag, force: bool = False) -> None:
        """Delete a backend; return when its replicas are gone.

        Replicas finish their requests in flight first unless ``force=True``. Refused with
        ValueError while an endpoint's traffic or shadows use it; unknown tags are a no-op.
        """
        _check_tag(backend_tag, "backend_tag")
        if not isinstance(force, bool):
            raise TypeError(f"force must be a bool, got {force!r}.")
        self._wait_for_goal(self._call("delete_backend", backend_tag, force))

    # ------------------------------------------------------------- endpoints

    @_guarded
    def create_endpoint(self, endpoint_name: EndpointTag, *, backend: Optional[str] = None,
                        route: Optional[str] = None,
                        methods: List[str] = ["GET"]) -> None:  # noqa: B006 (never mutated)
        """Create an endpoint that sends all its traffic to ``backend``.

        Args:
            endpoint_name: a unique name, also used by ``get_handle`` (1 to 128 printable
                characters, as a backend tag).
            backend: the backend tag that gets the traffic.
            route: the exact HTTP path, starting with "/"; None for a handle-only endpoint.
                A plain path: no "." or ".." segment, no "%", "?", "#", whitespace or
                control character; at most 1024 characters; not under "/-/".
            methods: allowed HTTP methods, default ["GET"].

        Returns once the HTTP proxy serves the route.

        Raises:
            TypeError / ValueError: a bad name, route or method (the message names it).
        """
        _check_tag(endpoint_name, "endpoint_name")
        if backend is None:
            raise TypeError("backend must be specified when creating an endpoint.")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__} "
                            f"{backend!r}.")
        _check_tag(backend, "backend")
        if route is not None:
            checked("route", check_route, route)
        upper = checked("methods", check_methods, methods)
        existing = self._call("list_endpoints").get(endpoint_name)
        if existing is not None and existing["route"] == route and existing["methods"] == upper:
            raise ValueError(f"Route '{route}' is already registered to endpoint "
                             f"'{endpoint_name}' with methods '{upper}'. To change the backend "
                             "of this endpoint, use set_traffic().")
        self._call("create_endpoint", endpoint_name, backend, route, upper)

    @_guarded
    def delete_endpoint(self, endpoint: EndpointTag) -> None:
        """Delete an endpoint (its backends stay); unknown names are a no-op."""
        _check_tag(endpoint, "endpoint")
        self._call("delete_endpoint", endpoint)

    @_guarded
    def list_endpoints(self) -> Dict[EndpointTag, Dict[str, Any]]:
        """``{name: {"route", "methods", "traffic", "shadows"}}`` for every endpoint."""
        return self._call("list_endpoints")

    @_guarded
    def set_traffic(self, endpoint_name: EndpointTag,
                    traffic_policy_dictionary: TrafficDict) -> None:
        """Replace the endpoint's traffic split ``{backend: weight}``; weights sum to 1.

        Shadows set with ``shadow_traffic`` are kept. Returns once the HTTP proxy uses it.
        """
        _check_tag(endpoint_name, "endpoint_name")
        if not isinstance(traffic_policy_dictionary, dict):
            raise TypeError("traffic_policy_dictionary must be a dict of backend tag to "
                            f"weight, got {traffic_policy_dictionary!r}.")
        for tag, weight in traffic_policy_dictionary.items():
            _check_tag(tag, "A backend tag in the traffic policy")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise TypeError(f"The weight of backend '{tag}' must be a number, got "
                                f"{weight!r}.")
        traffic = {tag: float(w) for tag, w in traffic_policy_dictionary.items()}
        self._call("set_traffic", endpoint_name, traffic)

    @_guarded
    def shadow_traffic(self, endpoint_name: EndpointTag, backend_tag: BackendTag,
                       proportion: float) -> None:
        """Copy ``proportion`` (0..1) of the endpoint's requests to ``backend_tag``.

        Shadow replies are discarded; 0 removes the shadow.
        """
        _check_tag(endpoint_name, "endpoint_name")
        _check_tag(backend_tag, "backend_tag")
        if isinstance(proportion, bool) or not isinstance(proportion, (int, float)) \
                or not 0 <= proportion <= 1:
            raise TypeError(f"proportion must be a float from 0 to 1, got {proportion!r}.")
        self._call("shadow_traffic", endpoint_name, backend_tag, float(proportion))

    @_guarded
    def get_handle(self, endpoint_name: EndpointTag, missing_ok: bool = False,
                   sync: bool = True) -> Union[ServeSyncHandle, ServeHandle]:
        """A handle to call the endpoint from Python.

        Args:
            endpoint_name: the endpoint to call.
            missing_ok: skip the check that the endpoint exists; calls then wait up to
                ``SERVEKIT_MISSING_ENDPOINT_TIMEOUT_S`` (30 s) for it to be created.
            sync: a ``ServeSyncHandle`` (default) or, with False, a ``ServeHandle`` for async
                code.

        Raises:
            KeyError: the endpoint does not exist and ``missing_ok`` is False.
        """
        _check_tag(endpoint_name, "endpoint_name")
        for name, flag in (("missing_ok", missing_ok), ("sync", sync)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}.")
        if not missing_ok and not self._call("endpoint_exists", endpoint_name):
            raise KeyError(f"Endpoint '{endpoint_name}' does not exist. Create it with "
                           "create_endpoint(), or pass missing_ok=True.")
        handle_type = ServeSyncHandle if sync else ServeHandle
        return handle_type(self._controller_address, endpoint_name,
                           HandleOptions(missing_ok=missing_ok))

    @_guarded
    def status(self) -> Dict[str, Any]:
        """What runs, as ``servekit status --json`` prints it: a dict of plain data.

        - ``"backends"``: ``{tag: {...}}`` with ``"status"`` in Ray Serve's words
          (``"UPDATING"``: being created, rolled over to a new revision or given a new
          config; ``"UPSCALING"`` / ``"DOWNSCALING"``: replicas start or stop towards a new
          count; ``"UNHEALTHY"``: fewer run than wanted because replicas fail to start,
          die or fail health checks; ``"HEALTHY"``), ``"message"`` (why, e.g. ``"rolling
          out revision 2: 2/5 new replicas ready, 3 of the old revision running"``),
          ``"running"`` and ``"target"`` (replicas), ``"revision"`` (the definition's
          number, raised by each redeploy) and ``"revision_running"`` (replicas running
          it), ``"config"`` (defaults resolved: ``max_concurrent_queries`` as replicas
          apply it), ``"autoscaling"`` (the autoscaler's last decision, None for a fixed
          count), ``"last_start_error"``, ``"description"`` and ``"source"``.
        - ``"endpoints"``: ``{name: {"route", "methods", "traffic", "shadows", "managed",
          "prefix"}}`` (``"prefix"``: the route is an ASGI app's prefix; ``"route"`` None:
          handle only).
        - ``"processes"``: ``[{"role", "name", "pid", "state", "node", ...}]`` for the
          instance's own processes, its proxies (with ``"http"``: host and port) and its
          replicas (with ``"backend"``, ``"revision"`` and ``"models"``: the ids of the
          multiplexed models it holds, as of its last health ping).
        - ``"http_options"``: the HTTP options the instance started with.
        """
        return self._call("status")

    # ------------------------------------------------------------- deploy files

    @_guarded
    def deploy(self, config: Union[str, "os.PathLike[str]", Mapping[str, Any]], *,
               prune: bool = False, dry_run: bool = False) -> DeployPlan:
        """Bring this instance to what a deploy file describes, and return the plan.

        The whole file is validated (every problem at once, each naming its place) and
        every backend is imported before anything changes. Config fields are updated in
        place; a changed definition (import path, init args, actor options, env, working
        directory, or the source of the local modules the backend imports) is a rolling
        replacement. Applying the same file again changes nothing
        (``plan.changes_anything`` is False).

        Args:
            config: the path of a YAML deploy file (import paths are found from its
                ``working_dir``, by default its directory), or a dict of its contents
                (found from the current directory).
            prune: also delete the backends and endpoints a deploy file of the same
                ``name`` made that are no longer in this one. Default False. Objects made
                under another name or through the Python API are never deleted.
            dry_run: only plan; change nothing. Default False.

        Raises:
            ValueError: the file is invalid, names a backend that will not exist, or asks
                for HTTP options other than the instance's (a ``DeployFileError`` listing
                every problem).
            ServeError: a step failed while applying (``DeployStepError``: says which);
                what the apply had changed before it was undone.
        """
        from servekit._private.deploy.apply import deploy

        return deploy(self, config, prune=prune, dry_run=dry_run)

    @_guarded
    def get_deploy_config(self) -> Dict[str, Any]:
        """The running state as the contents of a deploy file that ``deploy`` accepts back
        unchanged (``servekit config`` prints it as YAML).

        Only what deploy files made can be written: backends made through the Python API
        (their code is a Python object, not an import path), the endpoints that use them
        and endpoints made through the Python API are left out.
        """
        from servekit._private.deploy.export import export_config
        from servekit._private.deploy.state import read_state

        return export_config(read_state(self)).data

    # ------------------------------------------------------------- shutdown

    @_guarded
    def shutdown(self) -> None:
        """Stop this instance gracefully and remove its files.

        The proxy stops taking requests and finishes those it holds, replicas finish
        theirs (up to their graceful shutdown timeout), then every process stops.
        """
        self._shutdown(keep_state=False)

    def _shutdown(self, keep_state: bool) -> None:
        """``shutdown``; with ``keep_state`` the state file stays for the next start."""
        self._shut_down = True
        routers.close(self._controller_address)
        try:
            self._call("shutdown", keep_state)
        except (ServeError, ConnectionError):
            pass  # already gone
        finally:
            _running.pop(self._controller_address, None)
            if self._instance is not None:
                self._instance.stop(keep_state)


# The non-detached instances this process started and has not shut down, oldest first. They
# live until shutdown() or the end of the script, whether or not a Client still refers to them.
_running: Dict[str, Instance] = {}


@atexit.register
def _shutdown_at_exit() -> None:
    for address, instance in list(_running.items()):
        Client(address, instance=instance).shutdown()


def start(detached: bool = False, http_host: Any = _UNSET, http_port: Any = _UNSET,
          http_middlewares: Any = _UNSET,
          http_options: Union[HTTPOptions, Dict[str, Any], None] = None,
          resources: Optional[Dict[str, float]] = None,
          address: Optional[str] = None) -> Client:
    """Start a servekit instance and return a ``Client`` for it.

    It runs embedded on this machine, or on Ray when the script has initialized Ray
    (``ray.init(...)``) or gives ``address``.

    Args:
        detached: keep the instance running after this script exits; reach it later with
            ``serve.connect()``. Default False: the instance ends with the script.
        http_options: an ``HTTPOptions`` or a dict of its fields (host, port, middlewares,
            location). Default: serve HTTP on 127.0.0.1:8000.
        http_host, http_port, http_middlewares: deprecated; use ``http_options``.
        resources: custom resources this machine offers, e.g. ``{"accelerator": 2}``;
            backends reserve them with ``ray_actor_options={"resources": {...}}``. CPUs
            and GPUs are detected. (On Ray, the nodes declare their resources.)
        address: the Ray cluster to run on, passed to ``ray.init``: "auto",
            "ray://host:port" or "host:port". Default: Ray if it is initialized, else
            embedded.

    Raises:
        ValueError: deprecated arguments combined with ``http_options``.
        ServeError: the HTTP port cannot be bound, a detached instance already runs, or
            this code runs inside a replica (``serve.connect()`` reaches its instance).
    """
    _refuse_inside_a_replica()
    if not isinstance(detached, bool):
        raise TypeError(f"detached must be a bool, got {detached!r}.")
    deprecated = {name: value for name, value in (
        ("http_host", http_host), ("http_port", http_port),
        ("http_middlewares", http_middlewares)) if value is not _UNSET}
    if deprecated:
        warnings.warn(f"{', '.join(deprecated)} are deprecated; pass http_options="
                      "{'host': ..., 'port': ..., 'middlewares': ...} instead.",
                      DeprecationWarning, stacklevel=2)
        if http_options is not None:
            raise ValueError("You cannot specify both `http_options` and any of the "
                             f"deprecated `http_host`, `http_port`, `http_middlewares` "
                             f"(got {sorted(deprecated)}). Use `http_options` only.")
        http_options = {key.replace("http_", ""): value for key, value in deprecated.items()}
    options = parse_http_options(http_options)
    custom = validate_actor_options({"resources": resources})["resources"] if resources else {}
    if address is not None and not isinstance(address, str):
        raise TypeError(f"address must be a str such as 'auto' or 'ray://host:10001', got "
                        f"{address!r}.")
    if detached and choice.detached_running(address):
        raise ServeError("Called serve.start(detached=True) but a detached instance is "
                         "already running. Use serve.connect() to reach it, or shut it down "
                         "first.")
    instance = choice.start_instance(options, detached, custom, address)
    client = Client(instance.controller_address, instance=instance)
    try:
        pid = run_sync(client._call_async("ready"), timeout=constants.STARTUP_TIMEOUT_S)
    except BaseException:
        client._shut_down = True
        if detached:  # not our child: ask it to go
            try:
                run_sync(client._call_async("shutdown", True),  # keep the state it could not load
                         timeout=constants.PROCESS_STOP_TIMEOUT_S)
            except Exception:
                pass
        instance.stop(keep_state=True)
        raise
    instance.started(pid)
    if not detached:
        _running[instance.controller_address] = instance
        # Run before the exit hooks registered since (Ray's among them), while the runtime
        # can still stop what it started.
        atexit.unregister(_shutdown_at_exit)
        atexit.register(_shutdown_at_exit)
    return client


def _refuse_inside_a_replica() -> None:
    """A replica starting an instance of its own is a mistake, most often a module that
    calls ``serve.start()`` when imported: a replica of a backend defined in it imports it,
    starts an instance whose replica imports it again, and so on without end."""
    context = current_replica_context()
    if context is None:
        return
    raise ServeError(
        f"serve.start() was called inside replica {context.replica_tag} of backend "
        f"{context.backend_tag!r}. A backend's code runs in an instance already: reach it "
        "with serve.connect(). If a module this backend's code is defined in calls "
        "serve.start() when it is imported, put that call under "
        "`if __name__ == \"__main__\":`.")


def connect(address: Optional[str] = None) -> Client:
    """A client of the instance this code runs in: inside a backend, its instance; else the
    detached one (of the Ray cluster, when Ray is initialized or ``address`` is given), as
    in Ray Serve 1.x; else, when none runs, the latest instance this script started and did
    not shut down.

    Raises:
        ServeError: none of those is running, or ``$SERVEKIT_HOME`` is not private.
    """
    context = current_replica_context()
    if context is not None:
        return Client(context.controller_address,
                      instance=choice.instance_at(context.controller_address))
    try:
        found = choice.find_detached(address)
    except ServeError:
        if not _running or address is not None:
            raise
        found = None  # (a home another user can write: not trusted, not needed)
    if found is None and _running and address is None:
        controller_address, instance = list(_running.items())[-1]
        return Client(controller_address, instance=instance)
    if found is None:
        where = "on this Ray cluster" if choice.uses_ray(address) else "on this machine"
        raise ServeError(f"Called `serve.connect()` but there is no instance running {where}. "
                         "Call `serve.start(detached=True)` (or `servekit start`) to start "
                         "one.")
    return Client(found.controller_address, instance=found)


def metrics_text(address: Optional[str] = None) -> str:
    """The Prometheus metrics of the running instance (as ``serve.connect`` finds it): its
    controller, proxies and replicas, and the routers of this process — what the proxy's
    ``/-/metrics`` serves, for instances without HTTP too."""
    texts = connect(address)._call("metrics_of_every_process")
    return metrics.merge([metrics.exposition(), *texts])


def _replica_context(getter: str) -> ReplicaContext:
    context = current_replica_context()
    if context is None:
        raise ServeError(f"`serve.{getter}()` may only be called from within a servekit "
                         "backend.")
    return context


def get_current_backend_tag() -> BackendTag:
    """The tag of the backend this code runs in; ServeError outside a backend."""
    return _replica_context("get_current_backend_tag").backend_tag


def get_request_id() -> str:
    """The id of the request this code serves: the client's ``X-Request-ID`` header, else
    one servekit made (also sent back as ``X-Request-ID``). ServeError outside a request."""
    request_id = current_request_id.get()
    if request_id is None:
        raise ServeError("`serve.get_request_id()` may only be called while a servekit "
                         "backend serves a request.")
    return request_id


def get_multiplexed_model_id() -> str:
    """The multiplexed model id of the request this code serves (Ray Serve 2.x's name):
    its ``serve_multiplexed_model_id`` HTTP header or the handle's
    ``options(multiplexed_model_id=...)``; "" when it names none. Pass it to a
    ``@serve.multiplexed`` loader. ServeError outside a backend."""
    _replica_context("get_multiplexed_model_id")
    return current_model_id.get()


def get_current_replica_tag() -> str:
    """The tag of the replica this code runs in ("backend#xxxxxx"); ServeError outside one."""
    return _replica_context("get_current_replica_tag").replica_tag


def accept_batch(func: F) -> F:
    """Mark a function or method as taking a list of requests and returning a list."""
    setattr(func, BATCH_MARKER, True)
    return func

