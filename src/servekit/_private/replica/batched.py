"""``@serve.batch``: each caller passes one item and awaits one result; the decorated
``async def`` function or method runs on lists of them (Ray Serve 2.x's ``serve.batch``).

Batches form per replica across all its callers: one ``BatchQueue`` per decorated function
and instance (a plain function has one), made on the running loop at its first call. The
limits live with the decorated function and may change while it serves
(``set_max_batch_size``, ``set_batch_wait_timeout_s``, from ``reconfigure`` for instance):
the next batch formed uses them. A decorated async generator streams: it yields lists, one
element per caller, and each caller iterates its own elements.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Tuple

from servekit._private import metrics
from servekit._private.backend_metadata import BATCH_SETTINGS
from servekit._private.context import current_replica_context
from servekit._private.replica.batching import BatchQueue, check_batch_output
from servekit._private.replica.decorated import attributes_of, takes_self

DEFAULT_MAX_BATCH_SIZE = 10  # Ray Serve 2.x's defaults
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.01


def check_max_batch_size(value: Any) -> int:
    """``value`` if it is an int >= 1; else a TypeError or ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_batch_size must be an int >= 1, got {value!r} "
                        f"({type(value).__name__}).")
    if value < 1:
        raise ValueError(f"max_batch_size must be an int >= 1, got {value}. Use 1 to run "
                         "each call alone.")
    return value


def check_batch_wait_timeout_s(value: Any) -> float:
    """``value`` as a float if it is a finite number >= 0; else a TypeError or ValueError
    naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"batch_wait_timeout_s must be a number of seconds >= 0, got "
                        f"{value!r} ({type(value).__name__}).")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"batch_wait_timeout_s must be a finite number of seconds >= 0, "
                         f"got {value}. Use 0 to run whatever is queued at once.")
    return float(value)


class BatchSettings:
    """A decorated function's limits, read as each batch is formed."""

    __slots__ = ("max_batch_size", "batch_wait_timeout_s")

    def __init__(self, max_batch_size: Any, batch_wait_timeout_s: Any) -> None:
        self.max_batch_size = check_max_batch_size(max_batch_size)
        self.batch_wait_timeout_s = check_batch_wait_timeout_s(batch_wait_timeout_s)

    def limits(self) -> Tuple[int, float]:
        return self.max_batch_size, self.batch_wait_timeout_s


def batch(_func: Optional[Callable] = None, /, *,
          max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
          batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S) -> Any:
    """Run an ``async def`` function or method on batches of its callers' items.

    Each caller passes one item (``await self.predict(x)``) and gets one result; the
    decorated function receives a list of items and returns a list (tuple, numpy array)
    of as many results, result ``i`` going to caller ``i``. Used bare (``@serve.batch``)
    or with settings (``@serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)``).

    Args:
        max_batch_size: The largest list the function receives (default 10).
        batch_wait_timeout_s: How long a batch that is not full waits for more items after
            its first arrived (default 0.01 s); 0 runs whatever is queued at once. Longer
            waits make fuller batches and add that much latency when traffic is light.

    A batch runs when the previous one has ended, so items arriving meanwhile gather into
    the next. What the function raises fails every caller of that batch; a result list of
    the wrong length or type fails them with ``BatchOutputError``. A caller that leaves
    before its batch starts is taken out of it; one whose batch runs keeps its place on
    the replica until the batch ends. The decorated function gains
    ``set_max_batch_size(n)`` and ``set_batch_wait_timeout_s(s)`` (and Ray's
    ``_get_max_batch_size()``, ``_get_batch_wait_timeout_s()``).

    An ``async def`` generator streams: each caller gets an async iterator of its own
    elements, and the generator yields lists with one element per caller of its batch
    (``StopIteration`` as a caller's element ends that caller's stream). A caller that
    stops reading is dropped from later lists (its place is held until the batch ends);
    once none reads, the generator is closed.

    Raises:
        TypeError: the function is not ``async def`` (a coroutine or an async generator),
            does not take exactly one argument (a method: ``self`` and one), or a setting
            has the wrong type.
        ValueError: ``max_batch_size`` < 1, or ``batch_wait_timeout_s`` < 0 or not finite.
    """
    if _func is not None and not callable(_func):
        raise TypeError(f"@serve.batch takes its settings by name, as in "
                        f"@serve.batch(max_batch_size=8); it was given {_func!r}.")
    settings = BatchSettings(max_batch_size, batch_wait_timeout_s)
    if _func is None:
        return functools.partial(_batched, settings=settings)
    return _batched(_func, settings=settings)


