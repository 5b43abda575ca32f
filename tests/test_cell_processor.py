"""The cell-processor simulator: its process model (no I/O) and its OPC UA server, driven through
the real OPC UA driver with the simulator on a manual clock."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from asyncua import Client, ua

from drivers.base import Quality, Value
from drivers.clock import ManualClock, SystemClock
from drivers.errors import MethodFailed
from drivers.opcua import OpcUaDriver
from drivers.points import OpcUaMethod, OpcUaPoint, RetryPolicy
from simulators.cell_processor import (
    NAMESPACE,
    CellProcessorFaults,
    CellProcessorServer,
    node_id,
)
from simulators.cell_processor_programs import (
    PROGRAMS,
    TRANSITIONS,
    Bag,
    Refusal,
    State,
    check_start,
    run_outcome,
)
from tests.opcua_helpers import eventually, next_matching

MANAGER = ("2:DeviceSet", "2:CellProcessor", "2:FunctionalUnitSet", "2:Processing")
PM = (*MANAGER, "2:ProgramManager")
TAGS = {
    "state": (*PM, "2:State"),
    "progress": (*PM, "2:Progress"),
    "program": (*PM, "2:CurrentProgram"),
    "run_id": (*PM, "2:RunId"),
    "result": (*PM, "2:Result"),
    "error": (*PM, "2:Error"),
    "message": (*PM, "2:StatusMessage"),
    "cells": (*MANAGER, "2:Bag", "2:Cells"),
    "volume": (*MANAGER, "2:Bag", "2:VolumeMl"),
}
METHODS = [
    OpcUaMethod(name.lower(), object_browse_path=PM, method_browse_path=(*PM, f"2:{name}"))
    for name in ("StartProgram", "Abort", "LoadInput")
]
START = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


# ------------------------------------------------------------------ process model (no I/O)


def test_every_state_has_a_way_out_but_running_waits() -> None:
    """The state table lets a new run start from every resting state, and not while running."""
    for state in (State.IDLE, State.COMPLETE, State.ABORTED, State.ERROR):
        assert TRANSITIONS[(state, "start")] is State.RUNNING
    assert (State.RUNNING, "start") not in TRANSITIONS
    assert {TRANSITIONS[(State.RUNNING, c)] for c in ("abort", "done", "fault")} == {
        State.ABORTED,
        State.COMPLETE,
        State.ERROR,
    }


def test_select_recovers_about_55_percent_at_98_percent_purity() -> None:
    """Magnetic selection recovers ~55 % of the target cells at ~98 % purity."""
    bag, result = run_outcome(PROGRAMS["select"], Bag(), 200.0, 1, random.Random(1))
    assert 49 <= float(result["recovery_pct"]) <= 61
    assert 96.5 <= float(result["purity_pct"]) <= 99.5
    assert result["input_cells"] == pytest.approx(200 * 5e7)
    assert bag.volume_ml == 100.0
    assert bag.cells == result["output_cells"]


@pytest.mark.parametrize(
    ("bag", "args", "status", "argument"),
    [
        (Bag(), ("spin", 100.0, 1), "BadInvalidArgument", 0),
        (Bag(), ("select", 5000.0, 1), "BadOutOfRange", 1),
        (Bag(), ("select", 100.0, 0), "BadOutOfRange", 2),
        (Bag(), ("wash", 100.0, 3), "BadInvalidState", None),
        (Bag(1e9, 50.0, 98.0), ("concentrate", 80.0, 1), "BadOutOfRange", 1),
        (Bag(1e9, 50.0, 45.0), ("select", 80.0, 1), "BadOutOfRange", 1),
    ],
)
def test_start_arguments_are_checked(
    bag: Bag, args: tuple[str, float, int], status: str, argument: int | None
) -> None:
    """Unknown programs, out-of-range values and missing input are refused with their code."""
    with pytest.raises(Refusal) as info:
        check_start(bag, *args)
    assert (info.value.status, info.value.argument) == (status, argument)


# ------------------------------------------------------------------ over OPC UA


@dataclass
class Rig:
    clock: ManualClock
    server: CellProcessorServer
    driver: OpcUaDriver

    async def value(self, tag: str) -> Value:
        return (await self.driver.read([tag]))[tag].value

    async def until(self, tag: str, expected: Value) -> None:
        async def reached() -> bool:
            return await self.value(tag) == expected

        await eventually(reached)


@pytest.fixture
def faults() -> CellProcessorFaults:
    return CellProcessorFaults()


@pytest.fixture
async def rig(port: int, faults: CellProcessorFaults) -> AsyncIterator[Rig]:
    clock = ManualClock(START)
    async with CellProcessorServer(clock, port=port, faults=faults, seed=7) as server:
        points = [
            OpcUaPoint(tag, browse_path=path, sampling_interval_ms=20) for tag, path in TAGS.items()
        ]
        driver = OpcUaDriver(
            "cell-processor",
            server.endpoint,
            points,
            METHODS,
            clock=SystemClock(),
            timeout=2.0,
            retry=RetryPolicy(0.05, 2.0, 0.2),
            publishing_interval_ms=50,
        )
        async with driver:
            yield Rig(clock, server, driver)


async def test_select_runs_to_completion_in_simulated_time(rig: Rig) -> None:
    """select runs ~3 h of simulated time, reports progress, then a JSON result."""
    (run_id,) = await rig.driver.call("startprogram", "select", 200, 1)
    assert isinstance(run_id, str) and run_id.startswith("CP-20260301-")
    assert await rig.value("state") == "running"
    await rig.clock.advance(90 * 60)
    await rig.until("progress", 50.0)
    assert await rig.value("state") == "running"
    await rig.clock.advance(90 * 60)
    await rig.until("state", "complete")
    result = json.loads(str(await rig.value("result")))
    assert result["run_id"] == run_id
    assert 49 <= result["recovery_pct"] <= 61
    assert 96.5 <= result["purity_pct"] <= 99.5
    assert await rig.value("volume") == 100.0
    assert await rig.value("cells") == result["output_cells"]


async def test_programs_chain_through_the_bag(rig: Rig) -> None:
    """Loaded input feeds select, and select's output feeds the wash that follows."""
    await rig.driver.call("loadinput", 1.2e10, 250)
    await rig.driver.call("startprogram", "select", 250, 1)
    await rig.clock.advance(3 * 3600)
    await rig.until("state", "complete")
    selected = json.loads(str(await rig.value("result")))
    assert selected["input_cells"] == pytest.approx(1.2e10)

    await rig.driver.call("startprogram", "wash", 80, 3)
    await rig.clock.advance(45 * 60)
    await rig.until("program", "wash")
    await rig.until("state", "complete")
    washed = json.loads(str(await rig.value("result")))
    assert washed["input_cells"] == selected["output_cells"]
    assert washed["output_volume_ml"] == 80
    assert washed["output_cells"] < washed["input_cells"]


