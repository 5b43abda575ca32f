"""The control site lets no stranger write (issue 8), on SQLite and PostgreSQL.

Requests go through the real Starlette app (httpx ASGITransport) over real stores: a stranger's
request leaves every table as it was; only a unit that proves its key raises a tamper alarm,
de-duplicated and bounded in the database, with its text cleaned; every GET needs a live token.
"""

# ruff: noqa: F811  (fixtures imported from tests.test_ingest are parameters here)
from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
import structlog.testing
from starlette.routing import Route

from agent.record.format import Record, checkpoint_body, format_time
from agent.record.keys import UnitKey
from agent.uplink import INGEST_PATH, build_request
from controlsite.alarms import AlarmPolicy, clean_text
from controlsite.app import create_app
from controlsite.enroll import enroll_unit
from controlsite.ingest import Ingestor
from controlsite.store.base import Store, is_postgres_url, open_store
from controlsite.tokens import issue, revoke
from tests.test_ingest import T0, Chain, key, rebuilt, refusal, request, store, store_url  # noqa: F401

HOSTILE = "<script>alert(1)</script>\x1b[2J\x1b[31mPWNED\x00\u202e\r\n" + "A" * 2**20


def row_counts(url: str) -> dict[str, int]:
    """Rows in every table of the control-site database at ``url``."""
    if is_postgres_url(url):
        with psycopg.connect(url) as conn:
            names = [
                r[0]
                for r in conn.execute(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = current_schema()"
                )
            ]
            return {n: conn.execute(f"SELECT count(*) FROM {n}").fetchone()[0] for n in names}
    conn = sqlite3.connect(url)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {n: conn.execute(f"SELECT count(*) FROM {n}").fetchone()[0] for n in names}
    finally:
        conn.close()


@pytest.fixture
async def client(store: Store, key: UnitKey) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app over ``store`` with ``u1`` enrolled (before counting starts)."""
    enroll_unit(store, "u1", key.public_key.b64, when=T0)
    app = create_app(store, now=lambda: T0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://cs") as c:
        yield c


def signed(records: list[Record], unit: str, signer: UnitKey) -> tuple[bytes, dict[str, str]]:
    return build_request([r.data for r in records], unit=unit, key=signer, time=format_time(T0))


STRANGER = UnitKey.from_seed(b"\x21" * 32)


def attacks(key: UnitKey) -> dict[str, tuple[bytes, dict[str, str]]]:
    """Requests of someone without u1's key, by name."""
    bad = Chain("u1", key, every=0).events(4).records
    del bad[1]  # a broken chain: an alarm, if the sender had proved the key
    body, h = signed(bad, "u1", key)
    return {
        "no headers": (body, {"Content-Encoding": "deflate"}),
        "unknown unit": signed(Chain("intruder", STRANGER).events(3).records, "intruder", STRANGER),
        "markup unit id": (body, {**h, "Bedside-Unit": "<script>x</script>"}),
        "huge unit id": (body, {**h, "Bedside-Unit": "u" * 4000}),
        "wrong key": signed(bad, "u1", STRANGER),
        "signature not base64": (body, {**h, "Bedside-Signature": "%%%\x1b[31m"}),
        "bad time": (body, {**h, "Bedside-Time": "yesterday\x00"}),
        "body changed after signing": (body + b"x", h),
        "nonce changed": (body, {**h, "Bedside-Nonce": "0" * 32}),
        "declared too large": (body, {**h, "Content-Length": str(2**30)}),
    }


async def test_strangers_create_no_rows_in_any_table(
    client: httpx.AsyncClient,
    store_url: str,
    key: UnitKey,
) -> None:
    """Unauthenticated or unenrolled ingest requests are refused and leave every table as it
    was: no alarm, unit, record, latest or token row."""
    before = row_counts(store_url)
    assert {"units", "records", "latest", "alarms", "tokens"} <= set(before)
    for name, (body, headers) in attacks(key).items():
        response = await client.post(INGEST_PATH, content=body, headers=headers)
        assert response.status_code in (400, 401, 413), (name, response.text)
        assert row_counts(store_url) == before, name


