"""The Modbus driver against real servers: the pump simulator (TCP and RTU over a pty) and a
plain pymodbus server with its own data store."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from structlog.testing import capture_logs

from drivers.base import Driver, Quality, Sample
from drivers.clock import ManualClock, SystemClock
from drivers.errors import (
    ConfigurationError,
    DeviceTimeout,
    DeviceUnavailable,
    ModbusException,
    ProtocolError,
    WriteRefused,
)
from drivers.modbus import ModbusDriver
from drivers.points import (
    ByteOrder,
    ModbusPoint,
    ModbusTable,
    ModbusType,
    RetryPolicy,
    WordOrder,
)
from simulators.pumps import PumpFaults, PumpServer
from tests.conftest import free_port

HR, IR, CO, DI = (
    ModbusTable.HOLDING_REGISTER,
    ModbusTable.INPUT_REGISTER,
    ModbusTable.COIL,
    ModbusTable.DISCRETE_INPUT,
)
F32, U16, BOOL = ModbusType.FLOAT32, ModbusType.UINT16, ModbusType.BOOL


def pump_points(unit: int) -> list[ModbusPoint]:
    """The pump manual's map as driver points, tags prefixed ``p<unit>_``."""
    return [
        ModbusPoint(f"p{unit}_speed_sp", HR, 0, F32, unit_id=unit),
        ModbusPoint(f"p{unit}_tubing", HR, 2, U16, unit_id=unit, scale=0.001),
        ModbusPoint(f"p{unit}_run", CO, 0, BOOL, unit_id=unit),
        ModbusPoint(f"p{unit}_reverse", CO, 1, BOOL, unit_id=unit),
        ModbusPoint(f"p{unit}_speed", IR, 0, F32, unit_id=unit),
        ModbusPoint(f"p{unit}_volume", IR, 2, F32, unit_id=unit),
        ModbusPoint(f"p{unit}_alarms", IR, 4, U16, unit_id=unit),
        ModbusPoint(f"p{unit}_running", DI, 0, BOOL, unit_id=unit),
        ModbusPoint(f"p{unit}_alarm", DI, 1, BOOL, unit_id=unit),
    ]


POINTS = [*pump_points(1), *pump_points(2), ModbusPoint("p1_missing", HR, 5, U16, unit_id=1)]
TAGS1 = [p.tag for p in pump_points(1)]


