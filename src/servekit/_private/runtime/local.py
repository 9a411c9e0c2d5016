"""``LocalRuntime``: every worker is a child process of the controller on this machine."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import signal
import socket
import sys
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import cloudpickle

from servekit._private.controller.store import SQLiteStore
from servekit._private.resources import GPUAllocator, detect_gpus, machine_capacity
from servekit._private.runtime.base import Connection, Runtime
from servekit._private.specs import ControllerSpec, EarlyWorker, WorkerSpec
from servekit._private.wire.transport import RpcClient
from servekit._private.workers.process import (
    AdoptedProcess,
    WorkerProcess,
    process_start_time,
    start_worker,
    unix_socket_holders,
    write_spec,
)
from servekit.exceptions import ServeError

logger = logging.getLogger("servekit.controller")


class LocalRuntime(Runtime):
    """Runs workers as child processes; state lives in SQLite in the instance directory."""

    def __init__(self, instance_dir: str, controller_address: str,
                 sys_path: Sequence[str],
                 custom_resources: Optional[Dict[str, float]] = None,
                 http_socket: Optional[socket.socket] = None,
                 lifeline_fd: Optional[int] = None, log_dir: Optional[str] = None,
                 log_to_stderr: bool = True, early_proxy: Optional[EarlyWorker] = None,
                 early_replica: Optional[EarlyWorker] = None) -> None:
        """``http_socket``: the bound HTTP socket proxies serve (None: no HTTP).
        ``lifeline_fd``: the pipe workers watch (None: each watches this process).
        ``log_dir``: where workers write their log files (None: stderr only);
        ``log_to_stderr``: whether they log to stderr too. ``early_proxy``,
        ``early_replica``: the workers the supervisor started beside this controller:
        launching the first proxy adopts the one, the first replica (of this Python and
        without GPUs) the other."""
        self.instance_dir = instance_dir
        self.store_path = os.path.join(instance_dir, "state.db")
        self.store = SQLiteStore(self.store_path)
        self._controller_address = controller_address
        self._sys_path = list(sys_path)
        self._workers: Dict[str, Union[WorkerProcess, AdoptedProcess]] = {}
        self._sockets: Dict[str, str] = {}  # worker name -> its socket file
        self._proxies: Set[str] = set()  # names of the workers that are HTTP proxies
        self._http_socket = http_socket
        self._lifeline_fd = lifeline_fd
        self._log_dir = log_dir
        self._log_to_stderr = log_to_stderr
        gpus = detect_gpus()
        self._capacity = machine_capacity(gpus, custom_resources)
        self._gpus = GPUAllocator(gpus)
        self._gpu_requests: Dict[str, float] = {}
        self._early_proxy = early_proxy
        self._early_replica = early_replica

    def capacity(self) -> Dict[str, float]:
        """CPUs and GPUs of this machine plus the custom resources given to ``start``."""
        return dict(self._capacity)

    def bind_http(self, host: str, port: int) -> Tuple[str, int]:
        """The address of the HTTP socket the instance bound (see ``LocalInstance``)."""
        if self._http_socket is None:
            raise ServeError("This instance was started without an HTTP socket.")
        return self._http_socket.getsockname()[:2]

    async def proxy_nodes(self, location: str) -> Dict[str, Optional[str]]:
        """One proxy, whatever the location: this machine is the only node."""
        return {"proxy": None}

    def instance_processes(self) -> List[dict]:
        """The supervisor (which outlives controller restarts) and this controller."""
        return [{"role": "supervisor", "name": "supervisor", "pid": os.getppid(),
                 "state": "RUNNING"},
                {"role": "controller", "name": "controller", "pid": os.getpid(),
                 "state": "RUNNING"}]

    async def launch(self, name: str, role: str, payload: Any, *,
                     resources: Optional[dict] = None, python: Optional[str] = None,
                     node: Optional[str] = None) -> str:
        num_gpus = (resources or {}).get("num_gpus") or 0
        early = None
        if role == "proxy" and name == "proxy":
            early, self._early_proxy = self._early_proxy, None
        elif role == "replica" and python is None and not num_gpus:
            early, self._early_replica = self._early_replica, None
        if early is not None:
            if early.spec_fd is not None:  # a replica waiting for its spec
                assert early.rpc_fd is not None
                spec = WorkerSpec(role=role, name=name, instance_dir=self.instance_dir,
                                  rpc_fd=early.rpc_fd, controller_address=self._controller_address,
                                  payload=cloudpickle.dumps(payload), sys_path=self._sys_path,
                                  watch_parent=False, lifeline_fd=self._lifeline_fd,
                                  log_dir=self._log_dir, log_to_stderr=self._log_to_stderr)
                await asyncio.get_running_loop().run_in_executor(
                    None, write_spec, early.spec_fd, spec)
            if self.adopt(name, role, early.address, early.identity):
                return early.address
            _remove(early.address)  # it died: start another
        extra_fds = {}
        if role == "proxy":
            if self._http_socket is None:
                raise ServeError("bind_http must be called before a proxy is launched.")
            # Every proxy serves the one socket the supervisor holds: the kernel hands each
            # connection to one of them, and it keeps listening while a proxy restarts.
            extra_fds["http"] = self._http_socket.fileno()
            self._proxies.add(name)
        env = None
        devices = self._gpus.assign(name, num_gpus)
        if devices is not None:
            self._gpu_requests[name] = num_gpus
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": devices}
        path, self._workers[name] = start_worker(
            role, name, cloudpickle.dumps(payload), instance_dir=self.instance_dir,
            controller_address=self._controller_address,
            sys_path=self._sys_path if python is None else
            [p for p in self._sys_path if "-packages" not in p],
            extra_fds=extra_fds, lifeline_fd=self._lifeline_fd, log_dir=self._log_dir,
            log_to_stderr=self._log_to_stderr, python=python or sys.executable, env=env)
        self._sockets[name] = path
        return path

    async def connect(self, address: str) -> Connection:
        return await RpcClient.connect(address)

    async def stop(self, name: str, timeout: float) -> None:
        worker = self._workers.pop(name, None)
        if worker is not None:
            await worker.stop(timeout)
        self._gpus.release(name, self._gpu_requests.pop(name, 0))
        path = self._sockets.pop(name, None)
        if path is not None:
            _remove(path)  # nothing serves it any more

    def is_alive(self, name: str) -> bool:
        worker = self._workers.get(name)
        return worker is not None and worker.is_alive()

    def identity(self, name: str) -> Optional[dict]:
        """``{"pid", "start_time"}`` of worker ``name``'s process, its GPUs if it has any
        (``"gpus"``, ``"num_gpus"``: a controller that adopts it keeps them taken)."""
        worker = self._workers.get(name)
        if worker is None:
            return None
        identity: Dict[str, Any] = {"pid": worker.pid,
                                    "start_time": process_start_time(worker.pid)}
        if name in self._gpu_requests:
            identity["gpus"] = self._gpus.devices(name)
            identity["num_gpus"] = self._gpu_requests[name]
        if name in self._proxies and self._http_socket is not None:
            identity["http"] = list(self._http_socket.getsockname()[:2])
        return identity

    def adopt(self, name: str, role: str, address: str, identity: dict) -> bool:
        pid, started = identity.get("pid"), identity.get("start_time")
        if not isinstance(pid, int) or started is None or process_start_time(pid) != started:
            return False  # gone, or the pid now names another process
        try:
            self._workers[name] = AdoptedProcess(pid)
        except OSError:
            return False
        self._sockets[name] = address
        if role == "proxy":
            self._proxies.add(name)
        if identity.get("gpus"):
            self._gpus.restore(name, identity["gpus"], identity["num_gpus"])
            self._gpu_requests[name] = identity["num_gpus"]
        return True

    async def reap_unrecorded(self) -> List[str]:
        """Every worker serves a socket in the instance directory: one that no worker of
        this runtime owns belongs to a worker launched and never recorded. Its processes
        (found by the socket they hold) are killed and the file removed."""
        # (and the early workers, recorded once a launch adopts them)
        owned = {*self._sockets.values(),
                 *(early.address for early in (self._early_proxy, self._early_replica)
                   if early is not None)}
        reaped = []
        for path in glob.glob(os.path.join(glob.escape(self.instance_dir), "[rp]-*.sock")):
            if path in owned:
                continue
            for pid in unix_socket_holders(path):
                logger.warning("Stopping process %d: it serves %s, which no saved record "
                               "names (its controller died while starting it).", pid, path)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _remove(path)
            reaped.append(path)
        return reaped

    def store_description(self) -> str:
        return self.store_path

    def exit_description(self, name: str) -> str:
        worker = self._workers.get(name)
        if worker is None or worker.returncode is None:
            return "is not running"
        if isinstance(worker, AdoptedProcess):
            return "exited"
        code = worker.returncode
        if code < 0:
            return f"was killed by signal {signal.Signals(-code).name}"
        return f"exited with code {code}"

    async def shutdown(self, discard_state: bool = True) -> None:
        workers, self._workers = list(self._workers.values()), {}
        await asyncio.gather(*(worker.stop(timeout=2.0) for worker in workers))
        if self._http_socket is not None:
            self._http_socket.close()
            self._http_socket = None
        self.store.close()
        if discard_state:
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(self.store_path + suffix)
                except FileNotFoundError:
                    pass


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def run_local_controller(worker: WorkerSpec, sock: socket.socket,
                               stop: asyncio.Event) -> None:
    """The controller process of an embedded instance (role "controller" of the worker)."""
    from servekit._private.controller.main import serve_controller

    spec: ControllerSpec = worker.load_payload()
    http_fd = worker.extra_fds.get("http")
    runtime = LocalRuntime(worker.instance_dir, controller_address=sock.getsockname(),
                           sys_path=worker.sys_path, custom_resources=spec.custom_resources,
                           http_socket=None if http_fd is None else socket.socket(fileno=http_fd),
                           lifeline_fd=worker.lifeline_fd, log_dir=worker.log_dir,
                           log_to_stderr=worker.log_to_stderr,
                           early_proxy=worker.early_proxy, early_replica=worker.early_replica)
    # The instance's other processes watch the same lifeline as this one: when it closes,
    # they all exit by themselves, and the supervisor removes the directory.
    await serve_controller(runtime, spec.http_options, sock, stop)
