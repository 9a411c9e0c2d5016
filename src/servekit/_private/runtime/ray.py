"""``RayRuntime``: every servekit process is a Ray actor; Ray places, restarts and finds them.

- The controller is the named actor ``servekit-controller`` (namespace ``servekit``),
  detached when the instance is, restarted by Ray when it dies. It records its address in
  the KV store and keeps it across restarts where it can; where it cannot (another node, or
  the port taken), routers and clients look the new one up (``discovery``).
- Proxies and replicas are detached actors with the resources of their options, created
  by the controller. They survive a controller restart (a new controller adopts them by
  name) and exit by themselves once the controller's actor is gone for good.
- The data plane is servekit's own transport on TCP at the node's address, authenticated
  with the instance's secret (kept in Ray's internal KV store, like the durable state).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import pickle
import secrets
import select
import socket
import threading
import time
import traceback
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import cloudpickle
import ray
from ray.experimental import internal_kv
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from servekit._private import constants
from servekit._private.event_loop import new_event_loop
from servekit._private.runtime.base import Connection, Instance, Runtime
from servekit._private.specs import HTTPSettings, WorkerSpec
from servekit._private.wire import auth
from servekit._private.wire.discovery import register_controller_resolver
from servekit._private.wire.transport import RpcClient, parse_tcp_address, tcp_address
from servekit._private.workers.logs import configure_logging
from servekit._private.workers.process import (
    bind_http_socket,
    importable_sys_path,
    process_start_time,
)
from servekit.config import HTTPOptions
from servekit.exceptions import ServeError

logger = logging.getLogger("servekit")

NAMESPACE = "servekit"
CONTROLLER_NAME = "servekit-controller"
_STATE_KEY, _SECRET_KEY, _ADDRESS_KEY = b"state", b"secret", b"controller_address"
# Options of ray_actor_options passed to Ray as they are (the numbers are checked before).
_PASSED_OPTIONS = ("memory", "object_store_memory", "resources", "accelerator_type",
                   "runtime_env")
# Seconds between a worker's checks that its controller's actor still exists.
_LIFELINE_PERIOD_S = 1.0


def _kv_get(key: bytes) -> Optional[bytes]:
    return internal_kv._internal_kv_get(key, namespace=NAMESPACE)


def _kv_put(key: bytes, value: bytes) -> None:
    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=NAMESPACE)


def _kv_discard() -> None:
    for key in (_STATE_KEY, _SECRET_KEY, _ADDRESS_KEY):
        internal_kv._internal_kv_del(key, namespace=NAMESPACE)


def _instance_secret() -> bytes:
    """The secret of this cluster's instance, made by the first start."""
    secret = _kv_get(_SECRET_KEY)
    if secret is None:
        secret = auth.new_secret()
        _kv_put(_SECRET_KEY, secret)
    return secret