def driver(endpoint: str, clock: object | None = None, **kw: object) -> ModbusDriver:
    options: dict[str, object] = {"timeout": 0.3, "retries": 0}
    options.update(kw)
    return ModbusDriver(
        "pumps",
        endpoint,
        POINTS,
        clock=clock or ManualClock(),  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture
async def pumps(port: int, tmp_path: Path) -> AsyncIterator[PumpServer]:
    """Two pumps on a manual clock, served on TCP and on RTU over a pty link."""
    async with PumpServer(
        ManualClock(),
        tcp=("127.0.0.1", port),
        rtu_link=str(tmp_path / "pumps"),
        faults=PumpFaults(),
    ) as server:
        yield server


@pytest.fixture(params=["tcp", "rtu"])
async def drv(request: pytest.FixtureRequest, pumps: PumpServer) -> AsyncIterator[ModbusDriver]:
    """A connected driver on the TCP view, then on the RTU view."""
    async with driver(pumps.endpoints[request.param]) as d:
        yield d


def test_driver_satisfies_the_protocol() -> None:
    """ModbusDriver is a drivers.base.Driver."""
    assert isinstance(driver("tcp://127.0.0.1:1502"), Driver)


@pytest.mark.parametrize(
    ("points", "match"),
    [
        ([ModbusPoint("sp", CO, 0, F32)], "'sp'.*bit table"),
        ([ModbusPoint("far", HR, 65535, F32)], "'far'.*past address"),
        ([ModbusPoint("a", HR, 0), ModbusPoint("a", HR, 1)], "'a' defined twice"),
    ],
)
def test_bad_points_fail_at_construction(points: Sequence[ModbusPoint], match: str) -> None:
    """Impossible points raise ConfigurationError naming the tag before any I/O."""
    with pytest.raises(ConfigurationError, match=match):
        ModbusDriver("d", "tcp://127.0.0.1:1502", points, clock=ManualClock())


async def test_write_then_read_back(drv: ModbusDriver, pumps: PumpServer) -> None:
    """Set-point, calibration and coils written by tag read back with good quality."""
    await drv.write("p2_speed_sp", 37.5)
    await drv.write("p2_tubing", 1.25)
    await drv.write("p2_run", True)
    await drv.write("p2_reverse", 1)
    samples = await drv.read(["p2_speed_sp", "p2_tubing", "p2_run", "p2_reverse", "p1_run"])
    assert {t: s.value for t, s in samples.items()} == {
        "p2_speed_sp": 37.5,
        "p2_tubing": 1.25,
        "p2_run": True,
        "p2_reverse": True,
        "p1_run": False,
    }
    assert all(s.quality is Quality.GOOD for s in samples.values())
    assert (pumps.pumps[2].setpoint, pumps.pumps[2].calibration) == (37.5, 1250)


async def test_adjacent_tags_share_one_request(drv: ModbusDriver, pumps: PumpServer) -> None:
    """Nine tags of one pump take four requests, one per table, as counted by the server."""
    pumps.requests.clear()
    samples = await drv.read(TAGS1)
    assert len(samples) == 9
    assert sorted((r.unit, r.function_code, r.address, r.count) for r in pumps.requests) == [
        (1, 1, 0, 2),
        (1, 2, 0, 2),
        (1, 3, 0, 3),
        (1, 4, 0, 5),
    ]


async def test_read_returns_real_samples_in_the_callers_order(drv: ModbusDriver) -> None:
    """Good samples are immutable Samples, keyed in the caller's order, one time per read."""
    tags = ["p1_speed", "p2_run", "p1_alarms", "p1_speed_sp", "p2_run"]
    for _ in range(2):  # planned at the first read, from the cache at the second
        samples = await drv.read(tags)
        assert list(samples) == ["p1_speed", "p2_run", "p1_alarms", "p1_speed_sp"]
        assert len({s.agent_time for s in samples.values()}) == 1
        for tag, sample in samples.items():
            same = Sample(tag, sample.value, Quality.GOOD, sample.agent_time)
            assert type(sample) is Sample and sample == same and hash(sample) == hash(same)
            assert sample.as_dict() == same.as_dict()
            with pytest.raises(AttributeError):
                sample.value = 1  # type: ignore[misc]


async def test_missing_register_is_illegal_address(drv: ModbusDriver) -> None:
    """A register the device lacks is a BAD sample naming code 2; strict raises it."""
    samples = await drv.read(["p1_missing", "p1_speed"])
    assert samples["p1_speed"].quality is Quality.GOOD
    assert samples["p1_missing"].quality is Quality.BAD
    assert "exception code 2 (illegal data address)" in samples["p1_missing"].status
    with pytest.raises(ModbusException) as err:
        await drv.read(["p1_missing"], strict=True)
    assert err.value.code == 2 and "holding_register 5" in str(err.value)


async def test_out_of_range_setpoint_is_illegal_value(drv: ModbusDriver) -> None:
    """A set-point the pump refuses raises ModbusException code 3 naming tag and value."""
    with pytest.raises(ModbusException, match=r"150\.0.*p1_speed_sp") as err:
        await drv.write("p1_speed_sp", 150.0)
    assert err.value.code == 3


@pytest.mark.parametrize("code", [4, 6])
async def test_injected_exception_codes(drv: ModbusDriver, pumps: PumpServer, code: int) -> None:
    """Injected device failure / busy come back as ModbusException with that code."""
    pumps.faults.exception_code[2] = code
    with pytest.raises(ModbusException) as err:
        await drv.write("p2_run", True)
    assert err.value.code == code
    samples = await drv.read(["p1_speed", "p2_speed"])
    assert samples["p1_speed"].quality is Quality.GOOD
    assert f"exception code {code}" in samples["p2_speed"].status


async def test_silent_unit_times_out_while_the_other_reads(
    drv: ModbusDriver, pumps: PumpServer
) -> None:
    """A silent unit's tags are BAD (timeout) while the other unit on the bus reads good."""
    pumps.faults.silent.add(2)
    samples = await drv.read(["p1_speed_sp", "p2_speed_sp", "p1_run", "p2_run"])
    assert samples["p1_speed_sp"].quality is Quality.GOOD
    assert samples["p1_run"].quality is Quality.GOOD
    assert samples["p2_speed_sp"].quality is Quality.BAD
    assert "no answer" in samples["p2_speed_sp"].status
    with pytest.raises(DeviceTimeout, match="unit 2"):
        await drv.read(["p2_speed_sp"], strict=True)
    with pytest.raises(DeviceTimeout):
        await drv.write("p2_run", True)


async def test_slow_reply_times_out(pumps: PumpServer) -> None:
    """A reply slower than the timeout is a timeout (the delay runs on the pumps' clock)."""
    pumps.faults.reply_delay[1] = 5.0  # the manual clock never gets there
    async with driver(pumps.endpoints["tcp"]) as d:
        samples = await d.read(["p1_speed"])
    assert samples["p1_speed"].quality is Quality.BAD and "no answer" in samples["p1_speed"].status


async def test_out_of_range_write_is_refused_before_sending(
    drv: ModbusDriver, pumps: PumpServer
) -> None:
    """A value that does not fit the raw type, or a read-only table, is refused unsent."""
    pumps.requests.clear()
    with pytest.raises(WriteRefused, match=r"p1_tubing.*70\.0"):
        await drv.write("p1_tubing", 70.0)  # raw 70000 > uint16
    with pytest.raises(WriteRefused, match="read-only"):
        await drv.write("p1_speed", 1.0)
    with pytest.raises(WriteRefused, match="not a bool"):
        await drv.write("p1_run", "yes")
    assert list(pumps.requests) == []


async def test_unknown_tags_and_methods_are_configuration_errors(drv: ModbusDriver) -> None:
    """Unknown tags and any call() raise ConfigurationError."""
    with pytest.raises(ConfigurationError, match="nope"):
        await drv.read(["nope"])
    with pytest.raises(ConfigurationError, match="nope"):
        await drv.write("nope", 1)
    with pytest.raises(ConfigurationError, match="no methods"):
        await drv.call("prime")


async def test_refused_connection_is_unavailable() -> None:
    """Nothing listening raises DeviceUnavailable on connect."""
    with pytest.raises(DeviceUnavailable, match="cannot connect"):
        await driver(f"tcp://127.0.0.1:{free_port()}").connect()


async def test_missing_serial_port_is_unavailable(tmp_path: Path) -> None:
    """A serial path that does not exist raises DeviceUnavailable on connect."""
    with pytest.raises(DeviceUnavailable, match="cannot connect"):
        await driver(f"rtu://{tmp_path}/nothing").connect()


async def test_repeating_fault_logs_once_then_recovery(
    drv: ModbusDriver, pumps: PumpServer
) -> None:
    """A repeating unit fault logs one error, stays quiet, then logs recovery once."""
    pumps.faults.exception_code[1] = 6
    with capture_logs() as logs:
        for _ in range(3):
            await drv.read(["p1_speed"])
        pumps.faults.exception_code.clear()
        await drv.read(["p1_speed"])
        await drv.read(["p1_speed"])
    levels = [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("modbus_read")]
    assert levels == [
        ("modbus_read_failed", "error"),
        ("modbus_read_failed", "debug"),
        ("modbus_read_failed", "debug"),
        ("modbus_read_recovered", "info"),
    ]


async def next_matching(stream: AsyncIterator[Sample], tag: str, quality: Quality) -> Sample:
    """The next sample of ``tag`` with ``quality``."""
    async for sample in stream:
        if sample.tag == tag and sample.quality is quality:
            return sample
    raise AssertionError("stream ended")


@pytest.mark.parametrize("view", ["tcp", "rtu"])
async def test_observe_survives_a_server_restart(view: str, port: int, tmp_path: Path) -> None:
    """observe yields good, then BAD once while the server is away, then good again."""
    clock = SystemClock()  # polls and backoff of a few tens of ms
    server = PumpServer(clock, tcp=("127.0.0.1", port), rtu_link=str(tmp_path / "pumps"))
    await server.start()
    server.pumps[1].setpoint = 25.0
    retry = RetryPolicy(initial=0.05, factor=2.0, maximum=0.2)
    d = driver(server.endpoints[view], clock, poll_interval=0.05, retry=retry, timeout=0.2)
    try:
        async with asyncio.timeout(20), d:
            stream = d.observe(["p1_speed_sp", "p2_run"])
            async with contextlib.aclosing(stream):
                first = await next_matching(stream, "p1_speed_sp", Quality.GOOD)
                assert first.value == 25.0
                await server.stop()
                bad = await next_matching(stream, "p1_speed_sp", Quality.BAD)
                assert bad.value == 25.0 and bad.status  # keeps the last value, says why
                await server.start()
                good = await next_matching(stream, "p1_speed_sp", Quality.GOOD)
                assert good.value == 25.0
    finally:
        await server.stop()


async def test_dropped_connection_is_reopened_at_the_next_request(port: int) -> None:
    """A TCP connection dropped between polls is reopened at once; the drop is logged."""
    server = PumpServer(ManualClock(), tcp=("127.0.0.1", port))
    async with server, driver(server.endpoints["tcp"]) as d:
        assert (await d.read(["p1_run"]))["p1_run"].quality is Quality.GOOD
        server.drop_connections()
        for _ in range(200):  # wait until the client has seen the close
            if not d.connected:
                break
            await asyncio.sleep(0.005)
        with capture_logs() as logs:
            assert (await d.read(["p1_run"]))["p1_run"].quality is Quality.GOOD
    events = [(e["event"], e["log_level"]) for e in logs]
    assert events == [("modbus_link_lost", "error"), ("modbus_connected", "info")]


async def test_observe_yields_changes_and_heartbeats(pumps: PumpServer) -> None:
    """Unchanged tags are yielded only on heartbeat polls; a change is yielded at once."""
    clock = ManualClock()
    async with driver(pumps.endpoints["tcp"], clock, poll_interval=1.0, heartbeat=3) as d:
        got: list[tuple[str, object]] = []
        async with contextlib.aclosing(d.observe(["p1_speed_sp", "p1_run"])) as stream:
            consumer = asyncio.create_task(collect(stream, got, 5))
            for poll in range(1, 5):  # polls at t = 0, 1, 2, 3, 4
                await wait_for_polls(pumps, poll)
                if poll == 2:
                    pumps.pumps[1].setpoint = 10.0
                await clock.advance(1.0)
            await consumer
    # poll 0: both (first), poll 2: the change, poll 3: heartbeat of both
    assert (
        got
        == [
            ("p1_speed_sp", 0.0),
            ("p1_run", False),
            ("p1_speed_sp", 10.0),
            ("p1_speed_sp", 10.0),
            ("p1_run", False),
        ][: len(got)]
    )
    assert len(got) >= 4


async def collect(stream: AsyncIterator[Sample], into: list[tuple[str, object]], n: int) -> None:
    async for sample in stream:
        into.append((sample.tag, sample.value))
        if len(into) >= n:
            return


async def wait_for_polls(pumps: PumpServer, polls: int) -> None:
    """Let the driver's polls reach the server (two requests per poll)."""
    for _ in range(500):
        if len([r for r in pumps.requests if r.unit == 1]) >= 2 * polls:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"poll {polls} never reached the server")


