"""Monitors: on/off delays, hysteresis, unknown inputs and several monitors at once."""

from __future__ import annotations

import pytest

from agent.alarms.manager import Priority
from agent.engine.monitors import Action, Change, Monitor, MonitorEvent, MonitorSet


class Probe:
    """A reading the conditions look at; None stands for a bad-quality input."""

    def __init__(self, value: float | None) -> None:
        self.value = value

    def above(self, limit: float) -> bool | None:
        return None if self.value is None else self.value > limit

    def below(self, limit: float) -> bool | None:
        return None if self.value is None else self.value < limit


def temp_monitor(probe: Probe, on_delay: float = 10.0, off_delay: float = 30.0) -> Monitor:
    return Monitor(
        "temp_high",
        trip=lambda: probe.above(38.5),
        clear=lambda: probe.below(38.0),
        on_delay=on_delay,
        off_delay=off_delay,
        priority=Priority.CRITICAL,
        action=Action.HOLD,
    )


def run(
    monitors: MonitorSet, probe: Probe, readings: list[tuple[float, float | None]]
) -> list[tuple[float, str, Change]]:
    """Feed (time, value) readings, evaluating after each; return (time, id, change)."""
    out = []
    for at, value in readings:
        probe.value = value
        out += [(e.at, e.monitor.id, e.change) for e in monitors.evaluate(at)]
    return out


def test_trips_after_condition_holds_for_on_delay() -> None:
    """The monitor trips at the first evaluation on_delay after the condition became true."""
    probe = Probe(37.0)
    monitors = MonitorSet([temp_monitor(probe)])
    readings = [(0, 37.0), (1, 38.7), (5, 38.8), (10, 38.8), (11, 38.9), (12, 39.0)]
    assert run(monitors, probe, readings) == [(11, "temp_high", Change.TRIPPED)]
    assert monitors.is_tripped("temp_high")
    assert [m.id for m in monitors.tripped()] == ["temp_high"]


def test_blip_shorter_than_on_delay_does_not_trip() -> None:
    """A condition true for less than on_delay, then false, restarts the delay: no trip."""
    probe = Probe(37.0)
    monitors = MonitorSet([temp_monitor(probe)])
    readings = [(t, 39.0 if t % 10 < 8 else 37.5) for t in range(0, 60)]
    assert run(monitors, probe, readings) == []
    assert not monitors.is_tripped("temp_high")


def test_chatter_around_trip_threshold_does_not_trip() -> None:
    """Readings alternating across the trip threshold every scan never hold long enough."""
    probe = Probe(37.0)
    monitors = MonitorSet([temp_monitor(probe)])
    readings = [(t, 38.6 if t % 2 else 38.4) for t in range(100)]
    assert run(monitors, probe, readings) == []


def test_hysteresis_band_neither_clears_nor_retrips() -> None:
    """Once tripped, readings between clear and trip thresholds change nothing."""
    probe = Probe(39.0)
    monitors = MonitorSet([temp_monitor(probe, on_delay=0)])
    assert run(monitors, probe, [(0, 39.0)]) == [(0, "temp_high", Change.TRIPPED)]
    chatter = [(t, 38.4 if t % 2 else 38.6) for t in range(1, 200)]
    assert run(monitors, probe, chatter) == []
    assert monitors.is_tripped("temp_high")


def test_clears_after_clear_condition_holds_for_off_delay() -> None:
    """The monitor clears only when below the clear threshold continuously for off_delay."""
    probe = Probe(39.0)
    monitors = MonitorSet([temp_monitor(probe, on_delay=0, off_delay=30)])
    run(monitors, probe, [(0, 39.0)])
    readings = [(10, 37.9), (30, 37.8), (35, 38.2), (40, 37.9), (60, 37.9), (70, 37.8)]
    assert run(monitors, probe, readings) == [(70, "temp_high", Change.CLEARED)]
    assert not monitors.is_tripped("temp_high")


