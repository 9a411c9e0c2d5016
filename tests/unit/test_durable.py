"""The controller's saved state: JSON records that load back to the same state, written as
one transaction per change (only what changed), in an owner-only SQLite file."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import stat
from typing import Any, Dict, Iterable, List, Mapping, Tuple

import cloudpickle
import pytest

from servekit._private.backend_metadata import BackendMetadata, ReplicaConfig
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
    config = BackendConfig(num_replicas=2, user_config=user_config)
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
    assert loaded.config == BackendConfig(num_replicas=2, user_config={"v": 1})
    # Only the fields set explicitly are set again, so a merge after recovery is the same.
    assert loaded.config.model_fields_set == {"num_replicas", "user_config"}
    assert loaded.config.merged({"max_batch_size": 1}).num_replicas == 2
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
