"""Clocks: manual time wakes sleepers in order; scaled time runs faster than the wall."""

from __future__ import annotations

import asyncio

import pytest

from drivers.clock import ManualClock, ScaledClock


async def test_manual_clock_wakes_sleepers_in_deadline_order() -> None:
    """Sleepers wake when advance() passes their deadline, earliest first."""
    clock = ManualClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(name: str, s: float) -> None:
        await clock.sleep(s)
        woke.append((name, clock.monotonic()))

    tasks = [asyncio.create_task(sleeper("b", 20)), asyncio.create_task(sleeper("a", 10))]
    await asyncio.sleep(0)
    await clock.advance(15)
    assert woke == [("a", 10)]
    await clock.advance(10)
    assert woke == [("a", 10), ("b", 20)]
    assert clock.monotonic() == 25
    await asyncio.gather(*tasks)


async def test_scaled_clock_sleeps_a_fraction_of_wall_time() -> None:
    """At speed 1000 an hour of clock time passes in a few wall seconds at most."""
    clock = ScaledClock(1000)
    t0 = clock.monotonic()
    await clock.sleep(2.0)
    assert clock.monotonic() - t0 >= 2.0
    assert (clock.now() - clock.now()).total_seconds() <= 0


def test_scaled_clock_refuses_non_positive_speed() -> None:
    """Speed zero would freeze time: refused with a message."""
    with pytest.raises(ValueError, match="positive"):
        ScaledClock(0)
