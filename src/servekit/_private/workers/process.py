"""Starting servekit worker processes and tying their lives to their instance's.

A worker reads its ``WorkerSpec`` from stdin, then watches a lifeline: its stdin (the
supervisor watches the user's script this way), or the instance's lifeline pipe, whose write
end only the supervisor holds (the controller, proxy and replicas, which so survive a
controller crash). When the holder exits for any reason, even SIGKILL, the worker reads
end-of-file and exits too, so no process outlives the instance.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from servekit._private.constants import PROCESS_STOP_TIMEOUT_S
from servekit._private.specs import EarlyWorker, WorkerSpec
from servekit.exceptions import HostNotFoundError, ServeError

_LENGTH = struct.Struct("!Q")
# The environment variable that makes a worker import a role's modules before its spec comes.
PRELOAD_ROLE = "SERVEKIT_PRELOAD_ROLE"

# Run (quickly, from the lifeline thread) just before a worker exits because its parent died.
parent_exit_hooks: List[Callable[[], None]] = []


def bind_unix_socket(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` (the directory is private to the owner)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(4096)
    return sock


def bind_http_socket(host: str, port: int, shared: bool = False) -> socket.socket:
    """Bind and listen on ``host:port``, or raise a ServeError that says how to fix it.

    ``shared``: with ``SO_REUSEPORT``, so every proxy of the instance on this machine (one
    per Ray node, or ``num_proxies`` of them) can bind the same port, the kernel spreading
    connections over them; a port another program holds without it still fails."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise HostNotFoundError(
            exc.errno, f"Cannot serve HTTP on host {host!r}: it does not resolve "
                       f"({exc.strerror}). Pass a valid address in http_options['host'] "
                       "(servekit start and run: --http-host).") \
            from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if shared:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(4096)
    except OSError as exc:
        sock.close()
        raise ServeError(f"Cannot serve HTTP on {host}:{port}: {exc.strerror}. Stop whatever "
                         "listens there, or choose another port with "
                         "http_options={'port': ...} (servekit start and run: --http-port).") \
            from None
    sock.set_inheritable(True)
    return sock


def importable_sys_path(keep_site_packages: bool = True) -> list:
    """This process's import path, to give a worker the same view of the user's modules."""
    paths = [p or os.getcwd() for p in sys.path]
    if not keep_site_packages:
        prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix}
        paths = [p for p in paths if "site-packages" not in p and "dist-packages" not in p
                 and not any(p.startswith(os.path.join(pre, "lib")) for pre in prefixes)]
    return paths


