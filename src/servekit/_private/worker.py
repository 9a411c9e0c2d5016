"""Entry point of every servekit process: ``python -m servekit._private.worker``.

The parent writes a ``WorkerSpec`` to stdin. The worker then watches its lifeline — stdin
itself, or the instance's lifeline pipe — and exits at once when it reads end-of-file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from typing import Any, Callable

from servekit._private.event_loop import new_event_loop
from servekit._private.process import WorkerSpec, parent_exit_hooks, read_spec


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


def role_main(role: str) -> Callable[[WorkerSpec, socket.socket, asyncio.Event], Any]:
    """The coroutine function that runs a worker of ``role`` until its stop event is set."""
    if role == "supervisor":
        from servekit._private.supervisor import run_supervisor as run
    elif role == "controller":
        from servekit._private.runtime.local import run_local_controller as run
    elif role == "proxy":
        from servekit._private.proxy import run_proxy as run
    elif role == "replica":
        from servekit._private.replica import run_replica as run
    else:
        raise SystemExit(f"servekit worker: unknown role {role!r}")
    return run


def main() -> None:
    spec: WorkerSpec = read_spec(sys.stdin.buffer)
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
    logging.basicConfig(level=os.environ.get("SERVEKIT_LOG_LEVEL", "WARNING"),
                        format=f"(servekit {spec.role} pid={os.getpid()}) %(levelname)s "
                               "%(name)s: %(message)s")
    sock = socket.socket(fileno=spec.rpc_fd)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # the parent decides when we stop
    run = role_main(spec.role)
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
