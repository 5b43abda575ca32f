"""A balance speaking MT-SICS level 0 (Mettler Toledo Standard Interface Command Set) on a
serial line.

Commands and how their replies map to samples, writes and method calls::

    S   stable weight     S S <w> <u>  good      S I  busy/not stable: uncertain, last value
    SI  immediate weight  S S <w> <u>  good      S D <w> <u>  dynamic: uncertain
                          S + / S -    overload / underload: bad, last value
    TA  tare value        TA A <w> <u> good      write(tag, grams) presets it: TA <w> g
    Z   zero              Z A          call("zero") -> []        Z I / Z + / Z -: MethodFailed
    T   tare              T S <w> <u>  call("tare") -> [grams]   T I / T + / T -: MethodFailed
    @   reset             I4 A "<sn>"  call("reset") -> [serial number]
    I2 / I4 / I0          call("identify") / call("serial_number") / call("commands")
    ES / ET / EL          syntax / transmission / logical error: DeviceErrorReply

A ``B`` status means more reply lines follow (``I0``). Weights in g, kg or mg are returned in
grams. ``S I`` is reported as an uncertain sample rather than retried: ``S`` holds the line
while the balance waits for stability, and the poll loop asks again at the next interval anyway.
Read only ``SI`` for a load that keeps changing (a bag being filled).
"""

from __future__ import annotations

import asyncio
import math
import shlex
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import structlog

from drivers.base import DriverBase, Quality, Sample, Value
from drivers.clock import Clock, poll_pause
from drivers.errors import (
    ConfigurationError,
    DeviceErrorReply,
    DeviceUnavailable,
    MethodFailed,
    ProtocolError,
    WriteRefused,
)
from drivers.points import RetryPolicy, SerialPoint
from drivers.serial_line import SerialLine

UNITS_IN_GRAMS = {"g": 1.0, "kg": 1000.0, "mg": 0.001}
ERROR_REPLIES = {
    "ES": "syntax error: command not recognised",
    "ET": "transmission error",
    "EL": "logical error: command cannot be executed",
}
_REPLY_TOKEN = {"SI": "S", "@": "I4"}  # commands whose reply starts with another token
_KNOWN_REPLY_TOKENS = frozenset({"S", "Z", "ZI", "T", "TA", "TAC", "I0", "I1", "I2", "I3", "I4"})
_READ_COMMANDS = frozenset({"S", "SI", "TA"})
_METHODS = {"zero": "Z", "tare": "T", "reset": "@", "identify": "I2", "serial_number": "I4",
            "commands": "I0"}  # fmt: skip
_REFUSALS = {
    "I": "balance busy or not stable",
    "+": "upper limit exceeded",
    "-": "lower limit exceeded",
    "L": "parameter not allowed",
}


@dataclass(frozen=True, slots=True)
class Reply:
    """One MT-SICS reply line: ``<command> <status> <fields...>``."""

    command: str
    status: str
    fields: tuple[str, ...]
    line: str


def reply_token(command: str) -> str:
    """The token a reply to ``command`` starts with (``SI`` -> ``S``, ``@`` -> ``I4``)."""
    name = command.split()[0] if command.strip() else ""
    return _REPLY_TOKEN.get(name, name)


def parse_reply(device: str, command: str, line: str) -> Reply:
    """Parse one reply line to ``command``; error replies raise ``DeviceErrorReply`` and
    anything else the protocol does not allow raises ``ProtocolError``."""
    try:
        tokens = shlex.split(line)
    except ValueError as exc:
        raise ProtocolError(device, f"unparseable reply {line!r} to {command!r}") from exc
    if len(tokens) == 1 and tokens[0] in ERROR_REPLIES:
        raise DeviceErrorReply(
            device, f"{tokens[0]} ({ERROR_REPLIES[tokens[0]]}) in reply to {command!r}"
        )
    expected = reply_token(command)
    if len(tokens) < 2 or tokens[0] != expected:
        raise ProtocolError(device, f"reply {line!r} to {command!r} is not '{expected} <status>'")
    return Reply(tokens[0], tokens[1], tuple(tokens[2:]), line)


