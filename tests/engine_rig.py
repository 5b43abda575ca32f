"""A run-engine test rig: the simulated unit, the agent's hub, journal, users and run manager.

``SimThread(sim_env(dir))`` serves a ``SimulatedUnit`` on free ports from its own event loop in a
thread (a module's tests share one; ``reset_unit`` between tests). With the same variables set
(``BEDSIDE_SIM_*``, ``BEDSIDE_RUN_DIR``: monkeypatch them), ``agent_rig(tmp)`` builds what the
agent builds from the shipped ``agent/data/unit-sim.yaml``: a ``DeviceHub`` whose observations
feed ``hub.snapshot``, a ``Journal`` signed with the unit key of ``tmp/state``, a ``UserStore``
with cheap argon2 parameters and the users ``olive`` (operator), ``sam`` (supervisor) and
``quinn`` (qa), and a ``RunManager``, all on a ``ScaledClock``. The crash test's child process
builds the same ``agent_rig`` against a unit its parent serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from agent.auth.authenticator import Authenticator, UserStore
from agent.config import UnitConfig, default_config_path, load_config
from agent.devices.hub import DeviceHub
from agent.engine.engine import Engine
from agent.engine.runs import RunManager
from agent.engine.states import RunState
from agent.journal.journal import Journal
from agent.record.keys import KEY_FILE, init_unit_key, load_unit_key
from drivers.base import Quality
from drivers.clock import ScaledClock
from tests.conftest import free_port
from tests.simthread import SimThread as BaseSimThread

PASSWORD = "Correct-Horse-9"
USERS = {"olive": "operator", "sam": "supervisor", "quinn": "qa"}
SPEED = 1000.0  # simulated seconds per wall second

# the equipment block most test recipes share (roles bound to the shipped simulated unit)
EQUIPMENT = """
equipment:
  reactor:
    device: bioreactor
    tags: [temperature, temperature_sp, rocking_sp, perfusion_sp, volume, co2_sp]
  processor:
    device: cell_processor
    tags: [cp_state, cp_progress]
    methods: [start_program, abort_program]
  feed:
    device: feed_pump
    tags: [feed_speed_sp, feed_run, feed_speed, feed_dispensed]
