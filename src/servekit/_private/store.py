"""Durable key-value storage for the controller's checkpoints (SQLite)."""

from __future__ import annotations

import sqlite3
from typing import Optional


class SQLiteStore:
    """A tiny key -> bytes table in one SQLite file; every write is committed at once."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB)")

    def put(self, key: str, value: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    def get(self, key: str) -> Optional[bytes]:
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def delete(self, key: str) -> None:
        self._db.execute("DELETE FROM kv WHERE key = ?", (key,))

    def close(self) -> None:
        self._db.close()


class MemoryStore:
    """The same interface in memory, for tests and the fake runtime."""

    def __init__(self) -> None:
        self._data: dict = {}

    def put(self, key: str, value: bytes) -> None:
        self._data[key] = value

    def get(self, key: str) -> Optional[bytes]:
        return self._data.get(key)

    def delete(self, key: str) -> None:
        self._data.pop(key, None)

    def close(self) -> None:
        self._data.clear()
