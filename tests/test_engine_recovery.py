"""Crash recovery: the run's memory rebuilt from the journal after a kill -9 of the agent.

``RunMemory.apply`` is unit-tested on a synthetic event list; the system test kills a child agent
process (``tests/engine_child.py``) during a long timer, then a new agent on the same journal
recovers the run: Held, in the same phase, the timer's elapsed time restored, the cell
processor's program not started again, and a restart completes it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.engine.memory import RunMemory, load_run
from agent.engine.runs import RunRefused
from agent.engine.states import RunState
from tests.engine_rig import (
    SimThread,
    agent_rig,
    read_records,
    recipe_text,
    reset_unit,
    sim_env,
    wait_for,
)

CHILD = Path(__file__).resolve().parent / "engine_child.py"
AGENT_SPEED = 3000.0  # the agent's clock: a 2 h timer lasts 2.4 wall seconds

# ------------------------------------------------------------------ the fold, no I/O


def test_memory_folds_a_synthetic_event_list() -> None:
    """apply() rebuilds completed phases, loops, branches, progress, steps, outputs and samples."""
    events = [
        {
            "event": "run_started",
            "who": "olive",
            "recipe": {"id": "r", "sha256": "x"},
            "params": {"coi_id": "COI-000001"},
            "binding": {"reactor": "bioreactor"},
            "run_elapsed": 0.0,
        },
        {"event": "run_state", "old": "Idle", "new": "Running", "run_elapsed": 0.0},
        {"event": "phase_started", "key": "0.0", "phase": "scan", "run_elapsed": 1.0},
        {
            "event": "phase_completed",
            "key": "0.0",
            "phase": "scan",
            "outputs": {"bag_id": "COI-000001"},
            "run_elapsed": 5.0,
        },
        {"event": "phase_started", "key": "0.1", "phase": "feed_loop", "run_elapsed": 5.0},
        {"event": "phase_started", "key": "0.1.0.0", "phase": "feed", "run_elapsed": 5.0},
        {
            "event": "phase_completed",
            "key": "0.1.0.0",
            "phase": "feed",
            "outputs": {},
            "run_elapsed": 9.0,
        },
        {"event": "loop_iteration", "key": "0.1", "iteration": 1, "run_elapsed": 9.0},
        {
            "event": "phase_completed",
            "key": "0.1",
            "phase": "feed_loop",
            "outputs": {"iterations": 1},
            "run_elapsed": 9.0,
        },
        {"event": "branch_taken", "key": "0.2", "branch": "else", "run_elapsed": 9.5},
        {
            "event": "sample_taken",
            "key": "0.2.e.0",
            "phase": "day5",
            "volume_ml": 2,
            "results": ["vcd"],
            "wait_for_results": False,
            "run_elapsed": 9.5,
        },
        {"event": "phase_step", "key": "0.2.e.0", "step": "taken", "run_elapsed": 9.5},
        {
            "event": "phase_completed",
            "key": "0.2.e.0",
            "phase": "day5",
            "outputs": {},
            "run_elapsed": 9.5,
        },
        {"event": "phase_started", "key": "0.3", "phase": "run_wash", "run_elapsed": 10.0},
        {"event": "phase_step", "key": "0.3", "step": "called", "run_elapsed": 10.0},
        {"event": "phase_progress", "key": "0.3", "elapsed": 600.0, "run_elapsed": 610.0},
        {"event": "phase_progress", "key": "0.3", "elapsed": 1200.0, "run_elapsed": 1210.0},
        {"event": "run_state", "old": "Running", "new": "Holding", "run_elapsed": 1300.0},
    ]
    memory = RunMemory("run-1")
    for body in events:
        memory.apply(body)
    assert memory.params == {"coi_id": "COI-000001"}
    assert memory.binding == {"reactor": "bioreactor"}
    assert memory.started_by == "olive"
    assert memory.state == "Holding"
    assert memory.completed == {"0.0", "0.1.0.0", "0.1", "0.2.e.0"}
    assert memory.loops == {"0.1": 1}
    assert memory.branches == {"0.2": "else"}
    assert memory.current == "0.3"
    assert memory.progress == {"0.3": 1200.0}
    assert memory.steps == {"0.3": ["called"]}
    assert memory.outputs == {"scan": {"bag_id": "COI-000001"}, "feed_loop": {"iterations": 1}}
    assert memory.pending_results == {"day5": "0.2.e.0"}
    assert memory.elapsed_run == 1300.0
    assert not memory.finished

    memory.apply({"event": "sample_results", "phase": "day5", "results": {"vcd": 2.5e6}})
    memory.apply(
        {"event": "phase_completed", "key": "0.3", "phase": "run_wash", "outputs": {"out0": "CP-1"}}
    )
    memory.apply({"event": "run_state", "old": "Running", "new": "Complete"})
    assert memory.outputs["day5"] == {"vcd": 2.5e6}
    assert memory.pending_results == {}
    assert memory.progress == {} and memory.steps == {} and memory.current is None
    assert memory.finished


# ------------------------------------------------------------------ kill -9 and recover

RECIPE = recipe_text(
    "crash-test",
    """
