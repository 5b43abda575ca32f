"""Operator prompts and in-process sample results: typed entry, checks and e-signatures.

A prompt phase opens a ``PendingPrompt`` and waits. An operator answers through the API with
the inputs and the signatures the phase needs (each with the signer's password again). Inputs
are checked by type, pattern, limits and ``equals`` (e.g. a scanned bag ID against the run's
chain-of-identity ID); a wrong answer is refused with every reason, audited, and the prompt
stays open. Signatures are made by the authenticator, bound to the answer (a SHA-256 of the
signed content), checked for the two-person rule and journaled as ``signature`` records.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from agent.recipe.model import Input, PromptPhase, SamplePhase
from agent.record.format import Kind
from agent.text.patterns import PatternError, full_match

if TYPE_CHECKING:
    from agent.engine.engine import Engine


_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


class PromptRejected(Exception):
    """An answer that cannot be accepted; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class PendingPrompt:
    key: str
    phase: PromptPhase | SamplePhase
    opened: datetime
    future: asyncio.Future[dict[str, Any]] | None = None
    kind: str = "prompt"
    answered: dict[str, Any] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        fields = self.phase.inputs if isinstance(self.phase, PromptPhase) else self.phase.results
        return {
            "phase": self.phase.id,
            "key": self.key,
            "kind": self.kind,
            "text": getattr(self.phase, "text", f"enter the results of sample {self.phase.id}"),
            "opened": self.opened.isoformat(),
            "inputs": {
                n: {
                    "type": i.type,
                    "unit": i.unit,
                    "label": i.label or n,
                    "limits": i.limits,
                    "pattern": i.pattern,
                }
                for n, i in fields.items()
            },
            "signatures": list(getattr(self.phase, "signatures", [])),
            "waiting": self.future is not None,
        }


