"""The control site's storage: one interface, SQLite for one machine, PostgreSQL for a fleet.

``open_store(url)`` picks the implementation: ``postgresql://...`` (or ``postgres://``) opens
PostgreSQL (psycopg 3), anything else is a SQLite file path (``sqlite:///path`` also works).

Tables (the same on both)::

    units    id, public key (base64), key id, enrolled at, head seq, head hash
    records  unit, seq, time, kind, run, hash, data (the record's canonical bytes); PK (unit, seq)
    latest   unit, tag, value (canonical JSON), quality, time, seq: the last sample of each tag
    alarms   id, unit, time, error, reason, seq, count, last time, key: tamper alarms; a
             repeat (same unit and key) bumps its row's count instead of adding a row, and past
             ``limit`` new alarms of a unit in one window the rest bump one overflow row
    tokens   id, username, hash (SHA-256 hex of the secret), created, expires, revoked: the
             bearer tokens of the query API (``controlsite.tokens``); secrets are never stored

The per-unit head moves in the same transaction that stores the records, by a conditional
``UPDATE units SET head_seq = new WHERE id = unit AND head_seq = old``: when two ingest processes
race for one unit, the loser's update matches no row, its transaction is rolled back and
``HeadConflict`` tells it to re-read the head and try again. Per-unit order therefore holds
with any number of ingest processes on one database.

The interface is synchronous (the web app calls it from worker threads); errors of the
database libraries are translated into ``StoreError`` naming the operation and the unit.

Errors of the control site::

    ControlSiteError          any failure of the control site
    ├── StoreError            the database failed (unreachable, locked, schema)
    │   └── HeadConflict      another ingest advanced the unit's head first: retry
    ├── EnrolmentError        unknown unit, malformed unit id, a different key for an enrolled unit
    ├── TokenError            (controlsite.tokens) bad user or expiry, unknown token id, token file
    └── Refused               (controlsite.ingest) a request or batch refused, naming the record
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent.record.format import Record
from agent.record.keys import PublicKey

UNIT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


class ControlSiteError(Exception):
    """Any failure of the control site."""


class StoreError(ControlSiteError):
    """The database failed; the message names the operation and the unit."""


class HeadConflict(StoreError):
    """Another ingest advanced the unit's head between our read and our update: retry."""


class EnrolmentError(ControlSiteError):
    """An unknown unit, a malformed unit id or a second key for an enrolled unit."""


@dataclass(frozen=True, slots=True)
class Unit:
    """An enrolled unit and the head of its stored chain."""

    id: str
    public_key: PublicKey
    enrolled_at: str
    head_seq: int
    head_hash: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "id": self.id,
            "public_key": self.public_key.b64,
            "key_id": self.public_key.key_id,
            "enrolled_at": self.enrolled_at,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
        }


@dataclass(frozen=True, slots=True)
class Latest:
    """The last value of one tag of a unit (``value`` already decoded from JSON)."""

    tag: str
    value: Any
    quality: str
    time: str
    seq: int


@dataclass(frozen=True, slots=True)
class Alarm:
    """A tamper alarm: first ``time``, ``count`` occurrences, the last at ``last_time``."""

    unit: str
    time: str
    error: str
    reason: str
    seq: int | None
    count: int
    last_time: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "unit": self.unit,
            "time": self.time,
            "error": self.error,
            "reason": self.reason,
            "seq": self.seq,
            "count": self.count,
            "last_time": self.last_time,
        }


@dataclass(frozen=True, slots=True)
class NewAlarm:
    """A tamper alarm to record: ``key`` identifies repeats of the same refusal, ``reason`` is
    already cleaned (``controlsite.alarms.clean_text``)."""

    unit: str
    time: str
    error: str
    reason: str
    seq: int | None
    key: str


@dataclass(frozen=True, slots=True)
class Token:
    """A query-API token as stored: never its secret, only the secret's hash elsewhere."""

    id: str
    user: str
    created: str
    expires: str | None
    revoked: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (no secret: the store has none)."""
        return {
            "id": self.id,
            "user": self.user,
            "created": self.created,
            "expires": self.expires,
            "revoked": self.revoked,
        }


class Store(Protocol):
    """What the control site needs of its database (see the module docstring)."""

    url: str

    def close(self) -> None:
        """Release the connections; safe to call twice."""
        ...

    def enroll(self, unit: str, key: PublicKey, when: str) -> Unit:
        """Add a unit (idempotent for the same key; ``EnrolmentError`` for another key)."""
        ...

    def unit(self, unit: str) -> Unit | None:
        """One unit, or None if not enrolled."""
        ...

    def units(self) -> list[Unit]:
        """Every enrolled unit, by id."""
        ...

    def stored_hashes(self, unit: str, first: int, last: int) -> dict[int, bytes]:
        """{seq: hash} of the stored records of ``unit`` with first <= seq <= last."""
        ...

    def append(
        self, unit: str, head_seq: int, records: Sequence[Record], latest: Sequence[Latest]
    ) -> None:
        """Store ``records`` (contiguous, verified) after head ``head_seq`` and update the latest
        values, in one transaction; ``HeadConflict`` when the head is no longer ``head_seq``."""
        ...

    def records(
        self,
        unit: str,
        *,
        after: int = 0,
        limit: int = 100,
        run: str | None = None,
        kind: str | None = None,
    ) -> list[Record]:
        """Stored records of ``unit`` after seq ``after``, in seq order, optionally filtered."""
        ...

    def latest(self, unit: str) -> list[Latest]:
        """The last value of every tag of ``unit``, by tag."""
        ...

    def add_alarm(
        self, alarm: NewAlarm, overflow: NewAlarm, *, window_start: str, limit: int
    ) -> None:
        """Record a tamper alarm of an enrolled unit, atomically across processes: a repeat
        (same unit and key) bumps that row's count; once ``limit`` alarms of the unit were
        first seen since ``window_start``, a new one adds or bumps ``overflow`` instead."""
        ...

    def alarms(self, unit: str, limit: int = 100) -> list[Alarm]:
        """The unit's tamper alarms, the most recently seen first."""
        ...

    def add_token(self, token: Token, digest: str) -> None:
        """Store a new token under the SHA-256 hex ``digest`` of its secret."""
        ...

    def token_by_digest(self, digest: str) -> Token | None:
        """The token whose secret hashes to ``digest``, or None."""
        ...

    def tokens(self) -> list[Token]:
        """Every token (revoked and expired ones too), oldest first."""
        ...

    def revoke_token(self, token_id: str, when: str) -> Token | None:
        """Mark a token revoked at ``when`` (kept if already revoked); None if unknown."""
        ...


def check_unit_id(unit: str) -> str:
    """``unit`` if it is a valid unit id (letters, digits, ``._:-``, up to 64 characters)."""
    if not isinstance(unit, str) or not UNIT_ID_RE.match(unit):
        raise EnrolmentError(
            f"unit id {unit!r} is not valid: 1-64 letters, digits or ._:- starting with a "
            "letter or digit"
        )
    return unit


def is_postgres_url(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database."""
    return url.startswith(("postgresql://", "postgres://"))


def open_store(url: str) -> Store:
    """The store at ``url`` (PostgreSQL URL or SQLite path), schema created if missing."""
    if is_postgres_url(url):
        from controlsite.store.postgres import PostgresStore

        return PostgresStore(url)
    from controlsite.store.sqlite import SqliteStore

    return SqliteStore(url.removeprefix("sqlite://") if url.startswith("sqlite://") else url)
