"""Entry point of every servekit process: ``python -m servekit._private.workers.worker``.

The parent writes a ``WorkerSpec`` to stdin. The worker then watches its lifeline — stdin
itself, or the instance's lifeline pipe — and exits at once when it reads end-of-file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import sys
import threading
import traceback
from typing import Any, Callable

import setproctitle

from servekit._private.event_loop import new_event_loop
from servekit._private.memory import release_freed_memory
from servekit._private.specs import WorkerSpec
from servekit._private.workers.logs import configure_logging
from servekit._private.workers.process import PRELOAD_ROLE, parent_exit_hooks, read_spec


def _watch_lifeline(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except OSError:
        pass
    for hook in parent_exit_hooks:
        try:
            hook()
        except Exception:
            pass
    os._exit(0)


def _set_title(title: str) -> None:
    """What ps and top show: the role and name ("servekit replica clf:v1#3a2b1c"). Within
    the room of the command line (SPT_NOENV): the process's environment, which tools read
    in /proc, is left intact."""
    os.environ["SPT_NOENV"] = "1"
    try:
        setproctitle.setproctitle(title)
    finally:
        del os.environ["SPT_NOENV"]


def raise_open_file_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit: a proxy holds a
    descriptor per client connection, a replica one per caller process, and the usual soft
    limit (1024) is far below what they are allowed. A limit that cannot be raised is left
    as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # (an unlimited hard limit, as on macOS, is capped by the kernel: ask for a number)
    target = _UNLIMITED_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        logging.getLogger("servekit.worker").info(
            "The open-file limit (RLIMIT_NOFILE) stays at %d: raising it to %d failed: %s",
            soft, target, exc)


# The soft open-file limit a worker asks for when its hard limit is unlimited.
_UNLIMITED_OPEN_FILES = 65536


def role_main(role: str) -> Callable[[WorkerSpec, socket.socket, asyncio.Event], Any]:
    """The coroutine function that runs a worker of ``role`` until its stop event is set.
    (A worker on Ray starts here too: its process's open-file limit is raised here.)"""
    raise_open_file_limit()
    if role == "supervisor":
        from servekit._private.workers.supervisor import run_supervisor as run
    elif role == "controller":
        from servekit._private.runtime.local import run_local_controller as run
    elif role == "proxy":
        from servekit._private.proxy.proxy import run_proxy as run
    elif role == "replica":
        from servekit._private.replica.replica import run_replica as run
    else:
        raise SystemExit(f"servekit worker: unknown role {role!r}")
    return run


def main() -> None:
    preload = os.environ.pop(PRELOAD_ROLE, None)
    if preload is not None:  # started before its spec: imports its role's modules meanwhile
        role_main(preload)
    try:
        spec: WorkerSpec = read_spec(sys.stdin.buffer)
    except SystemExit:
        if preload is None:
            raise
        os._exit(0)  # its instance ended without needing it
    if spec.daemonize and os.fork() > 0:
        os._exit(0)  # the worker goes on in the child, which init adopts
    for path in reversed(spec.sys_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    lifeline = spec.lifeline_fd
    if lifeline is None and spec.watch_parent:
        lifeline = sys.stdin.fileno()
    if lifeline is not None:
        threading.Thread(target=_watch_lifeline, args=(lifeline,),
                         name="servekit-lifeline", daemon=True).start()
    configure_logging(spec.role, spec.name, spec.log_dir, spec.log_to_stderr)
    _set_title(f"servekit {spec.role} {spec.name}")
    sock = socket.socket(fileno=spec.rpc_fd)
    # The controller is off the requests' path: asyncio's own loop serves it, and spares it
    # uvloop's memory (about 2 MB); the processes requests go through run on uvloop.
    loop = asyncio.new_event_loop() if spec.role == "controller" else new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the parent decides when we stop
    run = role_main(spec.role)
    release_freed_memory()  # what compiling and importing its modules left
    code = 0
    try:
        loop.run_until_complete(run(spec, sock, stop))
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
