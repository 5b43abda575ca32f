"""The ISA-88 procedural state machine: every cell of the table, hooks, refusals, restore."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.engine.states import (
    OPERATOR_COMMANDS,
    STABLE,
    TABLE,
    Command,
    CommandRefused,
    ProcedureStateMachine,
    RunState,
    Transition,
)

# DOMAIN.md §3, copied verbatim: the module's TABLE is checked against this independent text.
SPEC = """
| from | start | pause | resume | hold | restart | stop | abort | reset | done |
| Idle | Running | | | | | | | | |
| Running | | Pausing | | Holding | | Stopping | Aborting | | Complete |
| Pausing | | | | Holding | | Stopping | Aborting | | Paused |
| Paused | | | Running | Holding | | Stopping | Aborting | | |
| Holding | | | | | | Stopping | Aborting | | Held |
| Held | | | | | Restarting | Stopping | Aborting | | |
| Restarting | | | | Holding | | Stopping | Aborting | | Running |
| Stopping | | | | | | | Aborting | | Stopped |
| Stopped | | | | | | | Aborting | Idle | |
| Aborting | | | | | | | | | Aborted |
| Aborted, Complete | | | | | | | | Idle | |
"""


def parse_spec() -> dict[tuple[RunState, Command], RunState | None]:
    lines = [line.strip().strip("|").split("|") for line in SPEC.strip().splitlines()]
    header = [Command(cell.strip()) for cell in lines[0][1:]]
    cells: dict[tuple[RunState, Command], RunState | None] = {}
    for row in lines[1:]:
        for source in row[0].split(","):
            for command, cell in zip(header, row[1:], strict=True):
                dest = cell.strip()
                cells[(RunState(source.strip()), command)] = RunState(dest) if dest else None
    return cells


EXPECTED = parse_spec()
CELLS = list(itertools.product(RunState, Command))


class Recorder:
    """Collects what the hooks are called with."""

    def __init__(self) -> None:
        self.transitions: list[tuple[Any, ...]] = []
        self.refusals: list[CommandRefused] = []

    async def on_transition(self, *args: Any) -> None:
        self.transitions.append(args)

    async def on_refused(self, error: CommandRefused) -> None:
        self.refusals.append(error)


def machine(state: RunState, hooks: Recorder) -> ProcedureStateMachine:
    return ProcedureStateMachine(
        initial=state, on_transition=hooks.on_transition, on_refused=hooks.on_refused
    )


async def trigger(sm: ProcedureStateMachine, command: Command) -> Transition:
    if command is Command.DONE:
        return await sm.done(who="engine", why="logic finished")
    return await sm.command(command.value, who="alice", why="test")


def test_table_matches_domain_spec() -> None:
    """The module's one table holds exactly the cells of DOMAIN.md §3 (12 states by 9 triggers)."""
    assert len(EXPECTED) == 12 * 9
    assert set(TABLE) == set(RunState)
    for (state, command), dest in EXPECTED.items():
        assert TABLE[state].get(command) == dest, (state, command)


@pytest.mark.parametrize(("state", "command"), [c for c in CELLS if EXPECTED[c] is not None])
async def test_allowed_cell_lands_in_table_state(state: RunState, command: Command) -> None:
    """An allowed command moves to the table's state and calls on_transition once with it."""
    hooks = Recorder()
    sm = machine(state, hooks)
    transition = await trigger(sm, command)
    dest = TABLE[state][command]
    assert sm.state is dest
    who, why = ("engine", "logic finished") if command is Command.DONE else ("alice", "test")
    assert transition == Transition(state, dest, command, who, why)
    assert hooks.transitions == [(state, dest, command, who, why)]
    assert hooks.refusals == []


@pytest.mark.parametrize(("state", "command"), [c for c in CELLS if EXPECTED[c] is None])
async def test_refused_cell_raises_and_keeps_state(state: RunState, command: Command) -> None:
    """A command outside the table raises CommandRefused naming state and command, calls
    on_refused and leaves the state unchanged."""
    hooks = Recorder()
    sm = machine(state, hooks)
    with pytest.raises(CommandRefused) as caught:
        await trigger(sm, command)
    error = caught.value
    assert sm.state is state
    assert (error.state, error.command) == (state, command.value)
    assert f"command '{command}' refused in state {state}:" in str(error)
    assert hooks.refusals == [error]
    assert hooks.transitions == []


def test_refusal_message_names_allowed_sources() -> None:
    """The refusal reason says where the command would be allowed."""
    error = CommandRefused(RunState.RUNNING, "resume", "resume is allowed only from Paused")
    assert str(error) == (
        "command 'resume' refused in state Running: resume is allowed only from Paused"
    )


async def test_resume_in_running_gives_documented_message() -> None:
    """Resume while Running is refused with the message the HMI shows."""
    sm = ProcedureStateMachine(initial=RunState.RUNNING)
    with pytest.raises(CommandRefused, match=r"resume is allowed only from Paused$"):
        await sm.command("resume", who="alice")


