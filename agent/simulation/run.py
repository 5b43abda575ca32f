"""``bedside recipe simulate``: a dry run of a recipe against the simulated unit.

Everything is real but the devices and the people: the simulators speak OPC UA, Modbus and
MT-SICS on loopback, the agent's drivers, recorder, journal and engine run as in production,
at an accelerated clock. A simulated operator answers prompts (values that pass the recipe's
checks, or those given with ``--answer``), enters sample results, signs with simulated users,
acknowledges alarms and restarts a held run once nothing is alarming. Nothing is sent to a
control site; the journal lives in a temporary folder (or ``keep_dir``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from argon2 import PasswordHasher

from agent.auth.authenticator import Authenticator, UserStore
from agent.config import UnitConfig, default_config_path, load_config
from agent.devices.hub import DeviceHub
from agent.engine.engine import FINAL, Engine
from agent.engine.runs import RunManager
from agent.engine.states import RunState
from agent.journal.journal import Journal
from agent.journal.recorder import Recorder
from agent.recipe.loader import bind, check_parameters, load_recipe
from agent.recipe.model import Input, PromptPhase
from agent.record.keys import PUB_FILE, UnitKey, write_public_key
from agent.uplink import Uplink
from drivers.clock import ScaledClock, SystemClock

log = structlog.get_logger(__name__)

SIM_USERS = {"sim-operator": ("operator",), "sim-supervisor": ("supervisor",), "sim-qa": ("qa",)}
SIGNERS = {
    "performed": "sim-operator",
    "verified": "sim-supervisor",
    "approved": "sim-qa",
    "reviewed": "sim-qa",
}
_CANDIDATES = ["SIM-LOT-0001", "SIMLOT0001", "A000000000001", "COI-000001", "SIM0001", "S1"]


@dataclass(frozen=True)
class FaultPlan:
    """``target.field=value@at[+for]``: set a simulator fault at run time ``at`` (seconds),
    and clear it ``duration`` seconds later."""

    target: str
    field: str
    value: Any
    at: float
    duration: float | None = None

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        m = re.fullmatch(r"(\w+)\.(\w+)=([^@]+)@([0-9.]+[smhd]?)(?:\+([0-9.]+[smhd]?))?", text)
        if not m:
            raise ValueError(
                f"fault {text!r} is not target.field=value@time[+duration] "
                "(e.g. bioreactor.heater_failed=true@2d+6h)"
            )
        raw = m.group(3)
        value: Any = {"true": True, "false": False}.get(raw.lower(), raw)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(raw)
        return cls(
            m.group(1),
            m.group(2),
            value,
            _seconds(m.group(4)),
            _seconds(m.group(5)) if m.group(5) else None,
        )


def _seconds(text: str) -> float:
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return float(text[:-1]) * scale[text[-1]] if text[-1] in scale else float(text)


@dataclass
class Summary:
    """What a simulated run did."""

    run: str = ""
    state: str = ""
    simulated_days: float = 0.0
    wall_seconds: float = 0.0
    phases: list[dict[str, Any]] = field(default_factory=list)
    holds: list[dict[str, Any]] = field(default_factory=list)
    alarms: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    journal: str = ""
    records: int = 0
    public_key: str = ""
    uplink: dict[str, Any] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answer(spec: Input, engine: Engine, given: str | None) -> Any:
    if given is not None:
        return given
    if spec.equals is not None:
        return engine.env.plain(spec.equals)
    if spec.type in ("float", "int"):
        lo, hi = spec.limits or (0.0, 1.0)
        mid = (lo + hi) / 2
        return int(mid) if spec.type == "int" else mid
    if spec.type == "bool":
        return True
    for candidate in _CANDIDATES:
        if spec.pattern is None or re.fullmatch(spec.pattern, candidate):
            return candidate
    raise ValueError(f"no simulated answer matches {spec.pattern!r}: give one with --answer")


async def simulate(
    recipe: str | Path,
    *,
    speed: float,
    params: dict[str, str],
    answers: dict[str, str] | None = None,
    faults: list[FaultPlan] | None = None,
    seed: int = 0,
    keep_dir: Path | None = None,
    timeout_wall: float = 1800.0,
    progress: Callable[[Engine, dict[str, Any]], None] | None = None,
    uplink_url: str | None = None,
    enrol: Callable[[str, str], None] | None = None,
) -> Summary:
    """Run ``recipe`` to its end against the simulated unit; returns what happened.

    With ``uplink_url`` the journal is also forwarded to that control site (``enrol(unit,
    public_key)`` is called first); the simulated run is then a full end-to-end demonstration.
    """
    from agent.cli.sim import sim_endpoints
    from simulators.unit import SimulatedUnit  # the composition root's privilege

    answers = answers or {}
    clock = ScaledClock(speed)
    work = keep_dir or Path(tempfile.mkdtemp(prefix="bedside-simulate-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {
            "BEDSIDE_SIM_OPCUA_PORT": str(_free_port()),
            "BEDSIDE_SIM_CELLPROC_PORT": str(_free_port()),
            "BEDSIDE_SIM_MODBUS_PORT": str(_free_port()),
            "BEDSIDE_RUN_DIR": str(work / "run"),
        }
    )
    config: UnitConfig = load_config(default_config_path())
    # a broken recipe, binding or parameter is refused before any simulator starts
    checked = load_recipe(recipe, config)
    bind(checked, config)
    check_parameters(checked, params)
    endpoints = sim_endpoints(config, _free_port())
    summary = Summary(journal=str(work / "journal.db"))
    passwords = {name: secrets.token_urlsafe(16) + "aA1!" for name in ["sim-admin", *SIM_USERS]}
    wall0 = asyncio.get_running_loop().time()
    key = UnitKey.generate()  # a throwaway unit: its private key never touches the disk
    summary.public_key = key.public_key.b64
    write_public_key(work / PUB_FILE, key.public_key)  # what an auditor verifies with
    if enrol is not None:
        enrol(config.unit.id, key.public_key.b64)
    async with (
        SimulatedUnit(clock, endpoints, seed=seed) as unit,
        Journal.open(work / "journal.db", unit=config.unit.id, signer=key, clock=clock) as journal,
    ):
        store = UserStore.in_dir(
            work, hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
        )
        auth = Authenticator(store, clock, lambda kind, body: journal.append(kind, body))
        admin = await auth.add_user(
            None, "sim-admin", "Simulated Admin", ["admin"], passwords["sim-admin"]
        )
        for name, roles in SIM_USERS.items():
            await auth.add_user(
                admin, name, name.replace("-", " ").title(), list(roles), passwords[name]
            )
        hub = DeviceHub(config, clock)
        await hub.connect()
        recorder = Recorder(
            {t: config.tag(t)[1].record for t in config.all_tags()}, journal.record_samples, clock
        )
        try:
            async with asyncio.TaskGroup() as tg:

                async def record() -> None:
                    async for sample in hub.observe(list(config.all_tags())):
                        recorder.offer((sample,))

                recording = tg.create_task(record())
                uplink = None
                if uplink_url:
                    # network timing is wall time, whatever the process clock's speed
                    uplink = Uplink(journal, uplink_url, unit_key=key, clock=SystemClock())
                    uplinking = tg.create_task(uplink.run())
                await asyncio.sleep(0.5)  # first readings of every tag
                runs = RunManager(config, hub, journal, clock, tg.create_task, authenticator=auth)
                engine = await runs.start(recipe, params, who="sim-operator", why="simulation")
                summary.run = engine.run
                pending = list(faults or [])
                active: list[FaultPlan] = []
                async with asyncio.timeout(timeout_wall):
                    while engine.sm.state not in FINAL:
                        await asyncio.sleep(0.05)
                        recorder.tick()
                        if progress:
                            progress(engine, uplink.status() if uplink else {})
                        now = engine.elapsed()
                        for plan in [p for p in pending if p.at <= now]:
                            pending.remove(plan)
                            setattr(unit.fault_targets()[plan.target], plan.field, plan.value)
                            active.append(plan)
                            log.info("sim_fault_set", fault=f"{plan.target}.{plan.field}", at=now)
                        for plan in [p for p in active if p.duration and p.at + p.duration <= now]:
                            active.remove(plan)
                            default = type(unit.fault_targets()[plan.target])()
                            setattr(
                                unit.fault_targets()[plan.target],
                                plan.field,
                                getattr(default, plan.field),
                            )
                            log.info(
                                "sim_fault_cleared", fault=f"{plan.target}.{plan.field}", at=now
                            )
                        await _operate(engine, answers, passwords)
                await _settle(engine)
                summary.state = engine.sm.state.value
                summary.simulated_days = engine.elapsed() / 86400
                await engine.command("reset", who="sim-supervisor", why="simulation finished")
                recording.cancel()
                if uplink is not None:
                    await journal.flush()
                    async with asyncio.timeout(60):  # the backlog drains within seconds
                        while uplink.status()["backlog"] > 0:
                            if progress:
                                progress(engine, uplink.status())
                            await asyncio.sleep(0.1)
                    summary.uplink = uplink.status()
                    uplinking.cancel()
        finally:
            await hub.close()
        summary.final = {
            t: s.value for t, s in sorted(hub.snapshot.items()) if t in engine.env.used_tags()
        }
    summary.wall_seconds = asyncio.get_running_loop().time() - wall0
    _fill(summary, work / "journal.db")
    return summary


async def _settle(engine: Engine) -> None:
    """Wait for the run to reach a stable state (a final `done` may still be queued)."""
    while not engine.sm.state.stable:  # noqa: ASYNC110 - the engine offers no event for this
        await asyncio.sleep(0.01)


async def _operate(engine: Engine, answers: dict[str, str], passwords: dict[str, str]) -> None:
    """What the simulated operator does on each look at the HMI."""
    for view in engine.prompts.views():
        phase = engine.recipe.phase(view["phase"])
        specs = phase.inputs if isinstance(phase, PromptPhase) else phase.results  # type: ignore[union-attr]
        inputs = {n: _answer(s, engine, answers.get(f"{phase.id}.{n}")) for n, s in specs.items()}
        sigs = [
            {"meaning": m, "user": SIGNERS[m], "password": passwords[SIGNERS[m]]}
            for m in view["signatures"]
        ]
        await engine.prompts.answer(phase.id, inputs, sigs, "sim-operator")
    if engine.sm.state is RunState.HELD:
        views = engine.alarms.active()
        for alarm in views:
            if alarm.state.value in ("unack", "rtn_unack"):
                await engine.alarms.acknowledge(alarm.id, "sim-operator", "seen in simulation")
        if not any(a.active for a in engine.alarms.active()):
            await engine.command("restart", who="sim-supervisor", why="cause cleared")


def _fill(summary: Summary, journal: Path) -> None:
    import json
    import sqlite3

    conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        summary.records = conn.execute("SELECT count(*) FROM records").fetchone()[0]
        started: dict[str, float] = {}
        for kind, data in conn.execute(
            "SELECT kind, data FROM records WHERE kind IN ('event', 'alarm') AND run = ? "
            "ORDER BY seq",
            (summary.run,),
        ):
            body = json.loads(data)["body"]
            t = body.get("run_elapsed", 0.0)
            if kind == "alarm" and body.get("state") == "unack":
                summary.alarms.append(
                    {
                        "alarm": body.get("alarm"),
                        "priority": body.get("priority"),
                        "at_h": round(t / 3600, 2) if t else None,
                    }
                )
            ev = body.get("event")
            if ev == "phase_started":
                started[body["key"]] = t
            elif ev == "phase_completed" and body.get("phase"):
                t0 = started.get(body["key"], t)
                summary.phases.append(
                    {
                        "phase": body["phase"],
                        "start_h": round(t0 / 3600, 2),
                        "hours": round((t - t0) / 3600, 2),
                    }
                )
            elif ev == "run_state" and body.get("new") == "Holding":
                summary.holds.append(
                    {"at_h": round(t / 3600, 2), "why": body.get("why"), "by": body.get("who")}
                )
    finally:
        conn.close()
