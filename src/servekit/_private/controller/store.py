"""Durable key-value storage of the controller's desired state.

A store holds ``key -> bytes``; ``write`` applies a set of puts and deletes as one
transaction, so a change is on disk whole or not at all. ``SQLiteStore`` keeps it in one
owner-only SQLite file; ``MemoryStore`` is the same interface in memory, for tests.

A state file is created whole (built aside, then renamed into place), so one that is
empty, or is some other SQLite database, was damaged or put there: it is an error that
names it, never taken for a new, empty state.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Dict, Iterable, Mapping, Optional

from servekit.exceptions import ServeError


def _unreadable(path: str, exc: Exception) -> ServeError:
    return ServeError(f"The state file {path} cannot be read ({exc}). Move it away to start "
                      "without the saved state, or restore it from a backup.")


_CREATE_TABLE = "CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB)"


class SQLiteStore:
    """A ``kv`` table in one SQLite file, created owner-only; every write is one transaction.

    Raises:
        ServeError: the file exists but is not a readable servekit state file (damaged,
            empty, or another program's database).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: Optional[sqlite3.Connection] = None  # opened on first use

    def _create(self) -> None:
        """A new state file with its empty table, built aside and renamed into place."""
        building = f"{self.path}.new"
        fd = os.open(building, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        os.close(fd)
        db = sqlite3.connect(building, isolation_level=None)
        try:
            db.execute(_CREATE_TABLE)
        finally:
            db.close()
        os.replace(building, self.path)

    def _open(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        try:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
            except FileNotFoundError:
                self._create()
                fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
            try:
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size == 0:
                raise ServeError(
                    f"The state file {self.path} is empty (0 bytes): the saved state is lost "
                    "(a full disk, or the file was truncated). Move it away to start without "
                    "the saved state, or restore it from a backup.")
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            tables = [name for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")]
            if "kv" not in tables:
                db.close()
                raise ServeError(
                    f"The state file {self.path} is an SQLite database but not a servekit "
                    f"state file (its tables: {tables}). Move it away to start without the "
                    "saved state, or restore the state file from a backup.")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("SELECT count(*), typeof(key), typeof(value) FROM kv").fetchone()
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
        for key, value in rows:
            if not isinstance(key, str) or not isinstance(value, (bytes, str)):
                raise _unreadable(self.path, ValueError(
                    f"the record {key!r} is a {type(value).__name__}, not bytes"))
        return {key: value if isinstance(value, bytes) else value.encode()
                for key, value in rows}

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
