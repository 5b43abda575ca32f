"""The one door between a running recipe and the devices.

Phases never call drivers: they ask the dispatcher to write, read or call, and the dispatcher
journals each action *before* it takes effect and its outcome after (who, why, old value, new
value, read-back), checks writes against the tag's limits (through the device hub), and confirms
set-points by read-back. A dry run (``recipe simulate``) goes through the very same door.

Journal bodies (kind ``audit`` for actions, so they form the audit trail):

- ``{"action": "write", "tag", "value", "old", "unit", "who", "why", "phase"}`` before the write
- ``{"action": "write_confirmed", "tag", "value", "read_back"}`` after a matching read-back
- ``{"action": "call", "device", "method", "args", "who", "why", "phase"}`` before a call
- ``{"action": "call_result", "device", "method", "outputs"}`` after it
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import structlog

from agent.devices.hub import DeviceHub
from agent.journal.journal import Journal
from agent.record.format import Kind
from drivers.base import Quality, Sample, Value
from drivers.clock import Clock
from drivers.errors import DriverError

log = structlog.get_logger(__name__)


class ReadBackMismatch(DriverError):
    """A set-point was written but the device reports another value."""


class Dispatcher:
    """Executes device actions for one run, journaling each one."""

    def __init__(
        self,
        hub: DeviceHub,
        journal: Journal,
        clock: Clock,
        *,
        run: str | None,
        tolerance: float = 1e-6,
        confirm_attempts: int = 5,
    ) -> None:
        self.hub = hub
        self.journal = journal
        self.clock = clock
        self.run = run
        self.tolerance = tolerance
        self.confirm_attempts = confirm_attempts

    async def _audit(self, body: dict[str, Any]) -> None:
        await self.journal.append(Kind.AUDIT, body, run=self.run)

    def latest(self, tag: str) -> Sample | None:
        """The newest sample of a tag the hub has seen."""
        return self.hub.snapshot.get(tag)

    async def read(self, tags: Sequence[str]) -> dict[str, Sample]:
        return await self.hub.read(list(tags))

    async def write(
        self,
        tag: str,
        value: Value,
        *,
        who: str,
        why: str,
        phase: str | None = None,
        confirm: bool = True,
        tolerance: float | None = None,
    ) -> Value:
        """Write ``tag`` and, with ``confirm``, read it back until it matches.

        The limit check happens in the hub before anything is sent; a refusal is journaled too.
        """
        dev, definition = self.hub.config.tag(tag)
        last = self.latest(tag)
        body = {
            "action": "write",
            "tag": tag,
            "value": value,
            "old": last.value if last else None,
            "unit": definition.unit,
            "who": who,
            "why": why,
            "phase": phase,
        }
        await self._audit(body)
        try:
            sent = await self.hub.write(tag, value)
        except DriverError as exc:
            await self._audit(
                {
                    "action": "write_failed",
                    "tag": tag,
                    "value": value,
                    "error": str(exc),
                    "phase": phase,
                }
            )
            raise
        if not confirm:
            return sent
        tol = self.tolerance if tolerance is None else tolerance
        back: Value = None
        for _ in range(self.confirm_attempts):
            sample = (await self.hub.read([tag]))[tag]
            back = sample.value
            if sample.quality is Quality.GOOD and _matches(sent, back, tol):
                await self._audit(
                    {
                        "action": "write_confirmed",
                        "tag": tag,
                        "value": sent,
                        "read_back": back,
                        "phase": phase,
                    }
                )
                return sent
            await self.clock.sleep(0.2 * self.clock.speed)  # ~0.2 s of wall time
        await self._audit(
            {
                "action": "write_unconfirmed",
                "tag": tag,
                "value": sent,
                "read_back": back,
                "phase": phase,
            }
        )
        raise ReadBackMismatch(
            dev, f"tag {tag!r}: wrote {sent!r} but the device reads back {back!r}"
        )

    async def call(
        self,
        device: str,
        method: str,
        args: Sequence[Value],
        *,
        who: str,
        why: str,
        phase: str | None = None,
    ) -> list[Value]:
        """Call a device method, journaled before and after."""
        await self._audit(
            {
                "action": "call",
                "device": device,
                "method": method,
                "args": list(args),
                "who": who,
                "why": why,
                "phase": phase,
            }
        )
        try:
            outputs = await self.hub.call(device, method, *args)
        except DriverError as exc:
            await self._audit(
                {
                    "action": "call_failed",
                    "device": device,
                    "method": method,
                    "error": str(exc),
                    "phase": phase,
                }
            )
            raise
        await self._audit(
            {
                "action": "call_result",
                "device": device,
                "method": method,
                "outputs": [_jsonable(o) for o in outputs],
                "phase": phase,
            }
        )
        return outputs


def _matches(sent: Value, back: Value, tolerance: float) -> bool:
    if isinstance(sent, bool) or not isinstance(sent, int | float):
        return sent == back
    if isinstance(back, bool) or not isinstance(back, int | float):
        return False
    # float32 registers round: compare relative to the value's size
    return math.isclose(float(sent), float(back), rel_tol=max(tolerance, 1e-6), abs_tol=1e-6)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