class Prompts:
    """The open prompts of one run."""

    def __init__(self, engine: Engine, authenticator: Any) -> None:
        self.e = engine
        self.auth = authenticator
        self.open: dict[str, PendingPrompt] = {}
        self._lock = asyncio.Lock()

    def views(self) -> list[dict[str, Any]]:
        return [p.view() for p in self.open.values()]

    async def ask(self, key: str, phase: PromptPhase | SamplePhase) -> dict[str, Any]:
        """Open a prompt and wait for an accepted answer; returns the typed inputs."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        kind = "prompt" if isinstance(phase, PromptPhase) else "sample_results"
        self.open[phase.id] = PendingPrompt(key, phase, self.e.clock.now(), fut, kind)
        await self.e.event(
            {
                "event": "prompt_opened",
                "key": key,
                "phase": phase.id,
                "kind": kind,
                "text": getattr(phase, "text", ""),
            }
        )
        try:
            return await fut
        finally:
            self.open.pop(phase.id, None)

    def expect_results(self, key: str, phase: SamplePhase) -> None:
        """A sample whose results will be entered later, without holding the procedure."""
        self.open[phase.id] = PendingPrompt(key, phase, self.e.clock.now(), None, "sample_results")

    def cancel_all(self) -> None:
        """Interrupted (hold, stop): waiting phases are re-asked when the run resumes."""
        for phase_id in [k for k, p in self.open.items() if p.future is not None]:
            pending = self.open.pop(phase_id)
            if pending.future and not pending.future.done():
                pending.future.cancel()

    async def answer(
        self, phase_id: str, inputs: dict[str, Any], signatures: list[dict[str, str]], who: str
    ) -> dict[str, Any]:
        """Check and accept an answer; ``PromptRejected`` (audited) when it cannot be. Answers
        are taken one at a time: a second answer to the same prompt finds it closed."""
        async with self._lock:
            return await self._answer(phase_id, inputs, signatures, who)

    async def _answer(
        self, phase_id: str, inputs: dict[str, Any], signatures: list[dict[str, str]], who: str
    ) -> dict[str, Any]:
        pending = self.open.get(phase_id)
        if pending is None:
            raise PromptRejected(
                [f"no open prompt for phase {phase_id!r}; open: {', '.join(self.open) or 'none'}"]
            )
        phase = pending.phase
        specs = phase.inputs if isinstance(phase, PromptPhase) else phase.results
        problems: list[str] = []
        typed: dict[str, Any] = {}
        for name in inputs:
            if name not in specs:
                problems.append(f"{name}: not an input of {phase_id} (inputs: {', '.join(specs)})")
        for name, spec in specs.items():
            if name not in inputs:
                if spec.required:
                    problems.append(f"{name}: required")
                continue
            value, problem = self._check(name, spec, inputs[name])
            if problem:
                problems.append(problem)
            else:
                typed[name] = value
        meanings = list(getattr(phase, "signatures", []))
        given = {s.get("meaning"): s for s in signatures}
        for meaning in meanings:
            if meaning not in given:
                problems.append(f"signature {meaning!r} is needed")
        if problems:
            await self._audit("prompt_rejected", phase_id, who, problems=problems)
            raise PromptRejected(problems)
        record = {"run": self.e.run, "phase": phase_id, "inputs": typed}
        made = []
        if meanings:
            from agent.auth.authenticator import check_distinct

            if self.auth is None:
                raise PromptRejected(["this agent has no user store: signatures cannot be made"])
            try:
                for meaning in meanings:
                    s = given[meaning]
                    made.append(await self.auth.sign(s["user"], s["password"], meaning, record))
                check_distinct(made)
            except Exception as exc:  # AuthError and friends carry the reason
                await self._audit("signature_refused", phase_id, who, problems=[str(exc)])
                raise PromptRejected([str(exc)]) from exc
        if made:  # the answer and its signatures in one transaction, each bound to the answer
            sigs = [
                {**sig.as_dict(), "run": self.e.run, "phase": phase_id, "record": record}
                for sig in made
            ]
            answered = {"action": "prompt_answered", "phase": phase_id, "who": who, "inputs": typed}
            await self.e.journal.append_signed(Kind.AUDIT, answered, self.e.run, sigs)
        else:
            await self._audit("prompt_answered", phase_id, who, inputs=typed)
        if pending.future is not None:
            self.open.pop(phase_id, None)  # answered: closed at once, before the phase resumes
            if not pending.future.done():  # (cancelled if a hold interrupted the phase meanwhile)
                pending.future.set_result(typed)
        else:  # results of a sample that did not hold the procedure
            self.open.pop(phase_id, None)
            self.e.memory.outputs[phase_id] = typed
            await self.e.event({"event": "sample_results", "phase": phase_id, "results": typed})
        return typed

    def _check(self, name: str, spec: Input, raw: Any) -> tuple[Any, str | None]:
        try:
            if isinstance(raw, bool) and spec.type != "bool":
                raise ValueError(raw)
            if spec.type == "float":
                value: Any = float(raw)
                if not math.isfinite(value):
                    raise ValueError(raw)
            elif spec.type == "int":
                value = int(raw) if not isinstance(raw, float) or raw.is_integer() else None
                if value is None:
                    raise ValueError(raw)
            elif spec.type == "bool":
                value = raw if isinstance(raw, bool) else _BOOLS[str(raw).strip().lower()]
            else:
                value = str(raw)
        except (TypeError, ValueError, KeyError, OverflowError):
            return None, f"{name}: {raw!r} is not a {spec.type}"
        try:
            matches = not spec.pattern or full_match(spec.pattern, str(value))
        except PatternError as exc:
            return None, f"{name}: {exc}"
        if not matches:
            return None, f"{name}: {value!r} does not match {spec.pattern}"
        if (
            spec.limits
            and isinstance(value, int | float)
            and not (spec.limits[0] <= value <= spec.limits[1])
        ):
            return (
                None,
                f"{name}: {value} is outside [{spec.limits[0]}, {spec.limits[1]}] {spec.unit}",
            )
        if spec.equals is not None:
            expected = self.e.env.plain(spec.equals)
            if value != expected:
                return None, (
                    f"{name}: {value!r} does not match {spec.equals.source} "
                    f"(chain of identity check)"
                )
        return value, None

    async def _audit(self, action: str, phase_id: str, who: str, **extra: Any) -> None:
        await self.e.journal.append(
            Kind.AUDIT, {"action": action, "phase": phase_id, "who": who, **extra}, run=self.e.run
        )
