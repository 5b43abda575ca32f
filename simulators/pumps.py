"""Peristaltic pumps on Modbus TCP and Modbus RTU (over a pty), as the device manual reads.

One server holds ``pumps`` pumps; pump *n* answers as unit id *n* (1, 2, ...). The TCP view and
the RTU view serve the same pumps. Unknown unit ids get no answer (as on an RS-485 bus).
Addresses are 0-based protocol addresses; multi-register values are big-endian with the **high
word first** (float32 100.0 = ``[0x42C8, 0x0000]``).

=================  =======  =====================================================  ==========
table              address  meaning                                                type
=================  =======  =====================================================  ==========
holding register   0-1      speed set-point, mL/min, 0-100 (else exception 3)      float32
holding register   2        tubing calibration, mL/rev x 1000 (1-65535)            uint16
holding register   10       write 1: reset the dispensed volume (reads 0)          uint16
coil               0        run (1) / stop (0)                                     bit
coil               1        direction: 0 forward (into the bioreactor), 1 reverse  bit
input register     0-1      actual speed, mL/min (ramps to the set-point)          float32
input register     2-3      dispensed volume since reset, mL                       float32
input register     4        alarms: bit0 occlusion/stall, bit1 tubing door open,   uint16
                            bit2 motor fault
discrete input     0        running (rotor turning)                                bit
discrete input     1        alarm active                                           bit
=================  =======  =====================================================  ==========

Other register addresses answer exception 2 (illegal data address); coils and discrete inputs
2-15 are reserved: they read 0 and refuse writes with exception 2.

While any alarm is active the rotor stands still. The actual speed ramps at ``ramp`` mL/min per
second of the injected clock; every ``tick`` seconds (and at every request) the dispensed volume
grows by the speed integrated over the elapsed time and ``on_dispense(pump, ml, direction)`` is
called, so the caller can move that volume into the bioreactor or out of a bag on a balance. On
a fast clock the tick is stretched so that it comes at most every ``min_wall_tick`` wall seconds.

Faults (``PumpFaults``, mutable at run time, per unit id): stall, door open, motor fault (alarm
bits, no pumping), an exception code answered to every request, a reply delay (seconds of the
injected clock) and silence. ``drop_connections()`` closes the TCP clients' connections;
``stop()`` / ``start()`` take the whole server away and back (the RTU view gets a new pty behind
the same link path). ``requests`` records every request received, for tests and diagnostics.

The RTU view is a null modem (``simulators.ptylink.NullModem``): two ptys joined back to back;
the server opens one slave and the client opens the other through the caller's ``rtu_link``.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

import structlog
from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.clock import Clock
from simulators.ptylink import NullModem

log = structlog.get_logger(__name__)

MAX_SPEED = 100.0  # mL/min
_TABLE = {1: "c", 5: "c", 15: "c", 2: "d", 3: "h", 6: "h", 16: "h", 22: "h", 23: "h", 4: "i"}
_WRITES = frozenset({5, 6, 15, 16})
ALARM_STALL, ALARM_DOOR, ALARM_MOTOR = 1, 2, 4


def _float_words(value: float) -> list[int]:
    hi, lo = struct.unpack(">HH", struct.pack(">f", value))
    return [hi, lo]


def _words_float(words: list[int]) -> float:
    value: float = struct.unpack(">f", struct.pack(">HH", *words))[0]
    return value


@dataclass
class PumpFaults:
    """Injected faults, keyed by unit id; change them while the server runs."""

    stalled: set[int] = field(default_factory=set)
    door_open: set[int] = field(default_factory=set)
    motor_fault: set[int] = field(default_factory=set)
    exception_code: dict[int, int] = field(default_factory=dict)  # every request → this code
    reply_delay: dict[int, float] = field(default_factory=dict)  # clock seconds before replying
    silent: set[int] = field(default_factory=set)  # unit answers nothing

    def alarms(self, unit: int) -> int:
        """The alarm bits of a unit (input register 4)."""
        return (
            (ALARM_STALL if unit in self.stalled else 0)
            | (ALARM_DOOR if unit in self.door_open else 0)
            | (ALARM_MOTOR if unit in self.motor_fault else 0)
        )


@dataclass
class Pump:
    """The state of one pump (what its registers show)."""

    unit: int
    setpoint: float = 0.0  # mL/min
    calibration: int = 1000  # mL/rev x 1000
    run: bool = False
    direction: int = 0  # 0 forward, 1 reverse
    speed: float = 0.0  # actual mL/min
    dispensed: float = 0.0  # mL since reset

    def step(self, dt: float, alarms: int, ramp: float) -> float:
        """Advance ``dt`` seconds; return the mL moved (exact for the linear ramp, so a long
        step moves as much as many short ones)."""
        before = self.speed
        if alarms:  # the rotor is blocked: it stops at once
            self.speed = 0.0
            return 0.0
        target = self.setpoint if self.run else 0.0
        ramp_s = abs(target - before) / ramp if ramp > 0 else 0.0
        if ramp_s >= dt:  # still ramping at the end of the step
            after = before + (dt * ramp if target > before else -dt * ramp)
            ml = (before + after) / 2 / 60 * dt
        else:
            after = target
            ml = ((before + after) / 2 * ramp_s + after * (dt - ramp_s)) / 60
        self.speed = after
        self.dispensed += ml
        return ml


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request a server view received."""

    view: str  # "tcp" or "rtu"
    unit: int
    function_code: int
    address: int
    count: int


