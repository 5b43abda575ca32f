"""The agent's local run API as operators use it: authenticated, authorised, audited.

System test: the simulated unit at accelerated time in this process, the real agent service
(devices, journal, engine, API on a loopback port) and HTTP requests with user credentials.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from agent.cli.run import run_app
from agent.record.format import Kind
from drivers.clock import ScaledClock
from simulators.unit import SimEndpoints, SimulatedUnit
from tests.api_agent import (
    PARAMS,
    PASSWORDS,
    RECIPE,
    RECIPE_NAME,
    Agent,
    agent_argv,
    prepare_state,
)
from tests.conftest import free_port


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    """The simulated unit in this process and the agent as a subprocess, with four users and
    the T-cell recipe installed in its recipe store."""
    run_dir = tmp_path / "run"
    ends = SimEndpoints(
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
        "BEDSIDE_SIM_OPCUA_PORT": str(ends.bioreactor_port),
        "BEDSIDE_SIM_CELLPROC_PORT": str(ends.cell_processor_port),
        "BEDSIDE_SIM_MODBUS_PORT": str(ends.modbus_port),
        "BEDSIDE_RUN_DIR": str(run_dir),
    }
    state = tmp_path / "unit"
    await prepare_state(state)
    port = free_port()
    async with SimulatedUnit(ScaledClock(100), ends):
        proc = await asyncio.create_subprocess_exec(
            *agent_argv(state, port),
            env=env,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            service = Agent(port, state)

            async def up() -> bool:
                try:
                    async with client(service) as c:
                        return (await c.get("/api/v1/status")).status_code == 200
                except httpx.HTTPError:
                    return False

            await until(up)
            yield service
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                # SIGTERM's clean exit is tested in test_agent_service; here only cleanup
                proc.kill()
                await proc.wait()


def client(service: Agent, user: str | None = None) -> httpx.AsyncClient:
    auth = (user, PASSWORDS[user]) if user else None
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.port}", auth=auth, timeout=30)


async def until(check: Callable[[], Any], within: float = 30) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while not (result := await check()):
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)
    return result


async def run_view(service: Agent) -> dict[str, Any]:
    async with client(service) as c:
        return (await c.get("/api/v1/run")).json()


async def start(service: Agent) -> dict[str, Any]:
    async with client(service, "alice") as c:
        r = await c.post("/api/v1/run/start", json={"recipe": RECIPE_NAME, "params": PARAMS})
    assert r.status_code == 200, r.text
    return r.json()


async def prompt_open(service: Agent) -> Any:
    view = await run_view(service)
    return view if view.get("prompts") else None


def answer(bag_id: str, verifier: str = "bob") -> dict[str, Any]:
    return {
        "phase": "scan_bag",
        "inputs": {"bag_id": bag_id, "donation_id": PARAMS["donation_id"], "volume": 200},
        "signatures": [
            {"meaning": "performed", "user": "alice", "password": PASSWORDS["alice"]},
            {"meaning": "verified", "user": verifier, "password": PASSWORDS[verifier]},
        ],
    }


async def test_state_changes_need_an_authenticated_user(agent: Agent) -> None:
    """Starting a run without credentials or with a wrong password is refused (401)."""
    async with client(agent) as c:
        r = await c.post("/api/v1/run/start", json={"recipe": RECIPE_NAME, "params": PARAMS})
        assert r.status_code == 401
        r = await c.post(
            "/api/v1/run/start",
            auth=("alice", "wrong-password-1"),
            json={"recipe": RECIPE_NAME, "params": PARAMS},
        )
        assert r.status_code == 401 and "unknown user or wrong password" in r.json()["error"]
    assert (await run_view(agent))["run"] is None


async def test_bad_parameters_are_refused_with_every_problem(agent: Agent) -> None:
    """Missing and malformed parameters are all named; no run starts."""
    async with client(agent, "alice") as c:
        r = await c.post(
            "/api/v1/run/start", json={"recipe": RECIPE_NAME, "params": {"coi_id": "12"}}
        )
    assert r.status_code == 422
    problems = " ".join(r.json()["problems"])
    assert "coi_id" in problems and "donation_id" in problems
    assert (await run_view(agent))["run"] is None


async def test_prompt_checks_chain_of_identity_and_two_person_signatures(agent: Agent) -> None:
    """A wrong bag is refused and audited; one person signing twice is refused; the right
    answer with two signers is accepted and both signatures are journaled."""
    await start(agent)
    await until(lambda: prompt_open(agent))
    async with client(agent, "alice") as c:
        wrong = await c.post("/api/v1/run/answer", json=answer("COI-999999"))
        assert wrong.status_code == 422
        assert any("chain of identity" in p for p in wrong.json()["problems"])
        same = await c.post("/api/v1/run/answer", json=answer("COI-123456", verifier="alice"))
        assert same.status_code == 422
        right = await c.post("/api/v1/run/answer", json=answer("COI-123456"))
        assert right.status_code == 200, right.text
    records = agent.records()
    signatures = [r.body for r in records if r.kind == Kind.SIGNATURE]
    assert {(s["user"], s["meaning"]) for s in signatures} == {
        ("alice", "performed"),
        ("bob", "verified"),
    }
    refused = [
        r.body
        for r in records
        if r.kind == Kind.AUDIT and r.body.get("action") == "prompt_rejected"
    ]
    assert refused and "chain of identity" in " ".join(refused[0]["problems"])


async def test_commands_are_authorised_per_role_and_refusals_journaled(agent: Agent) -> None:
    """An operator may hold but not abort; a supervisor restarts; a command not allowed in the
    state is refused (409) and journaled; one run at a time."""
    await start(agent)
    async with client(agent, "alice") as alice, client(agent, "bob") as bob:
        assert (
            await alice.post("/api/v1/run/command", json={"command": "abort"})
        ).status_code == 403
        r = await alice.post("/api/v1/run/command", json={"command": "resume"})
        assert r.status_code == 409 and "refused in state Running" in r.json()["error"]
        second = await alice.post(
            "/api/v1/run/start", json={"recipe": RECIPE_NAME, "params": PARAMS}
        )
        assert second.status_code == 409 and "one run per unit" in second.json()["error"]
        r = await alice.post("/api/v1/run/command", json={"command": "hold", "why": "test"})
        assert r.status_code == 200
        await until(lambda: _state_is(agent, "Held"))
        r = await bob.post("/api/v1/run/command", json={"command": "restart", "why": "checked"})
        assert r.status_code == 200
        await until(lambda: _state_is(agent, "Running"))
        assert (await bob.post("/api/v1/run/command", content=b"{not json")).status_code == 400
    audits = [r.body for r in agent.records() if r.kind == Kind.AUDIT]
    assert any(
        a.get("action") == "command_refused" and a.get("command") == "resume" for a in audits
    )


async def test_patient_identifiers_are_shown_only_to_signed_in_users(agent: Agent) -> None:
    """Anonymous ``GET /api/v1/run`` and ``/status`` carry no COI or donation id (parameters are
    redacted); a user with run.view sees them; wrong credentials are 401, an admin (no
    run.view) 403; ``bedside run status`` works both ways."""
    await start(agent)
    async with client(agent) as anonymous, client(agent, "alice") as alice:
        view = (await anonymous.get("/api/v1/run")).json()
        status = (await anonymous.get("/api/v1/status")).text
        signed_in = (await alice.get("/api/v1/run")).json()
        wrong = await anonymous.get("/api/v1/run", auth=("alice", "wrong-password-1"))
        admin = await anonymous.get("/api/v1/run", auth=("admin", PASSWORDS["admin"]))
    assert view["state"] and view["redacted"] == ["params"]
    assert set(view["params"]) >= set(PARAMS)
    text = json.dumps(view) + status
    assert PARAMS["coi_id"] not in text and PARAMS["donation_id"] not in text
    assert signed_in["params"]["coi_id"] == PARAMS["coi_id"] and "redacted" not in signed_in
    assert wrong.status_code == 401 and admin.status_code == 403
    runner, url = CliRunner(), f"http://127.0.0.1:{agent.port}"
    plain = await asyncio.to_thread(runner.invoke, run_app, ["status", "--api", url])
    assert plain.exit_code == 0 and PARAMS["coi_id"] not in plain.stdout
    full = await asyncio.to_thread(
        runner.invoke,
        run_app,
        ["status", "--api", url, "--user", "alice"],
        env={"BEDSIDE_PASSWORD": PASSWORDS["alice"]},
    )
    assert full.exit_code == 0 and json.loads(full.stdout)["params"]["coi_id"] == PARAMS["coi_id"]


async def _state_is(service: Agent, state: str) -> bool:
    return (await run_view(service))["state"] == state


def test_recipe_path_exists() -> None:
    """The shipped recipe this module drives is where the tests expect it."""
    assert RECIPE.exists() and os.access(RECIPE, os.R_OK)