async def test_only_a_proven_key_raises_an_alarm(
    client: httpx.AsyncClient, store: Store, key: UnitKey
) -> None:
    """The same broken batch raises no alarm signed by a stranger, and one when signed by u1."""
    bad = Chain("u1", key, every=0).events(4).records
    del bad[1]
    body, headers = signed(bad, "u1", STRANGER)
    assert (await client.post(INGEST_PATH, content=body, headers=headers)).status_code == 401
    assert store.alarms("u1") == []
    body, headers = signed(bad, "u1", key)
    assert (await client.post(INGEST_PATH, content=body, headers=headers)).status_code == 422
    [alarm] = store.alarms("u1")
    assert (alarm.error, alarm.seq, alarm.count) == ("chain_broken", 2, 1)


async def test_two_instances_retrying_bad_batches_share_alarm_rows(
    pg_url: str, key: UnitKey
) -> None:
    """Two app instances on one PostgreSQL, retrying two bad batches in turn and concurrently,
    keep one alarm row per batch with the count of all attempts."""
    stores = [open_store(pg_url), open_store(pg_url)]
    enroll_unit(stores[0], "u1", key.public_key.b64, when=T0)
    chain = Chain("u1", key, every=0).events(8).records
    missing = [r for r in chain if r.seq != 3]
    changed = [rebuilt(r, body={"n": -1}) if r.seq == 5 else r for r in chain]
    try:
        apps = [create_app(s, now=lambda: T0) for s in stores]
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(a), base_url="http://cs") for a in apps
        ]

        async def attempt(n: int) -> int:
            body, headers = signed(missing if n % 2 else changed, "u1", key)
            response = await clients[n % 4 // 2].post(INGEST_PATH, content=body, headers=headers)
            return response.status_code

        codes = await asyncio.gather(*(attempt(n) for n in range(24)))
        assert set(codes) == {422}
        alarms = stores[0].alarms("u1")
        assert sorted((a.seq, a.count) for a in alarms) == [(3, 12), (5, 12)]
        for c in clients:
            await c.aclose()
    finally:
        for s in stores:
            s.close()


def test_a_flood_of_different_bad_batches_is_bounded(store: Store, key: UnitKey) -> None:
    """Past ``limit`` distinct alarms in a window, one overflow row counts the rest; the next
    window allows ``limit`` again; a repeat of an old alarm only bumps its count."""
    enroll_unit(store, "u1", key.public_key.b64, when=T0)
    clock = [T0]
    site = Ingestor(store, now=lambda: clock[0], alarms=AlarmPolicy(limit=5, window=3600))
    chain = Chain("u1", key, every=0).events(6).records

    def forged(n: int) -> list[Record]:  # a different change each time: a different reason
        return [rebuilt(r, body={"n": n}) if r.seq == 2 else r for r in chain]

    for n in range(30):
        refusal(site, request(forged(n), "u1", key))
    alarms = store.alarms("u1", limit=1000)
    assert len(alarms) == 6
    [overflow] = [a for a in alarms if a.error == "overflow"]
    assert overflow.count == 25 and "more than 5" in overflow.reason
    assert sum(a.count for a in alarms) == 30
    clock[0] = T0 + timedelta(hours=1, minutes=1)
    for n in range(100, 103):
        refusal(site, request(forged(n), "u1", key))
    refusal(site, request(forged(0), "u1", key))  # seen in the first window: a repeat
    alarms = store.alarms("u1", limit=1000)
    assert sorted(a.count for a in alarms) == [1, 1, 1, 1, 1, 1, 1, 2, 25]


def hostile_checkpoint(chain: Chain, key_text: str) -> Chain:
    """``chain`` plus a checkpoint signed by the unit but naming the key ``key_text``."""
    seq, prev = chain.head
    time = format_time(T0 + timedelta(seconds=seq + 1))
    body = checkpoint_body(chain.key, unit=chain.unit, seq=seq, head=prev, time=time, reason="x")
    body["key"] = key_text
    record = Record.build(
        unit=chain.unit, seq=seq + 1, time=time, kind="checkpoint", run="R-1", body=body, prev=prev
    )
    chain.records.append(record)
    return chain


def assert_inert(text: str) -> None:
    """``text`` is bounded and holds no control character, NUL, bidi override or markup."""
    assert len(text) <= 500
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c == "\u202e" for c in text)
    assert "<" not in text and ">" not in text


