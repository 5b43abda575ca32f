"""The MT-SICS balance driver against the balance simulator on a real pty."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from drivers.base import Driver, Quality
from drivers.clock import Clock, ManualClock, SystemClock
from drivers.errors import (
    DeviceErrorReply,
    DeviceTimeout,
    MethodFailed,
    ProtocolError,
    WriteRefused,
)
from drivers.mtsics import MtSicsBalance
from drivers.points import RetryPolicy, SerialPoint
from simulators.balance import BalanceFaults, BalanceSimulator

POINTS = [SerialPoint("weight", "SI"), SerialPoint("stable", "S"), SerialPoint("tare", "TA")]
FAST_RETRY = RetryPolicy(initial=0.01, factor=2.0, maximum=0.05)


@contextlib.asynccontextmanager
async def rig(
    clock: Clock, link: Path, *, settle_time_s: float = 2.0, **sim: object
) -> AsyncIterator[tuple[BalanceSimulator, MtSicsBalance]]:
    """A running simulator at ``link`` and a connected driver on it."""
    simulator = BalanceSimulator(
        clock,
        link_path=str(link),
        settle_time_s=settle_time_s,
        **sim,  # type: ignore[arg-type]
    )
    balance = MtSicsBalance(
        "balance1", str(link), POINTS, clock=clock, timeout=1.0, poll_interval=0.01,
        retry=FAST_RETRY,
    )  # fmt: skip
    async with simulator, balance:
        yield simulator, balance


async def advance_until_done(clock: ManualClock, task: asyncio.Task[object]) -> None:
    """Move manual time in small steps, letting pty I/O run between steps, until ``task`` ends."""
    for _ in range(400):
        if task.done():
            return
        await asyncio.sleep(0.005)
        await clock.advance(0.25)
    raise AssertionError("task did not finish")


async def test_driver_satisfies_the_protocol(tmp_path: Path) -> None:
    """MtSicsBalance is a drivers.base.Driver."""
    async with rig(SystemClock(), tmp_path / "bal") as (_, balance):
        assert isinstance(balance, Driver)


async def test_stable_weight_reads_good_in_grams(tmp_path: Path) -> None:
    """A settled load reads good from S and SI, net of the tare, in grams."""
    clock = ManualClock()
    async with rig(clock, tmp_path / "bal") as (sim, balance):
        sim.place(100.0)
        await clock.advance(2.0)
        samples = await balance.read(["weight", "stable", "tare"])
    assert {t: (s.value, s.quality) for t, s in samples.items()} == {
        "weight": (100.0, Quality.GOOD),
        "stable": (100.0, Quality.GOOD),
        "tare": (0.0, Quality.GOOD),
    }
    assert samples["weight"].agent_time == clock.now()


async def test_dynamic_weight_is_uncertain_until_settled(tmp_path: Path) -> None:
    """While the load settles SI reads uncertain (S D) and S reports busy (S I) as
    uncertain; after the settle time both read good."""
    clock = ManualClock()
    async with rig(clock, tmp_path / "bal") as (sim, balance):
        sim.place(250.0)
        moving = await balance.read(["weight", "stable"])
        await clock.advance(2.0)
        settled = await balance.read(["weight", "stable"])
    assert moving["weight"].quality is Quality.UNCERTAIN
    assert "S D" in moving["weight"].status
    assert moving["weight"].value == pytest.approx(250.0, abs=0.2)
    assert moving["stable"].quality is Quality.UNCERTAIN
    assert "S I" in moving["stable"].status
    assert settled["weight"].value == 250.0 and settled["weight"].quality is Quality.GOOD
    assert settled["stable"].value == 250.0 and settled["stable"].quality is Quality.GOOD


@pytest.mark.parametrize(("load", "status"), [(7000.0, "overload"), (-5.0, "underload")])
async def test_overload_and_underload_are_bad(tmp_path: Path, load: float, status: str) -> None:
    """S + / S - come back as bad samples keeping the last good value and naming the cause."""
    clock = ManualClock()
    async with rig(clock, tmp_path / "bal") as (sim, balance):
        sim.place(10.0)
        await clock.advance(2.0)
        await balance.read(["weight"])
        sim.place(load)
        sample = (await balance.read(["weight"]))["weight"]
    assert sample.quality is Quality.BAD
    assert sample.value == 10.0
    assert status in sample.status


async def test_zero_tare_and_reset_methods(tmp_path: Path) -> None:
    """call('zero') zeroes the display, call('tare') returns the tare in grams and
    call('reset') returns the serial number and clears the tare."""
    clock = ManualClock()
    async with rig(clock, tmp_path / "bal") as (sim, balance):
        sim.place(40.0)
        await clock.advance(2.0)
        assert await balance.call("zero") == []
        sim.place(140.0)
        await clock.advance(2.0)
        assert await balance.call("tare") == [100.0]
        after_tare = await balance.read(["weight", "tare"])
        assert await balance.call("reset") == ["SIM0000001"]
        after_reset = await balance.read(["weight", "tare"])
    assert (after_tare["weight"].value, after_tare["tare"].value) == (0.0, 100.0)
    assert (after_reset["weight"].value, after_reset["tare"].value) == (100.0, 0.0)


async def test_identification_methods(tmp_path: Path) -> None:
    """I2, I4 and I0 are reachable as identify, serial_number and commands."""
    async with rig(SystemClock(), tmp_path / "bal") as (_, balance):
        assert await balance.call("identify") == ["BedsideSim 6200.00 g"]
        assert await balance.call("serial_number") == ["SIM0000001"]
        commands = await balance.call("commands")
    assert {"S", "SI", "Z", "T", "TA", "@"} <= set(commands)


async def test_zero_while_not_stable_fails(tmp_path: Path) -> None:
    """Z I (busy, not stable) makes call('zero') raise MethodFailed naming the reply."""
    clock = ManualClock()
    async with rig(clock, tmp_path / "bal") as (sim, balance):
        sim.place(3.0)
        with pytest.raises(MethodFailed, match="Z I"):
            await balance.call("zero")


async def test_tare_preset_write(tmp_path: Path) -> None:
    """Writing the TA tag presets the tare in grams; the net weight follows."""
    clock = ManualClock()
    async with rig(clock, tmp_path / "bal") as (sim, balance):
        sim.place(500.0)
        await clock.advance(2.0)
        await balance.write("tare", 12.5)
        samples = await balance.read(["weight", "tare"])
    assert samples["tare"].value == 12.5
    assert samples["weight"].value == 487.5


@pytest.mark.parametrize(
    ("tag", "value", "reason"),
    [("weight", 1.0, "read-only"), ("tare", 1e6, "TA L"), ("tare", "heavy", "not a weight")],
)
async def test_refused_writes(tmp_path: Path, tag: str, value: object, reason: str) -> None:
    """Read-only tags, tares the balance refuses and non-numbers raise WriteRefused."""
    async with rig(SystemClock(), tmp_path / "bal") as (_, balance):
        with pytest.raises(WriteRefused, match=reason) as caught:
            await balance.write(tag, value)  # type: ignore[arg-type]
    assert "balance1" in str(caught.value) and tag in str(caught.value)


@pytest.mark.parametrize(("command", "code"), [("XYZ", "ES"), ("TA abc g", "EL")])
async def test_error_replies_raise(tmp_path: Path, command: str, code: str) -> None:
    """An unknown command (ES) and an impossible argument (EL) raise DeviceErrorReply."""
    async with rig(SystemClock(), tmp_path / "bal") as (_, balance):
        with pytest.raises(DeviceErrorReply, match=code):
            await balance.command(command)


@pytest.mark.parametrize("fault", ["garble", "corrupt"])
async def test_garbled_reply_raises_protocol_error_then_recovers(
    tmp_path: Path, fault: str
) -> None:
    """A garbled or corrupted reply raises ProtocolError; the next request reads normally."""
    faults = BalanceFaults()
    async with rig(SystemClock(), tmp_path / "bal", faults=faults) as (sim, balance):
        sim.place(20.0)
        setattr(faults, fault, 1.0)
        with pytest.raises(ProtocolError, match="balance1"):
            await balance.read(["tare"])
        setattr(faults, fault, 0.0)
        assert (await balance.read(["tare"]))["tare"].quality is Quality.GOOD


async def test_slow_reply_times_out_and_the_line_recovers(tmp_path: Path) -> None:
    """A reply later than the (wall-clock) timeout raises DeviceTimeout; after the late reply, the
    next request gets its own answer."""
    clock = ManualClock()
    faults = BalanceFaults(slow_reply_s=1000.0)
    async with rig(clock, tmp_path / "bal", faults=faults) as (_, balance):
        slow = asyncio.create_task(balance.read(["weight"]))
        await advance_until_done(clock, slow)
        with pytest.raises(DeviceTimeout, match=r"reading weight: .*'SI'"):
            slow.result()
        faults.slow_reply_s = 0.0
        await clock.advance(1000.0)  # the late reply arrives and is flushed as stale
        assert await balance.call("serial_number") == ["SIM0000001"]


async def test_silent_balance_times_out(tmp_path: Path) -> None:
    """A balance that never answers raises DeviceTimeout naming device, port and command."""
    clock = ManualClock()
    link = tmp_path / "bal"
    async with rig(clock, link, faults=BalanceFaults(silent=True)) as (_, balance):
        request = asyncio.create_task(balance.call("tare"))
        await advance_until_done(clock, request)
    with pytest.raises(DeviceTimeout) as caught:
        request.result()
    assert "balance1" in str(caught.value) and str(link) in str(caught.value)


async def test_concurrent_requests_get_their_own_replies(tmp_path: Path) -> None:
    """Reads, writes and calls issued at once each get the reply to their own command."""
    clock = ManualClock()
    async with rig(clock, tmp_path / "bal") as (sim, balance):
        sim.place(80.0)
        await clock.advance(2.0)
        weights, serials, tares, idents = await asyncio.gather(
            asyncio.gather(*(balance.read(["weight"]) for _ in range(5))),
            asyncio.gather(*(balance.call("serial_number") for _ in range(5))),
            asyncio.gather(*(balance.read(["tare"]) for _ in range(5))),
            asyncio.gather(*(balance.call("identify") for _ in range(5))),
        )
    assert [r["weight"].value for r in weights] == [80.0] * 5
    assert serials == [["SIM0000001"]] * 5
    assert [r["tare"].value for r in tares] == [0.0] * 5
    assert idents == [["BedsideSim 6200.00 g"]] * 5


async def test_observe_survives_the_port_vanishing(tmp_path: Path) -> None:
    """observe yields good samples, one bad sample when the port vanishes, and good samples
    again once the simulator is back at the same path; the fault logs once as an error."""
    async with rig(SystemClock(), tmp_path / "bal", settle_time_s=0.0) as (sim, balance):
        sim.place(60.0)
        stream = balance.observe(["weight"])
        try:
            first = await anext(stream)
            with capture_logs() as logs:
                sim.disconnect()
                lost = await anext(stream)
                await sim.reconnect()
                back = await anext(stream)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
    assert (first.value, first.quality) == (60.0, Quality.GOOD)
    assert (lost.value, lost.quality) == (60.0, Quality.BAD)
    assert "balance1" in lost.status
    assert (back.value, back.quality) == (60.0, Quality.GOOD)
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [e["event"] for e in errors] == ["balance_poll_failed"]
    assert [e["event"] for e in logs if e["event"] == "balance_poll_recovered"] == [
        "balance_poll_recovered"
    ]


async def test_observe_yields_only_changes(tmp_path: Path) -> None:
    """A steady weight is yielded once; a new load is yielded as it changes."""
    async with rig(SystemClock(), tmp_path / "bal", settle_time_s=0.0) as (sim, balance):
        sim.place(1.0)
        stream = balance.observe(["weight", "tare"])
        try:
            initial = {s.tag: s.value for s in [await anext(stream), await anext(stream)]}
            sim.place(2.0)
            changed = await anext(stream)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
    assert initial == {"weight": 1.0, "tare": 0.0}
    assert (changed.tag, changed.value) == ("weight", 2.0)


async def test_observe_ends_when_the_driver_closes(tmp_path: Path) -> None:
    """Closing the driver ends an open observe stream."""
    async with rig(SystemClock(), tmp_path / "bal") as (_, balance):
        stream = balance.observe(["tare"])
        await anext(stream)
        await balance.close()
        with pytest.raises(StopAsyncIteration):
            await anext(stream)


async def test_simulator_reads_an_external_weight_source(tmp_path: Path) -> None:
    """With a weight_source the balance shows that load, noticing a change (and starting
    to settle) when next asked; place() is refused."""
    bag = {"grams": 321.0}
    clock = ManualClock()
    async with rig(clock, tmp_path / "bal", weight_source=lambda: bag["grams"]) as (sim, bal):
        assert (await bal.read(["weight"]))["weight"].value == 321.0
        bag["grams"] = 330.0
        assert (await bal.read(["weight"]))["weight"].quality is Quality.UNCERTAIN
        await clock.advance(2.0)
        assert (await bal.read(["weight"]))["weight"].value == 330.0
        with pytest.raises(RuntimeError):
            sim.place(1.0)


async def test_simulator_links_and_unlinks_its_port(tmp_path: Path) -> None:
    """The link points at a pty while running, moves to a new pty on reconnect and is
    removed by stop()."""
    link = tmp_path / "bal"
    async with BalanceSimulator(SystemClock(), link_path=str(link)) as sim:
        assert os.readlink(link) == sim.device_name
        sim.disconnect()
        assert not link.exists() and not sim.connected
        await sim.reconnect()
        assert os.readlink(link) == sim.device_name
    assert not link.is_symlink()