class PumpServer:
    """Simulated peristaltic pumps behind Modbus TCP and/or RTU (see the module doc)."""

    def __init__(
        self,
        clock: Clock,
        *,
        pumps: int = 2,
        tcp: tuple[str, int] | None = ("127.0.0.1", 5020),
        rtu_link: str | None = None,
        rtu_baudrate: int = 19200,
        on_dispense: Callable[[int, float, int], None] | None = None,
        faults: PumpFaults | None = None,
        tick: float = 0.1,
        ramp: float = 200.0,
        min_wall_tick: float = 0.02,
    ) -> None:
        if not 1 <= pumps <= 247:
            raise ValueError(f"pumps must be 1..247, got {pumps}")
        self.pumps = {unit: Pump(unit) for unit in range(1, pumps + 1)}
        self.faults = faults or PumpFaults()
        self.requests: deque[RequestRecord] = deque(maxlen=10_000)
        self._clock = clock
        self._tcp = tcp
        self._rtu_baudrate = rtu_baudrate
        self._modem = NullModem(rtu_link) if rtu_link else None
        self._on_dispense = on_dispense
        # a 600x clock would otherwise wake the physics every 0.17 ms of wall time
        self._tick = max(tick, min_wall_tick * clock.speed)
        self._ramp = ramp
        self._servers: list[ModbusTcpServer | ModbusSerialServer] = []
        self._physics: asyncio.Task[None] | None = None
        self._delayed: set[asyncio.Task[Any]] = set()
        self._last = clock.monotonic()
        self._log = log.bind(device="pumps")

    @property
    def endpoints(self) -> dict[str, str]:
        """Driver endpoints of the views: ``{"tcp": "tcp://H:P", "rtu": "rtu://LINK"}``."""
        out = {}
        if self._tcp:
            out["tcp"] = f"tcp://{self._tcp[0]}:{self._tcp[1]}"
        if self._modem:
            out["rtu"] = f"rtu://{self._modem.link}"
        return out

    async def start(self) -> None:
        """Start the views and the physics."""
        self._last = self._clock.monotonic()
        if self._tcp:
            tcp_server = ModbusTcpServer(
                self._devices(),
                address=self._tcp,
                trace_pdu=self._tracer("tcp"),
                trace_packet=self._silencer(6),  # MBAP header: unit id at byte 6
            )
            self._servers.append(tcp_server)
            await tcp_server.serve_forever(background=True)
        if self._modem:
            self._modem.open(asyncio.get_running_loop())
            rtu_server = ModbusSerialServer(
                self._devices(),
                framer=FramerType.RTU,
                port=self._modem.server_port,
                baudrate=self._rtu_baudrate,
                reconnect_delay=0,
                trace_pdu=self._tracer("rtu"),
                trace_packet=self._silencer(0),  # RTU frame: unit id first
            )
            self._servers.append(rtu_server)
            await rtu_server.serve_forever(background=True)
        self._physics = asyncio.create_task(self._run_physics(), name="pump physics")
        self._log.info("pumps_started", endpoints=self.endpoints, pumps=len(self.pumps))

    async def stop(self) -> None:
        """Stop the views and the physics; safe to call twice."""
        tasks = [t for t in (self._physics, *self._delayed) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._physics = None
        for server in self._servers:
            await server.shutdown()
        if self._servers:
            self._log.info("pumps_stopped")
        self._servers = []
        if self._modem:
            self._modem.close(asyncio.get_running_loop())

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def drop_connections(self) -> None:
        """Close every client connection of the TCP view (clients see the link drop)."""
        for server in self._servers:
            if isinstance(server, ModbusTcpServer):
                for handler in list(server.active_connections.values()):
                    handler.close()
        self._log.info("pumps_connections_dropped")

    # -- physics ------------------------------------------------------------------------
    async def _run_physics(self) -> None:
        while True:
            await self._clock.sleep(self._tick)
            self._advance()

    def _advance(self) -> None:
        now = self._clock.monotonic()
        dt, self._last = now - self._last, now
        if dt <= 0:
            return
        for unit, pump in self.pumps.items():
            ml = pump.step(dt, self.faults.alarms(unit), self._ramp)
            if ml > 0 and self._on_dispense is not None:
                try:
                    self._on_dispense(unit, ml, pump.direction)
                except Exception:
                    self._log.exception("pump_dispense_callback_failed", unit=unit)

    # -- Modbus data model ----------------------------------------------------------------
    def _devices(self) -> list[SimDevice]:
        def bits() -> list[SimData]:
            return [SimData(0, count=16, values=False, datatype=DataType.BITS)]

        def blocks() -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
            holding = [
                SimData(0, count=3, values=0, datatype=DataType.REGISTERS),
                SimData(10, count=1, values=0, datatype=DataType.REGISTERS),
            ]
            return (
                bits(),
                bits(),
                holding,
                [SimData(0, count=5, values=0, datatype=DataType.REGISTERS)],
            )

        # unit 0 stands for every unknown unit id; the silencer drops its answers
        devices = [SimDevice(0, simdata=blocks())]
        devices += [SimDevice(u, simdata=blocks(), action=self._action(u)) for u in self.pumps]
        return devices

    def _tracer(self, view: str) -> Callable[[bool, ModbusPDU], ModbusPDU]:
        def trace(sending: bool, pdu: ModbusPDU) -> ModbusPDU:
            if not sending:
                self.requests.append(
                    RequestRecord(view, pdu.dev_id, pdu.function_code, pdu.address, pdu.count)
                )
            return pdu

        return trace

    def _silencer(self, unit_at: int) -> Callable[[bool, bytes], bytes]:
        def trace(sending: bool, packet: bytes) -> bytes:
            if sending and len(packet) > unit_at:
                unit = packet[unit_at]
                if unit not in self.pumps or unit in self.faults.silent:
                    return b""
            return packet

        return trace

    def _action(self, unit: int) -> Any:
        async def action(
            function_code: int,
            _start: int,
            address: int,
            _count: int,
            registers: list[int],
            values: list[int] | list[bool] | None,
        ) -> ExcCodes | None:
            delay = self.faults.reply_delay.get(unit, 0.0)
            if delay > 0:
                await self._delay(delay)
            if code := self.faults.exception_code.get(unit):
                return ExcCodes(code)
            table = _TABLE.get(function_code, "")
            # bit reads come with a count of 16-bit words, so only writes can be bounds-checked
            if table == "c" and values and address + len(values) > 2:
                return ExcCodes.ILLEGAL_ADDRESS
            self._advance()
            pump = self.pumps[unit]
            if values:
                return self._apply(pump, table, address, list(values))
            if function_code not in _WRITES:  # not the read-back of a write
                self._render(pump, table, registers)
            return None

        return action

    async def _delay(self, seconds: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._delayed.add(task)
        try:
            await self._clock.sleep(seconds)
        finally:
            self._delayed.discard(task)

    def _apply(self, pump: Pump, table: str, address: int, values: list[Any]) -> ExcCodes | None:
        if table == "c":
            for addr, bit in enumerate(values, start=address):
                if addr == 0:
                    pump.run = bool(bit)
                else:
                    pump.direction = int(bool(bit))
            self._log.info("pump_coils_written", unit=pump.unit, run=pump.run, dir=pump.direction)
            return None
        if table != "h":
            return ExcCodes.ILLEGAL_FUNCTION
        regs = [*_float_words(pump.setpoint), pump.calibration] + [0] * 8
        regs[address : address + len(values)] = values
        touched = range(address, address + len(values))
        setpoint = _words_float(regs[0:2])
        if (0 in touched or 1 in touched) and not 0.0 <= setpoint <= MAX_SPEED:
            return ExcCodes.ILLEGAL_VALUE  # also refuses NaN
        if (2 in touched and regs[2] == 0) or (10 in touched and regs[10] not in (0, 1)):
            return ExcCodes.ILLEGAL_VALUE
        pump.setpoint, pump.calibration = setpoint, regs[2]
        if regs[10] == 1:
            pump.dispensed = 0.0
        self._log.info("pump_registers_written", unit=pump.unit, setpoint=pump.setpoint)
        return None

    def _render(self, pump: Pump, table: str, registers: list[int]) -> None:
        alarms = self.faults.alarms(pump.unit)
        if table == "c":
            registers[0] = int(pump.run) | pump.direction << 1
        elif table == "d":
            registers[0] = int(pump.speed > 0) | int(alarms != 0) << 1
        elif table == "h":
            registers[0:3] = [*_float_words(pump.setpoint), pump.calibration]
            registers[10] = 0
        elif table == "i":
            registers[0:5] = [*_float_words(pump.speed), *_float_words(pump.dispensed), alarms]