def parse_weight(device: str, command: str, reply: Reply) -> float:
    """The weight in a reply's ``<value> <unit>`` fields, in grams."""
    if len(reply.fields) != 2 or reply.fields[1] not in UNITS_IN_GRAMS:
        raise ProtocolError(
            device, f"reply {reply.line!r} to {command!r} has no '<value> <g|kg|mg>' weight"
        )
    try:
        value = float(reply.fields[0])
    except ValueError as exc:
        raise ProtocolError(
            device, f"bad weight {reply.fields[0]!r} in reply {reply.line!r} to {command!r}"
        ) from exc
    if not math.isfinite(value):
        raise ProtocolError(device, f"bad weight {reply.fields[0]!r} in reply to {command!r}")
    return value * UNITS_IN_GRAMS[reply.fields[1]]


def _format_grams(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")


class MtSicsBalance(DriverBase):
    """``drivers.base.Driver`` for an MT-SICS balance; tags are ``SerialPoint``s whose command
    is ``S``, ``SI`` or ``TA``. ``timeout``, ``poll_interval`` and the retry backoff are in
    seconds of the injected clock."""

    def __init__(
        self,
        name: str,
        port: str,
        points: Sequence[SerialPoint],
        *,
        clock: Clock,
        baudrate: int = 9600,
        timeout: float = 1.0,
        poll_interval: float = 1.0,
        retry: RetryPolicy = RetryPolicy(),
    ) -> None:
        self.name = name
        self.port = port
        self._points: dict[str, SerialPoint] = {}
        for point in points:
            if point.tag in self._points:
                raise ConfigurationError(name, f"tag {point.tag!r} defined twice")
            if point.command not in _READ_COMMANDS:
                raise ConfigurationError(
                    name,
                    f"tag {point.tag!r}: command {point.command!r} is not one of "
                    f"{sorted(_READ_COMMANDS)}",
                )
            self._points[point.tag] = point
        self._clock = clock
        self._poll_interval = poll_interval
        self._line = SerialLine(
            name, port, clock=clock, baudrate=baudrate, timeout=timeout, retry=retry
        )
        self._last: dict[str, Value] = {}
        self._closed = asyncio.Event()
        self._log = structlog.get_logger(__name__).bind(device=name, port=port)

    async def connect(self) -> None:
        self._closed.clear()
        await self._line.open()

    async def close(self) -> None:
        self._closed.set()
        await self._line.close()

    # -- the wire -----------------------------------------------------------------------------

    async def command(self, line: str) -> list[Reply]:
        """Send one MT-SICS command and return its parsed reply lines (several when the
        balance answers ``B``). Late replies to other commands are skipped."""
        expected = reply_token(line)

        def stale(text: str) -> bool:
            first = text.split(maxsplit=1)[0] if text.strip() else ""
            return first in _KNOWN_REPLY_TOKENS and first != expected

        def more(text: str) -> bool:
            tokens = text.split()
            return len(tokens) >= 2 and tokens[1] == "B"

        lines = await self._line.request_lines(line, more=more, skip=stale)
        return [parse_reply(self.name, line, text) for text in lines]

    async def _single(self, line: str) -> Reply:
        return (await self.command(line))[-1]

    # -- Driver -------------------------------------------------------------------------------

    def _point(self, tag: str) -> SerialPoint:
        try:
            return self._points[tag]
        except KeyError:
            raise ConfigurationError(self.name, f"unknown tag {tag!r}") from None

    async def _read_command(self, command: str) -> tuple[float | None, Quality, str]:
        reply = await self._single(command)
        if command == "TA":
            if reply.status == "A":
                return parse_weight(self.name, command, reply), Quality.GOOD, ""
        elif reply.status in ("S", "D"):
            weight = parse_weight(self.name, command, reply)
            if reply.status == "S":
                return weight, Quality.GOOD, ""
            return weight, Quality.UNCERTAIN, "dynamic: weight not stable (S D)"
        elif reply.status == "+":
            return None, Quality.BAD, "overload (S +)"
        elif reply.status == "-":
            return None, Quality.BAD, "underload (S -)"
        if reply.status == "I":
            return None, Quality.UNCERTAIN, f"balance busy or not stable ({reply.line.strip()})"
        raise ProtocolError(self.name, f"unexpected status in reply {reply.line!r} to {command!r}")

    async def read(self, tags: Sequence[str]) -> dict[str, Sample]:
        points = [self._point(tag) for tag in tags]
        results: dict[str, tuple[float | None, Quality, str]] = {}
        for command in dict.fromkeys(p.command for p in points):
            try:
                results[command] = await self._read_command(command)
            except (DeviceUnavailable, ProtocolError) as exc:
                names = ", ".join(p.tag for p in points if p.command == command)
                raise type(exc)(self.name, f"reading {names}: {exc.detail}") from exc
        now = self._clock.now()
        samples: dict[str, Sample] = {}
        for point in points:
            weight, quality, status = results[point.command]
            if weight is not None:
                self._last[point.tag] = weight
            value = weight if weight is not None else self._last.get(point.tag)
            samples[point.tag] = Sample(point.tag, value, quality, now, status=status)
        return samples

    async def write(self, tag: str, value: Value) -> None:
        """Preset the tare (a ``TA`` tag) to ``value`` grams; every other tag is read-only."""
        point = self._point(tag)
        if point.command != "TA":
            raise WriteRefused(
                self.name, f"tag {tag!r} ({point.command}) is read-only; {value!r} not written"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise WriteRefused(self.name, f"tag {tag!r} (TA): {value!r} is not a weight in grams")
        line = f"TA {_format_grams(float(value))} g"
        try:
            reply = await self._single(line)
        except DeviceErrorReply as exc:
            raise WriteRefused(self.name, f"tag {tag!r}: {line!r} refused: {exc.detail}") from exc
        if reply.status != "A":
            reason = _REFUSALS.get(reply.status, "unexpected status")
            raise WriteRefused(
                self.name, f"tag {tag!r}: {line!r} refused with {reply.line!r} ({reason})"
            )

    async def call(self, method: str, *args: Value) -> list[Value]:
        """Run ``zero``, ``tare``, ``reset``, ``identify``, ``serial_number`` or ``commands``."""
        command = _METHODS.get(method)
        if command is None:
            raise ConfigurationError(
                self.name, f"unknown method {method!r}; known: {sorted(_METHODS)}"
            )
        if args:
            raise ConfigurationError(self.name, f"method {method!r} takes no arguments: {args!r}")
        replies = await self.command(command)
        last = replies[-1]
        if command == "Z" and last.status == "A":
            return []
        if command == "T" and last.status == "S":
            return [parse_weight(self.name, command, last)]
        if command == "I0" and last.status == "A":
            return [r.fields[-1] for r in replies if r.fields]
        if command in ("@", "I2", "I4") and last.status == "A" and last.fields:
            return [last.fields[0]]
        reason = _REFUSALS.get(last.status, "unexpected reply")
        raise MethodFailed(self.name, f"{method} ({command!r}) failed: {last.line!r} ({reason})")

    def observe(self, tags: Sequence[str]) -> AsyncIterator[Sample]:
        """Poll the tags every ``poll_interval`` and yield those whose value, quality or status
        changed. A failing device yields each tag once as bad, then good samples on recovery.

        The stream is pulled: the next poll happens when the consumer asks for more, so a slow
        consumer delays polls and nothing queues up or is dropped.
        """
        for tag in tags:
            self._point(tag)
        return self._poll(list(tags))

    async def _poll(self, tags: list[str]) -> AsyncIterator[Sample]:
        last: dict[str, Sample] = {}
        failing = False
        while not self._closed.is_set():
            try:
                samples = await self.read(tags)
            except (DeviceUnavailable, ProtocolError) as exc:
                log = self._log.debug if failing else self._log.error
                log("balance_poll_failed", tags=tags, error=str(exc))
                failing = True
                now = self._clock.now()
                for tag in tags:
                    prev = last.get(tag)
                    if prev is None or prev.quality is not Quality.BAD:
                        value = self._last.get(tag)
                        last[tag] = Sample(tag, value, Quality.BAD, now, status=str(exc))
                        yield last[tag]
            else:
                if failing:
                    failing = False
                    self._log.info("balance_poll_recovered", tags=tags)
                for tag, sample in samples.items():
                    prev = last.get(tag)
                    if prev is None or (prev.value, prev.quality, prev.status) != (
                        sample.value,
                        sample.quality,
                        sample.status,
                    ):
                        last[tag] = sample
                        yield sample
            await self._pause(self._poll_interval)

    async def _pause(self, seconds: float) -> None:
        """Sleep on the clock, waking early when the driver closes."""
        sleeper = asyncio.ensure_future(poll_pause(self._clock, seconds))
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({sleeper, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            closed.cancel()
