"""Modbus TCP and RTU driver (pymodbus 3.16).

Endpoints: ``tcp://HOST:PORT`` (port 502 when omitted) and ``rtu://DEVICE_PATH`` with optional
query ``?baudrate=19200&parity=E&stopbits=1&bytesize=8`` (the query wins over the keyword
arguments), e.g. ``rtu:///dev/ttyUSB0?baudrate=9600``.

Reads are planned once per tag tuple (``drivers.modbus_codec.plan_reads``, cached):
neighbouring points of one unit id and table share a request. Failures are kept per request, so
one failing unit id on a bus does not discard the others:

* an exception response becomes ``ModbusException`` (with its code), a silent unit
  ``DeviceTimeout``, a short answer ``ProtocolError``; ``read`` returns the request's tags as BAD
  samples whose ``status`` is that error's message (``read(..., strict=True)`` raises it instead);
* a connection that is down (refused, dropped, serial port gone) raises ``DeviceUnavailable``.

Timing: each request waits ``timeout`` wall-clock seconds and is sent ``retries`` more times on
silence (worst case ``timeout · (1 + retries)``); pymodbus's own reconnect is disabled and the
driver reconnects with ``RetryPolicy`` backoff on the injected clock. The connection and the
lock that serializes every request on it are ``drivers.modbus_link.ModbusLink``'s.

``observe`` polls every ``poll_interval`` seconds of the injected clock and yields a tag's
sample when its value, quality or status changes, plus every tag at least every ``heartbeat``
polls (0: never), so a consumer can tell a steady value from a dead stream. When the link goes
down each tag is yielded once as BAD, then the driver reconnects with backoff and resumes with
good samples. The stream is pulled: a slow consumer delays the next poll, so the latest value
always wins and nothing queues up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog
from pymodbus.exceptions import ModbusException as PymodbusError

from drivers.base import DriverBase, Quality, Sample, Value
from drivers.clock import Clock, poll_pause
from drivers.errors import (
    ConfigurationError,
    DeviceUnavailable,
    DriverError,
    ModbusException,
    WriteRefused,
)
from drivers.modbus_codec import (
    BIT_TABLES,
    WRITABLE_TABLES,
    Decoded,
    ReadRequest,
    encode,
    parse_endpoint,
    plan_reads,
    to_raw,
    validate_point,
)
from drivers.modbus_link import Client, FaultLog, ModbusLink
from drivers.points import ModbusPoint, ModbusTable, RetryPolicy

log = structlog.get_logger(__name__)

_MAX_PLANS = 64  # cached read plans (one per distinct tag tuple read)
_READERS = {
    ModbusTable.COIL: "read_coils",
    ModbusTable.DISCRETE_INPUT: "read_discrete_inputs",
    ModbusTable.HOLDING_REGISTER: "read_holding_registers",
    ModbusTable.INPUT_REGISTER: "read_input_registers",
}


def _add_good(
    samples: dict[str, Sample], tags: Sequence[str], values: Decoded, now: datetime
) -> None:
    """Add a GOOD sample of each tag's value to ``samples``, in ``tags`` order."""
    good = Quality.GOOD
    for tag, value in zip(tags, values, strict=True):
        samples[tag] = Sample(tag, value, good, now)


@dataclass(frozen=True, slots=True)
class _ReadPlan:
    """The requests that read a tag tuple; ``in_order``: their tags are that tuple, in order."""

    requests: tuple[ReadRequest, ...]
    in_order: bool


def _fault_key(request: ReadRequest) -> str:
    return f"unit{request.unit_id}:{request.table}:{request.address}"