@pytest.mark.parametrize("where", ["checkpoint key", "record unit"])
async def test_hostile_record_text_is_stored_cleaned(
    client: httpx.AsyncClient,
    store: Store,
    key: UnitKey,
    where: str,
) -> None:
    """A record (signed by the enrolled unit) whose fields hold <script>, ANSI escapes, NUL, a
    bidi override and 1 MB is refused with a reason that is bounded and inert, in the answer,
    the stored alarm and the log."""
    chain = Chain("u1", key, every=0).events(2)
    if where == "checkpoint key":
        hostile_checkpoint(chain, HOSTILE)
    else:
        chain.records.append(rebuilt(Chain(HOSTILE, key).events(3).records[2], prev=chain.head[1]))
    body, headers = signed(chain.records, "u1", key)
    with structlog.testing.capture_logs() as logs:
        response = await client.post(INGEST_PATH, content=body, headers=headers)
    assert response.status_code == 422
    answer = response.json()["reason"]
    assert_inert(answer)
    assert "&lt;script&gt;" in answer and "x1b" in answer
    [alarm] = store.alarms("u1")
    assert_inert(alarm.reason)
    assert "more characters]" in alarm.reason
    for event in logs:
        assert_inert(str(event.get("reason", "")))


def test_clean_text_escapes_and_bounds() -> None:
    """clean_text writes control, format and separator characters as escapes, markup as
    entities, keeps ordinary text and spaces, and cuts long text saying how much."""
    assert clean_text("record 4: unit 'u1' was changed") == "record 4: unit 'u1' was changed"
    assert clean_text("a\x00b\x1b[31mc\u202ed\u00a0e<f>&") == (
        "a\\x00b\\x1b[31mc\\u202ed\\xa0e&lt;f&gt;&amp;"
    )
    assert clean_text("x" * 1000, 10) == "x" * 10 + " ...[990 more characters]"


async def test_every_get_route_needs_a_live_token(store: Store) -> None:
    """Every GET route of the app answers 401 without a token, with a wrong one, another scheme,
    an expired one and a revoked one; a live token gets through."""
    clock = [T0]
    app = create_app(store, now=lambda: clock[0])
    enroll_unit(store, "u1", UnitKey.from_seed(b"\x22" * 32).public_key.b64, when=T0)
    live = issue(store, "qa", now=T0).secret
    expiring = issue(store, "temp", now=T0, expires_days=1).secret
    revoked = issue(store, "gone", now=T0)
    revoke(store, revoked.token.id, T0)
    routes = [r for r in app.routes if isinstance(r, Route) and "GET" in (r.methods or ())]
    paths = sorted(r.path.replace("{unit}", "u1") for r in routes)
    assert len(paths) >= 4 and "/api/v1/units" in paths
    refused = {
        "none": {},
        "empty": {"Authorization": "Bearer "},
        "wrong": {"Authorization": "Bearer bst_" + "x" * 43},
        "not ours": {"Authorization": "Bearer test-token"},
        "basic": {"Authorization": f"Basic {live}"},
        "huge": {"Authorization": "Bearer bst_" + "x" * 10_000},
        "revoked": {"Authorization": f"Bearer {revoked.secret}"},
    }
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cs") as c:
        for path in paths:
            for name, headers in refused.items():
                response = await c.get(path, headers=headers)
                assert response.status_code == 401, (path, name)
                assert response.json()["error"] == "unauthorized"
            assert (await c.get(path, headers={"Authorization": f"Bearer {live}"})).is_success
            assert (await c.get(path, headers={"Authorization": f"Bearer {expiring}"})).is_success
        clock[0] = T0 + timedelta(days=1, seconds=1)
        for path in paths:
            response = await c.get(path, headers={"Authorization": f"Bearer {expiring}"})
            assert response.status_code == 401, (path, "expired")


