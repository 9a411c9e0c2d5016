"""Errors of user code, shown so that they point at the user's code.

Three parts:

- ``dumps_by_value``: cloudpickle, keeping where code came from. cloudpickle 3 names the
  file of every function it pickles by value ``<dynamic-code>``, so a traceback through a
  backend defined in the user's script pointed nowhere; here code objects travel through
  ``marshal``, which keeps their file name and line numbers (both sides run the same
  Python, as cloudpickle's own code pickling already requires).
- ``user_traceback``: a traceback with only the frames that help — the user's, not
  servekit's nor the standard library's machinery around them.
- ``FailureLog``: logs a backend's failures; the same failure again within a minute is
  counted, not printed, and the next time it is printed says how many were suppressed.
"""

from __future__ import annotations

import functools
import io
import logging
import marshal
import os
import time
import traceback
import types
from typing import Any, Dict, List, Tuple

_SERVEKIT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# Seconds during which the same failure of a backend is logged as one line, not in full.
REPEAT_WINDOW_S = 60.0


# (cloudpickle and sysconfig are imported on first use: most processes never pickle code by
# value nor format a user's error, and their idle memory counts)
@functools.cache
def _pickler() -> Any:
    """cloudpickle's Pickler, with code objects pickled through ``marshal``."""
    import cloudpickle

    class Pickler(cloudpickle.Pickler):
        def reducer_override(self, obj: Any) -> Any:
            if type(obj) is types.CodeType:
                return marshal.loads, (marshal.dumps(obj),)
            return super().reducer_override(obj)

    return Pickler


def dumps_by_value(value: Any, protocol: int = 5) -> bytes:
    """``cloudpickle.dumps(value)``, code objects keeping their file names."""
    with io.BytesIO() as file:
        _pickler()(file, protocol=protocol).dump(value)
        return file.getvalue()


@functools.cache
def _stdlib_dir() -> str:
    import sysconfig

    return os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep


def _helps(frame: traceback.FrameSummary) -> bool:
    filename = os.path.abspath(frame.filename) if frame.filename[:1] != "<" else frame.filename
    return not filename.startswith((_SERVEKIT_DIR, _stdlib_dir()))


def user_traceback(exc: BaseException) -> str:
    """``exc`` formatted with only the user's frames (and its notes, causes and context
    likewise); every frame if none is the user's (an error of servekit's own)."""
    formatted = traceback.TracebackException(type(exc), exc, exc.__traceback__,
                                             compact=True)
    seen = set()
    pending = [formatted]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        kept = [frame for frame in current.stack if _helps(frame)]
        if kept:
            current.stack = traceback.StackSummary.from_list(kept)
        pending.extend(chained for chained in (current.__cause__, current.__context__)
                       if chained is not None)
    return "".join(formatted.format())


class FailureLog:
    """Logs the failures of one backend with their user tracebacks. The same failure (type,
    message, the line that raised it) again within ``REPEAT_WINDOW_S`` of being shown is
    counted, not printed; the next time it is shown says how many were suppressed."""

    def __init__(self, logger: logging.Logger, backend: str) -> None:
        self._logger = logger
        self._backend = backend
        self._shown: Dict[Tuple[str, str, str], List[float]] = {}  # kind -> [when, count]

    def failed(self, what: str, exc: BaseException) -> None:
        """``what`` (the request, as the log line names it) failed with ``exc``."""
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        kind = (type(exc).__qualname__, str(exc)[:200], where)
        now = time.monotonic()
        shown = self._shown.get(kind)
        if shown is not None and now - shown[0] < REPEAT_WINDOW_S:
            shown[1] += 1
            return
        suppressed = int(shown[1]) if shown is not None else 0
        if len(self._shown) >= 1000:  # many kinds: start counting afresh
            self._shown.clear()
        self._shown[kind] = [now, 0]
        again = (f" ({suppressed} more like it in the last {REPEAT_WINDOW_S:.0f} s were not "
                 "shown)") if suppressed else ""
        self._logger.error("Backend %s raised while handling %s%s:\n%s", self._backend, what,
                           again, user_traceback(exc).rstrip("\n"))
