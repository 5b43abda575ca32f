"""The SQL both stores share; subclasses supply connections, transactions and the DDL.

Statements are written with ``?`` placeholders and rewritten to ``%s`` for psycopg. A subclass
provides ``_tx()`` (a cursor inside one transaction, committed on success, rolled back on an
exception) and ``_errors`` (its database library's base exception), and may override
``_is_integrity_error`` and ``_lock_unit`` (where transactions do not already exclude each
other, a statement that locks a unit's row).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from agent.record.format import ZERO_HASH, Record, canonical
from agent.record.keys import PublicKey
from controlsite.store.base import (
    Alarm,
    EnrolmentError,
    HeadConflict,
    Latest,
    NewAlarm,
    StoreError,
    Token,
    Unit,
    check_unit_id,
)

_UNIT_COLUMNS = "id, public_key, enrolled_at, head_seq, head_hash"
_INSERT_RECORD = (
    "INSERT INTO records (unit, seq, time, kind, run, hash, data) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_LATEST = (
    "INSERT INTO latest (unit, tag, value, quality, time, seq) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (unit, tag) DO UPDATE SET value = excluded.value, "
    "quality = excluded.quality, time = excluded.time, seq = excluded.seq"
)
_UPSERT_ALARM = (
    "INSERT INTO alarms (unit, time, error, reason, seq, count, last_time, akey) "
    "VALUES (?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT (unit, akey) DO UPDATE SET "
    "count = alarms.count + 1, last_time = excluded.last_time"
)
_TOKEN_COLUMNS = "id, username, created, expires, revoked"


class SqlStore:
    """Shared implementation of ``controlsite.store.base.Store``."""

    url: str
    placeholder = "?"
    _errors: tuple[type[Exception], ...] = ()
    _lock_unit: str | None = None  # a statement locking a unit's row for the transaction

    def _tx(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _is_integrity_error(self, exc: Exception) -> bool:
        return False

    def _q(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    @contextmanager
    def _run(self, what: str, unit: str | None = None) -> Iterator[Any]:
        """A cursor in a transaction; database errors become ``StoreError`` naming ``what``."""
        try:
            with self._tx() as cur:
                yield cur
        except self._errors as exc:
            if self._is_integrity_error(exc) and what == "append":
                raise HeadConflict(f"records of unit {unit!r} were stored concurrently") from exc
            where = f" for unit {unit!r}" if unit else ""
            raise StoreError(f"cannot {what}{where} in {self.url}: {exc}") from exc

    # --- units -------------------------------------------------------------------------------

    @staticmethod
    def _unit(row: Sequence[Any]) -> Unit:
        return Unit(row[0], PublicKey.parse(row[1]), row[2], int(row[3]), row[4])

    def enroll(self, unit: str, key: PublicKey, when: str) -> Unit:
        check_unit_id(unit)
        with self._run("enroll", unit) as cur:
            cur.execute(
                self._q(
                    "INSERT INTO units (id, public_key, enrolled_at, head_seq, head_hash) "
                    "VALUES (?, ?, ?, 0, ?) ON CONFLICT (id) DO NOTHING"
                ),
                (unit, key.b64, when, ZERO_HASH),
            )
            cur.execute(self._q(f"SELECT {_UNIT_COLUMNS} FROM units WHERE id = ?"), (unit,))
            found = self._unit(cur.fetchone())
        if found.public_key != key:
            raise EnrolmentError(
                f"unit {unit!r} is enrolled with key {found.public_key.key_id}, not "
                f"{key.key_id}; a unit keeps its key (enrol a new unit id for a new key)"
            )
        return found

    def unit(self, unit: str) -> Unit | None:
        with self._run("read the unit", unit) as cur:
            cur.execute(self._q(f"SELECT {_UNIT_COLUMNS} FROM units WHERE id = ?"), (unit,))
            row = cur.fetchone()
        return None if row is None else self._unit(row)

    def units(self) -> list[Unit]:
        with self._run("list units") as cur:
            cur.execute(f"SELECT {_UNIT_COLUMNS} FROM units ORDER BY id")
            return [self._unit(row) for row in cur.fetchall()]

    # --- records -----------------------------------------------------------------------------

    def stored_hashes(self, unit: str, first: int, last: int) -> dict[int, bytes]:
        if last < first:
            return {}
        with self._run("read record hashes", unit) as cur:
            cur.execute(
                self._q("SELECT seq, hash FROM records WHERE unit = ? AND seq >= ? AND seq <= ?"),
                (unit, first, last),
            )
            return {int(seq): bytes(h) for seq, h in cur.fetchall()}

    def append(
        self, unit: str, head_seq: int, records: Sequence[Record], latest: Sequence[Latest]
    ) -> None:
        if not records:
            return
        last = records[-1]
        with self._run("append", unit) as cur:
            # the conditional update takes the unit's row lock first: a concurrent ingest of
            # the same unit waits here, then finds head_seq moved and matches nothing
            cur.execute(
                self._q(
                    "UPDATE units SET head_seq = ?, head_hash = ? WHERE id = ? AND head_seq = ?"
                ),
                (last.seq, last.hash_hex, unit, head_seq),
            )
            if cur.rowcount != 1:
                raise HeadConflict(
                    f"the head of unit {unit!r} moved past {head_seq} while records "
                    f"{records[0].seq}-{last.seq} were verified"
                )
            cur.executemany(
                self._q(_INSERT_RECORD),
                [(unit, r.seq, r.time, r.kind.value, r.run, r.hash, r.data) for r in records],
            )
            if latest:
                rows = [
                    (unit, v.tag, canonical(v.value).decode(), v.quality, v.time, v.seq)
                    for v in latest
                ]
                cur.executemany(self._q(_UPSERT_LATEST), rows)

    def records(
        self,
        unit: str,
        *,
        after: int = 0,
        limit: int = 100,
        run: str | None = None,
        kind: str | None = None,
    ) -> list[Record]:
        sql = "SELECT data FROM records WHERE unit = ? AND seq > ?"
        params: list[Any] = [unit, after]
        if run is not None:
            sql += " AND run = ?"
            params.append(run)
        if kind is not None:
            sql += " AND kind = ?"
            params.append(kind)
        sql += " ORDER BY seq LIMIT ?"
        params.append(limit)
        with self._run("read records", unit) as cur:
            cur.execute(self._q(sql), params)
            rows = cur.fetchall()
        return [Record.parse(bytes(data), strict=False) for (data,) in rows]

    def latest(self, unit: str) -> list[Latest]:
        with self._run("read latest values", unit) as cur:
            cur.execute(
                self._q(
                    "SELECT tag, value, quality, time, seq FROM latest WHERE unit = ? ORDER BY tag"
                ),
                (unit,),
            )
            rows = cur.fetchall()
        return [Latest(tag, json.loads(value), q, t, int(seq)) for tag, value, q, t, seq in rows]

    # --- alarms ------------------------------------------------------------------------------

    def add_alarm(
        self, alarm: NewAlarm, overflow: NewAlarm, *, window_start: str, limit: int
    ) -> None:
        with self._run("record a tamper alarm", alarm.unit) as cur:
            if self._lock_unit is not None:
                # one alarm writer per unit at a time, in every process: the window count
                # below and the insert after it cannot interleave with another's
                cur.execute(self._q(self._lock_unit), (alarm.unit,))
            cur.execute(
                self._q(
                    "UPDATE alarms SET count = count + 1, last_time = ? WHERE unit = ? AND akey = ?"
                ),
                (alarm.time, alarm.unit, alarm.key),
            )
            if cur.rowcount == 1:
                return
            cur.execute(
                self._q("SELECT count(*) FROM alarms WHERE unit = ? AND time >= ? AND akey <> ?"),
                (alarm.unit, window_start, overflow.key),
            )
            (seen,) = cur.fetchone()
            new = alarm if int(seen) < limit else overflow
            cur.execute(
                self._q(_UPSERT_ALARM),
                (new.unit, new.time, new.error, new.reason, new.seq, new.time, new.key),
            )

    def alarms(self, unit: str, limit: int = 100) -> list[Alarm]:
        with self._run("read tamper alarms", unit) as cur:
            cur.execute(
                self._q(
                    "SELECT unit, time, error, reason, seq, count, last_time FROM alarms "
                    "WHERE unit = ? ORDER BY last_time DESC, id DESC LIMIT ?"
                ),
                (unit, limit),
            )
            return [Alarm(u, t, e, r, s, int(c), lt) for u, t, e, r, s, c, lt in cur.fetchall()]

    # --- tokens ------------------------------------------------------------------------------

    @staticmethod
    def _token(row: Sequence[Any]) -> Token:
        return Token(row[0], row[1], row[2], row[3], row[4])

    def add_token(self, token: Token, digest: str) -> None:
        with self._run("add a token") as cur:
            cur.execute(
                self._q(
                    "INSERT INTO tokens (id, username, hash, created, expires, revoked) "
                    "VALUES (?, ?, ?, ?, ?, ?)"
                ),
                (token.id, token.user, digest, token.created, token.expires, token.revoked),
            )

    def token_by_digest(self, digest: str) -> Token | None:
        with self._run("look up a token") as cur:
            cur.execute(self._q(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE hash = ?"), (digest,))
            row = cur.fetchone()
        return None if row is None else self._token(row)

    def tokens(self) -> list[Token]:
        with self._run("list tokens") as cur:
            cur.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY created, id")
            return [self._token(row) for row in cur.fetchall()]

    def revoke_token(self, token_id: str, when: str) -> Token | None:
        with self._run("revoke a token") as cur:
            cur.execute(
                self._q("UPDATE tokens SET revoked = ? WHERE id = ? AND revoked IS NULL"),
                (when, token_id),
            )
            cur.execute(self._q(f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = ?"), (token_id,))
            row = cur.fetchone()
        return None if row is None else self._token(row)
