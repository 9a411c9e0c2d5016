"""The controller's saved state: JSON records that load back to the same state, written as
one transaction per change (only what changed), in an owner-only SQLite file."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sqlite3
import stat
from typing import Any, Dict, Iterable, List, Mapping, Tuple

import cloudpickle
import pytest

from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig
from servekit._private.backend_settings import BackendSettings
from servekit._private.controller.durable import DurableState, load, snapshot
from servekit._private.controller.state import RUNNING, BackendState, ReplicaRecord
from servekit._private.controller.store import MemoryStore, SQLiteStore
from servekit._private.specs import EndpointInfo
from servekit.config import BackendConfig
from servekit.exceptions import ServeError


class Model:
    def reconfigure(self, config: Any) -> None:
        pass

    def __call__(self, request: Any) -> str:
        return "ok"


def backend(user_config: Any = None) -> BackendState:
    config = BackendSettings.check({"num_replicas": 2, "user_config": user_config})
    state = BackendState("m", ReplicaConfig(cloudpickle.dumps((Model, ("w",))), {"num_cpus": 1},
                                            "Model", None),
                         config, BackendMetadata.inspect(Model), goal="g1", created=True)
    state.replicas["m#1"] = ReplicaRecord(tag="m#1", backend="m", state=RUNNING,
                                          address="/tmp/r.sock", process={"pid": 7})
    return state


def test_state_loads_back_as_it_was() -> None:
    endpoints = {"e": EndpointInfo("e", "/e", ["GET"], {"m": 1.0}, {"m": 0.5})}
    proxies = {"proxy-a": {"address": "/p", "process": {}, "node": "a"}}
    records = snapshot({"m": backend({"v": 1})}, endpoints, proxies)
    state = load(records, "test")
    loaded = state.backends["m"]
    assert loaded.config == BackendSettings.check({"num_replicas": 2, "user_config": {"v": 1}})
    # Only the fields set explicitly are set again, so a merge after recovery is the same.
    assert set(loaded.config.given) == {"num_replicas", "user_config"}
    assert loaded.config.merged(BackendSettings.check({"max_batch_size": 1})).num_replicas == 2
    assert loaded.replica_config == backend().replica_config
    assert loaded.metadata == BackendMetadata.inspect(Model)
    assert (loaded.goal, loaded.created, loaded.deleting) == ("g1", True, False)
    assert loaded.replicas["m#1"].process == {"pid": 7}
    assert loaded.replicas["m#1"].address == "/tmp/r.sock"
    assert state.endpoints == endpoints
    assert state.proxies == proxies


def test_asgi_metadata_loads_back_and_older_records_are_not_asgi() -> None:
    state = backend()
    state.metadata = dataclasses.replace(BackendMetadata.inspect(Model), asgi=True)
    records = snapshot({"m": state}, {}, {})
    assert load(records, "test").backends["m"].metadata == state.metadata
    doc = json.loads(records["backend/m"])
    del doc["metadata"]["asgi"]  # written before backends could be ASGI apps
    records["backend/m"] = json.dumps(doc).encode()
    loaded = load(records, "test").backends["m"].metadata
    assert loaded is not None and loaded.asgi is False


def test_the_deploy_file_name_of_an_endpoint_loads_back_as_does_an_older_mark() -> None:
    endpoints = {name: EndpointInfo(name, f"/{name}", ["GET"], {"m": 1.0}, managed=mark)
                 for name, mark in (("api", None), ("file", "team-a"))}
    records = snapshot({}, endpoints, {})
    assert load(records, "test").endpoints == endpoints
    for mark, loaded in ((True, ""), (False, None)):  # written before files had names
        doc = json.loads(records["endpoint/file"])
        doc["managed"] = mark
        records["endpoint/file"] = json.dumps(doc).encode()
        assert load(records, "test").endpoints["file"].managed == loaded


# A backend's record as servekit wrote it while the controller held configs as pydantic
# models (autoscaling, a user_config JSON cannot carry, an int given for a float, and the
# config an update replaces).
_RECORD_OF_PYDANTIC_CONFIGS = (
    b'{"actor_options": {}, "autoscaled_replicas": null, "before": null, "changed_by": null, '
    b'"config": {"autoscaling_config": {"max_replicas": 4, "min_replicas": 0, '
    b'"target_ongoing_requests": 3.0}, "health_check_period_s": 2.0, "max_surge": 2, '
    b'"user_config": {"pickle": "gAWVDgAAAAAAAAB9lIwBdpRLAUsChpRzLg=="}}, '
    b'"config_before_update": {"num_replicas": 3}, "created": true, "created_by": null, '
    b'"deleting": false, "description": "Model", "force_delete": false, "goal": null, '
    b'"metadata": null, "python": null, "source": null, "version": 0}')


def test_a_backend_saved_while_configs_were_pydantic_models_loads_as_it_was() -> None:
    records = {"backend/m": _RECORD_OF_PYDANTIC_CONFIGS, "definition/m": b"code"}
    loaded = load(records, "test").backends["m"]
    expected = BackendConfig(
        autoscaling_config={"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 3},
        user_config={"v": (1, 2)}, max_surge=2, health_check_period_s=2)
    assert loaded.config == BackendSettings.check(expected)
    assert loaded.config.describe() == expected.model_dump(mode="json", exclude={"user_config"})
    assert loaded.config.autoscaling_config.start_replicas == 0
    assert loaded.config_before_update == BackendSettings.check({"num_replicas": 3})
    # Saved again, it is the same record.
    assert snapshot({"m": loaded}, {}, {})["backend/m"] == _RECORD_OF_PYDANTIC_CONFIGS


def test_the_single_proxy_record_of_an_older_state_file_loads() -> None:
    records = snapshot({}, {}, {})
    records["proxy"] = json.dumps({"address": "/p", "process": {"pid": 3}}).encode()
    assert load(records, "test").proxies == {"proxy": {"address": "/p", "process": {"pid": 3}}}


def test_records_are_json_but_the_definition() -> None:
    records = snapshot({"m": backend({"v": 1})}, {}, {})
    for key, value in records.items():
        if key.startswith("definition/"):
            continue
        json.loads(value)  # every other record is plain JSON


@pytest.mark.parametrize("user_config", [(1, 2), {1: "a"}, {"when": b"bytes"}])
def test_user_config_json_cannot_carry_is_kept_exactly(user_config: Any) -> None:
    state = load(snapshot({"m": backend(user_config)}, {}, {}), "test")
    assert state.backends["m"].config.user_config == user_config
    assert type(state.backends["m"].config.user_config) is type(user_config)


def test_damaged_records_are_a_serve_error_naming_the_place() -> None:
    records = snapshot({"m": backend()}, {}, {})
    records["backend/m"] = b"{not json"
    with pytest.raises(ServeError, match="saved state in /x/state.db is damaged"):
        load(records, "/x/state.db")
    with pytest.raises(ServeError, match="unknown record"):
        load({"surprise/x": b"{}"}, "here")


class RecordingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.transactions: List[Tuple[Dict[str, bytes], List[str]]] = []

    def write(self, puts: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None:
        self.transactions.append((dict(puts), list(deletes)))
        super().write(puts, deletes)


def test_each_save_writes_only_what_changed_in_one_transaction() -> None:
    async def main() -> None:
        store = RecordingStore()
        durable = DurableState(store)
        first = snapshot({"m": backend()}, {}, {})
        await durable.save(first)
        second = dict(first)
        second["endpoint/e"] = b"{}"
        del second["replica/m#1"]
        await durable.save(second)
        await durable.save(second)  # nothing changed: nothing written
        durable.close()
        assert len(store.transactions) == 2
        assert store.transactions[1] == ({"endpoint/e": b"{}"}, ["replica/m#1"])
        assert store.read_all() == second

    asyncio.run(main())


def test_sqlite_store_is_owner_only_and_durable(tmp_path: Any) -> None:
    path = str(tmp_path / "state.db")
    store = SQLiteStore(path)
    store.write({"a": b"1", "b": b"2"})
    store.write({"c": b"3"}, ["a"])
    store.close()
    for name in os.listdir(tmp_path):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
    assert SQLiteStore(path).read_all() == {"b": b"2", "c": b"3"}


def test_unreadable_state_file_is_a_serve_error_naming_it(tmp_path: Any) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database, just garbage " * 100)
    with pytest.raises(ServeError, match=f"state file {path} cannot be read"):
        SQLiteStore(str(path)).read_all()
    assert path.read_bytes().startswith(b"this is not")  # left as it was


class FailingStore(MemoryStore):
    """A MemoryStore whose next ``failures`` writes raise (a full disk), changing nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    def write(self, puts: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        super().write(puts, deletes)


def test_a_failed_write_is_written_by_the_next_save() -> None:
    """A write that failed is not taken for done: the next save writes what it missed."""

    async def main() -> None:
        store = FailingStore()
        durable = DurableState(store)
        first = snapshot({"m": backend()}, {}, {})
        store.failures = 1
        with pytest.raises(OSError, match="No space left"):
            await durable.save(first)
        assert store.read_all() == {}
        await durable.save(first)  # the same records again: all of them are written now
        assert store.read_all() == first
        assert load(store.read_all(), "test").backends["m"].config.num_replicas == 2
        # A delete whose write failed is made by the next save too.
        store.failures = 1
        with pytest.raises(OSError):
            await durable.save({})
        await durable.save({})
        durable.close()
        assert store.read_all() == {}

    asyncio.run(main())


def test_saves_queued_behind_a_failed_one_write_what_it_missed() -> None:
    """Saves made before the first one's write failed (not awaited in between) still leave
    the store holding the last snapshot."""

    async def main() -> None:
        store = FailingStore()
        durable = DurableState(store)
        first = snapshot({"m": backend()}, {}, {})
        second = {**first, "endpoint/e": b"{}"}
        store.failures = 1
        saves = [durable.save(first), durable.save(second)]
        results = await asyncio.gather(*saves, return_exceptions=True)
        assert isinstance(results[0], OSError) and results[1] is None
        durable.close()
        assert store.read_all() == second

    asyncio.run(main())


# --------------------------------------------------------------------------- bad state files


def test_a_new_state_file_is_never_empty(tmp_path: Any) -> None:
    """The file is built aside and renamed into place: none of the moments it exists at its
    path holds 0 bytes (which a later start would refuse)."""
    path = tmp_path / "state.db"
    store = SQLiteStore(str(path))
    assert store.read_all() == {}
    assert path.stat().st_size > 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    store.close()
    assert sorted(os.listdir(tmp_path))[0] == "state.db"
    assert not (tmp_path / "state.db.new").exists()
    assert SQLiteStore(str(path)).read_all() == {}


def test_an_empty_state_file_is_an_error_naming_it(tmp_path: Any) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"")
    with pytest.raises(ServeError, match=f"state file {path} is empty .0 bytes.*Move it away"):
        SQLiteStore(str(path)).read_all()
    assert path.read_bytes() == b""  # left as it was


