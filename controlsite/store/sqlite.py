"""The control site's store in one SQLite file: the embedded default for a single machine.

One connection guarded by a lock serves every thread of the process (SQLite writes one
transaction at a time anyway); WAL mode lets other processes read meanwhile, and each write
transaction starts with ``BEGIN IMMEDIATE`` so a second ingest process waits (busy timeout)
instead of failing. ``synchronous=FULL``: an acknowledged record is on disk.

The file holds every unit's records and the token hashes: it is created mode 0600 (SQLite
gives its ``-wal`` and ``-shm`` files the same mode), and an existing file others can read is
tightened to 0600 with a warning.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from controlsite.store.base import StoreError
from controlsite.store.sql import SqlStore

log = structlog.get_logger(__name__)

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
    seq INTEGER, count INTEGER NOT NULL, last_time TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '', akey TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS alarms_unit ON alarms (unit, id);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, username TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
    created TEXT NOT NULL, expires TEXT, revoked TEXT);
"""
# a database made before alarms had keys (issue 8): add the columns, one key per old row
MIGRATE_ALARMS = """
BEGIN IMMEDIATE;
ALTER TABLE alarms ADD COLUMN error TEXT NOT NULL DEFAULT '';
ALTER TABLE alarms ADD COLUMN akey TEXT;
UPDATE alarms SET akey = 'legacy/' || id;
COMMIT;
"""
INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS alarms_key ON alarms (unit, akey);
CREATE INDEX IF NOT EXISTS alarms_time ON alarms (unit, time);
"""


class SqliteStore(SqlStore):
    """``controlsite.store.base.Store`` in the SQLite file at ``path``."""

    _errors = (sqlite3.Error,)

    def __init__(self, path: str | Path, *, busy_timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.url = str(self.path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _private(self.path)
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.executescript(SCHEMA)
            if "akey" not in {row[1] for row in conn.execute("PRAGMA table_info(alarms)")}:
                conn.executescript(MIGRATE_ALARMS)
            conn.executescript(INDEXES)
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


def _private(path: Path) -> None:
    """Create ``path`` mode 0600 if missing; tighten it (and its WAL files) if others can read."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return
    except FileExistsError:
        pass
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = file.stat().st_mode
        except FileNotFoundError:
            continue
        if mode & 0o077:
            os.chmod(file, 0o600)
            log.warning("control_site_db_tightened", path=str(file), was=oct(mode & 0o777))
