"""System tests of the simulated unit's shared world, driven through the agent's real drivers.

The unit runs in the test's event loop at 60x; a ``DeviceHub`` built from the shipped unit
configuration (pointed at free ports and a temporary run folder) writes the pumps over Modbus
TCP and RTU and reads the bioreactor over OPC UA and the balance over MT-SICS.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.config import default_config_path, load_config
from agent.devices.hub import DeviceHub
from drivers.base import Quality
from drivers.clock import ScaledClock, SystemClock
from simulators.unit import BAG_TARE_G, SimEndpoints, SimulatedUnit
from tests.conftest import free_port

SPEED = 60.0  # a simulated minute per wall second: 30 mL/min moves 30 mL per second


@dataclass
class Rig:
    unit: SimulatedUnit
    hub: DeviceHub

    async def value(self, tag: str) -> float:
        """A tag's value, read through its driver (good or uncertain quality)."""
        sample = (await self.hub.read([tag]))[tag]
        assert sample.quality is not Quality.BAD, sample
        assert isinstance(sample.value, float)
        return sample.value

    def true_volume(self) -> float:
        return self.unit.model.true_values()["volume"]


@pytest.fixture
async def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Rig]:
    """The simulated unit and a hub on its bioreactor, pumps and balance."""
    opcua, cellproc, modbus = free_port(), free_port(), free_port()
    for name, value in {
        "BEDSIDE_SIM_OPCUA_PORT": opcua,
        "BEDSIDE_SIM_CELLPROC_PORT": cellproc,
        "BEDSIDE_SIM_MODBUS_PORT": modbus,
        "BEDSIDE_RUN_DIR": tmp_path,
    }.items():
        monkeypatch.setenv(name, str(value))
    config = load_config(default_config_path())
    endpoints = SimEndpoints(
        bioreactor_port=opcua,
        cell_processor_port=cellproc,
        modbus_port=modbus,
        rtu_link=str(tmp_path / "pumps-rtu"),
        balance_link=str(tmp_path / "balance"),
        control_port=free_port(),
        run_dir=str(tmp_path),
    )
    devices = ["bioreactor", "feed_pump", "harvest_pump", "balance"]
    async with (
        SimulatedUnit(ScaledClock(SPEED), endpoints) as unit,
        DeviceHub(config, SystemClock(), devices) as hub,
    ):
        yield Rig(unit, hub)


async def until(condition: Callable[[], Awaitable[bool]], what: str, within: float = 20) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` if it never does."""
    try:
        async with asyncio.timeout(within):
            while True:
                if await condition():
                    return
                await asyncio.sleep(0.05)  # a poll of the test, not process timing
    except TimeoutError:
        pytest.fail(f"{what} did not happen within {within} s")


async def test_feed_pump_raises_the_bioreactor_volume(rig: Rig) -> None:
    """Running the feed pump (Modbus TCP) pumps medium into the bag: the volume the bioreactor
    reports over OPC UA rises."""
    before = await rig.value("volume")
    await rig.hub.write("feed_speed_sp", 30.0)
    await rig.hub.write("feed_run", True)

    async def risen() -> bool:
        return await rig.value("volume") > before + 10

    await until(risen, "the bioreactor volume rising by 10 mL")
    assert await rig.value("feed_dispensed") > 10


async def test_harvest_pump_moves_culture_into_the_bag_on_the_balance(rig: Rig) -> None:
    """Running the harvest pump (Modbus RTU) takes culture out of the bioreactor and the bag's
    weight on the balance (MT-SICS) rises."""
    volume = rig.true_volume()
    weight = await rig.value("bag_weight")
    assert weight == pytest.approx(BAG_TARE_G)
    await rig.hub.write("harvest_speed_sp", 30.0)
    await rig.hub.write("harvest_run", True)

    async def heavier() -> bool:
        return await rig.value("bag_weight") > weight + 10

    await until(heavier, "the harvest bag gaining 10 g")
    assert rig.unit.harvest_bag_ml > 0
    assert rig.true_volume() == pytest.approx(volume - rig.unit.harvest_bag_ml, abs=0.01)


async def test_a_full_bioreactor_bag_stops_taking_volume_without_crashing(rig: Rig) -> None:
    """Feeding a full bag adds nothing beyond its capacity, logs it once, and every device goes
    on answering."""
    capacity = rig.unit.model.params.max_volume
    rig.unit.model.add_volume(capacity - rig.true_volume() - 5.0)  # 5 mL of headroom
    with capture_logs() as logs:
        await rig.hub.write("feed_speed_sp", 30.0)
        await rig.hub.write("feed_run", True)

        async def overfed() -> bool:
            return await rig.value("feed_dispensed") > 30

        await until(overfed, "the feed pump dispensing 30 mL")
    assert capacity - 5.0 < rig.true_volume() <= capacity
    limited = [e for e in logs if e["event"] == "sim_pumping_limited"]
    assert len(limited) == 1 and limited[0]["pump"] == 1
    assert await rig.value("volume") <= capacity + 2  # the bioreactor still answers
    assert await rig.value("bag_weight") == pytest.approx(BAG_TARE_G)
