"""Starting an embedded instance from the user's script, and ending it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from typing import Dict, List, Optional, Tuple

import cloudpickle

from servekit._private import home
from servekit._private.process import (
    WorkerProcess,
    WorkerSpec,
    bind_http_socket,
    bind_unix_socket,
    importable_sys_path,
)
from servekit._private.specs import ControllerSpec
from servekit.config import HTTPOptions


class LocalInstance:
    """An embedded instance as its script sees it: its private directory, the sockets it
    bound, and its supervisor process (which runs the controller, see ``supervisor``)."""

    def __init__(self, http_options: HTTPOptions, detached: bool,
                 custom_resources: Dict[str, float]) -> None:
        self.detached = detached
        self.http_address: Optional[Tuple[str, int]] = None
        # A detached instance keeps its place (and state file) in $SERVEKIT_HOME; the caller
        # checked that none runs, so a socket file there is a dead instance's.
        self.instance_dir = home.instance_dir() if detached else \
            tempfile.mkdtemp(prefix="servekit-")  # mode 0700
        self.controller_address = os.path.join(self.instance_dir, "controller.sock")
        if detached and os.path.lexists(self.controller_address):
            os.unlink(self.controller_address)
        sockets: List[socket.socket] = []
        try:
            extra_fds = {}
            if http_options.location != "NoServer" and http_options.host is not None:
                # Bound here, so a busy port fails start() before any process runs, and
                # held by the supervisor, so every controller and proxy serves this socket.
                http = bind_http_socket(http_options.host, http_options.port)
                self.http_address = http.getsockname()[:2]
                sockets.append(http)
                extra_fds["http"] = http.fileno()
            sock = bind_unix_socket(self.controller_address)
            sockets.append(sock)
            spec = WorkerSpec(
                role="supervisor", name="supervisor", instance_dir=self.instance_dir,
                rpc_fd=sock.fileno(), controller_address=None,
                payload=cloudpickle.dumps(ControllerSpec(http_options, detached, custom_resources)),
                sys_path=importable_sys_path(), watch_parent=not detached, daemonize=detached,
                extra_fds=extra_fds)
            # A detached instance outlives this script, so it must not hold its terminal
            # or pipes: its processes write to a log file instead.
            log_path = home.log_path() if detached else None
            self.process: Optional[WorkerProcess] = WorkerProcess(
                spec, new_session=detached, log_path=log_path)
        except BaseException:
            if not detached:
                shutil.rmtree(self.instance_dir, ignore_errors=True)
            raise
        finally:
            for held in sockets:
                held.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float) -> None:
        """Close the lifeline, wait up to ``timeout`` s for the exit, kill, remove the dir
        (a detached instance's directory, which may hold its state, is its own to clean)."""
        process, self.process = self.process, None
        if process is not None:
            process.popen.stdin.close()  # type: ignore[union-attr]
            try:
                process.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
        if not self.detached:
            shutil.rmtree(self.instance_dir, ignore_errors=True)
