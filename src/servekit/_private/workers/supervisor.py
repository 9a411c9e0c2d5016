"""The instance supervisor: keeps an instance's controller running, and its processes alive.

Every instance has one (``python -m servekit._private.workers.worker`` in the "supervisor" role). It
holds what must outlive a controller — the controller's listening socket, the HTTP socket and
the write end of the instance's lifeline pipe — and restarts the controller whenever it dies
without having been asked to stop (or is killed for not answering pings). Every other
process of the instance (controller, proxy, replicas) watches the lifeline's read end and
exits when it closes, so they all survive a controller crash (a new controller adopts them)
and all end with the supervisor, which ends with the user's script (or, for a detached
instance, on ``shutdown``).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import select
import shutil
import signal
import socket
import threading
import time
from typing import Optional

from servekit._private import constants
from servekit._private.specs import EarlyWorker, WorkerSpec
from servekit._private.workers.process import (
    WorkerProcess,
    cpu_state,
    parent_exit_hooks,
    process_start_time,
    start_early_replica,
    start_worker,
)
from servekit.exceptions import BackendUnavailableError

logger = logging.getLogger("servekit.supervisor")

_PR_SET_CHILD_SUBREAPER = 36
_STATE_FILE = "state.db"
# A controller that ran this long before it died is restarted at once, not after a backoff.
_STABLE_S = 10.0
# The supervisor pings the controller this often; this many missed in a row and it is killed.
_PING_PERIOD_S = 1.0
_PINGS_MISSED = 3


def _become_subreaper() -> None:
    """Orphans of the instance (replicas of a dead controller) become our children, so
    they stay in this process tree and we reap them when they exit."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: orphans go to init, which reaps them


def _reap_orphans(controller: WorkerProcess) -> None:
    """Collect exited children other than the controller (its Popen reaps it)."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid == controller.pid:
            return
        os.waitpid(info.si_pid, 0)


async def _reap_periodically(controller: WorkerProcess) -> None:
    # uvloop keeps SIGCHLD for itself; a zombie here lingers a second at most (the
    # controller learns of the exit at once through its pidfd).
    while True:
        await asyncio.sleep(1.0)
        _reap_orphans(controller)


def starved(pid: int, cpu_before: float, timeout: float) -> bool:
    """Whether a controller that missed a ping was only waiting for a CPU: runnable, and
    given less than half the ping's time in CPU since ``cpu_before`` (a machine saturated
    by hundreds of starting replicas), not frozen (stopped, blocked, or spinning)."""
    state = cpu_state(pid)
    return state is not None and state[0] == "R" and state[1] - cpu_before < timeout / 2


async def _kill_when_frozen(address: str, controller: WorkerProcess) -> None:
    """SIGKILL the controller once it misses ``_PINGS_MISSED`` pings in a row (its event
    loop is blocked, or the process is stopped), so that a new one is started. A ping
    missed while the controller only waited for a CPU does not count (see ``starved``).
    The first answer may take as long as a start; an exit is the caller's to see."""
    # (Imported here, once the controller and the first proxy are on their way.)
    from servekit._private.wire.transport import RpcClient

    timeout = constants.STARTUP_TIMEOUT_S
    missed = 0
    connection = None
    try:
        while True:
            before = cpu_state(controller.pid)
            try:
                if connection is None or connection.is_closed:
                    connection = await RpcClient.connect(address, "servekit controller")
                await asyncio.wait_for(connection.call("ping"), timeout)
                missed, timeout = 0, constants.CONTROLLER_PING_TIMEOUT_S
            except asyncio.TimeoutError:
                if before is not None and starved(controller.pid, before[1], timeout):
                    logger.warning("The controller (pid %d) is slow to answer: the machine "
                                   "is busy and it waits for a CPU.", controller.pid)
                    continue
                missed += 1
                if missed >= _PINGS_MISSED:
                    logger.warning(
                        "The controller (pid %d) did not answer %d pings in a row within "
                        "%.1fs each (is its event loop blocked, or the process stopped?); "
                        "killing it to start a new one.", controller.pid, missed, timeout)
                    controller.popen.kill()
                    return
            except BackendUnavailableError:
                pass  # it is exiting: the caller sees the exit
            await asyncio.sleep(_PING_PERIOD_S)
    finally:
        if connection is not None:
            connection.close()