def test_another_programs_database_is_an_error_naming_it(tmp_path: Any) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE photos (id INTEGER)")
    db.commit()
    db.close()
    with pytest.raises(ServeError, match=f"state file {path} is an SQLite database but not a "
                                         r"servekit state file \(its tables: \['photos'\]\)"):
        SQLiteStore(str(path)).read_all()
    db = sqlite3.connect(path)
    assert [name for (name,) in db.execute("SELECT name FROM sqlite_master")] == ["photos"]
    db.close()


def _edit(records: Dict[str, bytes], key: str, **changes: Any) -> None:
    doc = json.loads(records[key])
    for name, value in changes.items():
        *path, last = name.split("__")
        target = doc
        for part in path:
            target = target[part]
        target[last] = value
    records[key] = json.dumps(doc).encode()


def _damaged(change: Any) -> Dict[str, bytes]:
    endpoints = {"e": EndpointInfo("e", "/e", ["GET"], {"m": 1.0}, {})}
    records = snapshot({"m": backend()}, endpoints, {"proxy": {"address": "/p",
                                                              "process": None}})
    change(records)
    return records


@pytest.mark.parametrize("change, fragment", [
    (lambda r: _edit(r, "backend/m", deleting="yes"),
     "record 'backend/m': 'deleting' must be a bool, got 'yes'"),
    (lambda r: _edit(r, "backend/m", goal=7), "'goal' must be a string or null, got 7"),
    (lambda r: _edit(r, "backend/m", version=True), "'version' must be an integer, got True"),
    (lambda r: _edit(r, "backend/m", config__num_replicas="2"),
     "record 'backend/m' config is not a valid backend config (config.num_replicas must "
     "be an integer, got '2')"),
    (lambda r: _edit(r, "backend/m", config__num_replicas=10**9),
     "num_replicas=1000000000 is more than the 1000 replicas"),
    (lambda r: _edit(r, "backend/m", config__user_config={"pickle": "bm90IGEgcGlja2xl"}),
     "record 'backend/m' config.user_config cannot be unpickled"),
    (lambda r: _edit(r, "backend/m", metadata__is_async="no"),
     "record 'backend/m' metadata: 'is_async' must be a bool, got 'no'"),
    (lambda r: _edit(r, "backend/m", actor_options=["num_cpus"]),
     "'actor_options' must be an object, got ['num_cpus']"),
    (lambda r: r.update({"backend/m": b"[1, 2]"}),
     "record 'backend/m' must be a JSON object, got [1, 2]"),
    (lambda r: r.pop("definition/m"), "record 'backend/m' has no record 'definition/m'"),
    (lambda r: r.update({"backend/m\n": r.pop("backend/m")}),
     "its name 'm\\n' contains '\\n'"),
    (lambda r: _edit(r, "replica/m#1", state="DANCING"),
     "record 'replica/m#1': 'state' must be one of STARTING, RUNNING, STOPPING, got "
     "'DANCING'"),
    (lambda r: _edit(r, "replica/m#1", backend="gone"),
     "record 'replica/m#1' belongs to backend 'gone', which has no record"),
    (lambda r: _edit(r, "replica/m#1", process=[7]),
     "'process' must be an object or null, got [7]"),
    (lambda r: _edit(r, "endpoint/e", route=5), "'route' must be a string or null, got 5"),
    (lambda r: _edit(r, "endpoint/e", route="/e/../x"),
     "record 'endpoint/e': its route or methods '/e/../x' has a '.' or '..' segment"),
    (lambda r: _edit(r, "endpoint/e", methods=["GE T"]), "holds 'GE T'"),
    (lambda r: _edit(r, "endpoint/e", traffic={"m": "1"}),
     "'traffic' must map backend tags to numbers"),
    (lambda r: _edit(r, "proxy/proxy", address=["/p"]),
     "record 'proxy/proxy': 'address' must be a string or null"),
    (lambda r: r.update({"endpoint/e": 12}), "record 'endpoint/e' holds int, not bytes"),
], ids=["bool", "goal", "version-bool", "config-type", "config-bound", "user-config-pickle",
        "metadata", "actor-options", "not-an-object", "no-definition", "name", "replica-state",
        "replica-owner", "replica-process", "route-type", "route", "methods", "traffic",
        "proxy", "not-bytes"])
def test_records_of_the_wrong_type_are_refused_naming_record_and_value(
        change: Any, fragment: str) -> None:
    records = _damaged(change)
    with pytest.raises(ServeError) as excinfo:
        load(records, "/x/state.db")
    message = str(excinfo.value)
    assert message.startswith("The saved state in /x/state.db is damaged (")
    assert fragment in message, message
    assert message.endswith("Move it away to start without it, or restore it from a backup.")
    assert "\n" not in message
