"""A request's hold on a replica's capacity, from admission to the end of its work.

The replica admits a request under ``max_concurrent_queries`` and gives its place back once,
when the user's work for it has really stopped, not when its caller left:

    ADMITTED ──finish──▶ ENDED                      (the call returned or raised)
    ADMITTED ──cancel──▶ CANCELLING ──finish──▶ ENDED
        (the caller left while a sync call ran on its thread: counted until it returns)
    ADMITTED ──stream──▶ STREAMING ──close──▶ CLOSING ──finish──▶ ENDED
        (a streamed reply: the generator's close is work too, even when it raises)

A cancel in CANCELLING, CLOSING or ENDED changes nothing; any other event a state has no
move for is a bug, raised as ``IllegalTransition``. Today a request carries one payload in
and a value or a stream out; a streamed request body would be a second stream held here the
same way (its end joining the reply's before ENDED).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import Callable, Dict, List, Optional, Tuple

from servekit.exceptions import ServeError

# States.
ADMITTED = "admitted"  # counted; its call is queued for, or runs, the user's code
CANCELLING = "cancelling"  # its caller left; the user's code still runs (a sync call)
STREAMING = "streaming"  # its reply is a stream; the generator is open
CLOSING = "closing"  # the generator is being closed
ENDED = "ended"  # its place is given back

# Events.
FINISH = "finish"  # the user's work for it stopped (returned, raised, or closed)
CANCEL = "cancel"  # its caller left
STREAM = "stream"  # its reply became a stream
CLOSE = "close"  # the stream ended or its reader left: the generator is closed next

TRANSITIONS: Dict[Tuple[str, str], str] = {
    (ADMITTED, FINISH): ENDED,
    (ADMITTED, CANCEL): CANCELLING,
    (ADMITTED, STREAM): STREAMING,
    (CANCELLING, FINISH): ENDED,
    (CANCELLING, CANCEL): CANCELLING,
    (STREAMING, CLOSE): CLOSING,
    (STREAMING, CANCEL): STREAMING,  # the close that follows is what ends it
    (CLOSING, FINISH): ENDED,
    (CLOSING, CANCEL): CLOSING,
    (ENDED, CANCEL): ENDED,
}

# The admission of the request the running code serves (set by the replica per request).
current_admission: contextvars.ContextVar[Optional["Admission"]] = contextvars.ContextVar(
    "current_admission", default=None)


class IllegalTransition(ServeError):
    """An admission got an event its state has no move for: a bug in servekit."""


class Admission:
    """One request's place on the replica (module docstring). ``release`` is called once,
    with the admission, when it reaches ENDED; ``failed`` says whether the request failed
    (for the metrics)."""

    __slots__ = ("state", "admitted_at", "failed", "_release", "_on_end")

    def __init__(self, release: Callable[["Admission"], None]) -> None:
        self.state = ADMITTED
        self.admitted_at = time.perf_counter()
        self.failed = False
        self._release = release
        self._on_end: Optional[List[Callable[[], None]]] = None

    def __repr__(self) -> str:
        return f"<Admission {self.state}>"

    def _apply(self, event: str) -> None:
        before = self.state
        after = TRANSITIONS.get((before, event))
        if after is None:
            raise IllegalTransition(f"An admission in state {before!r} got event {event!r}.")
        self.state = after
        if after == ENDED and before != ENDED:
            self._release(self)
            on_end, self._on_end = self._on_end, None
            for callback in on_end or ():
                callback()

    def on_end(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the request's place is given back (now, if it was): what
        the request uses beyond its place (a multiplexed model) is released with it."""
        if self.state == ENDED:
            callback()
        elif self._on_end is None:
            self._on_end = [callback]
        else:
            self._on_end.append(callback)

    def cancel(self) -> None:
        """The caller left; the place is held until the work stops (``finish``)."""
        self._apply(CANCEL)

    def streaming(self) -> None:
        """The reply is a stream: the place is held until the generator is closed."""
        self._apply(STREAM)

    def closing(self) -> None:
        """The generator is about to be closed (its stream ended, or its reader left)."""
        self._apply(CLOSE)

    def finish(self) -> None:
        """The user's work for the request has stopped: give the place back."""
        self._apply(FINISH)


async def outlast(work: asyncio.Future) -> None:
    """Return once ``work`` is done, through any number of cancellations meanwhile (the
    task stays cancelled: its next await raises): the work a request's place stands for
    holds the place until it ends, however often the caller's side is cancelled."""
    while not work.done():
        try:
            await asyncio.wait((work,))
        except asyncio.CancelledError:
            continue