async def test_unknown_command_is_refused() -> None:
    """A command name that is not an ISA-88 command is refused and reported to on_refused."""
    hooks = Recorder()
    sm = machine(RunState.IDLE, hooks)
    with pytest.raises(CommandRefused, match="unknown command"):
        await sm.command("jump", who="alice", why="typo")
    assert sm.state is RunState.IDLE
    assert [(e.command, e.who, e.why) for e in hooks.refusals] == [("jump", "alice", "typo")]


async def test_done_is_not_an_operator_command() -> None:
    """An operator cannot send done, even where the state's logic could finish."""
    sm = ProcedureStateMachine(initial=RunState.RUNNING)
    with pytest.raises(CommandRefused, match="done is internal"):
        await sm.command("done", who="alice")
    assert sm.state is RunState.RUNNING


@pytest.mark.parametrize("state", list(RunState))
def test_allowed_lists_operator_commands_of_the_row(state: RunState) -> None:
    """allowed() is the row's operator commands in a fixed order, never done."""
    sm = ProcedureStateMachine(initial=state)
    assert sm.allowed() == [c for c in OPERATOR_COMMANDS if c in TABLE[state]]
    assert Command.DONE not in sm.allowed()


def test_stable_states_are_those_without_done() -> None:
    """Stable states are exactly the ones with no done transition of their own."""
    assert {s for s in RunState if Command.DONE not in TABLE[s]} == STABLE
    assert RunState.HELD.stable and not RunState.HOLDING.stable


async def test_restore_sets_state_without_hooks() -> None:
    """restore() reinstates a journaled state and calls neither hook."""
    hooks = Recorder()
    sm = machine(RunState.IDLE, hooks)
    sm.restore(RunState.RUNNING)
    assert sm.state is RunState.RUNNING
    assert hooks.transitions == [] and hooks.refusals == []
    await sm.command("hold", who="engine", why="recovered after restart")
    assert sm.state is RunState.HOLDING


async def test_plain_function_hooks_are_called() -> None:
    """Hooks may be plain functions as well as coroutines."""
    seen: list[tuple[Any, ...]] = []
    refused: list[str] = []
    sm = ProcedureStateMachine(
        on_transition=lambda *args: seen.append(args),
        on_refused=lambda error: refused.append(error.command),
    )
    await sm.command("start", who="alice")
    with pytest.raises(CommandRefused):
        await sm.command("reset", who="alice")
    assert seen == [(RunState.IDLE, RunState.RUNNING, Command.START, "alice", "")]
    assert refused == ["reset"]


async def test_hold_restart_cycle_reports_each_transition_in_order() -> None:
    """A hold/restart cycle to completion reports every transition, in order, with who and why."""
    hooks = Recorder()
    sm = machine(RunState.IDLE, hooks)
    await sm.command("start", who="alice", why="batch B-1")
    await sm.command("hold", who="monitor:temp_high", why="temperature above 38.5")
    await sm.done()
    await sm.command("restart", who="alice", why="temperature back in range")
    await sm.done()
    await sm.done()
    await sm.command("reset", who="alice", why="next batch")
    assert [(old, new) for old, new, *_ in hooks.transitions] == [
        (RunState.IDLE, RunState.RUNNING),
        (RunState.RUNNING, RunState.HOLDING),
        (RunState.HOLDING, RunState.HELD),
        (RunState.HELD, RunState.RESTARTING),
        (RunState.RESTARTING, RunState.RUNNING),
        (RunState.RUNNING, RunState.COMPLETE),
        (RunState.COMPLETE, RunState.IDLE),
    ]
    assert hooks.transitions[1][3:] == ("monitor:temp_high", "temperature above 38.5")


async def test_transitions_and_refusals_are_logged() -> None:
    """Each transition logs state_changed old -> new; each refusal logs command_refused."""
    sm = ProcedureStateMachine(run="R-1")
    with capture_logs() as logs:
        await sm.command("start", who="alice")
        with pytest.raises(CommandRefused):
            await sm.command("start", who="alice")
    changed = [e for e in logs if e["event"] == "state_changed"]
    refused = [e for e in logs if e["event"] == "command_refused"]
    assert changed == [
        {
            "event": "state_changed",
            "log_level": "info",
            "run": "R-1",
            "old": "Idle",
            "new": "Running",
            "command": "start",
            "who": "alice",
            "why": "",
        }
    ]
    assert refused[0]["state"] == "Running" and refused[0]["command"] == "start"


async def test_failing_transition_hook_propagates_and_state_stands() -> None:
    """If on_transition fails (journal down), the error propagates and the new state stands."""

    async def broken(*args: Any) -> None:
        raise OSError("disk full")

    sm = ProcedureStateMachine(initial=RunState.RUNNING, on_transition=broken)
    with pytest.raises(OSError, match="disk full"):
        await sm.command("hold", who="engine", why="monitor tripped")
    assert sm.state is RunState.HOLDING
