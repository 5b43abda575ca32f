"""System tests of the run engine's state model: operator commands, monitors, lost devices.

The simulated unit runs at 1000x in a thread shared by the module; each test gets a fresh agent
(journal, users, hub, run manager) and a unit reset to its defaults.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.engine.states import CommandRefused, RunState
from tests.engine_rig import (
    Rig,
    SimThread,
    agent_rig,
    recipe_text,
    reset_unit,
    sim_env,
    wait_async,
    wait_for,
)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimThread]:
    """One simulated unit for the module's tests."""
    with SimThread(sim_env(tmp_path_factory.mktemp("sim"))) as sim:
        yield sim


@pytest.fixture
async def rig(
    sim: SimThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Rig]:
    """A fresh agent (journal, users, hub, run manager) on the shared unit, reset."""
    for name, value in sim.env.items():
        monkeypatch.setenv(name, value)
    async with agent_rig(tmp_path) as rig:
        await reset_unit(sim, rig)
        yield rig


HOLD_ACTIONS = """
hold_actions:
  - {set: reactor.rocking_sp, value: 0}
  - {set: feed.feed_run, value: false}
"""

TWO_TIMERS = recipe_text(
    "two-timers",
    """
procedure:
  - operation: main
    phases:
      - {id: first, type: timer, duration: 20m}
      - {id: second, type: timer, duration: 20m}
""",
    head=HOLD_ACTIONS,
)


def states(rig: Rig, run: str) -> list[str]:
    return [e["new"] for e in rig.events(run, "run_state")]


# ------------------------------------------------------------------ commands


async def test_pause_stops_at_the_next_phase_boundary_and_resume_goes_on(rig: Rig) -> None:
    """Pause lets the running phase finish, stops before the next one; resume runs the rest."""
    engine = await rig.start(TWO_TIMERS)
    await rig.wait_phase(engine, "first")
    assert await engine.command("pause", who="olive", why="break") is RunState.PAUSING
    await rig.wait_state(engine, RunState.PAUSED)
    assert [e["phase"] for e in rig.events(engine.run, "phase_completed")] == ["first"]
    assert [e["phase"] for e in rig.events(engine.run, "phase_started")] == ["first"]
    assert await engine.command("resume", who="olive", why="back") is RunState.RUNNING
    await rig.wait_state(engine, RunState.COMPLETE)
    assert states(rig, engine.run) == ["Running", "Pausing", "Paused", "Running", "Complete"]


async def test_hold_applies_the_hold_actions_and_restart_resumes_the_timer(rig: Rig) -> None:
    """Hold brings the devices to the safe state; restart resumes the interrupted timer with
    its elapsed time (a second hold finds it further on, not started over)."""
    await rig.hub.write("feed_run", True)
    engine = await rig.start(TWO_TIMERS)
    await wait_for(lambda: engine.elapsed() > 300, "5 min of run time")
    await engine.command("hold", who="olive", why="check the bag")
    await rig.wait_state(engine, RunState.HELD)
    assert await rig.value("rocking_sp") == 0
    assert await rig.value("feed_run") is False
    held = [w for w in rig.audits("write", engine.run) if w["why"] == "hold action"]
    assert [(w["tag"], w["value"]) for w in held] == [("rocking_sp", 0), ("feed_run", False)]
    first = engine.memory.progress["0.0"]
    assert first >= 300

    await engine.command("restart", who="sam", why="bag fine")
    await rig.wait_state(engine, RunState.RUNNING)
    resumed_at = engine.elapsed()
    await wait_for(lambda: engine.elapsed() > resumed_at + 120, "2 min more")
    await engine.command("hold", who="olive", why="again")
    await rig.wait_state(engine, RunState.HELD)
    assert engine.memory.progress["0.0"] > first + 60
    await engine.command("restart", who="sam", why="go on")
    await rig.wait_state(engine, RunState.COMPLETE)
    assert [e["phase"] for e in rig.events(engine.run, "phase_started")] == ["first", "second"]


@pytest.mark.parametrize(
    ("command", "final"), [("stop", RunState.STOPPED), ("abort", RunState.ABORTED)]
)
async def test_stop_and_abort_end_the_run_and_reset_returns_to_idle(
    rig: Rig, command: str, final: RunState
) -> None:
    """Stop and abort end a run after the hold actions; reset frees the unit for the next run."""
    engine = await rig.start(TWO_TIMERS)
    await rig.wait_phase(engine, "first")
    await engine.command(command, who="sam", why="test")
    await rig.wait_state(engine, final)
    assert await rig.value("rocking_sp") == 0
    assert not rig.events(engine.run, "phase_completed")
    assert await engine.command("reset", who="sam", why="done") is RunState.IDLE
    await wait_for(engine.finished.is_set, "engine finished")
    assert not rig.runs.active
    with pytest.raises(CommandRefused):
        await engine.command("restart", who="sam", why="too late")
    again = await rig.start(TWO_TIMERS)
    assert again.run != engine.run
    await again.command("abort", who="sam", why="cleanup")
    await rig.wait_state(again, RunState.ABORTED)


