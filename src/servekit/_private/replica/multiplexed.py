"""``@serve.multiplexed``: a replica's cache of models loaded by id (Ray Serve 2.x's model
multiplexing).

The decorated ``async def`` loader takes a model id and returns the model. Calls go through
one ``ModelCache`` per decorated function and instance (a plain function has one), made on
the running loop at its first call:

- a model loads once per replica: the calls that ask for it while it loads wait for that
  load (which runs in no single request's context); a load that fails fails them all with
  the loader's error, and the next call tries again;
- beyond ``max_num_models_per_replica`` the least recently used model is evicted, never one
  a request is using (from the call that got it to the end of that request): the cache
  may hold more while more are in use, and evicts as their requests end. An evicted
  model's ``aclose()`` (awaited) or else ``close()`` (on a thread) is called, and a load
  that needed the room waits for that cleanup first (a GPU's memory is free again);
- the ids a replica holds are what its health ping answers: the controller shows them in
  ``servekit status`` and routers send a model's requests to replicas that hold it.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import copy
import functools
import inspect
import logging
import time
import weakref
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

from servekit._private import metrics
from servekit._private.context import current_replica_context
from servekit._private.replica.admission import current_admission
from servekit._private.replica.decorated import attributes_of, takes_self

logger = logging.getLogger("servekit.replica")

DEFAULT_MAX_NUM_MODELS_PER_REPLICA = 3  # Ray Serve 2.x's default

# Every cache of this process, for the ids its replica holds (``held_model_ids``).
_caches: "weakref.WeakSet[ModelCache]" = weakref.WeakSet()


def held_model_ids() -> Tuple[str, ...]:
    """The ids of the models this process's caches hold or are loading, sorted."""
    return tuple(sorted({model_id for cache in list(_caches) if not cache.loop.is_closed()
                         for model_id in cache.ids()}))


def check_max_num_models(value: Any) -> int:
    """``value`` if it is an int >= 1, or -1 (no limit); else a TypeError or ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"max_num_models_per_replica must be an int >= 1 (or -1: no limit), "
                        f"got {value!r} ({type(value).__name__}).")
    if value < 1 and value != -1:
        raise ValueError(f"max_num_models_per_replica must be an int >= 1 (or -1: no "
                         f"limit), got {value}.")
    return value


class _Metrics:
    """A replica's multiplexing metrics; none outside a replica."""

    def __init__(self) -> None:
        context = current_replica_context()
        self.labels = None if context is None else (context.backend_tag, context.replica_tag)

    def count(self, family: Any, amount: float = 1.0) -> None:
        if self.labels is not None:
            family.labels(*self.labels).inc(amount)

    def load_took(self, seconds: float) -> None:
        if self.labels is not None:
            metrics.MODEL_LOAD_LATENCY.labels(*self.labels).observe(seconds * 1e3)

    def held(self, change: int) -> None:
        if self.labels is not None:
            metrics.MODELS_HELD.labels(*self.labels).inc(change)


class _Entry:
    """One model id in a cache: its load while it runs, then its model, and the requests
    using it now."""

    __slots__ = ("loading", "model", "users")

    def __init__(self) -> None:
        self.loading: Optional[asyncio.Task] = None
        self.model: Any = None
        self.users: set = set()  # the admissions of the requests using it


