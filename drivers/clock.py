"""Injected time: the only place process timing reads a clock or sleeps.

``SystemClock`` in production, ``ScaledClock`` for accelerated simulation (a 12-day culture in
minutes) and ``ManualClock`` for unit tests, where time moves only when the test says so.
Everything that times a process (simulators, engine, drivers' backoff) takes a ``Clock``.
Times are UTC ``datetime`` objects; ``monotonic()`` is in (possibly scaled) seconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """What a component needs of time."""

    def now(self) -> datetime:
        """The current UTC time (timezone-aware)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards, at this clock's rate."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of this clock's time."""
        ...

    @property
    def speed(self) -> float:
        """How many clock seconds pass per wall-clock second (1 for real time)."""
        ...


class SystemClock:
    """Real time."""

    speed = 1.0

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ScaledClock:
    """Time running ``speed`` times faster than the wall clock, from ``start`` (default: now).

    ``now()`` and ``monotonic()`` advance ``speed`` seconds per wall second; ``sleep(s)`` waits
    ``s / speed`` wall seconds.
    """

    def __init__(self, speed: float, start: datetime | None = None) -> None:
        if not speed > 0:
            raise ValueError(f"clock speed must be positive, got {speed!r}")
        self._speed = float(speed)
        self._start = start or datetime.now(UTC)
        self._wall0 = time.monotonic()

    @property
    def speed(self) -> float:
        return self._speed

    def monotonic(self) -> float:
        return (time.monotonic() - self._wall0) * self._speed

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self.monotonic())

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self._speed)


class ManualClock:
    """Time that moves only by ``advance()``: deterministic unit tests.

    Sleepers wake in deadline order as ``advance()`` passes their deadline.
    """

    speed = 1.0

    def __init__(self, start: datetime | None = None) -> None:
        self._start = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._t = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._t)

    def monotonic(self) -> float:
        return self._t

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._t + seconds, next(self._counter), fut))
        await fut

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its deadline and letting it run."""
        target = self._t + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            self._t = max(self._t, deadline)
            if not fut.done():
                fut.set_result(None)
            for _ in range(5):
                await asyncio.sleep(0)
        self._t = target
        for _ in range(5):
            await asyncio.sleep(0)


MIN_POLL_WALL = 0.05  # seconds: no device is polled more than 20 times a wall second


async def poll_pause(clock: Clock, seconds: float) -> None:
    """Wait a poll interval of ``clock`` time, and at an accelerated clock at least
    ``MIN_POLL_WALL`` of wall time: a real (or simulated) device answers in real time, so a
    12-day process at 10,000x must not poll its devices 10,000 times a wall second."""
    await clock.sleep(seconds)
    if clock.speed > 1:
        await asyncio.sleep(MIN_POLL_WALL)