@dataclass
class PlainServer:
    """What the plain server received, and a switch making it answer one register short."""

    received: list[ModbusPDU] = field(default_factory=list)
    short: bool = False

    def trace(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.received.append(pdu)
        elif self.short and pdu.function_code == 3:
            pdu.registers = list(pdu.registers)[:-1]
        return pdu


@pytest.fixture
async def plain_server(port: int) -> AsyncIterator[PlainServer]:
    """A plain pymodbus TCP server (unit 7) with its own data store."""
    plain = PlainServer()
    holding = [
        SimData(0, values=[-12.5], datatype=DataType.FLOAT32),
        SimData(2, values=[-7], datatype=DataType.INT16),
        SimData(3, values=[123456], datatype=DataType.INT32),
        SimData(5, values=[3.25], datatype=DataType.FLOAT64),
    ]
    inputs = [SimData(0, values=[0x1234], datatype=DataType.UINT16)]
    coils = [SimData(0, values=[True, False, True] + [False] * 13, datatype=DataType.BITS)]
    discrete = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
    device = SimDevice(7, simdata=(coils, discrete, holding, inputs))
    server = ModbusTcpServer(device, address=("127.0.0.1", port), trace_pdu=plain.trace)
    await server.serve_forever(background=True)
    try:
        yield plain
    finally:
        await server.shutdown()


PLAIN = [
    ModbusPoint("f32", HR, 0, F32, unit_id=7),
    ModbusPoint("i16", HR, 2, ModbusType.INT16, unit_id=7),
    ModbusPoint("i32", HR, 3, ModbusType.INT32, unit_id=7),
    ModbusPoint("f64", HR, 5, ModbusType.FLOAT64, unit_id=7),
    ModbusPoint("f64_swapped", HR, 5, ModbusType.FLOAT64, unit_id=7, word_order=WordOrder.LITTLE),
    ModbusPoint("u16_le", IR, 0, U16, unit_id=7, byte_order=ByteOrder.LITTLE),
    ModbusPoint("c0", CO, 0, BOOL, unit_id=7),
    ModbusPoint("c2", CO, 2, BOOL, unit_id=7),
]


async def test_plain_pymodbus_server(plain_server: PlainServer, port: int) -> None:
    """Values encoded by pymodbus's own data store decode per type and order, merged."""
    async with ModbusDriver(
        "plain", f"tcp://127.0.0.1:{port}", PLAIN, clock=ManualClock(), timeout=0.5
    ) as d:
        samples = await d.read([p.tag for p in PLAIN])
        assert {t: s.value for t, s in samples.items() if t != "f64_swapped"} == {
            "f32": -12.5,
            "i16": -7,
            "i32": 123456,
            "f64": 3.25,
            "u16_le": 0x3412,
            "c0": True,
            "c2": True,
        }
        assert samples["f64_swapped"].value != 3.25
        assert len(plain_server.received) == 3  # holding 0..8, input 0, coils 0..2
        await d.write("f32", 99.75)
        await d.write("i16", -300)
        assert (await d.read(["f32"]))["f32"].value == 99.75
        assert (await d.read(["i16"]))["i16"].value == -300
        plain_server.short = True
        with pytest.raises(ProtocolError, match="asked 9, answered 8"):
            await d.read(["f32", "f64"], strict=True)
