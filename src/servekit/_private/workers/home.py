"""``$SERVEKIT_HOME`` (default ``~/.servekit``): the record of the detached instance, and its
logs (which stay when it stops, until the next one starts).

Everything in it is owner-only. servekit refuses to use a home, record or log that another
user could have written, rather than connect to or signal a process such a file names.
"""

from __future__ import annotations

import json
import os
import select
import stat
from typing import Optional

from servekit._private import constants
from servekit._private.workers.logs import LOG_DIR
from servekit._private.workers.process import process_start_time
from servekit.exceptions import ServeError

_RECORD = "detached-instance.json"
_LOG = "detached.log"
_INSTANCE = "instance"


def _check_private(path: str) -> None:
    """Raise a ServeError if ``path`` is not ours alone (owned by us, writable by no one else)."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise ServeError(f"Refusing to use {path}: it is a symbolic link. Remove it.")
    if info.st_uid != os.getuid():
        raise ServeError(f"Refusing to use {path}: it belongs to uid {info.st_uid}, not to "
                         f"you (uid {os.getuid()}). Set SERVEKIT_HOME to a directory of "
                         "your own.")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ServeError(f"Refusing to use {path}: other users can write to it (mode "
                         f"{stat.S_IMODE(info.st_mode):o}). Run `chmod go-w {path}` or "
                         "remove it.")


def home() -> str:
    """The home directory, created owner-only if missing and checked to be private."""
    path = constants.SERVEKIT_HOME
    os.makedirs(path, mode=0o700, exist_ok=True)
    _check_private(path)
    return path


def log_path() -> str:
    """The log file of detached instances (created owner-only)."""
    path = os.path.join(home(), _LOG)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600))
    _check_private(path)
    return path


def log_dir() -> str:
    """The directory of the detached instance's log files (created owner-only)."""
    path = os.path.join(home(), LOG_DIR)
    os.makedirs(path, mode=0o700, exist_ok=True)
    _check_private(path)
    return path


def instance_dir() -> str:
    """The directory of the detached instance: its sockets, and its state file, which
    stays when every process is gone (a reboot) so that the next start brings it back."""
    path = os.path.join(home(), _INSTANCE)
    os.makedirs(path, mode=0o700, exist_ok=True)
    _check_private(path)
    return path


def write_record(address: str, pid: int, http: dict) -> None:
    """Record the detached instance's controller address, pid and HTTP options (host,
    port, location), owner-only and atomically."""
    path = os.path.join(home(), _RECORD)
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"address": address, "pid": pid, "started": process_start_time(pid),
                   "http": http}, f)
    os.replace(temporary, path)


def _stored_record() -> Optional[dict]:
    """The record file's contents, whether or not its process still runs; None if there
    is no readable record.

    Raises:
        ServeError: the home or the record can be written by another user.
    """
    path = os.path.join(constants.SERVEKIT_HOME, _RECORD)
    if not os.path.lexists(path):
        return None
    _check_private(constants.SERVEKIT_HOME)
    _check_private(path)
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int) or \
            not isinstance(record.get("address"), str):
        return None
    return record


def saved_http_options() -> Optional[dict]:
    """The HTTP options of the last detached instance, if its state file is still there
    (its processes may be gone); None otherwise."""
    if not os.path.exists(os.path.join(constants.SERVEKIT_HOME, _INSTANCE, "state.db")):
        return None
    http = (_stored_record() or {}).get("http")
    return http if isinstance(http, dict) else None


def read_record() -> Optional[dict]:
    """The detached instance's record if there is one and its process lives, else None.

    Raises:
        ServeError: the home or the record can be written by another user.
    """
    record = _stored_record()
    if record is None or process_start_time(record["pid"]) != record.get("started"):
        return None  # none, gone, or its pid now names another process
    return record


def wait_until_gone(pid: int, started: Optional[int], timeout: float) -> bool:
    """Wait up to ``timeout`` s for process ``pid`` (started at ``started``) to exit."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return True
    try:
        if process_start_time(pid) != started:
            return True
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)


def remove_record(address: str) -> None:
    """Remove the record if it names ``address`` (whether or not its process still runs)."""
    record = _stored_record()
    if record is not None and record["address"] == address:
        os.unlink(os.path.join(constants.SERVEKIT_HOME, _RECORD))