async def test_a_refused_command_raises_and_is_journaled(rig: Rig) -> None:
    """A command the state does not accept raises CommandRefused and is audited."""
    engine = await rig.start(TWO_TIMERS)
    await rig.wait_state(engine, RunState.RUNNING)
    with pytest.raises(CommandRefused) as refused:
        await engine.command("resume", who="olive", why="nothing is paused")
    assert refused.value.state is RunState.RUNNING
    with pytest.raises(CommandRefused):
        await engine.command("launch", who="olive", why="no such command")
    audits = rig.audits("command_refused", engine.run)
    assert [(a["command"], a["state"], a["who"]) for a in audits] == [
        ("resume", "Running", "olive"),
        ("launch", "Running", "olive"),
    ]
    assert engine.sm.state is RunState.RUNNING
    await engine.command("abort", who="sam", why="cleanup")


# ------------------------------------------------------------------ monitors


def monitored(low: float) -> str:
    return recipe_text(
        "monitored",
        f"""
monitors:
  - id: temp_low
    when: reactor.temperature < {low:.2f} degC
    clear: reactor.temperature > {low + 0.1:.2f} degC
    priority: high
    action: hold
    message: Culture temperature low
procedure:
  - operation: main
    phases:
      - {{id: culture, type: timer, duration: 30m}}
""",
        head=HOLD_ACTIONS,
    )


async def test_a_monitor_trip_holds_the_run_until_it_clears(rig: Rig, sim: SimThread) -> None:
    """A failed heater cools the culture: the monitor alarms and holds the run; restart is
    refused while it is tripped and completes the run once it cleared."""
    engine = await rig.start(monitored(await rig.value("temperature") - 0.3))
    await rig.wait_state(engine, RunState.RUNNING)
    await sim.fault("bioreactor", "heater_failed", True)
    await rig.wait_state(engine, RunState.HELD, within=30)
    hold = next(e for e in rig.events(engine.run, "run_state") if e["new"] == "Holding")
    assert hold["who"] == "monitor:temp_low"
    alarm = engine.alarms.get("temp_low")
    assert alarm.active and alarm.priority.value == "high"
    records = [a for a in rig.records("alarm", engine.run) if a["alarm"] == "temp_low"]
    assert records[0]["state"] == "unack"
    with pytest.raises(CommandRefused) as refused:
        await engine.command("restart", who="sam", why="too early")
    assert "temp_low" in refused.value.reason

    await sim.fault("bioreactor", "heater_failed", False)
    await wait_for(lambda: not engine.alarms.get("temp_low").active, "monitor cleared", 30)
    await engine.alarms.acknowledge("temp_low", "olive", "heater repaired")
    await engine.command("restart", who="sam", why="heater repaired")
    await rig.wait_state(engine, RunState.COMPLETE, within=30)


# Timing-sensitive on a loaded 2-core machine (the short run can end before the loss is seen):
# run by `make test-slow`, not by `make test`.
@pytest.mark.slow
async def test_a_lost_device_raises_a_critical_alarm_and_holds(rig: Rig, sim: SimThread) -> None:
    """The bioreactor's server going away mid-phase raises device_lost_bioreactor (critical)
    and holds the run, the other devices still reaching their safe state; once it is back,
    restart completes the run."""
    await rig.hub.write("feed_run", True)
    engine = await rig.start(monitored(20.5))
    await rig.wait_phase(engine, "culture")
    await sim.call(lambda unit: unit.bioreactor.stop())
    try:
        await rig.wait_state(engine, RunState.HOLDING, RunState.HELD, within=20)
        alarm = engine.alarms.get("device_lost_bioreactor")
        assert alarm.active and alarm.priority.value == "critical"
        assert rig.events(engine.run, "device_lost")[0]["device"] == "bioreactor"
        # the pump reaches its safe state without waiting for the bioreactor
        await wait_async(lambda: _confirmed(rig, engine.run, "feed_run"), "pump stopped")
    finally:
        await sim.call(lambda unit: unit.bioreactor.start())
    await rig.wait_state(engine, RunState.HELD, within=30)
    await wait_for(
        lambda: not engine.alarms.get("device_lost_bioreactor").active, "bioreactor back", 30
    )
    assert rig.events(engine.run, "device_recovered")
    await engine.command("restart", who="sam", why="bioreactor back")
    await rig.wait_state(engine, RunState.COMPLETE, within=30)


async def _confirmed(rig: Rig, run: str, tag: str) -> bool:
    return any(a["tag"] == tag for a in rig.audits("write_confirmed", run))
