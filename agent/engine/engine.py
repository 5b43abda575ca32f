"""The run engine: one recipe, one run, executed as the ISA-88 procedural state model.

Everything that changes the run goes through one queue served by one task (``serve``): operator
commands from the API, ``done`` when a state's own logic finishes, and the requests of phases
(a timeout that holds) and monitors (an alarm that holds). So transitions never race, and each
one is journaled (``run_state`` event and a signed checkpoint) before its logic runs.

State logic::

    Running     a runner task executes the phases not yet completed (``agent.engine.phases``)
    Pausing     the runner stops at the next phase boundary, then done -> Paused
    Holding     the runner is cancelled, the recipe's hold actions are applied, done -> Held
    Restarting  done -> Running: the runner resumes the interrupted phase where it was
    Stopping    runner cancelled, hold actions applied (controlled end), done -> Stopped
    Aborting    runner cancelled, hold actions applied without read-back, done -> Aborted

A scan task evaluates the monitors and watches the devices the run uses: a device whose tags
read bad raises a critical ``device_lost`` alarm and holds the run.

After a crash the service rebuilds the run's memory from the journal (``agent.engine.memory``) and
creates the engine with ``recovered=True``: it comes back Held, hold actions applied, and waits
for an operator's restart; completed phases are never executed again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import structlog

from agent.alarms.manager import AlarmManager, Priority
from agent.config import UnitConfig
from agent.devices.hub import DeviceHub
from agent.engine.dispatcher import Dispatcher
from agent.engine.env import RunEnv
from agent.engine.memory import RunMemory
from agent.engine.monitors import Action, Change, Monitor, MonitorSet
from agent.engine.phases import AbortRequest, HoldRequest, PhaseRunner
from agent.engine.prompts import Prompts
from agent.engine.states import CommandRefused, ProcedureStateMachine, RunState
from agent.journal.journal import Journal
from agent.recipe.model import Operation, Recipe, SamplePhase, SetAction
from agent.record.format import Kind
from drivers.base import Quality
from drivers.clock import Clock
from drivers.errors import DriverError

log = structlog.get_logger(__name__)

ACTIVE = frozenset({RunState.RUNNING, RunState.PAUSING, RunState.PAUSED, RunState.RESTARTING})
FINAL = frozenset({RunState.COMPLETE, RunState.STOPPED, RunState.ABORTED})


@dataclass
class _Request:
    command: str
    who: str
    why: str
    reply: asyncio.Future[Any] | None = field(default=None)


class Engine:
    """Executes one run of one recipe on a unit."""

    def __init__(
        self,
        *,
        recipe: Recipe,
        config: UnitConfig,
        memory: RunMemory,
        hub: DeviceHub,
        journal: Journal,
        clock: Clock,
        recovered: bool = False,
        scan_seconds: float | None = None,
        authenticator: Any = None,
    ) -> None:
        self.recipe = recipe
        self.config = config
        self.memory = memory
        self.run = memory.run
        self.hub = hub
        self.journal = journal
        self.clock = clock
        self.recovered = recovered
        # scan monitors and devices 20 times a wall second, whatever the clock speed
        self.scan_seconds = scan_seconds or 0.05 * clock.speed
        self.dispatcher = Dispatcher(hub, journal, clock, run=self.run)
        self._t0 = clock.monotonic() - memory.elapsed_run
        self.env = RunEnv(
            recipe,
            config,
            memory.binding,
            memory.params,
            hub.snapshot,
            memory.outputs,
            self.elapsed,
        )
        self.alarms = AlarmManager(clock, self._sink)
        self.prompts = Prompts(self, authenticator)
        self.sm = ProcedureStateMachine(
            initial=RunState(memory.state) if memory.state else RunState.IDLE,
            on_transition=self._on_transition,
            on_refused=self._on_refused,
            run=self.run,
        )
        # built when the engine serves: a new run's binding arrives with its run_started event
        self.monitors: dict[str, tuple[MonitorSet, str | None]] = {}
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._runner: asyncio.Task[None] | None = None
        self._operation: Operation | None = None
        self.finished = asyncio.Event()
        self._lost: set[str] = set()
        self.log = log.bind(run=self.run, recipe=recipe.id)

    # ------------------------------------------------------------------ journal
    def elapsed(self) -> float:
        """Run time in seconds (continuing across a recovery)."""
        return self.clock.monotonic() - self._t0

    async def event(self, body: dict[str, Any]) -> None:
        """Journal an event of this run (durable on return) and fold it into the memory."""
        body = {**body, "run_elapsed": round(self.elapsed(), 3)}
        await self.journal.append(Kind.EVENT, body, run=self.run)
        self.memory.apply(body)

    async def _sink(self, kind: str, body: dict[str, Any]) -> None:
        await self.journal.append(kind, body, run=self.run)

    async def _on_transition(
        self, old: RunState, new: RunState, command: str, who: str, why: str
    ) -> None:
        await self.event(
            {
                "event": "run_state",
                "old": old.value,
                "new": new.value,
                "command": command,
                "who": who,
                "why": why,
            }
        )
        await self.journal.checkpoint(f"run {self.run}: {old.value} -> {new.value}")

    async def _on_refused(self, error: CommandRefused) -> None:
        await self.journal.append(
            Kind.AUDIT,
            {
                "action": "command_refused",
                "command": str(error.command),
                "state": error.state.value,
                "reason": error.reason,
                "who": error.who,
                "why": error.why,
            },
            run=self.run,
        )

    # ------------------------------------------------------------------ commands
    async def command(self, command: str, *, who: str, why: str = "") -> RunState:
        """Queue an operator command and wait for its transition; ``CommandRefused`` if not
        allowed now (the refusal is journaled)."""
        if self.finished.is_set():  # nobody serves the queue any more: refuse at once
            error = CommandRefused(
                self.sm.state,
                command,
                "the run is over and its engine has stopped",
                who=who,
                why=why,
            )
            await self._on_refused(error)
            raise error
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(command, who, why, reply))
        state: RunState = await reply
        return state

    def request(self, command: str, who: str, why: str) -> None:
        """Ask for a command from inside the engine (phases, monitors); never waits."""
        self._queue.put_nowait(_Request(command, who, why))

    def _done(self, why: str) -> None:
        self._queue.put_nowait(_Request("done", "engine", why))

    async def serve(self) -> None:
        """Run the engine until the run is reset to Idle (or cancelled)."""
        self.monitors = self._build_monitors()
        for phase_id, key in self.memory.pending_results.items():  # results still to enter
            phase = self.recipe.phase(phase_id)
            if isinstance(phase, SamplePhase):
                self.prompts.expect_results(key, phase)
        scan = asyncio.create_task(self._scan(), name=f"scan-{self.run}")
        try:
            if self.recovered:
                await self._recover()
            elif self.sm.state is RunState.IDLE:
                await self._handle(
                    _Request("start", self.memory.started_by or "operator", "run started")
                )
            while True:
                req = await self._queue.get()
                await self._handle(req)
                if self.sm.state is RunState.IDLE and self.memory.recipe:
                    break
        finally:
            self.finished.set()
            scan.cancel()
            await self._stop_runner()
            await asyncio.gather(scan, return_exceptions=True)
            while not self._queue.empty():  # commands nobody will serve: do not leave them hanging
                req = self._queue.get_nowait()
                if req.reply is not None and not req.reply.done():
                    req.reply.set_exception(
                        CommandRefused(
                            self.sm.state,
                            req.command,
                            "the run's engine has stopped",
                            who=req.who,
                            why=req.why,
                        )
                    )

    async def _handle(self, req: _Request) -> None:
        try:
            if req.command == "done":
                if self.sm.state.stable:
                    return  # a late `done` of a runner that was interrupted meanwhile
                t = await self.sm.done(who=req.who, why=req.why)
            else:
                if req.command == "restart" and self.sm.state is RunState.HELD:
                    await self._check_restart(req)
                t = await self.sm.command(req.command, who=req.who, why=req.why)
        except CommandRefused as exc:
            if req.reply and not req.reply.done():
                req.reply.set_exception(exc)
            return
        if req.reply and not req.reply.done():
            req.reply.set_result(t.new)
        await self._enter(t.new)

    async def _check_restart(self, req: _Request) -> None:
        """Refuse a restart while what held the run is still there: a lost device or a tripped
        monitor whose action holds, pauses or aborts (it would not trip again by itself)."""
        causes = [f"device {d} is lost" for d in sorted(self._lost)]
        for mset, op in self.monitors.values():
            if op is not None and (self._operation is None or self._operation.operation != op):
                continue
            causes += [
                f"monitor {m.id} is still tripped"
                for m in mset.tripped()
                if m.action is not Action.ALARM
            ]
        if causes:
            error = CommandRefused(
                self.sm.state, req.command, "; ".join(causes), who=req.who, why=req.why
            )
            await self._on_refused(error)
            raise error

    async def _enter(self, state: RunState) -> None:
        """The state's own logic (see the module docstring)."""
        if state is RunState.RUNNING:
            if self._runner is None or self._runner.done():
                self._runner = asyncio.create_task(self._run_procedure(), name=f"run-{self.run}")
        elif state is RunState.RESTARTING:
            self._done("restarted")
        elif state in (RunState.HOLDING, RunState.STOPPING, RunState.ABORTING):
            await self._stop_runner()
            await self.apply_hold_actions(confirm=state is not RunState.ABORTING)
            self._done("hold actions applied" if state is RunState.HOLDING else "run ended")
        elif state is RunState.PAUSING and (self._runner is None or self._runner.done()):
            self._done("paused")

    async def _stop_runner(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None and not runner.done():
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        self.prompts.cancel_all()

    async def _recover(self) -> None:
        """Come back Held after a crash: whatever state the journal last showed."""
        before = self.sm.state
        self.sm.restore(RunState.HELD)
        await self.event(
            {
                "event": "run_recovered",
                "old": before.value,
                "new": "Held",
                "current_phase": self.memory.current,
                "completed": len(self.memory.completed),
            }
        )
        await self.event(
            {
                "event": "run_state",
                "old": before.value,
                "new": "Held",
                "command": "recover",
                "who": "engine",
                "why": "agent restarted",
            }
        )
        await self.journal.checkpoint(f"run {self.run}: recovered Held")
        self.log.warning("run_recovered_held", before=before.value, phase=self.memory.current)
        if before not in FINAL:
            await self.apply_hold_actions(confirm=True)

    # ------------------------------------------------------------------ procedure
    async def _run_procedure(self) -> None:
        runner = PhaseRunner(self)
        try:
            for index, operation in enumerate(self.recipe.procedure):
                self._operation = operation
                await runner.block(operation.phases, str(index))
        except AbortRequest as req:  # before HoldRequest: it is a subclass
            self.request("abort", req.who, req.why)
            return
        except HoldRequest as req:
            self.request("hold", req.who, req.why)
            return
        except DriverError as exc:
            await self.event({"event": "device_error", "error": str(exc)})
            self.request("hold", "engine", f"device error: {exc}")
            return
        except _PausedAtBoundary:
            self._done("paused at a phase boundary")
            return
        self._operation = None
        self._done("procedure complete")

    def at_boundary(self) -> None:
        """Called by the runner between phases: stop here when a pause was asked for."""
        if self.sm.state is RunState.PAUSING:
            raise _PausedAtBoundary

    async def apply_hold_actions(self, *, confirm: bool) -> None:
        """Bring the devices to the recipe's safe state; a failing action is journaled and the
        others are still applied. Actions run in recipe order on each device, and the devices
        side by side: a device that does not answer must not delay the others' safe state."""
        by_device: dict[str, list[Any]] = {}
        for action in self.recipe.hold_actions:
            ref = action.set if isinstance(action, SetAction) else action.call
            by_device.setdefault(self.memory.binding.get(ref.split(".", 1)[0], ""), []).append(
                action
            )
        await asyncio.gather(*(self._hold_actions(a, confirm) for a in by_device.values()))

    async def _hold_actions(self, actions: list[Any], confirm: bool) -> None:
        for action in actions:
            try:
                if isinstance(action, SetAction):
                    tag = self.env.tag(action.set)
                    value = self.env.plain(action.value)
                    await self.dispatcher.write(
                        tag, value, who="engine", why="hold action", confirm=confirm
                    )
                else:
                    role, method = action.call.split(".", 1)
                    args = [self.env.plain(a) for a in action.args]
                    await self.dispatcher.call(
                        self.env.device(role), method, args, who="engine", why="hold action"
                    )
            except (DriverError, LookupError) as exc:
                self.log.error("hold_action_failed", action=str(action), error=str(exc))
                await self.event({"event": "hold_action_failed", "error": str(exc)})

    # ------------------------------------------------------------------ monitors and devices
    def _build_monitors(self) -> dict[str, tuple[MonitorSet, str | None]]:
        """One monitor set for the procedure, one per operation that has monitors."""
        sets: dict[str, tuple[MonitorSet, str | None]] = {"procedure": (MonitorSet(), None)}
        defined: set[str] = set()
        scopes = [("procedure", None, self.recipe.monitors)] + [
            (f"op:{op.operation}", op.operation, op.monitors)
            for op in self.recipe.procedure
            if op.monitors
        ]
        for scope, op, specs in scopes:
            mset = sets.setdefault(scope, (MonitorSet(), op))[0]
            for spec in specs:
                mset.add(self._monitor(spec))
                if spec.id not in defined:  # one alarm per monitor id, whatever its scope
                    defined.add(spec.id)
                    self.alarms.define(
                        spec.id,
                        Priority(spec.priority),
                        spec.message or f"monitor {spec.id} tripped",
                    )
        for device in sorted(set(self.memory.binding.values())):
            self.alarms.define(
                f"device_lost_{device}", Priority.CRITICAL, f"device {device} stopped answering"
            )
        return sets

    def _monitor(self, spec: Any) -> Monitor:
        if spec.device_lost is not None:
            device = self.memory.binding.get(spec.device_lost, spec.device_lost)

            def trip() -> bool | None:
                return device in self._lost

            clear = None
        else:

            def trip() -> bool | None:
                return self.env.test(spec.when)

            clear = (lambda: self.env.test(spec.clear)) if spec.clear is not None else None
        return Monitor(
            spec.id,
            trip,
            clear,
            on_delay=spec.on_delay,
            off_delay=spec.off_delay,
            priority=Priority(spec.priority),
            action=Action(spec.action),
            message=spec.message,
        )

    def _used_tags(self) -> dict[str, list[str]]:
        by_device: dict[str, list[str]] = {}
        for role, device in self.memory.binding.items():
            spec = self.recipe.equipment.get(role)
            if spec is not None:
                by_device.setdefault(device, []).extend(spec.tags)
        return by_device

    async def _scan(self) -> None:
        used = self._used_tags()
        while True:
            await self.clock.sleep(self.scan_seconds)
            try:
                await self._scan_once(used)
            except Exception:  # a monitor that crashes must not stop the others
                self.log.exception("scan_failed")

    async def _scan_once(self, used: dict[str, list[str]]) -> None:
        await self.alarms.tick()
        for device, tags in used.items():
            samples = [self.hub.snapshot.get(t) for t in tags]
            bad = any(s is not None and s.quality is Quality.BAD for s in samples)
            if bad and device not in self._lost:
                self._lost.add(device)
                await self.alarms.raise_(f"device_lost_{device}", detail="tags read bad")
                await self.event({"event": "device_lost", "device": device})
                if self.sm.state in ACTIVE:
                    self.request("hold", "engine", f"device {device} lost")
            elif not bad and device in self._lost and all(s is not None for s in samples):
                self._lost.discard(device)
                await self.alarms.clear(f"device_lost_{device}")
                await self.event({"event": "device_recovered", "device": device})
        now = self.clock.monotonic()
        for mset, op in self.monitors.values():
            if op is not None and (self._operation is None or self._operation.operation != op):
                continue
            for ev in mset.evaluate(now):
                await self._monitor_event(ev.monitor, ev.change)

    async def _monitor_event(self, monitor: Monitor, change: Change) -> None:
        if change is Change.TRIPPED:
            await self.alarms.raise_(monitor.id, detail=monitor.message)
            action = monitor.action
            if action is not Action.ALARM and self.sm.state in ACTIVE:
                self.request(action.value, f"monitor:{monitor.id}", monitor.message or monitor.id)
        elif change is Change.CLEARED:
            await self.alarms.clear(monitor.id)
        else:
            await self.event({"event": "monitor_unknown", "monitor": monitor.id})

    # ------------------------------------------------------------------ views
    def status(self) -> dict[str, Any]:
        """The run as the HMI and ``bedside run status`` show it."""
        return {
            "run": self.run,
            "recipe": {
                "id": self.recipe.id,
                "version": self.recipe.version,
                "title": self.recipe.title,
            },
            "state": self.sm.state.value,
            "allowed": [c.value for c in self.sm.allowed()],
            "elapsed_s": round(self.elapsed(), 1),
            "operation": self._operation.operation if self._operation else None,
            "phase": self.memory.current,
            "completed_phases": len(self.memory.completed),
            "prompts": self.prompts.views(),
            "alarms": [
                {
                    "id": a.id,
                    "priority": a.priority.value,
                    "state": a.state.value,
                    "active": a.active,
                    "message": a.message,
                    "detail": a.detail,
                    "since": a.since.isoformat(),
                }
                for a in self.alarms.active()
            ],
            "params": self.memory.params,
        }


class _PausedAtBoundary(Exception):
    """The runner reached a phase boundary while Pausing."""
