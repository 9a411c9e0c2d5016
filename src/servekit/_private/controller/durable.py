"""The controller's desired state as store records: JSON documents, one key each.

Keys: ``backend/<tag>`` (config, options, goal in progress), ``definition/<tag>`` (the
cloudpickled function or class with its init args: the only pickle in the store),
``definition_before/<tag>`` (while a redeploy is under way, the definition it goes back to
if a new replica fails), ``endpoint/<name>``, ``replica/<tag>`` (which process runs it, so a
restarted controller can adopt it), ``proxy`` and ``goal/<id>`` (a goal that failed, with
its error pickled, for a client that waits on it again after a restart). A ``user_config``
that JSON cannot carry exactly is stored pickled, as part of the backend's definition.

``DurableState.save`` writes what changed since the last write that succeeded as one
transaction, on a thread of its own (so the event loop never waits on the disk), in the
order of the calls. A write that fails changes nothing, on disk or in what counts as
written: the next save writes what it missed.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import pickle
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import cloudpickle

from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig
from servekit._private.backend_settings import BackendSettings
from servekit._private.config_checks import check_methods, check_name, check_route
from servekit._private.controller.state import (
    RUNNING,
    STARTING,
    STOPPING,
    BackendState,
    ReplicaRecord,
)
from servekit._private.runtime.base import Store
from servekit._private.specs import EndpointInfo
from servekit.exceptions import ServeError

Records = Dict[str, bytes]


def _value(value: Any, what: str) -> Any:
    """A JSON form of ``value``: itself if JSON keeps it exactly, else its pickle.

    Raises:
        TypeError: neither can carry it (a lambda, an instance of a class defined in a
            function); the message names ``what``.
    """
    try:
        if json.loads(json.dumps(value)) == value:
            return {"json": value}
    except (TypeError, ValueError):
        pass
    try:
        return {"pickle": base64.b64encode(pickle.dumps(value, protocol=5)).decode()}
    except Exception as exc:
        raise TypeError(
            f"The {what} cannot be saved: {value!r} is neither JSON nor picklable "
            f"({type(exc).__name__}: {exc}). Use plain data (dicts, lists, numbers, "
            "strings) or instances of classes a module defines.") from None


def _unvalue(doc: Any, where: str) -> Any:
    if isinstance(doc, dict) and set(doc) == {"json"}:
        return doc["json"]
    if not isinstance(doc, dict) or set(doc) != {"pickle"} or \
            not isinstance(doc["pickle"], str):
        raise ValueError(f"{where} must be {{'json': value}} or {{'pickle': base64 text}}, "
                         f"got {doc!r}")
    try:
        return pickle.loads(base64.b64decode(doc["pickle"]))
    except Exception as exc:
        raise ValueError(f"{where} cannot be unpickled ({type(exc).__name__}: {exc})") \
            from None


def _config(config: BackendSettings, tag: str) -> dict:
    """The fields set explicitly (so a merge after a restart behaves as before it)."""
    fields = config.fields()
    if "user_config" in fields:
        fields["user_config"] = _value(fields["user_config"], f"user_config of backend {tag!r}")
    return fields


def _unconfig(doc: dict, where: str) -> BackendSettings:
    if "user_config" in doc:
        doc = {**doc, "user_config": _unvalue(doc["user_config"], f"{where}.user_config")}
    try:
        return BackendSettings.check(doc)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} is not a valid backend config ({exc})") from None


def _metadata(metadata: Optional[BackendMetadata]) -> Optional[dict]:
    if metadata is None:
        return None
    # (Not dataclasses.asdict: it deep-copies, and every save writes every backend's.)
    doc = {field.name: getattr(metadata, field.name)
           for field in dataclasses.fields(metadata)}
    doc["batch_methods"] = sorted(metadata.batch_methods)
    doc["methods"] = list(metadata.methods)
    return doc


def _unmetadata(doc: Optional[dict], where: str) -> Optional[BackendMetadata]:
    if doc is None:
        return None
    fields = Fields(doc, where)
    return BackendMetadata(
        is_class=fields.get("is_class", bool), is_async=fields.get("is_async", bool),
        accepts_batches=fields.get("accepts_batches", bool),
        batch_methods=frozenset(fields.names("batch_methods")),
        has_reconfigure=fields.get("has_reconfigure", bool),
        methods=tuple(fields.names("methods")),
        name=fields.get("name", str, default=""), asgi=fields.get("asgi", bool, default=False),
        batch_wait_timeout_s=fields.get("batch_wait_timeout_s", float, default=0.0))


def _definition(replica_config: ReplicaConfig) -> dict:
    """What a backend's replicas run, but its pickled code (a record of its own)."""
    return {"actor_options": replica_config.actor_options,
            "description": replica_config.description, "python": replica_config.python,
            "source": replica_config.source}


