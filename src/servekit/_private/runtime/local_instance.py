"""The embedded instance as the user's script sees it.

``LocalInstance`` starts one; ``DetachedLocalInstance`` is the detached one this user runs,
found by its record in ``$SERVEKIT_HOME``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from typing import Dict, List, Optional, Tuple

import cloudpickle

from servekit._private import constants
from servekit._private.runtime.base import Instance
from servekit._private.specs import ControllerSpec, HTTPSettings, WorkerSpec
from servekit._private.workers import home
from servekit._private.workers.logs import LOG_DIR, set_aside_previous
from servekit._private.workers.process import (
    WorkerProcess,
    bind_http_socket,
    bind_unix_socket,
    importable_sys_path,
)
from servekit.config import HTTPOptions


class LocalInstance(Instance):
    """An embedded instance as its script sees it: its private directory, the sockets it
    bound, and its supervisor process (which runs the controller, see ``supervisor``)."""

    def __init__(self, http_options: HTTPOptions, detached: bool,
                 custom_resources: Dict[str, float]) -> None:
        self.detached = detached
        self.http_options = http_options
        self.http_address: Optional[Tuple[str, int]] = None
        # A detached instance keeps its place (and state file) in $SERVEKIT_HOME; the caller
        # checked that none runs, so a socket file there is a dead instance's.
        self.instance_dir = home.instance_dir() if detached else \
            tempfile.mkdtemp(prefix="servekit-")  # mode 0700
        self.controller_address = os.path.join(self.instance_dir, "controller.sock")
        if detached and os.path.lexists(self.controller_address):
            os.unlink(self.controller_address)
        sockets: List[socket.socket] = []
        settings = HTTPSettings.of(http_options)
        try:
            extra_fds = {}
            proxy_payload = None
            if http_options.location != "NoServer" and http_options.host is not None:
                # Bound here, so a busy port fails start() before any process runs, and
                # held by the supervisor, so every controller and proxy serves this socket.
                http = bind_http_socket(http_options.host, http_options.port)
                self.http_address = http.getsockname()[:2]
                sockets.append(http)
                extra_fds["http"] = http.fileno()
                # The supervisor starts the first proxy while the controller starts.
                proxy_payload = settings.proxy_spec
            sock = bind_unix_socket(self.controller_address)
            sockets.append(sock)
            if detached:  # its logs stay when it stops, until the next one starts
                log_dir = home.log_dir()
                set_aside_previous(log_dir)
            else:
                log_dir = os.path.join(self.instance_dir, LOG_DIR)
            spec = WorkerSpec(
                role="supervisor", name="supervisor", instance_dir=self.instance_dir,
                rpc_fd=sock.fileno(), controller_address=None,
                payload=cloudpickle.dumps(ControllerSpec(settings, detached, custom_resources)),
                sys_path=importable_sys_path(), watch_parent=not detached, daemonize=detached,
                extra_fds=extra_fds, log_dir=log_dir, log_to_stderr=not detached,
                proxy_payload=proxy_payload)
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
        """The supervisor's pid (the daemonizing parent's, for a detached instance)."""
        assert self.process is not None
        return self.process.pid

    def started(self, pid: int) -> None:
        if self.detached:
            port = self.http_address[1] if self.http_address else self.http_options.port
            location = self.http_options.location
            home.write_record(self.controller_address, pid, {
                "host": self.http_options.host, "port": port,
                "location": None if location is None else location.value})

    def stop(self, keep_state: bool) -> None:
        """Close the lifeline, wait for the exit (killing it if it is late), remove the dir;
        a detached instance is stopped by its record, and its directory is its own."""
        if self.detached and home.read_record() is not None:
            DetachedLocalInstance(self.controller_address).stop(keep_state)
        process, self.process = self.process, None
        if process is not None:
            process.popen.stdin.close()  # type: ignore[union-attr]
            try:
                process.popen.wait(constants.SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
        if not self.detached:
            shutil.rmtree(self.instance_dir, ignore_errors=True)


class DetachedLocalInstance(Instance):
    """The detached embedded instance of this user, found by its record in $SERVEKIT_HOME."""

    detached = True

    def __init__(self, controller_address: str) -> None:
        self.controller_address = controller_address

    def stop(self, keep_state: bool) -> None:
        """SIGTERM the supervisor the record names; return once it is gone, so that a new
        start finds none running."""
        record = home.read_record()
        if not keep_state:
            home.remove_record(self.controller_address)
        if record is None or record["address"] != self.controller_address:
            return
        try:
            os.kill(record["pid"], signal.SIGTERM)
        except ProcessLookupError:
            return
        home.wait_until_gone(record["pid"], record["started"], constants.SHUTDOWN_TIMEOUT_S)