def _batched(func: Callable, settings: BatchSettings) -> Callable:
    name = getattr(func, "__qualname__", repr(func))
    streamed = inspect.isasyncgenfunction(func)
    if not streamed and not inspect.iscoroutinefunction(func):
        raise TypeError(f"@serve.batch needs an `async def` function or method (batches "
                        f"form on the replica's event loop); {name} is not one. Declare it "
                        "`async def`, and run blocking model code inside it with "
                        "`await asyncio.to_thread(...)` if it must not hold the loop.")
    is_method = takes_self(func, name, "@serve.batch", "the list of items")
    what = f"The @serve.batch function {name}"
    key = f"_servekit_batch_queue_{name}"  # (one per function, overrides included)
    own: Dict[str, BatchQueue] = {}  # a plain function's queue

    def queue_of(instance: Any) -> BatchQueue:
        holder = own if instance is None else \
            attributes_of(instance, name, "@serve.batch", "its queue")
        queue = holder.get(key)
        if queue is None or queue.loop is not asyncio.get_running_loop():
            run = func if instance is None else functools.partial(func, instance)
            if streamed:
                run = functools.partial(_run_streamed, run, what)
            queue = holder[key] = BatchQueue(run, settings.limits, concurrent=False,
                                             on_batch=_batch_size_metric(), what=what)
        return queue

    def target(args: Tuple[Any, ...]) -> Tuple[BatchQueue, Any]:
        """The queue a call goes to, and its item."""
        if len(args) != 1 + is_method:
            raise TypeError(f"{name} is batched by @serve.batch: call it with one item "
                            f"(it runs on a list of them); it was given "
                            f"{len(args) - is_method} arguments.")
        return queue_of(args[0] if is_method else None), args[-1]

    @functools.wraps(func)
    async def batched(*args: Any) -> Any:
        queue, item = target(args)
        return await queue.call(item)

    @functools.wraps(func)
    async def batched_stream(*args: Any) -> AsyncIterator[Any]:
        queue, item = target(args)
        share = _Share()
        result = queue.submit((item, share))
        result.add_done_callback(share.finish)
        result.add_done_callback(_retrieved)  # raised below, unless its caller left
        left = True
        try:
            while True:
                element = await share.elements.get()
                if element is _END:
                    break
                yield element
            left = False
        except asyncio.CancelledError:
            share.reading = False
            await queue.left(result, cancelled=True)
            raise
        finally:
            share.reading = False
            if left and not result.done():  # it stopped reading (closed): dropped
                await queue.left(result, cancelled=False)
        if result.done() and not result.cancelled() and result.exception() is not None:
            raise result.exception()  # type: ignore[misc]

    def set_max_batch_size(value: int) -> None:
        settings.max_batch_size = check_max_batch_size(value)

    def set_batch_wait_timeout_s(value: float) -> None:
        settings.batch_wait_timeout_s = check_batch_wait_timeout_s(value)

    wrapper = batched_stream if streamed else batched
    setattr(wrapper, BATCH_SETTINGS, settings)
    for attribute, value in (
            ("set_max_batch_size", set_max_batch_size),
            ("set_batch_wait_timeout_s", set_batch_wait_timeout_s),
            ("_get_max_batch_size", lambda: settings.max_batch_size),
            ("_get_batch_wait_timeout_s", lambda: settings.batch_wait_timeout_s)):
        setattr(wrapper, attribute, value)
    return wrapper


_END = object()  # the end of a caller's share of a streamed batch
# What a streamed batch yields for a caller whose stream has ended (Ray's sentinels).
_STREAM_ENDS = (StopIteration, StopAsyncIteration)


class _Share:
    """One caller's share of a streamed batch: the elements yielded for it, in order (not
    bounded: a caller that reads slowly does not hold back the others)."""

    __slots__ = ("elements", "reading")

    def __init__(self) -> None:
        self.elements: asyncio.Queue = asyncio.Queue()
        self.reading = True  # its caller reads, and its stream has not ended

    def put(self, element: Any) -> None:
        if not self.reading:
            return
        if any(element is end for end in _STREAM_ENDS) or isinstance(element, _STREAM_ENDS):
            self.finish()
        else:
            self.elements.put_nowait(element)

    def finish(self, _: Any = None) -> None:
        """Its stream ends: after the batch, or when the function yields a sentinel for it."""
        if self.reading:
            self.reading = False
            self.elements.put_nowait(_END)


async def _run_streamed(generate: Callable[[List[Any]], AsyncIterator[List[Any]]], what: str,
                        entries: List[Tuple[Any, _Share]]) -> List[None]:
    """Run a streamed batch: each list ``generate`` yields has one element per caller, put
    in that caller's share. Stops once no caller reads. Its end (or what it raised, through
    the batch's results) ends every share."""
    shares = [share for _, share in entries]
    generator = generate([item for item, _ in entries])
    try:
        async for output in generator:
            elements = check_batch_output(output, len(shares), what, ("yield", "yielded"))
            for share, element in zip(shares, elements, strict=True):
                share.put(element)
            if not any(share.reading for share in shares):
                break
    finally:
        await generator.aclose()  # type: ignore[attr-defined]
    return [None] * len(shares)


def _retrieved(result: asyncio.Future) -> None:
    if not result.cancelled():
        result.exception()


def _batch_size_metric() -> Callable[[int], None]:
    """Where the sizes of a replica's batches are counted (``servekit_batch_size``);
    nowhere outside a replica."""
    context = current_replica_context()
    if context is None:
        return lambda size: None
    return metrics.BATCH_SIZE.labels(context.backend_tag, context.replica_tag).observe