def _undefinition(records: Records, key: str, fields: "Fields") -> ReplicaConfig:
    serialized = records.get(key)
    if not isinstance(serialized, bytes):
        raise ValueError(f"{fields.where} has no record {key!r} beside it (the pickled code "
                         "of its replicas)")
    return ReplicaConfig(serialized, fields.get("actor_options", dict),
                         fields.get("description", str), fields.get("python", str, None),
                         fields.get("source", dict, None, default=None))


def _made_by(fields: "Fields") -> Optional[str]:
    """The deploy file that made an endpoint (None: the Python API); ``true``, written
    before deploy files had names, is a file of no name ("")."""
    if isinstance(fields.doc.get("managed"), bool):
        return "" if fields.doc["managed"] else None
    return fields.get("managed", str, None, default=None)


def _json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


def _error(error: BaseException) -> dict:
    """A failed goal's error: pickled if it can be (and loads back), and as text."""
    doc: Dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
    try:
        pickled = cloudpickle.dumps(error)
        pickle.loads(pickled)
        doc["pickle"] = base64.b64encode(pickled).decode()
    except Exception:
        pass
    return doc


def _unerror(fields: "Fields") -> BaseException:
    kind, message = fields.get("type", str), fields.get("message", str)
    pickled = fields.get("pickle", str, default=None)
    if pickled is not None:
        try:
            error = pickle.loads(base64.b64decode(pickled))
            if isinstance(error, BaseException):
                return error
        except Exception:
            pass  # its class is gone: the text tells what it was
    return ServeError(f"{kind}: {message}")


def snapshot(backends: Dict[str, BackendState], endpoints: Dict[str, EndpointInfo],
             proxies: Dict[str, dict],
             failed_goals: Optional[Dict[str, BaseException]] = None) -> Records:
    """Every record of the desired state (and of the processes that run it).

    Raises:
        TypeError: a backend's ``user_config`` cannot be saved (the message names it).
    """
    records: Records = {}
    for tag, backend in backends.items():
        records[f"definition/{tag}"] = backend.replica_config.serialized
        before = backend.definition_before
        if before is not None:  # a redeploy is under way: what to go back to if it fails
            records[f"definition_before/{tag}"] = before.serialized
        records[f"backend/{tag}"] = _json({
            **_definition(backend.replica_config),
            "before": None if before is None else {
                **_definition(before), "metadata": _metadata(backend.metadata_before),
                "version": backend.previous_version},
            "version": backend.version,
            "autoscaled_replicas": backend.autoscaled_replicas,
            "config": _config(backend.config, tag),
            "config_before_update": None if backend.config_before_update is None
            else _config(backend.config_before_update, tag),
            "metadata": _metadata(backend.metadata),
            "goal": backend.goal,
            "created_by": backend.created_by,
            "changed_by": backend.changed_by,
            "created": backend.created,
            "deleting": backend.deleting,
            "force_delete": backend.force_delete,
        })
        for record in backend.replicas.values():
            records[f"replica/{record.tag}"] = _json({
                "backend": tag, "state": record.state, "address": record.address,
                "process": record.process, "version": record.version})
    for name, endpoint in endpoints.items():
        records[f"endpoint/{name}"] = _json(
            {"name": name, **endpoint.describe(), "managed": endpoint.managed})
    for name, proxy in proxies.items():
        records[f"proxy/{name}"] = _json(proxy)
    for goal, error in (failed_goals or {}).items():
        records[f"goal/{goal}"] = _json(_error(error))
    return records


