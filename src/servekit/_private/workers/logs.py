"""A servekit process's log: its level and format, its file in the instance's log
directory, and whether the process that writes a log file still runs.

Every process logs to stderr (an embedded instance's is its script's) and, with a log
directory, to a rotated file of its own there (``ROLE-NAME.log``). The process holds a
shared lock on that file while it lives: ``servekit logs`` tells the logs of the processes
that run from those of the ones that ended by trying to take the lock.
"""

from __future__ import annotations

import datetime
import fcntl
import io
import json
import logging
import logging.handlers
import os
import shutil
from typing import Any, Dict, List, Optional

from servekit._private import constants
from servekit._private.context import current_request_id

LOG_DIR = "logs"  # in $SERVEKIT_HOME for the detached instance, else in its directory
LOG_SUFFIX = ".log"
PREVIOUS = "previous"  # the folder of the log directory that holds the last instance's logs
_LOG_FILE_BYTES, _LOG_FILE_BACKUPS = 10 * 1024 * 1024, 3


def configure_logging(role: str, name: str, log_dir: Optional[str],
                      to_stderr: bool = True) -> None:
    """Log at ``SERVEKIT_LOG_LEVEL`` (INFO) in ``SERVEKIT_LOG_FORMAT`` (text or json) to
    stderr (unless told not to) and, with a ``log_dir``, to this process's rotated file
    there. A line written for a request carries its id; the proxy's access log goes to
    ``access.log`` only.
    """
    base = logging.getLogRecordFactory()

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made = base(*args, **kwargs)
        made.request_id = current_request_id.get() or "-"
        return made

    logging.setLogRecordFactory(record)
    formatter = _formatter(role, name)
    handlers: List[logging.Handler] = [logging.StreamHandler()] if to_stderr else []
    if log_dir is not None:
        os.makedirs(log_dir, mode=0o700, exist_ok=True)
        handlers.append(LogFile(os.path.join(log_dir, f"{role}-{_file_safe(name)}{LOG_SUFFIX}")))
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=constants.LOG_LEVEL, handlers=handlers, force=True)
    if role == "proxy":
        access = logging.getLogger("servekit.access")  # lines come in batches, stamped
        access.setLevel(logging.INFO)
        access.propagate = False  # never to stderr: without a log directory, nowhere
        if log_dir is not None:
            # One file per proxy (num_proxies of them share the directory): "access.log"
            # for the first, "access-proxy-2.log" for the next.
            file = "access" if name == "proxy" else f"access-{_file_safe(name)}"
            access.addHandler(LogFile(os.path.join(log_dir, file + LOG_SUFFIX)))


def _formatter(role: str, name: str) -> logging.Formatter:
    if constants.LOG_FORMAT == "json":
        return JSONFormatter(role, name)
    request = " [request %(request_id)s]" if role == "replica" else ""
    return logging.Formatter(f"%(asctime)s (servekit {role} {name} pid=%(process)d) "
                             f"%(levelname)s %(name)s{request}: %(message)s")


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, role, process (its name),
    pid, logger, message, and request_id, exception where there is one."""

    def __init__(self, role: str, name: str) -> None:
        super().__init__()
        self._role = role
        self._name = name

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
                .isoformat(timespec="milliseconds"),
                "level": record.levelname, "role": self._role, "process": self._name,
                "pid": record.process, "logger": record.name, "message": record.getMessage()}
        request_id = getattr(record, "request_id", "-")
        if request_id != "-":
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


class LogFile(logging.handlers.RotatingFileHandler):
    """A process's rotated log file, locked (shared) by the process while it lives."""

    def __init__(self, path: str) -> None:
        super().__init__(path, maxBytes=_LOG_FILE_BYTES, backupCount=_LOG_FILE_BACKUPS)

    def _open(self) -> io.TextIOWrapper:
        stream = super()._open()
        # The lock is on a descriptor of its own, which stays open when the handler is
        # closed (uvicorn's or the user's logging setup closes every handler): only this
        # file's next one (after a rotation) replaces it.
        held = os.dup(stream.fileno())
        fcntl.flock(held, fcntl.LOCK_SH)
        replaced = _held_locks.pop(self.baseFilename, None)
        if replaced is not None:
            os.close(replaced)
        _held_locks[self.baseFilename] = held
        return stream


_held_locks: Dict[str, int] = {}  # log file path -> descriptor with this process's lock


def written_by_a_live_process(path: str) -> bool:
    """Whether a running process holds ``path`` as its log file (a lock is released by
    the kernel when its process ends, however it ends)."""
    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False
    except FileNotFoundError:
        return False


def set_aside_previous(log_dir: str) -> None:
    """Before an instance starts logging to ``log_dir``: move the logs of the one before
    to ``previous/`` there (dropping those it held)."""
    previous = os.path.join(log_dir, PREVIOUS)
    shutil.rmtree(previous, ignore_errors=True)
    os.makedirs(previous, mode=0o700)
    for name in os.listdir(log_dir):
        if LOG_SUFFIX in name:  # (rotated ones too: x.log.1)
            os.replace(os.path.join(log_dir, name), os.path.join(previous, name))


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


class LogTail:
    """Reads one log file: its last lines, then what is written to it next (from its
    start again when it was rotated or truncated). Only whole lines are read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._inode: Optional[int] = None
        self._offset = 0

    def last_lines(self, count: int) -> str:
        """The last ``count`` lines; what follows them is what ``new_text`` returns."""
        text = self.new_text()
        return "".join(text.splitlines(keepends=True)[-count:])

    def new_text(self) -> str:
        """The whole lines written since the last call ("" if none)."""
        try:
            with open(self.path, "rb") as f:
                info = os.fstat(f.fileno())
                if info.st_ino != self._inode or info.st_size < self._offset:
                    self._inode, self._offset = info.st_ino, 0  # a new file at this path
                if info.st_size == self._offset:
                    return ""
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return ""
        whole = data[:data.rfind(b"\n") + 1]
        self._offset += len(whole)
        return whole.decode(errors="replace")
