"""The control site's store in PostgreSQL (psycopg 3): for a fleet, with several ingest processes.

Connections come from a small pool (one per concurrent request, up to ``max_connections``); each
operation is one transaction at READ COMMITTED. Ingest processes keep no state of their own: the
per-unit head lives in ``units`` and moves by the conditional update described in
``controlsite.store.base``. The schema is created under an advisory lock so that processes starting
together do not race on ``CREATE TABLE``. The URL may carry libpq options, e.g.
``?options=-csearch_path%3Dsite_a`` to keep a site's tables in their own schema.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from controlsite.store.base import StoreError
from controlsite.store.sql import SqlStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS units (
    id TEXT PRIMARY KEY, public_key TEXT NOT NULL, enrolled_at TEXT NOT NULL,
    head_seq BIGINT NOT NULL, head_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    unit TEXT NOT NULL REFERENCES units (id), seq BIGINT NOT NULL, time TEXT NOT NULL,
    kind TEXT NOT NULL, run TEXT, hash BYTEA NOT NULL, data BYTEA NOT NULL,
    PRIMARY KEY (unit, seq));
CREATE INDEX IF NOT EXISTS records_run ON records (unit, run, seq) WHERE run IS NOT NULL;
CREATE INDEX IF NOT EXISTS records_kind ON records (unit, kind, seq);
CREATE TABLE IF NOT EXISTS latest (
    unit TEXT NOT NULL, tag TEXT NOT NULL, value TEXT NOT NULL, quality TEXT NOT NULL,
    time TEXT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (unit, tag));
CREATE TABLE IF NOT EXISTS alarms (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, unit TEXT NOT NULL, time TEXT NOT NULL,
    reason TEXT NOT NULL, seq BIGINT, count INTEGER NOT NULL, last_time TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '', akey TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS alarms_unit ON alarms (unit, id);
-- a database made before alarms had keys (issue 8): add the columns, one key per old row
ALTER TABLE alarms ADD COLUMN IF NOT EXISTS error TEXT NOT NULL DEFAULT '';
ALTER TABLE alarms ADD COLUMN IF NOT EXISTS akey TEXT;
UPDATE alarms SET akey = 'legacy/' || id WHERE akey IS NULL;
CREATE UNIQUE INDEX IF NOT EXISTS alarms_key ON alarms (unit, akey);
CREATE INDEX IF NOT EXISTS alarms_time ON alarms (unit, time);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, username TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
    created TEXT NOT NULL, expires TEXT, revoked TEXT);
"""
_SCHEMA_LOCK = 0x6265647369646501  # an arbitrary advisory-lock key for schema creation


class PostgresStore(SqlStore):
    """``controlsite.store.base.Store`` in the PostgreSQL database at ``url``."""

    placeholder = "%s"
    _errors = (psycopg.Error,)
    # READ COMMITTED transactions overlap: alarm writers of one unit queue on its row instead
    _lock_unit = "SELECT id FROM units WHERE id = ? FOR UPDATE"

    def __init__(self, url: str, *, max_connections: int = 8, connect_timeout: int = 10) -> None:
        self.url = url
        self._connect_timeout = connect_timeout
        self._idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._all: list[psycopg.Connection[Any]] = []
        self._all_lock = threading.Lock()
        self._closed = False
        try:
            with self._tx() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                cur.execute(SCHEMA)
        except psycopg.Error as exc:
            self.close()
            raise StoreError(
                f"cannot open the control-site database {self._safe_url}: {exc}"
            ) from exc

    @property
    def _safe_url(self) -> str:
        """The URL without a password, for messages."""
        try:
            info = psycopg.conninfo.conninfo_to_dict(self.url)
        except psycopg.Error:
            return "postgresql://..."
        user, host, port = info.get("user", ""), info.get("host", ""), info.get("port", "")
        return f"postgresql://{user}@{host}:{port}/{info.get('dbname', '')}"

    def _is_integrity_error(self, exc: Exception) -> bool:
        return isinstance(exc, psycopg.errors.IntegrityError)

    def _take(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise StoreError(f"the control-site database {self._safe_url} is closed")
        self._slots.acquire()
        try:
            while True:
                try:
                    conn = self._idle.get_nowait()
                except queue.Empty:
                    break
                if not conn.closed and not conn.broken:
                    return conn
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self._connect_timeout)
        except BaseException:
            self._slots.release()
            raise
        with self._all_lock:
            self._all.append(conn)
        return conn

    def _give(self, conn: psycopg.Connection[Any]) -> None:
        if self._closed:
            conn.close()
        elif not conn.closed and not conn.broken:
            self._idle.put(conn)
        self._slots.release()

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Cursor[Any]]:
        conn = self._take()
        try:
            with conn.transaction(), conn.cursor() as cur:
                yield cur
        finally:
            self._give(conn)

    def close(self) -> None:
        self._closed = True
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(psycopg.Error):
                conn.close()