@dataclasses.dataclass
class LoadedState:
    """What a store held: backends (with the replica records to adopt), endpoints, the
    HTTP proxies by name, and the goals that failed with their errors."""

    backends: Dict[str, BackendState]
    endpoints: Dict[str, EndpointInfo]
    proxies: Dict[str, dict]
    failed_goals: Dict[str, BaseException] = dataclasses.field(default_factory=dict)


def load(records: Records, where: str) -> LoadedState:
    """Rebuild the state from ``records``; a ServeError naming ``where``, the record and
    what is wrong with it if they are bad (a value of the wrong type included)."""
    try:
        return _load(records)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        detail = str(exc) if type(exc) is ValueError else f"{type(exc).__name__}: {exc}"
        detail = " ".join(detail.split())  # one line
        raise ServeError(f"The saved state in {where} is damaged ({detail}). Move it away "
                         "to start without it, or restore it from a backup.") from None


_MISSING: Any = object()
_KIND_NAMES = {bool: "a bool", int: "an integer", str: "a string", dict: "an object",
               list: "a list"}


class Fields:
    """The fields of one JSON object of a record, each checked for its type as it is read:
    a wrong one is a ValueError naming the record (``where``), the field and the value."""

    def __init__(self, doc: Any, where: str) -> None:
        if not isinstance(doc, dict):
            raise ValueError(f"{where} must be a JSON object, got {doc!r}")
        self.doc = doc
        self.where = where

    def get(self, name: str, kind: type, *null: None, default: Any = _MISSING) -> Any:
        """Field ``name``, which must be of ``kind`` (a bool is no integer), or null if
        given ``None`` after it; ``default`` if it may be missing."""
        if name not in self.doc:
            if default is not _MISSING:
                return default
            raise ValueError(f"{self.where} lacks the field {name!r}")
        value = self.doc[name]
        if value is None and null:
            return None
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
        expected = _KIND_NAMES.get(kind, kind.__name__) + (" or null" if null else "")
        raise ValueError(f"{self.where}: {name!r} must be {expected}, got {value!r}")

    def names(self, name: str) -> List[str]:
        """Field ``name``, a list of strings."""
        value = self.get(name, list)
        if not all(isinstance(item, str) for item in value):
            raise ValueError(f"{self.where}: {name!r} must be a list of strings, got {value!r}")
        return value

    def weights(self, name: str) -> Dict[str, float]:
        """Field ``name``, an object of backend tag to a number."""
        value = self.get(name, dict)
        for weight in value.values():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"{self.where}: {name!r} must map backend tags to numbers, "
                                 f"got {value!r}")
        return {tag: float(weight) for tag, weight in value.items()}


def _document(records: Records, key: str) -> Fields:
    raw = records[key]
    if not isinstance(raw, bytes):
        raise ValueError(f"record {key!r} holds {type(raw).__name__}, not bytes")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"record {key!r} is not JSON ({exc})") from None
    return Fields(doc, f"record {key!r}")


def _checked_name(key: str, name: str) -> str:
    try:
        return check_name(name)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"record {key!r}: its name {exc}") from None


