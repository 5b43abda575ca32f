"""The simulators' control endpoint: bearer token, request checking, faults and actions.

The request checks run against the ASGI app in process (httpx's ASGI transport); the actions run
against a whole simulated unit over real HTTP, with a real OPC UA client watching.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asyncua import Client, ua

from drivers.clock import ScaledClock
from simulators.balance import BalanceFaults
from simulators.bioreactor import node_id
from simulators.cell_processor import CellProcessorFaults
from simulators.control import control_app
from simulators.faults import FaultState
from simulators.pumps import PumpFaults
from simulators.unit import SimEndpoints, SimulatedUnit
from tests.conftest import free_port

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROUTES = [
    ("GET", "/faults", None),
    ("POST", "/faults", {"target": "bioreactor", "field": "heater_failed", "value": True}),
    ("GET", "/actions", None),
    ("POST", "/actions", {"action": "count"}),
    ("GET", "/state", None),
]


class Endpoint:
    """The control app over fault objects of every simulator and one counting action."""

    def __init__(self) -> None:
        self.targets: dict[str, Any] = {
            "bioreactor": FaultState(),
            "pumps": PumpFaults(),
            "balance": BalanceFaults(),
            "cell_processor": CellProcessorFaults(),
        }
        self.calls = 0

        async def count() -> int:
            self.calls += 1
            return self.calls

        app = control_app(TOKEN, self.targets, {"count": count}, lambda: {"volume": 1000.0})
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://control"
        )

    async def faults(self) -> Any:
        return (await self.client.get("/faults", headers=AUTH)).json()


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    """The control app, reached in process."""
    ep = Endpoint()
    async with ep.client:
        yield ep


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
@pytest.mark.parametrize(
    "header", [None, "Bearer wrong-token", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x"]
)
async def test_every_route_refuses_a_missing_or_wrong_token(
    endpoint: Endpoint, method: str, path: str, body: Any, header: str | None
) -> None:
    """Without the exact bearer token every route answers 401 and changes nothing."""
    before = await endpoint.faults()
    headers = {"Authorization": header} if header is not None else {}
    r = await endpoint.client.request(method, path, json=body, headers=headers)
    assert r.status_code == 401
    assert "token" in r.json()["error"]
    assert await endpoint.faults() == before
    assert endpoint.calls == 0


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"target": "heater", "field": "on", "value": 1}, "unknown target 'heater'"),
        ({"target": "bioreactor", "field": "heater_broken", "value": True}, "no fault"),
        ({"target": "bioreactor", "field": "heater_failed", "value": "yes"}, "takes a bool"),
        ({"target": "bioreactor", "field": "leak_ml_per_h", "value": "lots"}, "takes a float"),
        ({"target": "bioreactor", "field": "stuck_sensors", "value": "ph"}, "set[str]"),
        ({"target": "pumps", "field": "stalled", "value": [1.5]}, "set[int]"),
        ({"target": "pumps", "field": "exception_code", "value": {"one": 4}}, "dict[int, int]"),
        ({"target": "cell_processor", "field": "fail_program", "value": 3}, "str | None"),
        ({"target": "bioreactor", "field": "heater_failed"}, "missing value"),
        ([1, 2], "JSON object"),
        (b"heater_failed=true", "not JSON"),
    ],
)
async def test_bad_fault_requests_answer_400_and_change_nothing(
    endpoint: Endpoint, body: Any, problem: str
) -> None:
    """A fault request with an unknown target or field, a value of the wrong type or a body
    that is not a JSON object answers 400 naming the problem; no fault changes."""
    before = await endpoint.faults()
    if isinstance(body, bytes):
        r = await endpoint.client.post("/faults", content=body, headers=AUTH)
    else:
        r = await endpoint.client.post("/faults", json=body, headers=AUTH)
    assert r.status_code == 400
    assert problem in r.json()["error"]
    assert await endpoint.faults() == before


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"action": "bioreactor.explode"}, "unknown action 'bioreactor.explode'"),
        ({"action": ["count"]}, "unknown action"),
        ({}, "unknown action None"),
        (b"count", "not JSON"),
    ],
)
async def test_bad_action_requests_answer_400_and_run_nothing(
    endpoint: Endpoint, body: Any, problem: str
) -> None:
    """An unknown action or a malformed body answers 400 naming the problem; nothing runs."""
    if isinstance(body, bytes):
        r = await endpoint.client.post("/actions", content=body, headers=AUTH)
    else:
        r = await endpoint.client.post("/actions", json=body, headers=AUTH)
    assert r.status_code == 400
    assert problem in r.json()["error"]
    assert endpoint.calls == 0


async def test_good_fault_requests_change_the_faults(endpoint: Endpoint) -> None:
    """Fault values are taken in their JSON form: bools, numbers, lists as sets, objects with
    text keys as int-keyed dicts; `GET /faults` shows them."""
    for target, field, value in [
        ("bioreactor", "heater_failed", True),
        ("bioreactor", "stuck_sensors", ["ph"]),
        ("pumps", "exception_code", {"1": 4}),
        ("balance", "garble", 1),
        ("cell_processor", "fail_program", "select"),
    ]:
        body = {"target": target, "field": field, "value": value}
        r = await endpoint.client.post("/faults", json=body, headers=AUTH)
        assert r.status_code == 200, r.text
    targets = endpoint.targets
    assert targets["bioreactor"].heater_failed is True
    assert targets["bioreactor"].stuck_sensors == {"ph"}
    assert targets["pumps"].exception_code == {1: 4}
    assert targets["balance"].garble == 1.0
    assert targets["cell_processor"].fail_program == "select"
    faults = await endpoint.faults()
    assert faults["bioreactor"]["stuck_sensors"] == ["ph"]
    assert faults["pumps"]["exception_code"] == {"1": 4}


async def test_actions_are_listed_and_run(endpoint: Endpoint) -> None:
    """`GET /actions` lists the actions; `POST /actions` runs one and returns its result."""
    listed = await endpoint.client.get("/actions", headers=AUTH)
    assert listed.json() == {"actions": ["count"]}
    r = await endpoint.client.post("/actions", json={"action": "count"}, headers=AUTH)
    assert r.json() == {"action": "count", "result": 1}
    assert endpoint.calls == 1


# ------------------------------------------------------------------ a whole simulated unit


@pytest.fixture
async def unit(tmp_path: Path) -> AsyncIterator[SimulatedUnit]:
    """The simulated unit at 60x on free ports (a 5 s restart takes ~0.1 s)."""
    endpoints = SimEndpoints(
        bioreactor_port=free_port(),
        cell_processor_port=free_port(),
        modbus_port=free_port(),
        control_port=free_port(),
        run_dir=str(tmp_path),
    )
    async with SimulatedUnit(ScaledClock(60.0), endpoints) as sim:
        yield sim


def control_client(unit: SimulatedUnit) -> httpx.AsyncClient:
    """An HTTP client of the unit's control endpoint, with the token from its run folder."""
    run_dir = Path(unit.endpoints.run_dir)
    token = (run_dir / "control.token").read_text()
    return httpx.AsyncClient(
        base_url=(run_dir / "control.url").read_text(),
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


async def test_fault_request_reaches_the_running_simulator(unit: SimulatedUnit) -> None:
    """A fault set over HTTP is the one the bioreactor model integrates."""
    async with control_client(unit) as http:
        body = {"target": "bioreactor", "field": "heater_failed", "value": True}
        r = await http.post("/faults", json=body)
        assert r.status_code == 200, r.text
    assert unit.model.faults.heater_failed is True


async def test_bioreactor_restart_cuts_clients_and_serves_again(unit: SimulatedUnit) -> None:
    """`bioreactor.restart` drops an OPC UA client's connection, and the server answers new
    clients once the action returns."""
    target = node_id("Temperature", "TargetValue")
    before = Client(unit.bioreactor.endpoint)
    await before.connect()
    try:
        assert await before.get_node(target).read_value() == 37.0
        async with control_client(unit) as http:
            r = await http.post("/actions", json={"action": "bioreactor.restart"})
        assert r.json() == {"action": "bioreactor.restart", "result": "restarted"}
        with pytest.raises((ConnectionError, ua.UaError, asyncio.TimeoutError)):
            await before.get_node(target).read_value()
    finally:
        with contextlib.suppress(ConnectionError, ua.UaError, asyncio.TimeoutError):
            await before.disconnect()
    async with Client(unit.bioreactor.endpoint) as after:
        assert await after.get_node(target).read_value() == 37.0