async def run_supervisor(worker: WorkerSpec, sock: socket.socket, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    _become_subreaper()
    lifeline_read, lifeline_write = os.pipe()
    os.set_inheritable(lifeline_read, True)

    running: list = []  # the controller running now
    finishing = threading.Lock()
    finished: list = []

    def finish(everything: bool) -> None:
        """Close the lifeline (every process of the instance exits), wait for the
        controller so it writes nothing more, then clean the directory. Runs once, from
        the main thread or from the lifeline thread when the script is gone."""
        with finishing:
            if finished:
                return
            finished.append(True)
            os.close(lifeline_write)
            for controller in running:  # (its Popen may be waited on by another thread)
                try:
                    pidfd = os.pidfd_open(controller.pid)
                except OSError:
                    continue  # already gone
                if not select.select([pidfd], [], [], constants.PROCESS_STOP_TIMEOUT_S)[0]:
                    os.kill(controller.pid, signal.SIGKILL)
                os.close(pidfd)
            if everything:
                shutil.rmtree(worker.instance_dir, ignore_errors=True)
            else:
                _clean(worker.instance_dir)

    # The script that started a non-detached instance is gone: so is the instance.
    parent_exit_hooks.append(lambda: finish(everything=True))
    address = sock.getsockname()
    # The first proxy and the first replica start now, beside the controller, which adopts
    # them: the three boot at once instead of one after the other.
    early_replica = start_early_replica(instance_dir=worker.instance_dir,
                                        lifeline_fd=lifeline_read)
    assert early_replica.spec_fd is not None
    spec = WorkerSpec(role="controller", name="controller", instance_dir=worker.instance_dir,
                      rpc_fd=sock.fileno(), controller_address=None, payload=worker.payload,
                      sys_path=worker.sys_path, watch_parent=False, lifeline_fd=lifeline_read,
                      extra_fds={**worker.extra_fds, "early_replica": early_replica.spec_fd},
                      log_dir=worker.log_dir, log_to_stderr=worker.log_to_stderr,
                      early_proxy=_start_proxy(worker, address, lifeline_read),
                      early_replica=early_replica)
    failures = 0
    while True:
        started = time.monotonic()
        controller = WorkerProcess(spec)
        if spec.early_replica is not None:  # only the first controller adopts them
            os.close(spec.extra_fds.pop("early_replica"))
            spec.early_proxy = spec.early_replica = None
        running[:] = [controller]
        reaper = asyncio.ensure_future(_reap_periodically(controller))
        watchdog = asyncio.ensure_future(_kill_when_frozen(address, controller))
        exited: asyncio.Future = loop.run_in_executor(None, controller.popen.wait)
        stopping: asyncio.Future = asyncio.ensure_future(stop.wait())
        await asyncio.wait([exited, stopping], return_when=asyncio.FIRST_COMPLETED)
        reaper.cancel()
        watchdog.cancel()
        if stopping.done():  # SIGTERM: let the controller stop everything, then go
            await controller.stop(constants.SHUTDOWN_TIMEOUT_S)
            break
        stopping.cancel()
        code = controller.popen.returncode
        if code == 0:
            break  # it was shut down
        failures = 0 if time.monotonic() - started > _STABLE_S else failures + 1
        delay = 0.0 if failures == 0 else min(constants.MAX_RESTART_BACKOFF_S,
                                              0.1 * 2 ** failures)
        logger.warning("The controller %s; starting it again%s.",
                       f"was killed by signal {signal.Signals(-code).name}" if code < 0
                       else f"exited with code {code}",
                       f" in {delay:.1f}s" if delay else "")
        await asyncio.sleep(delay)
    await loop.run_in_executor(None, finish, False)


def _start_proxy(worker: WorkerSpec, controller_address: str,
                 lifeline: int) -> Optional[EarlyWorker]:
    """Start the instance's first HTTP proxy, if it serves HTTP, as the controller would
    (None without HTTP)."""
    if worker.proxy_payload is None:
        return None
    address, proxy = start_worker(
        "proxy", "proxy", worker.proxy_payload, instance_dir=worker.instance_dir,
        controller_address=controller_address, sys_path=worker.sys_path,
        extra_fds={"http": worker.extra_fds["http"]}, lifeline_fd=lifeline,
        log_dir=worker.log_dir, log_to_stderr=worker.log_to_stderr)
    return EarlyWorker(address, {"pid": proxy.pid,
                                 "start_time": process_start_time(proxy.pid)})


def _clean(instance_dir: str) -> None:
    """Remove the instance's files but a state file kept on purpose (``state.db``)."""
    for entry in os.listdir(instance_dir):
        if not entry.startswith(_STATE_FILE):
            path = os.path.join(instance_dir, entry)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
    try:
        os.rmdir(instance_dir)
    except OSError:
        pass  # the state file stays