def test_tokens_are_stored_only_as_hashes(store: Store, store_url: str) -> None:
    """The store keeps the SHA-256 of a token, never the secret (not in any row, not in the
    SQLite file or its WAL)."""
    issued = issue(store, "qa", now=datetime.now(UTC))
    if is_postgres_url(store_url):
        with psycopg.connect(store_url) as conn:
            rows = conn.execute("SELECT * FROM tokens").fetchall()
    else:
        conn2 = sqlite3.connect(store_url)
        rows = conn2.execute("SELECT * FROM tokens").fetchall()
        conn2.close()
        for path in Path(store_url).parent.glob(Path(store_url).name + "*"):
            assert issued.secret.encode() not in path.read_bytes()
    assert issued.secret not in repr(rows) + repr(store.tokens())
    assert hashlib.sha256(issued.secret.encode()).hexdigest() in repr(rows)


def test_sqlite_database_and_its_wal_are_private(tmp_path: Path) -> None:
    """A new control-site database and its -wal and -shm files are 0600; an existing database
    others can read is tightened to 0600 with a warning."""
    path = tmp_path / "sites" / "cs.db"
    old_umask = os.umask(0o022)
    try:
        s = open_store(str(path))
        enroll_unit(s, "u1", UnitKey.from_seed(b"\x23" * 32).public_key.b64, when=T0)
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        assert [os.stat(f).st_mode & 0o777 for f in files] == [0o600] * 3
        s.close()
        os.chmod(path, 0o644)
        with structlog.testing.capture_logs() as logs:
            open_store(str(path)).close()
    finally:
        os.umask(old_umask)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert any(e["event"] == "control_site_db_tightened" for e in logs)


OLD_ALARMS = {
    "sqlite": "CREATE TABLE alarms (id INTEGER PRIMARY KEY, unit TEXT NOT NULL, "
    "time TEXT NOT NULL, reason TEXT NOT NULL, seq INTEGER, count INTEGER NOT NULL, "
    "last_time TEXT NOT NULL)",
    "postgres": "CREATE TABLE alarms (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
    "unit TEXT NOT NULL, time TEXT NOT NULL, reason TEXT NOT NULL, seq BIGINT, "
    "count INTEGER NOT NULL, last_time TEXT NOT NULL)",
}


def test_alarms_of_an_older_database_are_migrated(store_url: str, key: UnitKey) -> None:
    """A database whose alarms table predates alarm keys opens: its alarms are kept and new
    ones are de-duplicated."""
    insert = "INSERT INTO alarms (unit, time, reason, seq, count, last_time) VALUES "
    row = f"('u1', '{format_time(T0)}', 'old', 3, 2, '{format_time(T0)}')"
    if is_postgres_url(store_url):
        with psycopg.connect(store_url) as conn:
            conn.execute(OLD_ALARMS["postgres"])
            conn.execute(insert + row)
    else:
        conn2 = sqlite3.connect(store_url)
        conn2.execute(OLD_ALARMS["sqlite"])
        conn2.execute(insert + row)
        conn2.commit()
        conn2.close()
    s = open_store(store_url)
    try:
        enroll_unit(s, "u1", key.public_key.b64, when=T0)
        site = Ingestor(s, now=lambda: T0 + timedelta(minutes=1))
        records = Chain("u1", key, every=0).events(4).records
        del records[1]
        for _ in range(2):
            refusal(site, request(records, "u1", key))
        assert [(a.reason, a.count) for a in s.alarms("u1")][1] == ("old", 2)
        assert s.alarms("u1")[0].count == 2 and len(s.alarms("u1")) == 2
    finally:
        s.close()


async def test_stranger_is_refused_before_its_body_is_read(store: Store) -> None:
    """A request naming a unit that is not enrolled is refused 401 before its body is read: a
    streamed body far over the size limit is not buffered (it would answer 413)."""
    app = create_app(store, now=lambda: T0, max_body_bytes=1000)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(50):
            yield b"x" * 1000

    headers = {"Bedside-Unit": "intruder", "Bedside-Time": format_time(T0),
               "Bedside-Nonce": "0" * 32, "Bedside-Signature": "AAAA",
               "Content-Encoding": "deflate"}  # fmt: skip
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cs") as c:
        response = await c.post(INGEST_PATH, content=chunks(), headers=headers)
    assert (response.status_code, response.json()["error"]) == (401, "unknown_unit")
