"""Finding an instance's processes as descendants of its controller pid, by /proc, never by name.

A process is identified by (pid, start time) so that a recycled pid is not mistaken for the
original; a zombie counts as gone (it has exited, only its exit status is left).
"""

from __future__ import annotations

import glob
import os
import signal
from typing import Dict, Iterable, List, Optional


def start_time(pid: int) -> Optional[int]:
    """The start time of ``pid`` (clock ticks after boot), or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may contain spaces.
    fields = stat[stat.rindex(")") + 2:].split()
    state, start = fields[0], int(fields[19])
    if state in ("Z", "X"):
        return None
    return start


def children(pid: int) -> List[int]:
    """Direct children of ``pid`` (every thread's children)."""
    result: List[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as f:
                result.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return sorted(set(result))


def descendants(pid: int) -> List[int]:
    """Every live descendant of ``pid``, depth first."""
    found: List[int] = []
    stack = [pid]
    while stack:
        for child in children(stack.pop()):
            if child not in found and start_time(child) is not None:
                found.append(child)
                stack.append(child)
    return found


def snapshot(pids: Iterable[int]) -> Dict[int, int]:
    """pid -> start time for the pids that are alive now."""
    result = {}
    for pid in pids:
        started = start_time(pid)
        if started is not None:
            result[pid] = started
    return result


def still_alive(processes: Dict[int, int]) -> List[int]:
    """The pids of a ``snapshot`` that still run as the same process."""
    return [pid for pid, started in processes.items() if start_time(pid) == started]


def kill_leftovers(processes: Dict[int, int]) -> None:
    """SIGKILL the processes of a snapshot that still run (only ever ones a test started)."""
    for pid in still_alive(processes):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def is_worker(pid: int) -> bool:
    """Whether ``pid`` runs ``python -m servekit._private.workers.worker`` (titled "servekit ROLE
    NAME" once it runs), or is the Ray actor of a servekit process (to check what we
    found)."""
    command = cmdline(pid)
    return command.startswith("servekit ") or "servekit._private.workers.worker" in command or \
        "ServekitActor" in command

