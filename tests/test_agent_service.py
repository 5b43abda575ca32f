"""The agent service as a user runs it, and its disk duties.

System tests: the simulated unit (real OPC UA, Modbus TCP/RTU and MT-SICS servers) in this
process at accelerated time, a control site on loopback, and ``bedside keys init``,
``control-site enroll``, ``agent run``, ``status`` and ``verify`` as subprocesses. The agent is
killed with SIGKILL mid-stream and restarted: the journal and the control site must still agree
record for record. In-process tests check the low-disk alarm, retention and the local API's
socket with a ``ManualClock`` and a unit without devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import default_config_path, parse_config
from agent.journal.journal import Journal
from agent.record.format import JournalStorageError, Kind
from agent.record.keys import init_unit_key
from agent.runtime.service import AgentService, AgentSettings
from controlsite.service import ControlSiteServer
from controlsite.store.base import open_store
from drivers.clock import ManualClock, ScaledClock
from simulators.unit import SimEndpoints, SimulatedUnit
from tests.conftest import free_port

UNIT = "unit-sim-01"  # the id in agent/data/unit-sim.yaml
EMPTY_UNIT = "unit: {id: unit-t}\ndevices: {}\n"


async def bedside(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``bedside ARGS`` (without blocking the loop the simulators run on)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "--log-format", "json", *args,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def until(what: str, check: Callable[[], Any], within: float = 30) -> Any:
    """Poll the async ``check`` until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        with contextlib.suppress(httpx.HTTPError):
            result = await check()
            if result:
                return result
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


