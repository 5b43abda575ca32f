"""The control site's HTTP API on loopback (uvicorn in-process), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from agent.record.format import format_time
from agent.record.keys import UnitKey
from agent.record.verify import ChainVerifier, verify_records
from agent.uplink import INGEST_PATH, build_request
from controlsite.enroll import enroll_unit
from controlsite.service import ControlSiteServer
from controlsite.store.base import ControlSiteError, Store, open_store
from controlsite.tokens import init_state, issue, load_api_token
from tests.conftest import free_port
from tests.test_ingest import T0, Chain, key, store_url  # noqa: F401  (fixtures)

NOW = datetime.now(UTC)


def token_for(store: Store) -> str:
    """A new query token of ``store`` (its secret)."""
    return issue(store, "qa", now=NOW).secret


@pytest.fixture
async def site(store_url: str, key: UnitKey) -> AsyncIterator[tuple[str, str]]:  # noqa: F811
    """A control site with unit ``u1`` enrolled; yields its base URL and a query token."""
    store = open_store(store_url)
    enroll_unit(store, "u1", key.public_key.b64)
    token = token_for(store)
    try:
        async with ControlSiteServer(store, port=free_port()) as server:
            yield server.url, token
    finally:
        store.close()


async def post(
    client: httpx.AsyncClient, url: str, chain: Chain, records: list | None = None
) -> httpx.Response:
    data = [r.data for r in (chain.records if records is None else records)]
    body, headers = build_request(data, unit=chain.unit, key=chain.key, time=format_time(T0))
    return await client.post(url + INGEST_PATH, content=body, headers=headers)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_ingest_and_queries_over_http(site: tuple[str, str], key: UnitKey) -> None:  # noqa: F811
    """A posted batch is acknowledged and the units, records, latest and alarms views show it."""
    site, token = site
    chain = Chain("u1", key).samples({"temp": 37.2}).events(6)
    async with httpx.AsyncClient(headers=auth(token)) as client:
        response = await post(client, site, chain)
        assert response.status_code == 200
        assert response.json()["ack"] == len(chain.records) == 8
        units = (await client.get(f"{site}/api/v1/units")).json()["units"]
        assert [(u["id"], u["head_seq"], u["key_id"]) for u in units] == [("u1", 8, key.key_id)]
        page = (await client.get(f"{site}/api/v1/units/u1/records?after=2&limit=3")).json()
        assert [r["seq"] for r in page["records"]] == [3, 4, 5] and page["next_after"] == 5
        assert page["records"][0]["hash"] == chain.records[2].hash_hex
        kinds = await client.get(f"{site}/api/v1/units/u1/records?kind=checkpoint&run=R-1")
        assert [r["seq"] for r in kinds.json()["records"]] == [6]
        latest = (await client.get(f"{site}/api/v1/units/u1/latest")).json()["tags"]
        assert latest["temp"]["value"] == 37.2 and latest["temp"]["quality"] == "good"
        assert (await client.get(f"{site}/api/v1/units/u1/alarms")).json()["alarms"] == []
        missing = await client.get(f"{site}/api/v1/units/nobody/records")
        assert missing.status_code == 404


async def test_queries_need_the_api_token(site: tuple[str, str]) -> None:
    """Queries without the bearer token, or with a wrong one, answer 401."""
    site, _ = site
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{site}/api/v1/units")).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await client.get(f"{site}/api/v1/units", headers=wrong)).status_code == 401


async def test_refusal_is_json_naming_the_record(site: tuple[str, str], key: UnitKey) -> None:  # noqa: F811
    """A broken batch answers 422 with a JSON reason naming the record, and is alarmed."""
    site, token = site
    chain = Chain("u1", key, every=0).events(6)
    async with httpx.AsyncClient(headers=auth(token)) as client:
        response = await post(client, site, chain, chain.records[:2] + chain.records[3:])
        assert response.status_code == 422
        answer = response.json()
        assert (answer["error"], answer["seq"], answer["retry"]) == ("chain_broken", 3, False)
        assert "record 3" in answer["reason"]
        alarms = (await client.get(f"{site}/api/v1/units/u1/alarms")).json()["alarms"]
        assert [a["seq"] for a in alarms] == [3]


async def test_malformed_requests_are_refused(site: tuple[str, str], key: UnitKey) -> None:  # noqa: F811
    """Missing headers answer 400; a body that is not deflate answers 400; no record is stored."""
    site, token = site
    async with httpx.AsyncClient(headers=auth(token)) as client:
        bare = await client.post(site + INGEST_PATH, content=b"x")
        assert bare.status_code == 400 and "bedside-unit" in bare.json()["reason"]
        chain = Chain("u1", key).events(2)
        body, headers = build_request(
            [r.data for r in chain.records], unit="u1", key=key, time=format_time(T0)
        )
        headers["Content-Encoding"] = "br"
        odd = await client.post(site + INGEST_PATH, content=body, headers=headers)
        assert odd.status_code == 400
        units = (await client.get(f"{site}/api/v1/units")).json()["units"]
        assert units[0]["head_seq"] == 0


async def test_concurrent_ingests_on_postgres_keep_order(pg_url: str, key: UnitKey) -> None:  # noqa: F811
    """Many overlapping posts through two app instances on one PostgreSQL store one valid chain."""
    chain = Chain("u1", key, every=7).events(150)
    total = len(chain.records)
    stores = [open_store(pg_url), open_store(pg_url)]
    enroll_unit(stores[0], "u1", key.public_key.b64)
    rng = random.Random(5)
    conflicts = 0

    async def worker(client: httpx.AsyncClient, urls: list[str]) -> None:
        nonlocal conflicts
        acked = 0
        while acked < total:
            start = max(0, acked - rng.randrange(3))  # sometimes resend a little
            batch = chain.records[start : start + rng.randrange(1, 25)]
            response = await post(client, rng.choice(urls), chain, batch)
            if response.status_code == 409:
                assert response.json()["retry"] is True
                conflicts += 1
                continue
            assert response.status_code == 200, response.text
            acked = max(acked, response.json()["ack"])

    try:
        async with (
            ControlSiteServer(stores[0], port=free_port()) as one,
            ControlSiteServer(stores[1], port=free_port()) as two,
            httpx.AsyncClient(timeout=30) as client,
            asyncio.TaskGroup() as tg,
        ):
            for _ in range(8):
                tg.create_task(worker(client, [one.url, two.url]))
        back = stores[0].records("u1", limit=1000)
        assert [r.seq for r in back] == list(range(1, total + 1))
        report = verify_records(
            (r.data for r in back),
            ChainVerifier(unit="u1", keys={key.key_id: key.public_key}),
            allow_unsealed=True,  # a live stream: its newest records follow the last checkpoint
        )
        assert report.ok and report.head_hash == chain.head[1] and report.checkpoints > 0
        assert stores[0].alarms("u1") == []
    finally:
        for s in stores:
            s.close()


def test_init_writes_a_private_admin_token(tmp_path: Path, store_url: str) -> None:  # noqa: F811
    """init_state issues an admin token into a 0600 file of a 0700 folder; it authenticates;
    a second init needs force, which revokes the old token; a readable file is refused."""
    from controlsite.tokens import authenticate

    store = open_store(store_url)
    try:
        token = init_state(tmp_path / "cs", store, now=NOW)
        path = tmp_path / "cs" / "api-token"
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert os.stat(tmp_path / "cs").st_mode & 0o777 == 0o700
        secret = load_api_token(tmp_path / "cs")
        assert len(secret) >= 40 and token.user == "admin"
        assert authenticate(store, secret, NOW) == token
        with pytest.raises(ControlSiteError, match="already exists"):
            init_state(tmp_path / "cs", store, now=NOW)
        renewed = init_state(tmp_path / "cs", store, now=NOW, force=True)
        assert authenticate(store, secret, NOW) is None  # the replaced token is revoked
        assert authenticate(store, load_api_token(tmp_path / "cs"), NOW) == renewed
        os.chmod(path, 0o644)
        with pytest.raises(ControlSiteError, match="chmod 600"):
            load_api_token(tmp_path / "cs")
        exposed = path.read_text().strip()
        init_state(tmp_path / "cs", store, now=NOW, force=True)  # replacing an exposed file
        assert authenticate(store, exposed, NOW) is None
        assert os.stat(path).st_mode & 0o777 == 0o600
    finally:
        store.close()
