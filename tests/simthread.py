"""A ``SimulatedUnit`` served by its own event loop in a thread, for system tests.

The simulators get a loop of their own so that the code under test (CLI subprocesses, an
agent's hub and engine) runs against them as against separate devices.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

from drivers.clock import ScaledClock
from simulators.unit import SimEndpoints, SimulatedUnit


class SimThread:
    """Start with ``with``; ``submit`` runs a function of the unit on the simulator's loop."""

    def __init__(self, endpoints: SimEndpoints, speed: float) -> None:
        self.endpoints = endpoints
        self.speed = speed
        self.unit: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="sim")

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            async with SimulatedUnit(ScaledClock(self.speed), self.endpoints) as unit:
                self.unit = unit
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._ready.set()

    def __enter__(self) -> SimThread:
        self._thread.start()
        self._ready.wait(30)
        if self.unit is None:
            raise RuntimeError(f"the simulated unit did not start: {self._error!r}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def submit(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn(unit)`` on the simulator's loop (awaited if it returns a coroutine)."""
        assert self._loop is not None and self.unit is not None
        unit = self.unit

        async def run() -> Any:
            result = fn(unit)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(run(), self._loop)
