"""The ISA-88 procedural state model (ISA-88.01 §5.7) of one run, as one table.

::

      Idle ──start──► Running ──────────── done ───────────► Complete
                       │  ▲  ▲
                 pause │  │  └── resume ── Paused ◄── done ── Pausing ◄──┐
                       │  │                                              │
                       └──┼──────────────────────────────────────────────┘
                          │
                          └─ done ── Restarting ◄── restart ── Held ◄── done ── Holding

      hold  ──► Holding    from Running, Pausing, Paused, Restarting
      stop  ──► Stopping   from Running, Pausing, Paused, Holding, Held, Restarting
      abort ──► Aborting   from every state except Idle, Aborting, Aborted, Complete
      Stopping ── done ──► Stopped          Aborting ── done ──► Aborted
      reset ──► Idle       from Stopped, Aborted, Complete

Stable states (wait for a command): Idle, Paused, Held, Complete, Stopped, Aborted. Transient
states (run their own logic, then ``done``): Running, Pausing, Holding, Restarting, Stopping,
Aborting. ``TABLE`` below is the whole model; every cell it leaves empty is refused with
``CommandRefused``.

The machine only decides and records transitions: it does no I/O. The engine injects two hooks,
each a plain or ``async`` callable that is awaited before ``command``/``done`` return:

- ``on_transition(old, new, command, who, why)`` for every transition, right as it takes effect
  (the engine journals it);
- ``on_refused(error)`` for every refused command, before ``CommandRefused`` is raised.

The state changes before ``on_transition`` is awaited; if the hook raises (the journal failed),
the new state stands and the error propagates: a hold must not be undone by a full disk.

``restore(state)`` puts a machine reloaded from the journal back into its last state without
hooks. A run that was in a transient state when the agent stopped (Running, Pausing, Holding,
Restarting, Stopping, Aborting) must not resume by itself: the *engine* forces it to Held after
restoring, with a transition it journals; this module does not decide that.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import structlog
from transitions import Machine, MachineError

__all__ = [
    "OPERATOR_COMMANDS",
    "STABLE",
    "TABLE",
    "Command",
    "CommandRefused",
    "ProcedureStateMachine",
    "RefusedHook",
    "RunState",
    "Transition",
    "TransitionHook",
]

log = structlog.get_logger(__name__)


class RunState(enum.StrEnum):
    """The procedural state of a run."""

    IDLE = "Idle"
    RUNNING = "Running"
    PAUSING = "Pausing"
    PAUSED = "Paused"
    HOLDING = "Holding"
    HELD = "Held"
    RESTARTING = "Restarting"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    ABORTING = "Aborting"
    ABORTED = "Aborted"
    COMPLETE = "Complete"

    @property
    def stable(self) -> bool:
        """True for the states that wait for a command; False for those that run logic."""
        return self in STABLE


class Command(enum.StrEnum):
    """The operator commands, plus ``done`` (a transient state's own logic finished)."""

    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    HOLD = "hold"
    RESTART = "restart"
    STOP = "stop"
    ABORT = "abort"
    RESET = "reset"
    DONE = "done"


S, C = RunState, Command  # short names for the table

#: The ISA-88 procedural state model: ``TABLE[state][command]`` is the next state; a command
#: missing from a state's row is refused there (DOMAIN.md §3).
TABLE: Mapping[RunState, Mapping[Command, RunState]] = {
    S.IDLE: {C.START: S.RUNNING},
    S.RUNNING: {
        C.PAUSE: S.PAUSING,
        C.HOLD: S.HOLDING,
        C.STOP: S.STOPPING,
        C.ABORT: S.ABORTING,
        C.DONE: S.COMPLETE,
    },
    S.PAUSING: {C.HOLD: S.HOLDING, C.STOP: S.STOPPING, C.ABORT: S.ABORTING, C.DONE: S.PAUSED},
    S.PAUSED: {C.RESUME: S.RUNNING, C.HOLD: S.HOLDING, C.STOP: S.STOPPING, C.ABORT: S.ABORTING},
    S.HOLDING: {C.STOP: S.STOPPING, C.ABORT: S.ABORTING, C.DONE: S.HELD},
    S.HELD: {C.RESTART: S.RESTARTING, C.STOP: S.STOPPING, C.ABORT: S.ABORTING},
    S.RESTARTING: {C.HOLD: S.HOLDING, C.STOP: S.STOPPING, C.ABORT: S.ABORTING, C.DONE: S.RUNNING},
    S.STOPPING: {C.ABORT: S.ABORTING, C.DONE: S.STOPPED},
    S.STOPPED: {C.ABORT: S.ABORTING, C.RESET: S.IDLE},
    S.ABORTING: {C.DONE: S.ABORTED},
    S.ABORTED: {C.RESET: S.IDLE},
    S.COMPLETE: {C.RESET: S.IDLE},
}

STABLE = frozenset({S.IDLE, S.PAUSED, S.HELD, S.COMPLETE, S.STOPPED, S.ABORTED})

OPERATOR_COMMANDS = tuple(c for c in Command if c is not Command.DONE)

TransitionHook = Callable[[RunState, RunState, Command, str, str], Awaitable[None] | None]
RefusedHook = Callable[["CommandRefused"], Awaitable[None] | None]


class CommandRefused(Exception):
    """A command that the current state does not accept; the state is unchanged."""

    def __init__(
        self, state: RunState, command: str, reason: str, *, who: str = "", why: str = ""
    ) -> None:
        super().__init__(f"command {command!r} refused in state {state}: {reason}")
        self.state = state
        self.command = command
        self.reason = reason
        self.who = who
        self.why = why


@dataclass(frozen=True, slots=True)
class Transition:
    """One transition that took effect."""

    old: RunState
    new: RunState
    command: Command
    who: str = ""
    why: str = ""


class _Model:
    """What ``transitions`` drives: it keeps the current state in ``state``."""

    state: RunState


def _sources(command: Command) -> list[RunState]:
    return [state for state, row in TABLE.items() if command in row]


async def _call(hook: Callable[..., Awaitable[None] | None] | None, *args: Any) -> None:
    if hook is not None:
        result = hook(*args)
        if inspect.isawaitable(result):
            await result


class ProcedureStateMachine:
    """The procedural state of one run (see the module docstring for the model and hooks)."""

    def __init__(
        self,
        *,
        initial: RunState = RunState.IDLE,
        on_transition: TransitionHook | None = None,
        on_refused: RefusedHook | None = None,
        run: str | None = None,
    ) -> None:
        self._model = _Model()
        self._machine = Machine(
            model=self._model,
            states=RunState,
            initial=initial,
            transitions=[
                {"trigger": command.value, "source": source, "dest": dest}
                for source, row in TABLE.items()
                for command, dest in row.items()
            ],
            auto_transitions=False,
            ignore_invalid_triggers=False,
        )
        self._on_transition = on_transition
        self._on_refused = on_refused
        self._log = log.bind(run=run) if run is not None else log

    @property
    def state(self) -> RunState:
        """The current state."""
        return self._model.state

    def allowed(self) -> list[Command]:
        """The operator commands the current state accepts (the HMI's enabled buttons)."""
        row = TABLE[self.state]
        return [c for c in OPERATOR_COMMANDS if c in row]

    async def command(self, name: str, *, who: str, why: str = "") -> Transition:
        """Apply operator command ``name`` (``start``, ``pause``, ...); ``who`` is the operator
        or component that asked. Raises ``CommandRefused`` (after ``on_refused``) when the
        current state does not accept it; ``done`` is not an operator command."""
        try:
            command = Command(name)
        except ValueError:
            known = ", ".join(OPERATOR_COMMANDS)
            await self._refuse(name, f"unknown command (known: {known})", who, why)
        if command is Command.DONE:
            await self._refuse(
                name, "done is internal: the state's own logic finishes it", who, why
            )
        return await self._apply(command, who, why)

    async def done(self, *, who: str = "engine", why: str = "") -> Transition:
        """The current transient state's own logic has finished: move to the next state.
        Raises ``CommandRefused`` in a stable state (an engine bug)."""
        return await self._apply(Command.DONE, who, why)

    def restore(self, state: RunState) -> None:
        """Set the state reloaded from the journal after a restart; no hooks run. The engine
        then forces a transient state to Held (see the module docstring)."""
        old = self.state
        self._machine.set_state(RunState(state), model=self._model)
        self._log.info("state_restored", old=old.value, new=self.state.value)

    async def _apply(self, command: Command, who: str, why: str) -> Transition:
        old = self.state
        try:
            self._machine.events[command.value].trigger(self._model)
        except MachineError:
            allowed = ", ".join(s.value for s in _sources(command))
            await self._refuse(command.value, f"{command} is allowed only from {allowed}", who, why)
        transition = Transition(old, self.state, command, who, why)
        self._log.info(
            "state_changed",
            old=old.value,
            new=transition.new.value,
            command=command.value,
            who=who,
            why=why,
        )
        await _call(self._on_transition, old, transition.new, command, who, why)
        return transition

    async def _refuse(self, command: str, reason: str, who: str, why: str) -> NoReturn:
        error = CommandRefused(self.state, command, reason, who=who, why=why)
        self._log.warning(
            "command_refused", state=self.state.value, command=command, reason=reason, who=who
        )
        await _call(self._on_refused, error)
        raise error