class ModelCache:
    """The models one loader has loaded on this replica, least recently used first
    (module docstring). ``capacity`` -1: no limit."""

    def __init__(self, load: Callable[[str], Awaitable[Any]], capacity: int,
                 what: str) -> None:
        self.loop = asyncio.get_running_loop()
        self._load = load
        self.capacity = capacity
        self._what = what
        self._entries: "collections.OrderedDict[str, _Entry]" = collections.OrderedDict()
        self._cleanups: set = set()  # cleanups of evicted models still running
        self._metrics = _Metrics()
        _caches.add(self)

    def ids(self) -> List[str]:
        """The ids held or loading, least recently used first."""
        return list(self._entries)

    async def get(self, model_id: str) -> Any:
        """The model of ``model_id``, loaded first if this replica does not hold it (a load
        already running is waited for). The request being served uses it until it ends.

        Raises:
            What the loader raised (the same type, for every request that waited for it).
        """
        entry = self._entries.get(model_id)
        if entry is None:
            cleanups = self._evict(room_for=1)
            entry = self._entries[model_id] = _Entry()
            # The load serves every request that waits for it: it runs in a context of its
            # own, not the first one's (as a batch does).
            entry.loading = self.loop.create_task(self._loaded(model_id, entry, cleanups),
                                                  context=contextvars.Context())
            entry.loading.add_done_callback(_seen)  # (each waiter raises its own copy)
            self._metrics.held(1)
        else:
            self._entries.move_to_end(model_id)
            if entry.loading is None:
                self._metrics.count(metrics.MODEL_HITS)
        self._use(entry)
        if entry.loading is not None:
            try:
                await asyncio.shield(entry.loading)
            except Exception as error:
                mine = _own_copy(error)
                if mine is error:
                    raise
                raise mine from error
        return entry.model

    def _use(self, entry: _Entry) -> None:
        """Count the request being served as a user of ``entry`` until it ends (once,
        however often it asks); outside a request nothing is counted."""
        admission = current_admission.get()
        if admission is None or admission in entry.users:
            return
        entry.users.add(admission)
        admission.on_end(functools.partial(self._release, entry, admission))

    def _release(self, entry: _Entry, admission: Any) -> None:
        entry.users.discard(admission)
        if not entry.users and self._over_capacity():
            self._evict()

    def _over_capacity(self) -> bool:
        return self.capacity != -1 and len(self._entries) > self.capacity

    async def _loaded(self, model_id: str, entry: _Entry, cleanups: List[asyncio.Task]) -> None:
        """Load ``model_id`` into ``entry``, after the cleanups of the models evicted to
        make room for it; a failed load leaves the cache (the next call tries again)."""
        if cleanups:
            await asyncio.wait(cleanups)
        started = time.perf_counter()
        try:
            model = await self._load(model_id)
        except BaseException:
            if self._entries.get(model_id) is entry:
                del self._entries[model_id]
                self._metrics.held(-1)
            self._metrics.count(metrics.MODEL_LOAD_FAILURES)
            raise
        finally:
            entry.loading = None
        entry.model = model
        self._metrics.load_took(time.perf_counter() - started)
        self._metrics.count(metrics.MODEL_LOADS)
        if self._over_capacity():
            self._evict()

    def _evict(self, room_for: int = 0) -> List[asyncio.Task]:
        """Evict the least recently used models that are loaded and unused until the cache
        is within its capacity, with ``room_for`` more (or none is left to evict); their
        cleanups."""
        cleanups: List[asyncio.Task] = []
        if self.capacity == -1:
            return cleanups
        excess = len(self._entries) + room_for - self.capacity
        for model_id in list(self._entries):
            if excess <= 0:
                break
            entry = self._entries[model_id]
            if entry.loading is not None or entry.users:
                continue
            del self._entries[model_id]
            excess -= 1
            self._metrics.held(-1)
            self._metrics.count(metrics.MODEL_EVICTIONS)
            logger.info("%s evicted model %r (max_num_models_per_replica=%d).",
                        self._what, model_id, self.capacity)
            cleanups.append(self._close(entry.model))
        return cleanups

    def _close(self, model: Any) -> asyncio.Task:
        task = self.loop.create_task(_close(model, self._what))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task


def _seen(task: asyncio.Task) -> None:
    """Mark a load's outcome as seen (the requests waiting for it, if any, raise it)."""
    if not task.cancelled():
        task.exception()


def _own_copy(error: Exception) -> Exception:
    """A copy of a failed load's error for one of the requests that waited for it (each
    request's error gets notes of its own), or the error itself if it cannot be copied."""
    try:
        mine = copy.copy(error)
    except Exception:
        return error
    if type(mine) is not type(error):
        return error
    notes = getattr(error, "__notes__", None)
    if notes is not None:
        mine.__notes__ = list(notes)
    return mine