async def test_refused_calls_answer_with_status_and_message(rig: Rig) -> None:
    """Bad arguments and calls the state forbids fail with their status and a clear message."""
    cases = [
        (("spin", 100, 1), "name: BadInvalidArgument", "unknown program 'spin'"),
        (("select", 900, 1), "volume_ml: BadOutOfRange", "outside 10..500 mL"),
        (("wash", 100, 3), "BadInvalidState", "no cells loaded"),
    ]
    for args, status, message in cases:
        with pytest.raises(MethodFailed, match=status):
            await rig.driver.call("startprogram", *args)
        assert message in str(await rig.value("message"))

    await rig.driver.call("startprogram", "select", 100, 1)
    with pytest.raises(MethodFailed, match="BadInvalidState"):
        await rig.driver.call("startprogram", "select", 100, 1)
    assert "not allowed while running" in str(await rig.value("message"))


async def test_arguments_of_the_wrong_type_are_refused(rig: Rig) -> None:
    """Like a spec-following server, an Int64 sent for a Double argument gets BadTypeMismatch."""
    async with Client(rig.server.endpoint) as client:
        idx = await client.get_namespace_index(NAMESPACE)
        assert idx == 2
        manager = client.get_node(node_id("ProgramManager"))
        with pytest.raises(ua.UaStatusCodeError) as info:
            await manager.call_method(
                ua.NodeId.from_string(node_id("ProgramManager.StartProgram")),
                ua.Variant("select", ua.VariantType.String),
                ua.Variant(100, ua.VariantType.Int64),
                ua.Variant(1, ua.VariantType.UInt32),
            )
    assert info.value.code == ua.StatusCodes.BadTypeMismatch


async def test_abort_stops_a_run(rig: Rig) -> None:
    """Abort ends a running program as aborted; with nothing running it is refused."""
    await rig.driver.call("startprogram", "select", 50, 1)
    await rig.clock.advance(5 * 60)
    assert await rig.driver.call("abort") == []
    assert await rig.value("state") == "aborted"
    await rig.clock.advance(60 * 60)
    assert await rig.value("state") == "aborted"
    with pytest.raises(MethodFailed, match="BadInvalidState"):
        await rig.driver.call("abort")


async def test_injected_fault_fails_the_run_midway(rig: Rig, faults: CellProcessorFaults) -> None:
    """A program set to fail goes to error at the fault's progress with the fault's message."""
    faults.fail_program = "select"
    faults.fail_at_progress = 40.0
    await rig.driver.call("startprogram", "select", 100, 1)
    await rig.clock.advance(3 * 3600)
    await rig.until("state", "error")
    assert await rig.value("progress") == 40.0
    assert await rig.value("error") == faults.fail_message
    assert await rig.value("result") == ""


async def test_progress_stream_carries_simulated_timestamps(rig: Rig) -> None:
    """Subscribed progress values carry source timestamps from the simulator's clock."""
    stream = rig.driver.observe(["progress"])
    try:
        await next_matching(stream, lambda s: s.quality is Quality.GOOD)
        await rig.driver.call("startprogram", "select", 100, 1)
        await rig.clock.advance(18 * 60)  # 10 % of the 3 h selection
        sample = await next_matching(stream, lambda s: s.value == 10.0)
        assert sample.source_time == datetime(2026, 3, 1, 8, 18, tzinfo=UTC)
    finally:
        await stream.aclose()