def test_default_clear_is_not_trip() -> None:
    """Without a clear condition the monitor clears when the trip condition is false."""
    probe = Probe(39.0)
    monitor = Monitor("t", trip=lambda: probe.above(38.5), on_delay=0, off_delay=5)
    monitors = MonitorSet([monitor])
    readings = [(0, 39.0), (1, 38.4), (5, 38.4), (6, 38.4)]
    assert run(monitors, probe, readings) == [(0, "t", Change.TRIPPED), (6, "t", Change.CLEARED)]


def test_unknown_input_reported_once_and_changes_nothing() -> None:
    """A None condition is reported once per stretch, neither trips nor clears, and restarts
    the delay."""
    probe = Probe(37.0)
    monitors = MonitorSet([temp_monitor(probe)])
    readings = [(0, 39.0), (5, None), (6, None), (9, 39.0), (15, 39.0), (19, 39.0), (20, None)]
    assert run(monitors, probe, readings) == [
        (5, "temp_high", Change.UNKNOWN),
        (19, "temp_high", Change.TRIPPED),
        (20, "temp_high", Change.UNKNOWN),
    ]
    assert monitors.is_tripped("temp_high")


def test_unknown_input_does_not_clear_a_tripped_monitor() -> None:
    """A tripped monitor stays tripped while its clear condition cannot be evaluated."""
    probe = Probe(39.0)
    monitors = MonitorSet([temp_monitor(probe, on_delay=0, off_delay=0)])
    run(monitors, probe, [(0, 39.0)])
    assert run(monitors, probe, [(t, None) for t in range(1, 100)]) == [
        (1, "temp_high", Change.UNKNOWN)
    ]
    assert monitors.is_tripped("temp_high")


def test_several_monitors_are_independent() -> None:
    """Each monitor keeps its own delay and state; events come in the order of the set."""
    temp, do = Probe(37.0), Probe(40.0)
    monitors = MonitorSet(
        [
            temp_monitor(temp, on_delay=5),
            Monitor("do_low", trip=lambda: do.below(20.0), clear=lambda: do.above(25.0)),
        ]
    )
    events: list[MonitorEvent] = []
    for t, (tv, dv) in enumerate([(39.0, 15.0), (39.0, 22.0), (39.0, 30.0)] + [(39.0, 30.0)] * 3):
        temp.value, do.value = tv, dv
        events += monitors.evaluate(t)
    assert [(e.at, e.monitor.id, e.change) for e in events] == [
        (0, "do_low", Change.TRIPPED),
        (2, "do_low", Change.CLEARED),
        (5, "temp_high", Change.TRIPPED),
    ]
    assert events[2].monitor.action is Action.HOLD
    assert events[2].monitor.priority is Priority.CRITICAL


def test_reset_forgets_trips_and_delays() -> None:
    """reset() returns every monitor to untripped with no delay running."""
    probe = Probe(39.0)
    monitors = MonitorSet([temp_monitor(probe, on_delay=0)])
    run(monitors, probe, [(0, 39.0)])
    monitors.reset()
    assert monitors.tripped() == []


def test_condition_error_names_the_monitor() -> None:
    """An exception from a condition propagates with a note naming the monitor."""

    def broken() -> bool | None:
        raise ZeroDivisionError("division by zero")

    monitors = MonitorSet([Monitor("ratio", trip=broken)])
    with pytest.raises(ZeroDivisionError) as caught:
        monitors.evaluate(0)
    assert caught.value.__notes__ == ["while evaluating monitor 'ratio'"]


@pytest.mark.parametrize("delay", [-1.0, float("nan"), float("inf")])
def test_bad_delays_are_refused(delay: float) -> None:
    """A negative or non-finite delay is a configuration error naming the monitor."""
    with pytest.raises(ValueError, match="monitor 'm': on_delay"):
        Monitor("m", trip=lambda: True, on_delay=delay)


def test_duplicate_monitor_ids_are_refused() -> None:
    """Two monitors with one id cannot be in a set."""
    monitor = Monitor("m", trip=lambda: True)
    with pytest.raises(ValueError, match="already in the set"):
        MonitorSet([monitor, monitor])