class Agent:
    """``bedside agent run`` as a subprocess, its logs in a file."""

    def __init__(self, env: dict[str, str], state: Path, api_port: int, control_site: str) -> None:
        self.env, self.state, self.api_port, self.control_site = env, state, api_port, control_site
        self.api = f"http://127.0.0.1:{api_port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log = (self.state.parent / "agent.log").open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "--log-format", "json", "agent", "run",
            "--state-dir", str(self.state), "--control-site", self.control_site,
            "--api-port", str(self.api_port),
            env=self.env, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()

    async def status(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            return (await client.get(f"{self.api}/api/v1/status", timeout=5)).json()  # type: ignore[no-any-return]

    async def stop(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 30)

    def log(self) -> str:
        return (self.state.parent / "agent.log").read_text(errors="replace")


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """The simulated unit at 60x, on free ports; yields the environment the shipped unit
    configuration needs to reach it."""
    run_dir = tmp_path / "run"
    endpoints = SimEndpoints(
        bioreactor_port=free_port(),
        cell_processor_port=free_port(),
        modbus_port=free_port(),
        rtu_link=str(run_dir / "pumps-rtu"),
        balance_link=str(run_dir / "balance"),
        control_port=free_port(),
        run_dir=str(run_dir),
    )
    env = {
        **os.environ,
        "BEDSIDE_SIM_OPCUA_PORT": str(endpoints.bioreactor_port),
        "BEDSIDE_SIM_CELLPROC_PORT": str(endpoints.cell_processor_port),
        "BEDSIDE_SIM_MODBUS_PORT": str(endpoints.modbus_port),
        "BEDSIDE_RUN_DIR": str(run_dir),
    }
    async with SimulatedUnit(ScaledClock(60), endpoints):
        yield env


async def cs_records(client: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    """Every record the control site holds for the unit, in its order."""
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        r = await client.get(
            f"{url}/api/v1/units/{UNIT}/records", params={"after": after, "limit": 1000}
        )
        page = r.json()
        out += page["records"]
        if len(page["records"]) < 1000:
            return out
        after = page["next_after"]


def journal_hashes(path: Path) -> dict[int, str]:
    """seq -> hash of every record in the journal file (read-only, as a second reader)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {seq: bytes(h).hex() for seq, h in conn.execute("SELECT seq, hash FROM records")}
    finally:
        conn.close()


async def test_agent_streams_survives_kill_9_and_stops_cleanly(
    tmp_path: Path, sim: dict[str, str]
) -> None:
    """keys init, enroll, agent run: the control site gets the unit's tags; after kill -9 and a
    restart nothing acknowledged is lost, the chain verifies, the control site holds every
    record once and in order, and SIGTERM stops the agent with exit 0 and a final checkpoint."""
    state, db = tmp_path / "unit", tmp_path / "control-site.db"
    env = {**sim, "BEDSIDE_STATE_DIR": str(state)}
    rc, out, err = await bedside("keys", "init", env=env)
    assert rc == 0, err
    public_key = json.loads(out)["public_key"]
    rc, out, err = await bedside(
        "control-site", "enroll", UNIT, public_key, "--db", str(db), env=env
    )
    assert rc == 0, err
    rc, out, err = await bedside(
        "control-site", "token", "create", "--user", "qa", "--db", str(db), env=env
    )
    assert rc == 0, err
    token = json.loads(out)["token"]
    store = open_store(str(db))
    try:
        async with (
            ControlSiteServer(store, port=free_port()) as site,
            httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as client,
        ):
            agent = Agent(env, state, free_port(), site.url)
            await agent.start()

            async def head() -> int:
                units = (await client.get(f"{site.url}/api/v1/units")).json()["units"]
                return int(units[0]["head_seq"])

            async def tags() -> dict[str, Any]:
                latest = await client.get(f"{site.url}/api/v1/units/{UNIT}/latest")
                found: dict[str, Any] = latest.json()["tags"]
                wanted = {"temperature", "ph", "feed_speed", "harvest_dispensed", "bag_weight"}
                return found if wanted <= set(found) else {}

            latest = await until("the unit's tags at the control site", tags)
            assert latest["temperature"]["quality"] == "good"
            assert 30 < latest["temperature"]["value"] < 40

            rc, out, err = await bedside("status", "--api", agent.api, env=env)
            assert rc == 0, err
            shown = json.loads(out)
            assert shown["uplink"]["link"] == "up"
            assert {"backlog", "acked_seq"} <= set(shown["uplink"])
            assert shown["journal"]["acked_seq"] > 0

            # run the feed pump, as an engineer would: its dispensed volume is then recorded
            # about every second (the shipped policies keep a quiet unit's journal sparse)
            for tag, value in (("feed_speed_sp", "1"), ("feed_run", "true")):
                cfg = str(default_config_path())
                rc, out, err = await bedside("devices", "write", cfg, tag, value, env=env)
                assert rc == 0, err

            # kill -9 mid-stream, once a good part of the journal is acknowledged
            first = await head()
            await until("more records acknowledged", lambda: _above(head, first + 5))
            acked = (await agent.status())["journal"]["acked_seq"]
            await agent.stop(signal.SIGKILL)
            acked_records = {r["seq"]: r["hash"] for r in await cs_records(client, site.url)}
            assert max(acked_records) >= acked

            await agent.start()
            restarted = (await until("the restarted agent", agent.status))["journal"]["head_seq"]
            await until(
                "records after the restart acknowledged", lambda: _above(head, restarted + 3)
            )
            assert await agent.stop(signal.SIGTERM) == 0, agent.log()

            journal = state / "journal.db"
            on_disk = journal_hashes(journal)
            for seq, hash_hex in acked_records.items():
                assert on_disk[seq] == hash_hex, f"acknowledged record {seq} changed or lost"
            held = await cs_records(client, site.url)
            assert [r["seq"] for r in held] == list(range(1, len(held) + 1))
            assert all(on_disk[r["seq"]] == r["hash"] for r in held)
            last = held[-1]["seq"]
            assert last >= restarted + 3 and max(on_disk) >= last
    finally:
        store.close()

    rc, out, err = await bedside(
        "verify", str(journal), "--public-key", public_key, "--json", env=env
    )
    assert rc == 0, out + err
    report = json.loads(out)
    assert report["ok"] and report["unsealed"] == 0 and report["head_seq"] == max(on_disk)
    records = _all(journal)
    assert records[-1].kind == Kind.CHECKPOINT and records[-1].body["signed"]["reason"] == "close"
    reasons = [r.body["signed"]["reason"] for r in records if r.kind == Kind.CHECKPOINT]
    assert "open" in reasons  # the restart after the kill signed what the kill left unsigned


async def _above(get: Callable[[], Any], value: int) -> bool:
    return bool(await get() > value)


def _no_signer() -> Any:
    """A throwaway signing key for a journal the test itself holds open."""
    from agent.record.keys import UnitKey

    return UnitKey.generate()


def _all(path: Path) -> list[Any]:
    from agent.record.format import Record

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [Record.parse(d, strict=False) for (d,) in conn.execute("SELECT data FROM records")]
    finally:
        conn.close()


async def test_sigint_flushes_and_exits_zero_with_a_final_checkpoint(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) stops `bedside agent run` with exit 0: agent_stopped journaled and the
    journal closed with its final checkpoint, even with every device unreachable."""
    state = tmp_path / "unit"
    config = tmp_path / "unit.yaml"
    config.write_text(EMPTY_UNIT)
    init_unit_key(state)
    env = {**os.environ}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "--log-format", "json", "agent", "run",
        "--config", str(config), "--state-dir", str(state), "--api-port", str(free_port()),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    while b"journal_opened" not in (line := await asyncio.wait_for(proc.stderr.readline(), 30)):
        assert line, "the agent stopped before opening its journal"
    await asyncio.sleep(0.5)  # let it journal agent_started
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    records = _all(state / "journal.db")
    assert records[-1].kind == Kind.CHECKPOINT and records[-1].body["signed"]["reason"] == "close"
    assert records[-2].body == {"event": "agent_stopped"}


# --- in process: disk duties and the API socket -------------------------------------------


@contextlib.asynccontextmanager
async def running(service: AgentService) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(service.run())
    ready = asyncio.create_task(service.ready.wait())
    try:
        await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        yield task
    finally:
        ready.cancel()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def settings(tmp_path: Path, **kw: Any) -> AgentSettings:
    init_unit_key(tmp_path / "unit")
    return AgentSettings(state_dir=tmp_path / "unit", api_port=free_port(), **kw)


def records_of(service: AgentService, kind: Kind) -> list[Any]:
    assert service.journal is not None
    return [r for r in service.journal.read(0, 10_000) if r.kind == kind]


async def test_low_disk_raises_an_alarm_and_keeps_recording(tmp_path: Path) -> None:
    """Below the free-space threshold the agent journals a low_disk alarm, reports
    ``low_disk`` (for the engine) and keeps running; the alarm returns when space does."""
    clock = ManualClock()
    service = AgentService(
        parse_config(EMPTY_UNIT), clock, settings(tmp_path, low_disk_bytes=2**50)
    )
    async with running(service) as task:
        assert service.low_disk and service.status()["journal"]["low_disk"]
        (alarm,) = records_of(service, Kind.ALARM)
        assert alarm.body["alarm"] == "low_disk" and alarm.body["state"] == "active"
        await clock.advance(5)
        assert not task.done()
        assert service.journal is not None
        await service.journal.append(Kind.EVENT, {"event": "still_journaling"})
        service.settings = dataclasses.replace(service.settings, low_disk_bytes=0)
        await clock.advance(1)
        await service.journal.flush()
        states = [r.body["state"] for r in records_of(service, Kind.ALARM)]
        assert states == ["active", "returned"] and not service.low_disk


async def test_retention_prunes_acknowledged_records_only(tmp_path: Path) -> None:
    """The service prunes acknowledged records older than the retention, periodically, and
    never an unacknowledged one, however old."""
    clock = ManualClock()
    service = AgentService(
        parse_config(EMPTY_UNIT),
        clock,
        settings(tmp_path, retention_seconds=100, prune_interval=30, checkpoint_seconds=1e6),
    )
    async with running(service):
        journal = service.journal
        assert journal is not None
        for n in range(10):
            await journal.append(Kind.EVENT, {"n": n})
        acked = journal.durable_seq - 4
        journal.mark_acknowledged(acked)
        await journal.append(Kind.EVENT, {"n": "late"})
        await clock.advance(200)
        await journal.flush()
        # the prune runs in the journal's writer thread: give it the wall time it needs
        for _ in range(200):
            kept = journal.read(0, 1000)
            if kept[0].seq > 1:
                break
            await asyncio.sleep(0.05)
        assert kept[0].seq == acked + 1  # everything acknowledged and old is gone
        assert [r.body.get("n") for r in kept[:5]] == [6, 7, 8, 9, "late"]


async def test_api_socket_is_closed_when_the_journal_cannot_open(tmp_path: Path) -> None:
    """A journal that fails to open (here: held by another writer) stops the service with the
    journal's error, and the local API's port is free again at once."""
    s = settings(tmp_path)
    service = AgentService(parse_config(EMPTY_UNIT), ManualClock(), s)
    held = Journal.open(
        s.state_dir / "journal.db", unit="unit-t", signer=_no_signer(), clock=ManualClock()
    )
    with held, pytest.raises(JournalStorageError, match="open in another process"):
        await service.run()
    with socket.socket() as probe:
        probe.bind((s.api_host, s.api_port))  # raises if the agent's socket leaked
