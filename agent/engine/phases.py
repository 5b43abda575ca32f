"""Phase execution: one coroutine per phase type, run by ``PhaseRunner`` in document order.

Phases act on devices only through the engine's dispatcher and record their progress through
``engine.event``. A phase is identified by its key, the path of indices through operations,
phases and loop iterations (``"2.0.5.1"``); completed keys are skipped, so after a hold or a
crash nothing completed runs again and the interrupted phase resumes with its elapsed time.

A phase asks for a hold or an abort by raising ``HoldRequest``/``AbortRequest``; the engine
then carries it out through its command queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agent.alarms.manager import Priority
from agent.expr.expression import Expr
from agent.recipe.model import (
    BranchPhase,
    CallPhase,
    Phase,
    PromptPhase,
    RampPhase,
    RepeatPhase,
    SamplePhase,
    SetPhase,
    TimerPhase,
    TransferPhase,
    WaitPhase,
)
from drivers.errors import MethodFailed

if TYPE_CHECKING:
    from agent.engine.engine import Engine

PROGRESS_EVERY = 600.0  # seconds of run time between journaled progress of a long phase


class HoldRequest(Exception):
    """A phase needs the run held (timeout, read-back failure, stall)."""

    def __init__(self, who: str, why: str) -> None:
        super().__init__(why)
        self.who, self.why = who, why


class AbortRequest(HoldRequest):
    """A phase needs the run aborted."""


class PhaseRunner:
    """Executes blocks of phases for an engine."""

    def __init__(self, engine: Engine) -> None:
        self.e = engine
        self.memory = engine.memory
        self.env = engine.env
        self.clock = engine.clock
        self._saved: dict[str, float] = {}

    # ------------------------------------------------------------------ structure
    async def block(self, phases: Sequence[Phase], prefix: str) -> None:
        for index, phase in enumerate(phases):
            self.e.at_boundary()
            key = f"{prefix}.{index}"
            if key not in self.memory.completed:
                await self.phase(phase, key)

    async def phase(self, phase: Phase, key: str) -> None:
        if self.memory.current != key:
            await self.e.event(
                {
                    "event": "phase_started",
                    "key": key,
                    "phase": phase.id,
                    "type": phase.type,
                    "title": phase.title,
                }
            )
        handler = getattr(self, f"_{phase.type}")
        outputs = await handler(phase, key)
        await self.e.event(
            {"event": "phase_completed", "key": key, "phase": phase.id, "outputs": outputs or {}}
        )

    async def _repeat(self, phase: RepeatPhase, key: str) -> dict[str, Any]:
        n = self.memory.loops.get(key, 0)
        while n < phase.max_iterations:
            # run.iteration is the pass number: the pass to come when `while` is checked, the
            # pass just done when `until` is
            self.env.iterations.append(n + 1)
            try:
                if phase.while_ is not None and not await self._decide(phase.while_):
                    break
                await self.block(phase.phases, f"{key}.{n}")
                n += 1
                await self.e.event({"event": "loop_iteration", "key": key, "iteration": n})
                if phase.until is not None and await self._decide(phase.until):
                    break
            finally:
                self.env.iterations.pop()
        else:
            await self.e.event(
                {"event": "loop_limit", "key": key, "phase": phase.id, "iterations": n}
            )
        return {"iterations": n}

    async def _branch(self, phase: BranchPhase, key: str) -> dict[str, Any]:
        taken = self.memory.branches.get(key)
        if taken is None:
            taken = "then" if await self._decide(phase.if_) else "else"
            await self.e.event({"event": "branch_taken", "key": key, "branch": taken})
        await self.block(phase.then if taken == "then" else phase.else_, f"{key}.{taken[0]}")
        return {"branch": taken}

    async def _decide(self, expr: Expr) -> bool:
        """A decision needs a known value: wait for one (a lost device holds the run anyway)."""
        while (result := self.env.test(expr)) is None:
            await self.clock.sleep(self.e.scan_seconds)
        return result

    # ------------------------------------------------------------------ time
    async def _progress(self, key: str, elapsed: float, *, force: bool = False) -> None:
        if (
            force
            or elapsed - self._saved.get(key, self.memory.progress.get(key, 0.0)) >= PROGRESS_EVERY
        ):
            self._saved[key] = elapsed
            await self.e.event(
                {"event": "phase_progress", "key": key, "elapsed": round(elapsed, 3)}
            )

    async def _run_for(
        self, key: str, total: float | None, until: Any = None, hold_for: float | None = None
    ) -> tuple[bool, float]:
        """Wait until ``until()`` holds (for ``hold_for``) or ``total`` elapsed; returns
        (condition met, elapsed). Elapsed time survives holds and crashes."""
        elapsed = self.memory.progress.get(key, 0.0)
        true_since: float | None = None
        step = self.e.scan_seconds
        try:
            while True:
                if until is not None:
                    ok = until()
                    if ok:
                        true_since = elapsed if true_since is None else true_since
                        if elapsed - true_since >= (hold_for or 0.0):
                            return True, elapsed
                    else:
                        true_since = None
                if total is not None and elapsed >= total:
                    return False, elapsed
                wait = step if total is None else min(step, max(total - elapsed, 0.0))
                t0 = self.clock.monotonic()
                try:
                    await self.clock.sleep(wait)
                finally:
                    elapsed += self.clock.monotonic() - t0
                await self._progress(key, elapsed)
        except asyncio.CancelledError:
            await self._progress(key, elapsed, force=True)
            raise

    async def _timeout(self, phase: Any, key: str) -> dict[str, Any]:
        what = f"phase {phase.id}: no result within {phase.timeout:g} s"
        action = phase.on_timeout
        if action == "abort":
            raise AbortRequest("engine", what)
        if action == "hold":
            raise HoldRequest("engine", what)
        alarm = f"timeout_{phase.id}"
        if alarm not in {v.id for v in self.e.alarms.views()}:
            self.e.alarms.define(alarm, Priority.MEDIUM, what)
        await self.e.alarms.raise_(alarm, detail=what)
        if action == "alarm":
            await self._run_for(key, None, lambda: self.env.test(phase.until))
        return {"timed_out": True}

    # ------------------------------------------------------------------ phase types
    async def _set(self, phase: SetPhase, key: str) -> dict[str, Any]:
        written: dict[str, Any] = {}
        for ref, expr in phase.values.items():
            tag = self.env.tag(ref)
            value = self.env.plain(expr)
            try:
                written[ref] = await self.e.dispatcher.write(
                    tag,
                    value,
                    who="engine",
                    why=f"phase {phase.id}",
                    phase=phase.id,
                    tolerance=phase.tolerance,
                )
            except Exception as exc:
                if type(exc).__name__ == "ReadBackMismatch":
                    raise HoldRequest("engine", f"phase {phase.id}: {exc}") from exc
                raise
        return written

    async def _wait(self, phase: WaitPhase, key: str) -> dict[str, Any]:
        met, elapsed = await self._run_for(
            key, phase.timeout, lambda: self.env.test(phase.until), phase.hold_for
        )
        if not met:
            return await self._timeout(phase, key)
        return {"waited_s": round(elapsed, 1)}

    async def _timer(self, phase: TimerPhase, key: str) -> dict[str, Any]:
        duration = phase.duration.seconds(self.env.value)
        await self._run_for(key, duration)
        return {"duration_s": duration}

    async def _ramp(self, phase: RampPhase, key: str) -> dict[str, Any]:
        tag = self.env.tag(phase.tag)
        steps = self.memory.steps.get(key, [])
        start_step = next((s for s in steps if s.startswith("from:")), None)
        if start_step is None:
            start = float((await self.e.dispatcher.read([tag]))[tag].value or 0.0)
            await self.e.event({"event": "phase_step", "key": key, "step": f"from:{start!r}"})
        else:
            start = float(start_step[5:])
        target = float(self.env.plain(phase.to))
        step = phase.step or phase.over / 60
        elapsed = self.memory.progress.get(key, 0.0)
        try:
            while elapsed < phase.over:
                value = start + (target - start) * elapsed / phase.over
                await self.e.dispatcher.write(
                    tag, value, who="engine", why=f"ramp {phase.id}", phase=phase.id, confirm=False
                )
                t0 = self.clock.monotonic()
                try:
                    await self.clock.sleep(min(step, phase.over - elapsed))
                finally:
                    elapsed += self.clock.monotonic() - t0
                await self._progress(key, elapsed)
        except asyncio.CancelledError:
            await self._progress(key, elapsed, force=True)
            raise
        await self.e.dispatcher.write(
            tag, target, who="engine", why=f"ramp {phase.id} end", phase=phase.id
        )
        return {"from": start, "to": target}

    async def _prompt(self, phase: PromptPhase, key: str) -> dict[str, Any]:
        return await self.e.prompts.ask(key, phase)

    async def _call(self, phase: CallPhase, key: str) -> dict[str, Any]:
        role, method = phase.method.split(".", 1)
        device = self.env.device(role)
        outputs: dict[str, Any] = dict(self.memory.outputs.get(phase.id, {}))
        steps = self.memory.steps.get(key, [])
        called_now = "called" not in steps or steps[-1] == "call_refused"
        if called_now:
            # journaled before the call: after a crash the call is never repeated (it may have
            # taken effect); only a call the device refused is made again on restart
            await self.e.event({"event": "phase_step", "key": key, "step": "called"})
            args = [self.env.plain(a) for a in phase.args]
            try:
                result = await self.e.dispatcher.call(
                    device, method, args, who="engine", why=f"phase {phase.id}", phase=phase.id
                )
            except MethodFailed:
                await self.e.event({"event": "phase_step", "key": key, "step": "call_refused"})
                raise
            outputs = {f"out{i}": _jsonable(v) for i, v in enumerate(result)}
            self.memory.outputs[phase.id] = outputs
        if phase.until is None:
            return outputs
        # the device's state before the call (e.g. "complete" from the previous program) must
        # not end this phase: judge only readings taken after the call
        # (after a hold or a crash the call was made before: any reading will do)
        until = phase.until
        called_at = self.clock.now()
        watched = [self.env.tag(n) for n in phase.until.names() if _is_tag(n)] if called_now else []

        def finished() -> bool | None:
            if any(
                (s := self.e.hub.snapshot.get(t)) is None or s.agent_time <= called_at
                for t in watched
            ):
                return None
            if phase.fail_if is not None and self.env.test(phase.fail_if):
                raise HoldRequest("engine", f"phase {phase.id}: {phase.fail_if.source}")
            return self.env.test(until)

        met, _ = await self._run_for(key, phase.timeout, finished)
        if not met:
            outputs.update(await self._timeout(phase, key))
        return outputs

    async def _transfer(self, phase: TransferPhase, key: str) -> dict[str, Any]:
        speed_tag, run_tag = self.env.tag(phase.speed_tag), self.env.tag(phase.run_tag)
        d = self.e.dispatcher
        why = f"transfer {phase.id}"
        await d.write(speed_tag, self.env.plain(phase.speed), who="engine", why=why, phase=phase.id)
        await d.write(run_tag, True, who="engine", why=why, phase=phase.id)
        stall = phase.stall
        last: list[Any] = [None, 0.0]  # value at the start of the stall window, window start

        def done() -> bool | None:
            if stall is not None:
                try:
                    now = self.env.value(stall.tag)
                except LookupError:
                    now = None
                t = self.elapsed_in_phase
                if now is not None:
                    if last[0] is None or abs(_num(now) - _num(last[0])) >= _num(
                        self.env.plain(stall.min_change)
                    ):
                        last[0], last[1] = now, t
                    elif t - last[1] >= stall.within:
                        raise HoldRequest(
                            "engine",
                            f"transfer {phase.id}: {stall.tag} moved less "
                            f"than {stall.min_change.source} in {stall.within:g} s",
                        )
            return self.env.test(phase.until)

        self.elapsed_in_phase = self.memory.progress.get(key, 0.0)
        try:
            t0 = self.clock.monotonic() - self.elapsed_in_phase

            def tracked() -> bool | None:
                self.elapsed_in_phase = self.clock.monotonic() - t0
                return done()

            met, _ = await self._run_for(key, phase.timeout, tracked)
        finally:
            await d.write(
                run_tag, False, who="engine", why=f"{why} end", phase=phase.id, confirm=False
            )
        if not met:
            return await self._timeout(phase, key)
        return {"transferred": True}

    async def _sample(self, phase: SamplePhase, key: str) -> dict[str, Any]:
        if "taken" not in self.memory.steps.get(key, []):
            await self.e.event(
                {
                    "event": "sample_taken",
                    "key": key,
                    "phase": phase.id,
                    "volume_ml": phase.volume_ml,
                    "results": sorted(phase.results),
                    "wait_for_results": phase.wait_for_results,
                }
            )
            await self.e.event({"event": "phase_step", "key": key, "step": "taken"})
        if phase.wait_for_results:
            return await self.e.prompts.ask(key, phase)
        self.e.prompts.expect_results(key, phase)
        return {}


def _jsonable(value: Any) -> Any:
    """A method output as the journal can hold it."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _is_tag(name: str) -> bool:
    return name.split(".", 1)[0] not in ("param", "phase", "run")


def _num(value: Any) -> float:
    v = getattr(value, "value", value)
    return float(v)
