"""The controller's desired state as store records: JSON documents, one key each.

Keys: ``backend/<tag>`` (config, options, goal in progress), ``definition/<tag>`` (the
cloudpickled function or class with its init args: the only pickle in the store),
``definition_before/<tag>`` (while a redeploy is under way, the definition it goes back to
if a new replica fails), ``endpoint/<name>``, ``replica/<tag>`` (which process runs it, so a
restarted controller can adopt it) and ``proxy``. A ``user_config`` that JSON cannot carry
exactly is stored pickled, as part of the backend's definition.

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

from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig
from servekit._private.controller.state import BackendState, ReplicaRecord
from servekit._private.runtime.base import Store
from servekit._private.specs import EndpointInfo
from servekit.config import BackendConfig
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


def _unvalue(doc: Any) -> Any:
    if "json" in doc:
        return doc["json"]
    return pickle.loads(base64.b64decode(doc["pickle"]))


def _config(config: BackendConfig, tag: str) -> dict:
    """The fields set explicitly (so a merge after a restart behaves as before it)."""
    fields = {name: getattr(config, name) for name in config.model_fields_set}
    if "user_config" in fields:
        fields["user_config"] = _value(fields["user_config"], f"user_config of backend {tag!r}")
    if fields.get("autoscaling_config") is not None:
        fields["autoscaling_config"] = fields["autoscaling_config"].model_dump(
            exclude_unset=True)
    return fields


def _unconfig(doc: dict) -> BackendConfig:
    if "user_config" in doc:
        doc = {**doc, "user_config": _unvalue(doc["user_config"])}
    return BackendConfig.model_validate(doc)


def _metadata(metadata: Optional[BackendMetadata]) -> Optional[dict]:
    if metadata is None:
        return None
    doc = dataclasses.asdict(metadata)
    doc["batch_methods"] = sorted(metadata.batch_methods)
    doc["methods"] = list(metadata.methods)
    return doc


def _unmetadata(doc: Optional[dict]) -> Optional[BackendMetadata]:
    if doc is None:
        return None
    return BackendMetadata(**{**doc, "batch_methods": frozenset(doc["batch_methods"]),
                              "methods": tuple(doc["methods"])})


def _definition(replica_config: ReplicaConfig) -> dict:
    """What a backend's replicas run, but its pickled code (a record of its own)."""
    return {"actor_options": replica_config.actor_options,
            "description": replica_config.description, "python": replica_config.python,
            "source": replica_config.source}


def _undefinition(serialized: bytes, doc: dict) -> ReplicaConfig:
    return ReplicaConfig(serialized, doc["actor_options"], doc["description"], doc["python"],
                         doc.get("source"))


def _json(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


def snapshot(backends: Dict[str, BackendState], endpoints: Dict[str, EndpointInfo],
             proxies: Dict[str, dict]) -> Records:
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
    return records


@dataclasses.dataclass
class LoadedState:
    """What a store held: backends (with the replica records to adopt), endpoints, and the
    HTTP proxies by name."""

    backends: Dict[str, BackendState]
    endpoints: Dict[str, EndpointInfo]
    proxies: Dict[str, dict]


def load(records: Records, where: str) -> LoadedState:
    """Rebuild the state from ``records``; a ServeError naming ``where`` if they are bad."""
    try:
        return _load(records)
    except (KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        raise ServeError(f"The saved state in {where} is damaged ({type(exc).__name__}: "
                         f"{exc}). Move it away to start without it.") from None


def _load(records: Records) -> LoadedState:
    backends: Dict[str, BackendState] = {}
    endpoints: Dict[str, EndpointInfo] = {}
    replicas: List[Tuple[str, dict]] = []
    proxies: Dict[str, dict] = {}
    for key, raw in sorted(records.items()):
        kind, _, name = key.partition("/")
        if kind == "backend":
            doc = json.loads(raw)
            replica_config = _undefinition(records[f"definition/{name}"], doc)
            before = doc["config_before_update"]
            backends[name] = BackendState(
                name, replica_config, _unconfig(doc["config"]), _unmetadata(doc["metadata"]),
                goal=doc["goal"], created_by=doc.get("created_by"), created=doc["created"],
                deleting=doc["deleting"],
                force_delete=doc["force_delete"],
                config_before_update=None if before is None else _unconfig(before),
                version=doc.get("version", 0),
                autoscaled_replicas=doc.get("autoscaled_replicas"))
            redeploy = doc.get("before")
            if redeploy is not None:
                backend = backends[name]
                backend.definition_before = _undefinition(
                    records[f"definition_before/{name}"], redeploy)
                backend.metadata_before = _unmetadata(redeploy["metadata"])
                backend.previous_version = redeploy["version"]
        elif kind == "replica":
            replicas.append((name, json.loads(raw)))
        elif kind == "endpoint":
            doc = json.loads(raw)
            endpoints[name] = EndpointInfo(name, doc["route"], doc["methods"], doc["traffic"],
                                           doc["shadows"], doc.get("managed", False))
        elif kind == "proxy":
            proxies[name or "proxy"] = json.loads(raw)  # "proxy": the one of a state file
            # written before there could be several
        elif kind not in ("definition", "definition_before"):
            raise ValueError(f"unknown record {key!r}")
    for tag, doc in replicas:
        backend = backends[doc["backend"]]
        backend.replicas[tag] = ReplicaRecord(tag=tag, backend=backend.tag, state=doc["state"],
                                              address=doc["address"], process=doc["process"],
                                              version=doc.get("version", 0))
    return LoadedState(backends, endpoints, proxies)


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