class RayKVStore:
    """The durable state as one value in Ray's internal KV: each write replaces it whole,
    so a write is one transaction."""

    def __init__(self) -> None:
        self._records: Optional[Dict[str, bytes]] = None

    def read_all(self) -> Dict[str, bytes]:
        raw = _kv_get(_STATE_KEY)
        self._records = {} if raw is None else pickle.loads(raw)
        return dict(self._records)

    def write(self, puts: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None:
        records = self._records if self._records is not None else self.read_all()
        records.update(puts)
        for key in deletes:
            records.pop(key, None)
        _kv_put(_STATE_KEY, pickle.dumps(records, protocol=5))

    def close(self) -> None:
        pass


def _bind_tcp(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(4096)
    return sock


def _controller_address() -> Optional[str]:
    """Where the controller serves now, as it last recorded it (None: nowhere yet)."""
    raw = _kv_get(_ADDRESS_KEY)
    return raw.decode() if raw else None


def _bind_controller(host: str) -> socket.socket:
    """The controller's socket: at its earlier address when that is on this node and free
    (routers and clients find it where they left it), else at a new port (they look the
    address up again, see ``discovery``)."""
    earlier = parse_tcp_address(_controller_address() or "")
    if earlier is not None and earlier[0] == host:
        try:
            return _bind_tcp(host, earlier[1])
        except OSError as exc:
            logger.warning("The servekit controller cannot serve on its earlier port %d "
                           "(%s); it serves on a new one.", earlier[1], exc.strerror)
    return _bind_tcp(host, 0)


@ray.remote
class ServekitActor:
    """One servekit process on Ray: runs a role (controller, proxy, replica) of the worker
    code on a thread of its own and serves its RPC on TCP at this node's address."""

    def __init__(self, role: str, name: str, payload: bytes,
                 controller_address: Optional[str], sys_path: Sequence[str],
                 http: Optional[Tuple[str, int]]) -> None:
        import sys

        for path in reversed(sys_path):
            if path not in sys.path and os.path.isdir(path):
                sys.path.insert(0, path)
        configure_logging(role, name, None)  # Ray keeps the actors' output in its logs
        auth.set_secret(_instance_secret())
        host = ray.util.get_node_ip_address()
        if role == "controller":
            sock = _bind_controller(host)
            _kv_put(_ADDRESS_KEY, tcp_address(host, sock.getsockname()[1]).encode())
        else:
            sock = _bind_tcp(host, 0)
            assert controller_address is not None
            register_controller_resolver(controller_address, _controller_address)
        extra_fds = {}
        self._http: Optional[List[Any]] = None
        if http is not None:
            # Shared: proxies of other Ray nodes on this machine, or this node's other
            # proxies (num_proxies), serve the same port.
            self._http_socket = bind_http_socket(*http, shared=True)
            extra_fds["http"] = self._http_socket.fileno()
            self._http = list(self._http_socket.getsockname()[:2])
        self._role = role
        self._info: Dict[str, Any] = {
            "address": tcp_address(host, sock.getsockname()[1]), "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(), "http": self._http}
        spec = WorkerSpec(role=role, name=name, instance_dir="", rpc_fd=sock.fileno(),
                          controller_address=controller_address or self._info["address"],
                          payload=payload, sys_path=sys_path, watch_parent=False,
                          extra_fds=extra_fds)
        self._loop = new_event_loop()
        self._stop = asyncio.Event()
        self._ended = threading.Event()
        threading.Thread(target=self._run, args=(spec, sock), name=f"servekit-{role}",
                         daemon=True).start()
        if role != "controller":
            threading.Thread(target=self._watch_controller, name="servekit-lifeline",
                             daemon=True).start()

    def info(self) -> dict:
        """Where this process serves RPC (and HTTP), its pid and its node."""
        return self._info

    def wait_for_exit(self) -> None:
        """Never returns: the call fails when the actor's process is gone, which is how
        the controller learns that it is (the role ending is not enough: the process may
        still be exiting)."""
        threading.Event().wait()

    def stop(self, timeout: float) -> None:
        """Ask the role to stop, as SIGTERM does to a local worker; wait up to ``timeout``."""
        self._loop.call_soon_threadsafe(self._stop.set)
        self._ended.wait(timeout)

    def _run(self, spec: WorkerSpec, sock: socket.socket) -> None:
        from servekit._private.workers.worker import role_main

        asyncio.set_event_loop(self._loop)
        run = run_ray_controller if spec.role == "controller" else role_main(spec.role)
        try:
            self._loop.run_until_complete(run(spec, sock, self._stop))
        except BaseException:
            traceback.print_exc()
            os._exit(1)  # a failure: Ray restarts a controller, and reports a worker dead
        self._ended.set()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _watch_controller(self) -> None:
        """The lifeline: exit once the controller's actor is gone for good (a restarting
        controller still has its name)."""
        while not self._ended.wait(_LIFELINE_PERIOD_S):
            try:
                ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
            except ValueError:
                logger.warning("The servekit controller is gone; this %s exits.", self._role)
                os._exit(0)
            except Exception:
                pass  # the GCS is unreachable for now: not a reason to exit


@dataclasses.dataclass
class RayControllerSpec:
    """What the controller actor is told: the HTTP options, the driver's ``sys.path`` (for
    its workers) and the driver's node (where a HeadOnly proxy runs)."""

    http_options: HTTPSettings
    sys_path: List[str]
    driver_node: Optional[str]


async def run_ray_controller(worker: WorkerSpec, sock: socket.socket,
                             stop: asyncio.Event) -> None:
    from servekit._private.controller.main import serve_controller

    spec: RayControllerSpec = worker.load_payload()
    assert worker.controller_address is not None
    runtime = RayRuntime(worker.controller_address, spec.sys_path, spec.driver_node)
    await serve_controller(runtime, spec.http_options, sock, stop)


async def _result(ref: Any) -> Any:
    return await asyncio.wrap_future(ref.future())


class RayRuntime(Runtime):
    """Runs proxies and replicas as Ray actors; the state lives in Ray's internal KV."""

    def __init__(self, controller_address: str, sys_path: Sequence[str],
                 head_node: Optional[str]) -> None:
        """``head_node``: where a HeadOnly proxy runs (the driver's node), None: this one."""
        self.store = RayKVStore()
        self._controller_address = controller_address
        self._sys_path = list(sys_path)
        self._node = ray.get_runtime_context().get_node_id()
        self._head_node = head_node or self._node
        self._actors: Dict[str, Any] = {}
        self._identities: Dict[str, dict] = {}
        # Worker name -> the name of its actor, from the moment it is created (or adopted)
        # until it is stopped: what ``reap_unrecorded`` never stops.
        self._actor_names: Dict[str, str] = {}
        self._watches: Dict[str, asyncio.Future] = {}
        self._endings: Dict[str, str] = {}  # worker name -> how it ended
        self._http: Optional[Tuple[str, int]] = None

    # ------------------------------------------------------------- placement

    def capacity(self) -> Dict[str, float]:
        """What the cluster's nodes offer: CPUs, GPUs and their custom resources."""
        totals = ray.cluster_resources()
        return {name: float(value) for name, value in totals.items()
                if name not in ("memory", "object_store_memory")
                and not name.startswith(("node:", "accelerator_type:"))}

    def bind_http(self, host: str, port: int) -> Tuple[str, int]:
        """Remember the address; each proxy binds it on its own node."""
        self._http = (host, port)
        return host, port

    async def proxy_nodes(self, location: str) -> Dict[str, Optional[str]]:
        """HeadOnly: one proxy on the driver's node; EveryNode: one on each live node."""
        if location != "EveryNode":
            return {"proxy": self._head_node}
        nodes = await asyncio.get_running_loop().run_in_executor(None, ray.nodes)
        return {f"proxy-{node['NodeID'][:12]}": node["NodeID"]
                for node in nodes if node.get("Alive")}

    def instance_processes(self) -> List[dict]:
        return [{"role": "controller", "name": "controller", "pid": os.getpid(),
                 "state": "RUNNING", "node": ray.get_runtime_context().get_node_id()}]

    def _actor_options(self, resources: dict, node: Optional[str]) -> dict:
        options = {"num_cpus": resources.get("num_cpus") or 0,
                   "num_gpus": resources.get("num_gpus") or 0}
        options.update({key: resources[key] for key in _PASSED_OPTIONS if resources.get(key)})
        if node is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        return options

    # ------------------------------------------------------------- lifecycle

    async def launch(self, name: str, role: str, payload: Any, *,
                     resources: Optional[dict] = None, python: Optional[str] = None,
                     node: Optional[str] = None) -> str:
        if python is not None:
            raise ServeError("env= (another interpreter) is not supported on the Ray "
                             "runtime; give the replica a Ray runtime environment with "
                             "ray_actor_options={'runtime_env': {...}} instead.")
        options = self._actor_options(resources or {}, node)
        actor_name = f"servekit:{name}:{secrets.token_hex(4)}"
        self._actor_names[name] = actor_name
        actor = ServekitActor.options(  # type: ignore[attr-defined]
            name=actor_name, namespace=NAMESPACE, lifetime="detached", max_restarts=0,
            max_concurrency=4, **options,
        ).remote(role, name, cloudpickle.dumps(payload), self._controller_address,
                 self._sys_path, self._http if role == "proxy" else None)
        self._actors[name] = actor
        self._endings.pop(name, None)
        try:
            info = await asyncio.wait_for(_result(actor.info.remote()),
                                          constants.STARTUP_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._forget(name)
            ray.kill(actor, no_restart=True)
            raise ServeError(f"Ray could not place {name} (asking for {options}) within "
                             f"{constants.STARTUP_TIMEOUT_S}s: no node has those resources "
                             "free.") from None
        except ray.exceptions.RayError as exc:
            self._forget(name)
            raise ServeError(f"{name} could not start on Ray: "
                             f"{_start_error(exc)}") from None
        self._identities[name] = {"actor": actor_name, **info,
                                  "start_time": process_start_time(info["pid"])
                                  if info["node"] == self._node else None}
        self._watch(name, actor)
        return info["address"]

    def _watch(self, name: str, actor: Any) -> None:
        watch = asyncio.wrap_future(actor.wait_for_exit.remote().future())

        def ended(future: asyncio.Future) -> None:
            error = None if future.cancelled() else future.exception()
            if self._actors.get(name) is actor and error is not None:
                self._endings[name] = f"ended ({_first_line(error)})"

        watch.add_done_callback(ended)
        self._watches[name] = watch

    def _forget(self, name: str) -> Tuple[Any, Optional[asyncio.Future]]:
        self._identities.pop(name, None)
        self._actor_names.pop(name, None)
        return self._actors.pop(name, None), self._watches.pop(name, None)

    async def connect(self, address: str) -> Connection:
        return await RpcClient.connect(address)

    async def stop(self, name: str, timeout: float) -> None:
        identity = self._identities.get(name)
        actor, watch = self._forget(name)
        if actor is None:
            return
        if timeout > 0:
            try:
                await asyncio.wait_for(_result(actor.stop.remote(timeout)), timeout + 1)
            except (asyncio.TimeoutError, ray.exceptions.RayError):
                pass
        ray.kill(actor, no_restart=True)
        if watch is not None:
            try:
                await asyncio.wait_for(asyncio.shield(watch), constants.PROCESS_STOP_TIMEOUT_S)
            except (asyncio.TimeoutError, ray.exceptions.RayError):
                pass
        if identity is not None and identity.get("node") == self._node:
            # Ray reports the actor dead a moment before its process is gone; wait for
            # that here, so what the process held (a GPU's memory, a port) is free again.
            await _wait_until_gone(identity["pid"], identity.get("start_time"))

    def is_alive(self, name: str) -> bool:
        return name in self._actors and name not in self._endings

    def identity(self, name: str) -> Optional[dict]:
        """The actor's name (to find it again), pid, node, and HTTP address for a proxy."""
        return self._identities.get(name)

    def adopt(self, name: str, role: str, address: str, identity: dict) -> bool:
        try:
            actor = ray.get_actor(identity["actor"], namespace=NAMESPACE)
        except (ValueError, KeyError, TypeError):
            return False  # gone (workers are never restarted, so a live one is the same)
        self._actors[name] = actor
        self._identities[name] = identity
        self._actor_names[name] = identity["actor"]
        self._endings.pop(name, None)
        self._watch(name, actor)
        return True

    async def reap_unrecorded(self) -> List[str]:
        """Every worker is a named actor, ``servekit:NAME:...`` in servekit's namespace:
        one that is neither adopted nor launched here was never recorded. It is killed.

        What this runtime launches is never killed, even while its start is under way or
        if it began while Ray listed the actors: what it owns is read after the listing."""
        listed = await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(ray.util.list_named_actors, all_namespaces=True))
        owned = set(self._actor_names.values())
        reaped = []
        for entry in listed:
            name = entry.get("name", "")
            if entry.get("namespace") != NAMESPACE or not name.startswith("servekit:") or \
                    name in owned:
                continue
            try:
                actor = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                continue  # gone meanwhile
            logger.warning("Stopping actor %s: no saved record names it (its controller died "
                           "while starting it).", name)
            ray.kill(actor, no_restart=True)
            reaped.append(name)
        return reaped

    def store_description(self) -> str:
        return f"Ray's internal KV store (namespace {NAMESPACE!r}, key {_STATE_KEY.decode()!r})"

    def exit_description(self, name: str) -> str:
        return self._endings.get(name, "is not running")

    async def shutdown(self, discard_state: bool = True) -> None:
        await asyncio.gather(*(self.stop(name, timeout=2.0) for name in list(self._actors)))
        if discard_state:
            await asyncio.get_running_loop().run_in_executor(None, _kv_discard)


async def _wait_until_gone(pid: int, start_time: Optional[int]) -> None:
    """Wait (up to the process stop timeout) until process ``pid`` of ``start_time`` exits."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # already gone
    try:
        if start_time is not None and process_start_time(pid) == start_time:
            # A pidfd turns readable when its process exits.
            await asyncio.get_running_loop().run_in_executor(
                None, select.select, [pidfd], [], [], constants.PROCESS_STOP_TIMEOUT_S)
    finally:
        os.close(pidfd)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _start_error(error: BaseException) -> str:
    """What Ray's error says went wrong: for an actor whose constructor raised, the line
    of that exception (the last of the traceback Ray quotes), else the first line."""
    if getattr(error, "actor_init_failed", False):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if lines:
            name, colon, message = lines[-1].partition(": ")
            return f"{name.rsplit('.', 1)[-1]}: {message}" if colon else lines[-1]
    return _first_line(error)


def _init_ray(address: Optional[str]) -> None:
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)


def _controller() -> Optional[Any]:
    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


class RayInstance(Instance):
    """The instance of a Ray cluster, reached through its controller actor."""

    def __init__(self, controller: Any, info: dict, detached: bool) -> None:
        self._controller = controller
        self.controller_address = info["address"]
        self.detached = detached
        auth.set_secret(_instance_secret())
        register_controller_resolver(self.controller_address, _controller_address)

    @classmethod
    def start(cls, http_options: HTTPOptions, detached: bool,
              custom_resources: Dict[str, float], address: Optional[str]) -> "RayInstance":
        """Create the controller actor on the driver's node.

        Raises:
            ServeError: an instance already runs on this cluster, or ``resources`` was given.
        """
        if custom_resources:
            raise ServeError("serve.start(resources=...) declares what this machine offers; "
                             "on Ray, declare custom resources on the nodes instead "
                             "(ray start --resources='{...}' or ray.init(resources=...)).")
        _init_ray(address)
        if _controller() is not None:
            raise ServeError("A servekit instance already runs on this Ray cluster. Use "
                             "serve.connect() to reach it, or shut it down first.")
        if not detached:
            _kv_discard()  # what a non-detached instance left behind is no one's
        _instance_secret()
        node = ray.get_runtime_context().get_node_id()
        payload = RayControllerSpec(HTTPSettings.of(http_options), list(importable_sys_path()),
                                    node)
        controller = ServekitActor.options(  # type: ignore[attr-defined]
            name=CONTROLLER_NAME, namespace=NAMESPACE,
            lifetime="detached" if detached else None, max_restarts=-1, max_concurrency=4,
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
        ).remote("controller", "controller", cloudpickle.dumps(payload), None,
                 importable_sys_path(), None)
        try:
            info = ray.get(controller.info.remote(), timeout=constants.STARTUP_TIMEOUT_S)
        except Exception as exc:
            ray.kill(controller, no_restart=True)
            raise ServeError(f"The servekit controller could not start on Ray: "
                             f"{_start_error(exc)}") from None
        return cls(controller, info, detached)

    @classmethod
    def find(cls, address: Optional[str]) -> Optional["RayInstance"]:
        """The instance of the cluster (connecting to it first if ``address``), or None."""
        _init_ray(address)
        controller = _controller()
        if controller is None:
            return None
        info = ray.get(controller.info.remote(), timeout=constants.STARTUP_TIMEOUT_S)
        return cls(controller, info, detached=True)

    def stop(self, keep_state: bool) -> None:
        if not ray.is_initialized():
            return  # the script is ending: Ray ends the actors this driver owns
        ray.kill(self._controller, no_restart=True)
        if not keep_state:
            _kv_discard()

    def controller_returns(self) -> bool:
        """Wait (up to the startup timeout) for Ray to restart a dead controller."""
        deadline = time.monotonic() + constants.STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if _controller() is None:
                return False  # gone for good
            try:
                ray.get(self._controller.info.remote(), timeout=deadline - time.monotonic())
                return True
            except ray.exceptions.GetTimeoutError:
                return False
            except ray.exceptions.RayError:
                time.sleep(0.1)  # called while it was being restarted
        return False