def _load(records: Records) -> LoadedState:
    if not isinstance(records, dict):
        raise ValueError(f"the store holds {type(records).__name__}, not records")
    backends: Dict[str, BackendState] = {}
    endpoints: Dict[str, EndpointInfo] = {}
    replicas: List[Tuple[str, Fields]] = []
    proxies: Dict[str, dict] = {}
    failed_goals: Dict[str, BaseException] = {}
    for key in sorted(records):
        if not isinstance(key, str):
            raise ValueError(f"record key {key!r} is not a string")
        kind, _, name = key.partition("/")
        if kind == "backend":
            _checked_name(key, name)
            fields = _document(records, key)
            where = fields.where
            replica_config = _undefinition(records, f"definition/{name}", fields)
            before = fields.get("config_before_update", dict, None)
            backend = backends[name] = BackendState(
                name, replica_config, _unconfig(fields.get("config", dict), f"{where} config"),
                _unmetadata(fields.get("metadata", dict, None), f"{where} metadata"),
                goal=fields.get("goal", str, None),
                created_by=fields.get("created_by", str, None, default=None),
                changed_by=fields.names("changed_by") if fields.get(
                    "changed_by", list, None, default=None) is not None else None,
                created=fields.get("created", bool), deleting=fields.get("deleting", bool),
                force_delete=fields.get("force_delete", bool),
                config_before_update=None if before is None else _unconfig(
                    before, f"{where} config_before_update"),
                version=fields.get("version", int, default=0),
                autoscaled_replicas=fields.get("autoscaled_replicas", int, None, default=None))
            redeploy = fields.get("before", dict, None, default=None)
            if redeploy is not None:
                previous = Fields(redeploy, f"{where} before")
                backend.definition_before = _undefinition(
                    records, f"definition_before/{name}", previous)
                backend.metadata_before = _unmetadata(previous.get("metadata", dict, None),
                                                      f"{where} before.metadata")
                backend.previous_version = previous.get("version", int)
        elif kind == "replica":
            replicas.append((name, _document(records, key)))
        elif kind == "endpoint":
            _checked_name(key, name)
            fields = _document(records, key)
            route = fields.get("route", str, None)
            try:
                if route is not None:
                    check_route(route)
                methods = check_methods(fields.get("methods", list))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"record {key!r}: its route or methods {exc}") from None
            endpoints[name] = EndpointInfo(
                name, route, methods, fields.weights("traffic"), fields.weights("shadows"),
                _made_by(fields))
        elif kind == "proxy":
            fields = _document(records, key)
            fields.get("address", str, None)
            fields.get("process", dict, None)
            fields.get("node", str, None, default=None)
            proxies[name or "proxy"] = fields.doc  # "proxy": the one of a state file
            # written before there could be several
        elif kind == "goal":
            failed_goals[name] = _unerror(_document(records, key))
        elif kind not in ("definition", "definition_before"):
            raise ValueError(f"unknown record {key!r}")
    for tag, fields in replicas:
        owner = fields.get("backend", str)
        if owner not in backends:
            raise ValueError(f"{fields.where} belongs to backend {owner!r}, which has no "
                             "record")
        backend = backends[owner]
        state = fields.get("state", str)
        if state not in (STARTING, RUNNING, STOPPING):
            raise ValueError(f"{fields.where}: 'state' must be one of {STARTING}, {RUNNING}, "
                             f"{STOPPING}, got {state!r}")
        backend.replicas[tag] = ReplicaRecord(
            tag=tag, backend=backend.tag, state=state, address=fields.get("address", str, None),
            process=fields.get("process", dict, None),
            version=fields.get("version", int, default=0))
    return LoadedState(backends, endpoints, proxies, failed_goals)


class DurableState:
    """Saves snapshots to a store: only what changed, one transaction each, in call order.

    ``behind`` is True while the last write failed: the store lacks some of what was saved
    (the next save that succeeds writes it).
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._written: Records = {}  # what the store holds (changed on the writer thread)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="servekit-store")
        self.behind = False

    def read(self) -> Records:
        self._written = self._store.read_all()
        return dict(self._written)

    def save(self, records: Records) -> "asyncio.Future[None]":
        """Write the difference between ``records`` and what the store holds; await to be
        sure it is on disk (a write that failed raises its error)."""
        return asyncio.get_running_loop().run_in_executor(self._writer, self._write, records)

    def _write(self, records: Records) -> None:
        """On the writer thread, one save at a time in call order: compared with what the
        writes that succeeded left, so that one that failed is made up for by the next."""
        puts = {key: value for key, value in records.items()
                if self._written.get(key) != value}
        deletes = [key for key in self._written if key not in records]
        if puts or deletes:
            try:
                self._store.write(puts, deletes)
            except BaseException:
                self.behind = True
                raise
        self._written = records
        self.behind = False

    def close(self) -> None:
        self._writer.shutdown(wait=True)