class ModbusDriver(DriverBase):
    """A Modbus TCP server or an RTU bus of unit ids, read and written by tag."""

    def __init__(
        self,
        name: str,
        endpoint: str,
        points: Sequence[ModbusPoint],
        *,
        clock: Clock,
        timeout: float = 1.0,
        retries: int = 1,
        poll_interval: float = 1.0,
        retry: RetryPolicy = RetryPolicy(),  # frozen dataclass: a safe shared default
        baudrate: int = 19200,
        parity: str = "N",
        stopbits: int = 1,
        bytesize: int = 8,
        max_gap: int = 4,
        heartbeat: int = 10,
    ) -> None:
        self.name = name
        self.endpoint = parse_endpoint(
            name, endpoint, baudrate=baudrate, parity=parity, stopbits=stopbits, bytesize=bytesize
        )
        self._points: dict[str, ModbusPoint] = {}
        for point in points:
            validate_point(name, point)
            if point.tag in self._points:
                raise ConfigurationError(name, f"tag {point.tag!r} defined twice")
            self._points[point.tag] = point
        if timeout <= 0 or retries < 0 or poll_interval <= 0 or max_gap < 0 or heartbeat < 0:
            raise ConfigurationError(
                name,
                f"timeout {timeout} and poll_interval {poll_interval} must be > 0; retries "
                f"{retries}, max_gap {max_gap} and heartbeat {heartbeat} must be ≥ 0",
            )
        self._clock = clock
        self._poll_interval = poll_interval
        self._retry = retry
        self._max_gap = max_gap
        self._heartbeat = heartbeat
        self._plans: dict[tuple[str, ...], _ReadPlan] = {}
        self._closed = asyncio.Event()
        self._log = log.bind(device=name)
        self._faults = FaultLog(self._log)
        self._link = ModbusLink(
            name, self.endpoint, timeout=timeout, retries=retries, faults=self._faults
        )

    # -- connection ---------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether the connection is up right now."""
        return self._link.connected

    async def connect(self) -> None:
        """Open the connection; ``DeviceUnavailable`` when the device cannot be reached."""
        self._closed.clear()
        async with self._link.lock:
            await self._link.ensure()

    async def close(self) -> None:
        """Close the connection and end ``observe`` streams; safe to call twice."""
        self._closed.set()
        self._link.drop()

    # -- reading ------------------------------------------------------------------------
    def _plan(self, tags: Sequence[str]) -> _ReadPlan:
        """The requests for these tags, planned once per tag tuple (as the caller orders it)."""
        key = tuple(tags)
        plan = self._plans.get(key)
        if plan is None:
            unknown = sorted({t for t in key if t not in self._points})
            if unknown:
                raise ConfigurationError(self.name, f"unknown tags {unknown}")
            if len(self._plans) >= _MAX_PLANS:  # callers with ever-new tag sets: start over
                self._plans.clear()
            requests = plan_reads(
                (self._points[t] for t in sorted(set(key))), max_gap=self._max_gap
            )
            in_order = key == tuple(t for r in requests for t in r.tags)
            plan = self._plans[key] = _ReadPlan(tuple(requests), in_order)
        return plan

    async def read(self, tags: Sequence[str], *, strict: bool = False) -> dict[str, Sample]:
        """Read the tags now. A failing unit's tags come back BAD (``strict``: its error is
        raised instead); ``DeviceUnavailable`` when the connection is down."""
        plan = self._plan(tags)
        results: list[Decoded | DriverError] = []
        async with self._link.lock:
            client = await self._link.ensure()
            for request in plan.requests:
                results.append(await self._read_request(client, request))
        now = self._clock.now()  # one timestamp for the whole read
        samples: dict[str, Sample] = {}
        for request, result in zip(plan.requests, results, strict=True):
            names = request.tags
            if isinstance(result, DriverError):
                if strict:
                    raise result
                status = str(result)
                for tag in names:
                    samples[tag] = Sample(tag, None, Quality.BAD, now, status=status)
            else:
                _add_good(samples, names, result, now)
        return samples if plan.in_order else {t: samples[t] for t in tags}

    async def _read_request(self, client: Client, request: ReadRequest) -> Decoded | DriverError:
        """One request; per-unit failures are returned, a dead link raises."""
        reader = getattr(client, _READERS[request.table])
        try:
            response = await reader(request.address, count=request.count, device_id=request.unit_id)
        except (PymodbusError, OSError) as exc:
            error = self._link.io_error(f"reading {request.describe()}", exc)
            return self._read_failed(request, error)
        try:
            if response.isError():
                raise ModbusException(
                    self.name, f"reading {request.describe()}", response.exception_code
                )
            answer = response.bits if request.table in BIT_TABLES else response.registers
            values = request.values(self.name, answer)
        except DriverError as error:
            return self._read_failed(request, error)
        if self._faults:  # only then can this request be recovering
            self._faults.recover(
                _fault_key(request), "modbus_read_recovered", request=request.describe()
            )
        return values

    def _read_failed(self, request: ReadRequest, error: DriverError) -> DriverError:
        self._faults.fault(
            _fault_key(request), "modbus_read_failed", request=request.describe(), error=str(error)
        )
        return error

    # -- writing ------------------------------------------------------------------------
    async def write(self, tag: str, value: Value) -> None:
        """Write one coil or holding-register tag; ``WriteRefused`` for read-only tables and
        values that do not fit, ``ModbusException`` when the device answers with an exception."""
        point = self._points.get(tag)
        if point is None:
            raise ConfigurationError(self.name, f"unknown tag {tag!r}")
        where = f"tag {tag!r} ({point.table} {point.address}, unit {point.unit_id})"
        if point.table not in WRITABLE_TABLES:
            raise WriteRefused(self.name, f"{where}: {point.table} is read-only (value {value!r})")
        doing = f"writing {value!r} to {where}"
        payload: bool | int | list[int]
        if point.table is ModbusTable.COIL:
            method, payload = "write_coil", bool(to_raw(self.name, point, value))
        else:
            words = encode(self.name, point, value)  # refuses before anything is sent
            method, payload = (
                ("write_register", words[0]) if len(words) == 1 else ("write_registers", words)
            )
        async with self._link.lock:
            client = await self._link.ensure()
            try:
                response = await getattr(client, method)(
                    point.address, payload, device_id=point.unit_id
                )
            except (PymodbusError, OSError) as exc:
                raise self._link.io_error(doing, exc) from exc
        if response.isError():
            raise ModbusException(self.name, doing, response.exception_code)
        self._log.info("modbus_written", tag=tag, value=value, address=point.address)

    async def call(self, method: str, *args: Value) -> list[Value]:
        """Modbus has no methods: always ``ConfigurationError``."""
        raise ConfigurationError(self.name, f"Modbus devices have no methods (called {method!r})")

    # -- observing ----------------------------------------------------------------------
    async def observe(self, tags: Sequence[str]) -> AsyncIterator[Sample]:
        """Poll the tags; yield changes, heartbeats, BAD once on link loss (see module doc)."""
        self._plan(tags)  # unknown tags fail now, not at the first poll
        last: dict[str, Sample] = {}
        polls = 0
        backoff = self._retry.initial
        while not self._closed.is_set():
            try:
                samples = await self.read(tags)
            except DeviceUnavailable as exc:
                if self._closed.is_set():
                    return
                now = self._clock.now()
                for tag in tags:
                    before = last.get(tag)
                    if (
                        before is None
                        or before.quality is not Quality.BAD
                        or before.status != str(exc)
                    ):
                        value = before.value if before is not None else None
                        last[tag] = Sample(tag, value, Quality.BAD, now, status=str(exc))
                        yield last[tag]
                await self._sleep(backoff)
                backoff = min(backoff * self._retry.factor, self._retry.maximum)
                continue
            backoff = self._retry.initial
            beat = self._heartbeat > 0 and polls % self._heartbeat == 0
            polls += 1
            for tag, sample in samples.items():
                before = last.get(tag)
                if sample.quality is Quality.BAD and before is not None:
                    sample = Sample(
                        tag, before.value, Quality.BAD, sample.agent_time, status=sample.status
                    )
                changed = before is None or (before.value, before.quality, before.status) != (
                    sample.value,
                    sample.quality,
                    sample.status,
                )
                last[tag] = sample
                if changed or beat:
                    yield sample
            await self._sleep(self._poll_interval)

    async def _sleep(self, seconds: float) -> None:
        """Sleep on the injected clock, waking early when the driver closes."""
        sleeper = asyncio.ensure_future(poll_pause(self._clock, seconds))
        closer = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait({sleeper, closer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # cancel the helpers and let them finish; a cancellation of this task itself must
            # propagate (suppressing CancelledError around `await task` would swallow it)
            sleeper.cancel()
            closer.cancel()
            await asyncio.gather(sleeper, closer, return_exceptions=True)
