"""The control site's store in one SQLite file: the embedded default for a single machine.

One connection guarded by a lock serves every thread of the process (SQLite writes one
transaction at a time anyway); WAL mode lets other processes read meanwhile, and each write
transaction starts with ``BEGIN IMMEDIATE`` so a second ingest process waits (busy timeout)
instead of failing. ``synchronous=FULL``: an acknowledged record is on disk.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from controlsite.store import StoreError
from controlsite.store_sql import SqlStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS units (
    id TEXT PRIMARY KEY, public_key TEXT NOT NULL, enrolled_at TEXT NOT NULL,
    head_seq INTEGER NOT NULL, head_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    unit TEXT NOT NULL REFERENCES units (id), seq INTEGER NOT NULL, time TEXT NOT NULL,
    kind TEXT NOT NULL, run TEXT, hash BLOB NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (unit, seq));
CREATE INDEX IF NOT EXISTS records_run ON records (unit, run, seq) WHERE run IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_kind ON records (unit, kind, seq);
CREATE TABLE IF NOT EXISTS latest (
    unit TEXT NOT NULL, tag TEXT NOT NULL, value TEXT NOT NULL, quality TEXT NOT NULL,
    time TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (unit, tag));
CREATE TABLE IF NOT EXISTS alarms (
    id INTEGER PRIMARY KEY, unit TEXT NOT NULL, time TEXT NOT NULL, reason TEXT NOT NULL,
    seq INTEGER, count INTEGER NOT NULL, last_time TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS alarms_unit ON alarms (unit, id);
"""


class SqliteStore(SqlStore):
    """``controlsite.store.Store`` in the SQLite file at ``path``."""

    _errors = (sqlite3.Error,)

    def __init__(self, path: str | Path, *, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.url = str(self.path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the control-site database {self.path}: {exc}") from exc
        self._conn: sqlite3.Connection | None = conn

    def _is_integrity_error(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        with self._lock:
            if self._conn is None:
                raise StoreError(f"the control-site database {self.path} is closed")
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have ended it
                    cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