hold_actions:
  - {set: reactor.rocking_sp, value: 0}
procedure:
  - operation: main
    phases:
      - {id: warm, type: set, values: {reactor.temperature_sp: 36.8}}
      - {id: wash, type: call, method: processor.start_program, args: [wash, 100, 1],
         until: processor.cp_state == "complete", fail_if: processor.cp_state == "error",
         timeout: 2h}
      - {id: culture, type: timer, duration: 2h}
""",
)


@pytest.fixture
def sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimThread]:
    """A simulated unit the child and then this process drive (environment set for both)."""
    env = sim_env(tmp_path / "sim")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with SimThread(env) as sim:
        yield sim


def progress(db: Path, run: str, key: str) -> float:
    bodies = [
        b
        for b in read_records(db, "event", run)
        if b.get("event") == "phase_progress" and b.get("key") == key
    ]
    return max((b["elapsed"] for b in bodies), default=0.0)


def calls(db: Path, run: str, method: str) -> int:
    return sum(
        1
        for b in read_records(db, "audit", run)
        if b.get("action") == "call" and b.get("method") == method
    )


async def test_a_killed_agent_recovers_the_run_held_where_it_was(
    sim: SimThread, tmp_path: Path
) -> None:
    """kill -9 during the timer; a new agent recovers the run Held in the timer with its elapsed
    time, never calls the program again, and completes the run after a restart."""
    work = tmp_path / "agent"
    work.mkdir()
    (work / "recipe.yaml").write_text(RECIPE)
    async with agent_rig(work, AGENT_SPEED) as setup:  # the users, the key; the unit reset
        await reset_unit(sim, setup)
    db = work / "journal.db"
    with (work / "child.err").open("wb") as err:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(CHILD),
            str(work),
            str(AGENT_SPEED),
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
        try:
            assert child.stdout is not None
            line = await asyncio.wait_for(child.stdout.readline(), 30)
            assert line.startswith(b"run "), (work / "child.err").read_text()[-2000:]
            run = line.decode().split()[1]
            await wait_for(lambda: progress(db, run, "0.2") >= 1800, "30 min into the timer", 30)
        finally:
            child.kill()
            await child.wait()
    assert calls(db, run, "start_program") == 1
    before = load_run(db, run)
    assert before.state == "Running" and before.current == "0.2"

    async with agent_rig(work, AGENT_SPEED, new_users=False) as rig:
        original = (work / "recipe.yaml").read_text()
        (work / "recipe.yaml").write_text(original.replace("2h}", "3h}"))
        with pytest.raises(RunRefused, match="changed since the run started"):
            await rig.runs.recover()
        (work / "recipe.yaml").write_text(original)

        engine = await rig.runs.recover()
        assert engine is not None and engine.run == run
        await rig.wait_state(engine, RunState.HELD)
        assert engine.memory.current == "0.2"
        assert engine.memory.progress["0.2"] >= 1800
        assert {"0.0", "0.1"} <= engine.memory.completed
        assert rig.events(run, "run_recovered")[0]["old"] == "Running"
        assert await rig.value("rocking_sp") == 0  # hold actions applied on recovery

        await engine.command("restart", who="sam", why="agent back")
        await rig.wait_state(engine, RunState.COMPLETE, within=30)
        assert calls(db, run, "start_program") == 1
        started = [e["phase"] for e in rig.events(run, "phase_started")]
        assert started == ["warm", "wash", "culture"]  # the timer was resumed, not restarted


SAMPLED = recipe_text(
    "restart-test",
    """
procedure:
  - operation: main
    phases:
      - {id: day5, type: sample, volume_ml: 2, results: {vcd: {type: float, unit: cells/mL}}}
      - {id: culture, type: timer, duration: 1h}
""",
)


async def test_an_agent_restart_keeps_sample_results_still_to_enter(
    sim: SimThread, tmp_path: Path
) -> None:
    """An agent stopped mid-run comes back Held with the sample whose results are still due
    open again; the results entered then reach the run, and restart completes it."""
    work = tmp_path / "agent"
    work.mkdir()
    async with agent_rig(work, AGENT_SPEED) as rig:
        await reset_unit(sim, rig)
        engine = await rig.start(SAMPLED)
        await rig.wait_prompt(engine, "day5")
        await rig.wait_phase(engine, "culture")
        run = engine.run
    async with agent_rig(work, AGENT_SPEED, new_users=False) as rig:
        recovered = await rig.runs.recover()
        assert recovered is not None and recovered.run == run
        await rig.wait_state(recovered, RunState.HELD)
        await rig.wait_prompt(recovered, "day5")
        await recovered.prompts.answer("day5", {"vcd": 2.5e6}, [], "olive")
        await recovered.command("restart", who="sam", why="agent back")
        await rig.wait_state(recovered, RunState.COMPLETE, within=30)
        assert load_run(work / "journal.db", run).outputs["day5"] == {"vcd": 2.5e6}
