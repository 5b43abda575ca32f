"""Monitors: conditions watched every scan, with on/off delays and hysteresis.

A monitor trips when its trip condition has been true on every evaluation for ``on_delay``
seconds, and clears when its clear condition has been true on every evaluation for
``off_delay`` seconds. The clear condition defaults to "not trip"; give a separate one for
hysteresis (trip ``T > 38.5``, clear ``T < 38.0``: values in between change nothing, so a
reading chattering around one threshold cannot toggle the monitor)::

                trip true for on_delay
       normal ──────────────────────────► tripped
          ▲                                  │
          └──────────────────────────────────┘
                clear true for off_delay

Continuity is judged on the evaluations the engine makes (its scan): a false reading restarts
the delay. A condition that cannot be evaluated (``None``: a bad-quality input) neither trips nor
clears and restarts the delay; it is reported once as ``unknown`` per stretch of unknowns. The
engine watches device loss itself with ``device_lost`` monitors, whose conditions do evaluate.

This module is pure logic on an injected monotonic time: ``MonitorSet.evaluate(now)`` returns
what changed and the engine acts on it (``action``: raise an alarm, pause, hold or abort).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.alarms.manager import Priority

Condition = Callable[[], bool | None]


class Action(enum.StrEnum):
    """What the engine does when a monitor trips (an alarm is raised in every case)."""

    ALARM = "alarm"
    PAUSE = "pause"
    HOLD = "hold"
    ABORT = "abort"


class Change(enum.StrEnum):
    """What ``evaluate`` reports about a monitor."""

    TRIPPED = "tripped"
    CLEARED = "cleared"
    UNKNOWN = "unknown"  # the condition could not be evaluated (reported once per stretch)


@dataclass(frozen=True, slots=True)
class Monitor:
    """A watched condition; ``trip``/``clear`` return True, False or None (cannot tell)."""

    id: str
    trip: Condition
    clear: Condition | None = None  # None: clear when trip is false
    on_delay: float = 0.0  # seconds the trip condition must hold
    off_delay: float = 0.0  # seconds the clear condition must hold
    priority: Priority = Priority.HIGH
    action: Action = Action.ALARM
    message: str = ""

    def __post_init__(self) -> None:
        for name in ("on_delay", "off_delay"):
            delay = getattr(self, name)
            if not (math.isfinite(delay) and delay >= 0):
                raise ValueError(f"monitor {self.id!r}: {name} {delay!r} must be >= 0 s")


@dataclass(frozen=True, slots=True)
class MonitorEvent:
    """A change of one monitor at evaluation time ``at`` (monotonic seconds)."""

    monitor: Monitor
    change: Change
    at: float


@dataclass(slots=True)
class _Track:
    tripped: bool = False
    since: float | None = None  # when the awaited condition became (continuously) true
    unknown: bool = False


def _not(value: bool | None) -> bool | None:
    return None if value is None else not value


class MonitorSet:
    """The monitors of one run and their trip state."""

    def __init__(self, monitors: Iterable[Monitor] = ()) -> None:
        self._monitors: dict[str, Monitor] = {}
        self._tracks: dict[str, _Track] = {}
        for monitor in monitors:
            self.add(monitor)

    def add(self, monitor: Monitor) -> None:
        """Watch one more monitor (ids are unique), starting untripped."""
        if monitor.id in self._monitors:
            raise ValueError(f"monitor {monitor.id!r} is already in the set")
        self._monitors[monitor.id] = monitor
        self._tracks[monitor.id] = _Track()

    @property
    def monitors(self) -> list[Monitor]:
        """The monitors, in the order they were added."""
        return list(self._monitors.values())

    def is_tripped(self, monitor_id: str) -> bool:
        """Whether the monitor is tripped now."""
        return self._tracks[monitor_id].tripped

    def tripped(self) -> list[Monitor]:
        """The monitors tripped now."""
        return [m for m in self._monitors.values() if self._tracks[m.id].tripped]

    def reset(self) -> None:
        """Forget every trip and delay (a new run, or a restart after a hold)."""
        for monitor_id in self._tracks:
            self._tracks[monitor_id] = _Track()

    def evaluate(self, now: float) -> list[MonitorEvent]:
        """Evaluate every monitor at monotonic time ``now``; return what changed, in order.

        A condition that raises propagates, with a note naming the monitor."""
        events: list[MonitorEvent] = []
        for monitor in self._monitors.values():
            change = self._step(monitor, self._tracks[monitor.id], now)
            if change is not None:
                events.append(MonitorEvent(monitor, change, now))
        return events

    @staticmethod
    def _step(monitor: Monitor, track: _Track, now: float) -> Change | None:
        try:
            if not track.tripped:
                condition, delay, change = monitor.trip(), monitor.on_delay, Change.TRIPPED
            elif monitor.clear is not None:
                condition, delay, change = monitor.clear(), monitor.off_delay, Change.CLEARED
            else:
                condition, delay, change = _not(monitor.trip()), monitor.off_delay, Change.CLEARED
        except Exception as exc:
            exc.add_note(f"while evaluating monitor {monitor.id!r}")
            raise
        if condition is None:
            track.since = None
            if track.unknown:
                return None
            track.unknown = True
            return Change.UNKNOWN
        track.unknown = False
        if not condition:
            track.since = None
            return None
        if track.since is None:
            track.since = now
        if now - track.since < delay:
            return None
        track.tripped, track.since = not track.tripped, None
        return change