"""


def sim_env(tmp_path: Path) -> dict[str, str]:
    """Environment for the shipped configuration: free ports and a run folder in ``tmp_path``."""
    return {
        "BEDSIDE_SIM_OPCUA_PORT": str(free_port()),
        "BEDSIDE_SIM_CELLPROC_PORT": str(free_port()),
        "BEDSIDE_SIM_MODBUS_PORT": str(free_port()),
        "BEDSIDE_RUN_DIR": str(tmp_path / "run"),
    }


def recipe_text(rid: str, body: str, *, equipment: str = EQUIPMENT, head: str = "") -> str:
    """A format-1 recipe: ``rid``, the shared equipment, then ``head`` and ``body`` (YAML)."""
    return f"format: 1\nid: {rid}\nversion: 1\ntitle: test {rid}\n{equipment}\n{head}\n{body}"


@dataclass
class Rig:
    """What a test drives: the agent side (and the simulated unit when it runs here)."""

    tmp: Path
    config: UnitConfig
    clock: ScaledClock
    hub: DeviceHub
    journal: Journal
    auth: Authenticator
    runs: RunManager
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    # ---------------------------------------------------------------- runs
    async def start(
        self, text: str, params: Mapping[str, Any] | None = None, *, name: str = "recipe.yaml"
    ) -> Engine:
        """Write ``text`` to a file and start a run of it as ``olive``."""
        path = self.tmp / name
        path.write_text(text)
        return await self.runs.start(path, dict(params or {}), who="olive", why="test run")

    async def wait_state(self, engine: Engine, *states: RunState, within: float = 20) -> RunState:
        """Wait until the run is in one of ``states`` and its ``run_state`` event is journaled
        (the state machine moves first, the event follows); fail naming where it is instead."""

        def there() -> bool:
            if engine.sm.state not in states:
                return False
            journaled = self.events(engine.run, "run_state")
            return journaled[-1]["new"] == engine.sm.state.value if journaled else True

        await wait_for(
            there,
            f"run in {states}",
            within,
            lambda: f"state {engine.sm.state.value}, phase {engine.memory.current}",
        )
        return engine.sm.state

    async def wait_phase(self, engine: Engine, phase_id: str, within: float = 20) -> None:
        """Wait until phase ``phase_id`` has started (its key is the current one)."""
        await wait_for(
            lambda: any(
                e.get("phase") == phase_id for e in self.events(engine.run, "phase_started")
            ),
            f"phase {phase_id} started",
            within,
        )

    async def wait_prompt(self, engine: Engine, phase_id: str, within: float = 20) -> None:
        """Wait until the prompt (or sample results) of ``phase_id`` is open."""
        await wait_for(
            lambda: phase_id in engine.prompts.open,
            f"prompt {phase_id}",
            within,
            lambda: f"state {engine.sm.state.value}, phase {engine.memory.current}",
        )

    def signature(self, meaning: str, user: str, password: str = PASSWORD) -> dict[str, str]:
        return {"meaning": meaning, "user": user, "password": password}

    # ---------------------------------------------------------------- devices
    async def value(self, tag: str) -> Any:
        """A tag's value read now through the hub (it must read good)."""
        sample = (await self.hub.read([tag]))[tag]
        assert sample.quality is Quality.GOOD, sample
        return sample.value

    # ---------------------------------------------------------------- journal
    def records(self, kind: str, run: str | None = None) -> list[dict[str, Any]]:
        """The bodies of the journal's records of ``kind`` (of ``run`` if given), in order."""
        return read_records(self.journal.path, kind, run)

    def events(self, run: str, event: str | None = None) -> list[dict[str, Any]]:
        return [b for b in self.records("event", run) if event is None or b.get("event") == event]

    def audits(self, action: str | None = None, run: str | None = None) -> list[dict[str, Any]]:
        return [
            b for b in self.records("audit", run) if action is None or b.get("action") == action
        ]


def read_records(db: Path, kind: str, run: str | None = None) -> list[dict[str, Any]]:
    """Record bodies straight from the journal file (read-only, beside the writer)."""
    sql = (
        "SELECT data FROM records WHERE kind = ?"
        + (" AND run = ?" if run else "")
        + " ORDER BY seq"
    )
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(sql, (kind, run) if run else (kind,)).fetchall()
    finally:
        conn.close()
    return [json.loads(data)["body"] for (data,) in rows]


async def wait_for(
    condition: Callable[[], bool],
    what: str,
    within: float = 20,
    where: Callable[[], str] = lambda: "",
) -> None:
    """Poll ``condition`` (a test's poll, not process timing) until it holds or fail."""
    try:
        async with asyncio.timeout(within):
            while not condition():  # noqa: ASYNC110 - polls other tasks' and processes' work
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}; {where()}") from None


