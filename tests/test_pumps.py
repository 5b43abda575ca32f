"""The pump simulator: physics on a manual clock, and its register map through a plain client."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

from drivers.clock import ManualClock
from simulators.pumps import ALARM_DOOR, ALARM_STALL, PumpFaults, PumpServer


def f32(words: list[int]) -> float:
    value: float = struct.unpack(">f", struct.pack(">HH", *words))[0]
    return value


def words(value: float) -> list[int]:
    return list(struct.unpack(">HH", struct.pack(">f", value)))


@pytest.fixture
async def physics() -> AsyncIterator[tuple[PumpServer, ManualClock, list[tuple[int, float, int]]]]:
    """A pump server without network views, on a manual clock, recording dispenses."""
    clock = ManualClock()
    dispensed: list[tuple[int, float, int]] = []
    server = PumpServer(
        clock, tcp=None, on_dispense=lambda u, ml, d: dispensed.append((u, ml, d)), ramp=100.0
    )
    async with server:
        yield server, clock, dispensed


async def test_speed_ramps_to_setpoint_and_volume_integrates(
    physics: tuple[PumpServer, ManualClock, list[tuple[int, float, int]]],
) -> None:
    """A running pump ramps to its set-point and dispenses speed·dt, reported per tick."""
    server, clock, dispensed = physics
    pump = server.pumps[1]
    pump.setpoint, pump.run = 60.0, True
    await clock.advance(0.35)  # three ticks of 0.1 s
    assert pump.speed == pytest.approx(30.0)  # ramp 100 mL/min per s
    await clock.advance(60.0)
    assert pump.speed == pytest.approx(60.0)
    # 0.6 s of ramp (0.3 mL), then 1 mL/s up to the last tick, at most one tick ago
    assert pump.dispensed == pytest.approx(clock.monotonic() - 0.3, abs=0.11)
    assert sum(ml for _, ml, _ in dispensed) == pytest.approx(pump.dispensed)
    assert {(u, d) for u, _, d in dispensed} == {(1, 0)}
    assert server.pumps[2].dispensed == 0.0


async def test_reverse_direction_is_reported_to_the_callback(
    physics: tuple[PumpServer, ManualClock, list[tuple[int, float, int]]],
) -> None:
    """Pumping in reverse reports direction 1 to on_dispense."""
    server, clock, dispensed = physics
    pump = server.pumps[2]
    pump.setpoint, pump.run, pump.direction = 30.0, True, 1
    await clock.advance(2.0)
    assert dispensed and {(u, d) for u, _, d in dispensed} == {(2, 1)}


async def test_stall_stops_the_volume_until_cleared(
    physics: tuple[PumpServer, ManualClock, list[tuple[int, float, int]]],
) -> None:
    """An occlusion stops the rotor and the volume; clearing it resumes pumping."""
    server, clock, _ = physics
    pump = server.pumps[1]
    pump.setpoint, pump.run = 60.0, True
    await clock.advance(5.0)
    server.faults.stalled.add(1)
    await clock.advance(0.1)
    assert server.faults.alarms(1) == ALARM_STALL
    volume = pump.dispensed
    await clock.advance(10.0)
    assert pump.speed == 0.0 and pump.dispensed == volume
    server.faults.stalled.clear()
    await clock.advance(10.0)
    assert pump.dispensed > volume


@pytest.fixture
async def tcp_pumps(port: int) -> AsyncIterator[tuple[PumpServer, AsyncModbusTcpClient]]:
    """Pumps on TCP with a plain pymodbus client connected."""
    server = PumpServer(ManualClock(), tcp=("127.0.0.1", port), faults=PumpFaults())
    async with server:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.3, retries=0)
        await client.connect()
        try:
            yield server, client
        finally:
            client.close()


async def test_register_map_as_documented(
    tcp_pumps: tuple[PumpServer, AsyncModbusTcpClient],
) -> None:
    """Set-point, calibration, coils, measurements and alarms sit at the documented addresses."""
    server, client = tcp_pumps
    assert not (await client.write_registers(0, words(42.5), device_id=2)).isError()
    assert not (await client.write_register(2, 1250, device_id=2)).isError()
    assert not (await client.write_coil(1, True, device_id=2)).isError()
    server.pumps[2].dispensed = 12.5
    server.faults.door_open.add(2)
    holding = await client.read_holding_registers(0, count=3, device_id=2)
    assert f32(holding.registers[:2]) == 42.5 and holding.registers[2] == 1250
    coils = await client.read_coils(0, count=2, device_id=2)
    assert coils.bits[:2] == [False, True]
    inputs = await client.read_input_registers(0, count=5, device_id=2)
    assert f32(inputs.registers[2:4]) == 12.5 and inputs.registers[4] == ALARM_DOOR
    assert (await client.read_discrete_inputs(0, count=2, device_id=2)).bits[:2] == [False, True]
    assert server.pumps[1].setpoint == 0.0


async def test_reset_register_clears_the_volume(
    tcp_pumps: tuple[PumpServer, AsyncModbusTcpClient],
) -> None:
    """Writing 1 to holding register 10 resets the dispensed volume; it reads back 0."""
    server, client = tcp_pumps
    server.pumps[1].dispensed = 99.0
    assert not (await client.write_register(10, 1, device_id=1)).isError()
    assert server.pumps[1].dispensed == 0.0
    assert (await client.read_holding_registers(10, count=1, device_id=1)).registers == [0]


@pytest.mark.parametrize(
    ("address", "value", "code"),
    [(0, words(150.0), 3), (0, words(-1.0), 3), (0, words(float("nan")), 3), (2, [0], 3)],
)
async def test_bad_values_answer_illegal_value(
    tcp_pumps: tuple[PumpServer, AsyncModbusTcpClient], address: int, value: list[int], code: int
) -> None:
    """Set-points outside 0-100 mL/min and a zero calibration answer exception code 3."""
    server, client = tcp_pumps
    response = await client.write_registers(address, value, device_id=1)
    assert response.isError() and response.exception_code == code
    assert server.pumps[1].setpoint == 0.0 and server.pumps[1].calibration == 1000


async def test_undocumented_addresses_answer_illegal_address(
    tcp_pumps: tuple[PumpServer, AsyncModbusTcpClient],
) -> None:
    """Holding register 5 and coil 2 are not in the map: exception code 2."""
    _, client = tcp_pumps
    assert (await client.read_holding_registers(5, count=1, device_id=1)).exception_code == 2
    assert (await client.read_input_registers(4, count=2, device_id=1)).exception_code == 2
    assert (await client.write_coil(2, True, device_id=1)).exception_code == 2


async def test_unknown_unit_is_silent_and_requests_are_recorded(
    tcp_pumps: tuple[PumpServer, AsyncModbusTcpClient],
) -> None:
    """An unknown unit id gets no answer, as on a bus; the server records every request."""
    server, client = tcp_pumps
    with pytest.raises(Exception, match="No response"):
        await client.read_holding_registers(0, count=2, device_id=9)
    assert [(r.view, r.unit, r.function_code, r.address, r.count) for r in server.requests] == [
        ("tcp", 9, 3, 0, 2)
    ]


async def test_rtu_view_serves_the_same_pumps(port: int, tmp_path: object) -> None:
    """The RTU view over the pty link shows what the TCP view wrote."""
    link = f"{tmp_path}/pumps"
    async with PumpServer(ManualClock(), tcp=("127.0.0.1", port), rtu_link=link) as server:
        tcp = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.5, retries=0)
        rtu = AsyncModbusSerialClient(link, timeout=0.5, retries=0, reconnect_delay=0)
        assert await tcp.connect() and await rtu.connect()
        try:
            await tcp.write_registers(0, words(12.0), device_id=2)
            response = await rtu.read_holding_registers(0, count=2, device_id=2)
            assert f32(response.registers) == 12.0
            assert {r.view for r in server.requests} == {"tcp", "rtu"}
        finally:
            tcp.close()
            rtu.close()