async def _close(model: Any, what: str) -> None:
    """Call an evicted model's ``aclose()`` (awaited) or else ``close()`` (a coroutine
    function awaited, a plain one on a thread); what it raises is logged."""
    try:
        aclose = getattr(model, "aclose", None)
        if callable(aclose):
            await aclose()
            return
        close = getattr(model, "close", None)
        if not callable(close):
            return
        if inspect.iscoroutinefunction(close):
            await close()
        else:
            await asyncio.to_thread(close)
    except Exception:
        logger.exception("Closing a model %s evicted raised.", what)


def multiplexed(_func: Optional[Callable] = None, /, *,
                max_num_models_per_replica: int = DEFAULT_MAX_NUM_MODELS_PER_REPLICA) -> Any:
    """Cache the models an ``async def`` loader returns, by model id, in each replica.

    The loader takes one argument, the model id (a method: ``self`` and the id), and returns
    the model; call it with the id of the request, ``await self.get_model(
    serve.get_multiplexed_model_id())``. Used bare (``@serve.multiplexed``) or with
    ``@serve.multiplexed(max_num_models_per_replica=N)``.

    Args:
        max_num_models_per_replica: The models one replica keeps (default 3; -1: no
            limit). Beyond it the least recently used model no request is using is
            evicted, and its ``aclose()`` or ``close()`` called.

    A model loads once per replica, however many requests ask for it at once; a load that
    raises fails every request waiting for it with that error, and the next call loads
    again. Requests naming a model (the ``serve_multiplexed_model_id`` header,
    ``handle.options(multiplexed_model_id=...)``) go to replicas that hold it while one
    has room, else to another replica, which loads it too.

    Raises:
        TypeError: the loader is not ``async def`` or does not take exactly one argument
            (a method: ``self`` and one); a setting has the wrong type; at call time, a
            model id that is not a str.
        ValueError: ``max_num_models_per_replica`` < 1 and not -1; at call time, an empty
            model id (the request named no model).
    """
    if _func is not None and not callable(_func):
        raise TypeError(f"@serve.multiplexed takes its settings by name, as in "
                        f"@serve.multiplexed(max_num_models_per_replica=3); it was given "
                        f"{_func!r}.")
    capacity = check_max_num_models(max_num_models_per_replica)
    if _func is None:
        return functools.partial(_multiplexed, capacity=capacity)
    return _multiplexed(_func, capacity=capacity)


def _multiplexed(func: Callable, capacity: int) -> Callable:
    name = getattr(func, "__qualname__", repr(func))
    if not inspect.iscoroutinefunction(func):
        raise TypeError(f"@serve.multiplexed needs an `async def` loader (requests wait for "
                        f"its load on the replica's event loop); {name} is not one. Declare "
                        "it `async def`, and load blocking code with "
                        "`await asyncio.to_thread(...)`.")
    is_method = takes_self(func, name, "@serve.multiplexed", "the model id")
    what = f"The @serve.multiplexed loader {name}"
    key = f"_servekit_model_cache_{name}"  # (one per loader, overrides included)
    own: Dict[str, ModelCache] = {}  # a plain function's cache

    def cache_of(instance: Any) -> ModelCache:
        holder = own if instance is None else \
            attributes_of(instance, name, "@serve.multiplexed", "its cache")
        cache = holder.get(key)
        if cache is None or cache.loop is not asyncio.get_running_loop():
            load = func if instance is None else functools.partial(func, instance)
            cache = holder[key] = ModelCache(load, capacity, what)
        return cache

    @functools.wraps(func)
    async def load(*args: Any) -> Any:
        if len(args) != 1 + is_method:
            raise TypeError(f"{name} loads models by @serve.multiplexed: call it with one "
                            f"model id; it was given {len(args) - is_method} arguments.")
        model_id = args[-1]
        if not isinstance(model_id, str):
            raise TypeError(f"{name} takes a model id as a str, got {model_id!r} "
                            f"({type(model_id).__name__}).")
        if not model_id:
            raise ValueError(f"{name} was called with an empty model id: the request named "
                             "no model. Send the header serve_multiplexed_model_id, or call "
                             "through handle.options(multiplexed_model_id=...).")
        return await cache_of(args[0] if is_method else None).get(model_id)

    return load