class WorkerProcess:
    """A running worker: its Popen and the lifeline pipe that keeps it alive."""

    def __init__(self, spec: WorkerSpec, python: str = sys.executable,
                 env: Optional[Dict[str, str]] = None, new_session: bool = False,
                 log_path: Optional[str] = None) -> None:
        fds = [spec.rpc_fd, *spec.extra_fds.values()]
        if spec.lifeline_fd is not None:
            fds.append(spec.lifeline_fd)
        log = open(log_path, "ab") if log_path else None  # else: share this process's output
        try:
            self.popen = subprocess.Popen(
                [python, "-m", "servekit._private.workers.worker"], stdin=subprocess.PIPE,
                stdout=log, stderr=log, pass_fds=fds, env=env, start_new_session=new_session)
        finally:
            if log is not None:
                log.close()
        assert self.popen.stdin is not None
        self.popen.stdin.write(spec_message(spec))
        self.popen.stdin.flush()
        if not spec.watch_parent:
            self.popen.stdin.close()
        if spec.daemonize:
            self.popen.wait()  # the first process exits once it has forked the worker

    @property
    def pid(self) -> int:
        return self.popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return self.popen.poll()

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()
        self.popen.wait()
        self._close_lifeline()

    async def stop(self, timeout: float = PROCESS_STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL; returns once it has exited."""
        if self.is_alive():
            try:
                self.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, self.popen.wait, timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                await loop.run_in_executor(None, self.popen.wait)
        self._close_lifeline()

    def _close_lifeline(self) -> None:
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except OSError:
                pass


def start_worker(role: str, name: str, payload: bytes, *, instance_dir: str,
                 controller_address: str, sys_path: Sequence[str],
                 extra_fds: Dict[str, int], lifeline_fd: Optional[int],
                 log_dir: Optional[str], log_to_stderr: bool, python: str = sys.executable,
                 env: Optional[Dict[str, str]] = None) -> Tuple[str, WorkerProcess]:
    """Start a worker of the instance in ``instance_dir`` serving a new Unix socket there:
    (the socket's path, the process). ``lifeline_fd`` None: it watches this process."""
    # Random, so a restarted controller never reuses the socket of a worker it adopts.
    path = os.path.join(instance_dir, f"{role[0]}-{secrets.token_hex(6)}.sock")
    sock = bind_unix_socket(path)
    spec = WorkerSpec(role=role, name=name, instance_dir=instance_dir, rpc_fd=sock.fileno(),
                      controller_address=controller_address, payload=payload,
                      sys_path=sys_path, extra_fds=extra_fds,
                      watch_parent=lifeline_fd is None, lifeline_fd=lifeline_fd,
                      log_dir=log_dir, log_to_stderr=log_to_stderr)
    try:
        return path, WorkerProcess(spec, python=python, env=env)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        sock.close()


def unix_socket_holders(path: str) -> List[int]:
    """The pids of this user's processes holding a Unix socket bound to ``path`` (from
    ``/proc``: the socket's inode in ``/proc/net/unix``, then each process's open files)."""
    try:
        with open("/proc/net/unix") as table:
            next(table, None)  # the header
            inodes = {fields[6] for fields in (line.split(None, 7) for line in table)
                      if len(fields) == 8 and fields[7].rstrip("\n") == path}
    except OSError:
        return []
    targets = {f"socket:[{inode}]" for inode in inodes}
    holders = []
    for process in os.scandir("/proc"):
        if not process.name.isdigit() or int(process.name) == os.getpid():
            continue
        try:
            with os.scandir(f"/proc/{process.name}/fd") as files:
                if any(_link(entry.path) in targets for entry in files):
                    holders.append(int(process.name))
        except OSError:
            continue  # gone, or another user's
    return holders


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def process_start_time(pid: int) -> Optional[int]:
    """When ``pid`` started (clock ticks after boot), or None if it is gone or a zombie.

    With the pid it identifies a process for good: a recycled pid starts at another time.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def cpu_state(pid: int) -> Optional[Tuple[str, float]]:
    """(scheduler state letter, seconds of CPU used so far) of ``pid``; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class AdoptedProcess:
    """A worker that an earlier controller started: not our child, watched through a pidfd.

    Signals go through the pidfd too, so they can never reach a recycled pid.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)

    def is_alive(self) -> bool:
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        return not readable  # a pidfd turns readable when its process exits

    @property
    def returncode(self) -> Optional[int]:
        return None if self.is_alive() else 0  # not our child: its status is not ours to read

    def _signal(self, sig: int) -> None:
        try:
            signal.pidfd_send_signal(self._pidfd, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        select.select([self._pidfd], [], [], PROCESS_STOP_TIMEOUT_S)
        os.close(self._pidfd)

    async def stop(self, timeout: float = PROCESS_STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
        loop = asyncio.get_running_loop()
        self._signal(signal.SIGTERM)
        readable, _, _ = await loop.run_in_executor(
            None, select.select, [self._pidfd], [], [], timeout)
        if not readable:
            await loop.run_in_executor(None, self.kill)
        else:
            os.close(self._pidfd)


def spec_message(spec: WorkerSpec) -> bytes:
    """What a worker reads on its stdin: ``spec``, length-prefixed."""
    data = pickle.dumps(spec, protocol=5)
    return _LENGTH.pack(len(data)) + data


def start_early_replica(*, instance_dir: str, lifeline_fd: int) -> EarlyWorker:
    """Start a replica process with no spec yet, serving a new Unix socket in
    ``instance_dir``: it imports the replica's modules, then waits for the spec its
    controller writes to ``spec_fd`` (and exits if the pipe closes first)."""
    path = os.path.join(instance_dir, f"r-{secrets.token_hex(6)}.sock")
    sock = bind_unix_socket(path)
    rpc_fd = sock.fileno()  # (its number in the replica too)
    try:
        popen = subprocess.Popen(
            [sys.executable, "-m", "servekit._private.workers.worker"], stdin=subprocess.PIPE,
            pass_fds=[sock.fileno(), lifeline_fd], env={**os.environ, PRELOAD_ROLE: "replica"})
    except BaseException:
        os.unlink(path)
        raise
    finally:
        sock.close()
    assert popen.stdin is not None
    spec_fd = os.dup(popen.stdin.fileno())  # (the Popen's copy closes with it)
    popen.stdin.close()
    return EarlyWorker(path, {"pid": popen.pid, "start_time": process_start_time(popen.pid)},
                       rpc_fd=rpc_fd, spec_fd=spec_fd)


def write_spec(fd: int, spec: WorkerSpec) -> None:
    """Give ``spec`` to the worker reading the pipe ``fd`` (blocks while the pipe is full),
    and close it."""
    try:
        with open(fd, "wb", closefd=True) as pipe:
            pipe.write(spec_message(spec))
    except BrokenPipeError:
        pass  # it is gone: its adoption fails


def read_spec(stream: Any) -> WorkerSpec:
    """Read the spec the parent wrote to this worker's stdin."""
    header = stream.read(_LENGTH.size)
    if len(header) != _LENGTH.size:
        raise SystemExit("servekit worker: no spec on stdin; workers are started by servekit.")
    (length,) = _LENGTH.unpack(header)
    return pickle.loads(stream.read(length))