async def wait_async(
    condition: Callable[[], Awaitable[bool]], what: str, within: float = 20
) -> None:
    """Like ``wait_for`` with an async condition (e.g. a read through the hub)."""
    try:
        async with asyncio.timeout(within):
            while not await condition():  # noqa: ASYNC110 - polls a remote peer
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@contextlib.asynccontextmanager
async def agent_rig(
    tmp: Path, speed: float = SPEED, *, new_users: bool = True
) -> AsyncIterator[Rig]:
    """The agent side of the rig (the ``BEDSIDE_SIM_*`` variables must be set already)."""
    config = load_config(default_config_path())
    clock = ScaledClock(speed)
    state = tmp / "state"
    if not (state / KEY_FILE).exists():
        init_unit_key(state)
    key = load_unit_key(state)
    tasks: list[asyncio.Task[None]] = []

    def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        tasks.append(task)
        return task

    async with Journal.open(
        tmp / "journal.db", unit=config.unit.id, signer=key, clock=clock
    ) as journal:
        store = UserStore.in_dir(
            state, hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
        )
        auth = Authenticator(store, clock, lambda kind, body: journal.append(kind, body))
        if new_users:
            admin = await auth.add_user(None, "root-admin", "Root Admin", ["admin"], PASSWORD)
            for name, role in USERS.items():
                await auth.add_user(admin, name, name.title(), [role], PASSWORD)
        hub = DeviceHub(config, clock)
        await hub.connect()
        try:

            async def feed() -> None:
                async for _ in hub.observe(list(config.all_tags())):
                    pass

            spawn(feed())
            await wait_for(
                lambda: set(config.all_tags()) <= set(hub.snapshot),
                "first readings of every tag",
                20,
                lambda: f"missing {set(config.all_tags()) - set(hub.snapshot)}",
            )
            runs = RunManager(config, hub, journal, clock, spawn, authenticator=auth)
            rig = Rig(tmp, config, clock, hub, journal, auth, runs, tasks)
            yield rig
        finally:
            try:
                pending: set[asyncio.Task[None]] = set(tasks)
                for _ in range(20):
                    # cancel again and again: a driver's poll loop can swallow one cancellation
                    # when it lands while it cleans up its own sleep (reported to the lead)
                    for task in pending:
                        task.cancel()
                    _, pending = await asyncio.wait(pending, timeout=0.5)
                    if not pending:
                        break
                if pending:  # name what ignored its cancellation before giving up
                    for t in asyncio.all_tasks():
                        if not t.done() and t is not asyncio.current_task():
                            t.print_stack(limit=12, file=sys.stderr)
                    raise AssertionError(f"the rig's tasks did not stop when cancelled: {pending}")
                results = [t.exception() if not t.cancelled() else None for t in tasks]
            finally:
                await hub.close()
        failures = [r for r in results if r is not None]
        if failures:
            raise failures[0]


class SimThread(BaseSimThread):
    """The simulated unit in its own thread (shared by a module's tests; ``reset`` between
    tests), on the ports of ``env`` (see ``sim_env``)."""

    def __init__(self, env: Mapping[str, str], speed: float = SPEED) -> None:
        super().__init__(sim_endpoints(env), speed)
        self.env = dict(env)

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(unit)`` on the simulator's loop (awaiting it if it returns a coroutine)."""
        return await asyncio.wrap_future(self.submit(fn))

    async def action(self, name: str) -> Any:
        """One of the unit's control actions (``bioreactor.restart``, ``clear``...)."""
        return await self.call(lambda unit: unit.actions()[name]())

    async def fault(self, target: str, name: str, value: Any) -> None:
        """Set a fault field (``bioreactor``/``pumps``/``balance``/``cell_processor``)."""
        await self.call(lambda unit: setattr(unit.fault_targets()[target], name, value))


DEFAULTS = {
    "temperature_sp": 37.0,
    "rocking_sp": 15.0,
    "perfusion_sp": 0.0,
    "co2_sp": 5.0,
    "feed_run": False,
    "feed_speed_sp": 0.0,
    "harvest_run": False,
}


async def reset_unit(sim: SimThread, rig: Rig) -> None:
    """Between tests: no faults, the set-points back at their defaults, pumps stopped, the cell
    processor idle with a bag of cells loaded (as an operator loads it by hand)."""
    await sim.action("clear")
    for tag, value in DEFAULTS.items():
        await rig.hub.write(tag, value)

    async def processor(unit: Any) -> None:
        cp = unit.cell_processor
        if cp.state.value == "running":
            await cp._abort()
        await cp._load(2.0e9, 200.0)

    await sim.call(processor)


def sim_endpoints(env: Mapping[str, str]) -> Any:
    """The simulators' endpoints matching the shipped configuration under ``env``."""
    from simulators.unit import SimEndpoints

    run_dir = env["BEDSIDE_RUN_DIR"]
    return SimEndpoints(
        bioreactor_port=int(env["BEDSIDE_SIM_OPCUA_PORT"]),
        cell_processor_port=int(env["BEDSIDE_SIM_CELLPROC_PORT"]),
        modbus_port=int(env["BEDSIDE_SIM_MODBUS_PORT"]),
        rtu_link=f"{run_dir}/pumps-rtu",
        balance_link=f"{run_dir}/balance",
        control_port=free_port(),
        run_dir=run_dir,
    )
