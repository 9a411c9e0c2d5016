"""Durable key-value storage of the controller's desired state.

A store holds ``key -> bytes``; ``write`` applies a set of puts and deletes as one
transaction, so a change is on disk whole or not at all. ``SQLiteStore`` keeps it in one
owner-only SQLite file; ``MemoryStore`` is the same interface in memory, for tests.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Dict, Iterable, Mapping, Optional

from servekit.exceptions import ServeError


def _unreadable(path: str, exc: Exception) -> ServeError:
    return ServeError(f"The state file {path} cannot be read ({exc}). Move it away to start "
                      "without the saved state, or restore it from a backup.")


class SQLiteStore:
    """A ``kv`` table in one SQLite file, created owner-only; every write is one transaction.

    Raises:
        ServeError: the file exists but is not a readable servekit state file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: Optional[sqlite3.Connection] = None  # opened on first use

    def _open(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            os.close(fd)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB)")
            db.execute("SELECT count(*) FROM kv").fetchone()
        except (OSError, sqlite3.DatabaseError) as exc:
            raise _unreadable(self.path, exc) from None
        for suffix in ("-wal", "-shm"):  # SQLite creates these with the umask's mode
            if os.path.exists(self.path + suffix):
                os.chmod(self.path + suffix, 0o600)
        self._db = db
        return db

    def read_all(self) -> Dict[str, bytes]:
        try:
            rows = self._open().execute("SELECT key, value FROM kv").fetchall()
        except sqlite3.DatabaseError as exc:
            raise _unreadable(self.path, exc) from None
        return {key: bytes(value) for key, value in rows}

    def write(self, puts: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None:
        db = self._open()
        with db:  # one transaction
            db.execute("BEGIN")
            db.executemany("DELETE FROM kv WHERE key = ?", [(key,) for key in deletes])
            db.executemany("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)",
                           list(puts.items()))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class MemoryStore:
    """The same interface in memory, for tests and the fake runtime."""

    def __init__(self) -> None:
        self._data: Dict[str, bytes] = {}

    def read_all(self) -> Dict[str, bytes]:
        return dict(self._data)

    def write(self, puts: Mapping[str, bytes], deletes: Iterable[str] = ()) -> None:
        for key in deletes:
            self._data.pop(key, None)
        self._data.update(puts)

    def close(self) -> None:
        pass
