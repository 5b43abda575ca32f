"""Engine figures: trip-to-hold latency at real time, and the CAR-T recipe at full speed.

``trip_to_hold(trips)`` runs the agent as the service composes it (a ``DeviceHub`` observing
every tag into ``hub.snapshot``, a ``Journal``, a ``RunManager``) against the in-process
``SimulatedUnit`` on the wall clock, with a small recipe (``RECIPE``): the feed pump is switched
on, then a long timer runs under a procedure monitor ``reactor.temperature_sp > 38.5 degC``
(``on_delay`` 0, action hold) whose hold action switches the feed pump off. Each trip:

* at a random moment (so the crossing falls anywhere in the scan, publish and poll cycles) the
  simulator's model gets a temperature set-point of 39 degC and publishes it at once
  (``BioreactorServer.tick``): the crossing instant at the device is taken just before;
* the hub sees the new value (OPC UA subscription): the device-to-agent part;
* the pump server records the hold action's coil write as it arrives (its Modbus request
  record, stamped here with the clock's time): the end of the trip;
* then the set-point goes back to 37 degC, the monitor clears, the pump is switched on again at
  the simulator, and the run is restarted (Held -> Restarting -> Running) for the next trip.

It does this once with the engine's own scan period and once with a 20 ms scan, to show how
much of the latency the scan period is. ``cart(speeds)`` runs ``recipes/cart-expansion.yaml``
through ``agent.simulation.run.simulate``
(every tag recorded through the Recorder and Journal) at the
first of ``speeds`` that completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sqlite3
import statistics
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from agent.cli.sim import sim_endpoints
from agent.config import default_config_path, load_config
from agent.devices.hub import DeviceHub
from agent.engine.engine import Engine
from agent.engine.runs import RunManager
from agent.engine.states import RunState
from agent.journal.journal import Journal
from agent.record.format import Kind, decode_samples
from agent.record.keys import UnitKey
from agent.simulation.run import simulate
from drivers.clock import Clock, SystemClock
from simulators.pumps import RequestRecord
from simulators.unit import FEED_PUMP, SimulatedUnit
from tests.conftest import free_port

TAG, LOW, HIGH, THRESHOLD = "temperature_sp", 37.0, 39.0, 38.5
FAST_SCAN = 0.02  # s: the reference scan period
WRITE_COIL = frozenset({5, 15})  # Modbus function codes that write coils
CART = Path(__file__).resolve().parents[2] / "recipes" / "cart-expansion.yaml"
CART_PARAMS = {"coi_id": "COI-123456", "donation_id": "A123456789012",
               "patient_weight": "70", "target_dose": "1e9"}  # fmt: skip
CART_SPEEDS = (20000.0, 15000.0, 10000.0)

RECIPE = f"""
format: 1
id: trip-latency
version: 1
title: Trip-to-hold latency benchmark
product: none
master_file: none
equipment:
  reactor: {{device: bioreactor, tags: [{TAG}]}}
  feed: {{device: feed_pump, tags: [feed_run]}}
hold_actions:
  - {{set: feed.feed_run, value: false}}
monitors:
  - id: setpoint_high
    when: reactor.{TAG} > {THRESHOLD} degC
    on_delay: 0s
    priority: high
    action: hold
    message: temperature set-point above {THRESHOLD} degC
procedure:
  - operation: soak
    phases:
      - {{id: feed_on, type: set, values: {{feed.feed_run: true}}}}
      - {{id: soak, type: timer, duration: 30d}}
"""


class _StampedRequests(deque[RequestRecord]):
    """The pump server's request record, each coil write of the feed pump also stamped with the
    clock's time as it arrives (``RequestRecord`` carries no time)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(maxlen=10_000)
        self.clock = clock
        self.coil_writes: list[float] = []
        self.arrived = asyncio.Event()

    def append(self, record: RequestRecord) -> None:
        if record.unit == FEED_PUMP and record.function_code in WRITE_COIL and record.address == 0:
            self.coil_writes.append(self.clock.monotonic())
            self.arrived.set()
        super().append(record)


@dataclass
class _Seen:
    """When the hub first saw the set-point above the threshold, since ``clear()``."""

    clock: Clock
    at: float | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def clear(self) -> None:
        self.at = None
        self.arrived.clear()

    async def watch(self, hub: DeviceHub, tags: list[str]) -> None:
        async for sample in hub.observe(tags):
            high = isinstance(sample.value, float) and sample.value > THRESHOLD
            if sample.tag == TAG and high and self.at is None:
                self.at = self.clock.monotonic()
                self.arrived.set()


async def _until(test: Callable[[], bool], within: float = 30.0) -> None:
    """Wait until ``test()`` holds (the engine signals no state change: poll; off the timed
    path)."""
    async with asyncio.timeout(within):
        while not test():  # noqa: ASYNC110 - nothing to wait on
            await asyncio.sleep(0.005)


@dataclass
class _Rig:
    clock: Clock
    unit: SimulatedUnit
    requests: _StampedRequests
    seen: _Seen
    rng: random.Random

    async def publish(self, setpoint: float) -> None:
        """Put a set-point into the simulated bioreactor and publish it now."""
        self.unit.model.controls.temperature_sp = setpoint
        await self.unit.bioreactor.tick()

    async def trip(self, engine: Engine) -> tuple[float, float, float]:
        """One trip; returns, from the crossing: the end of the simulator's publishing step,
        the hub seeing the value, the hold write reaching the pump (seconds)."""
        await self.clock.sleep(self.rng.uniform(0.0, 1.0))
        self.requests.arrived.clear()
        self.seen.clear()
        cross = self.clock.monotonic()
        await self.publish(HIGH)
        published = self.clock.monotonic()
        async with asyncio.timeout(30):
            await self.requests.arrived.wait()
        write = self.requests.coil_writes[-1]
        await asyncio.wait_for(self.seen.arrived.wait(), 5)
        assert self.seen.at is not None
        await _until(lambda: engine.sm.state is RunState.HELD)
        # re-arm: the cause goes away, the monitor clears, the pump runs, the run restarts
        await self.publish(LOW)
        mset = engine.monitors["procedure"][0]
        await _until(lambda: not mset.is_tripped("setpoint_high"))
        self.unit.pumps.pumps[FEED_PUMP].run = True
        await engine.command("restart", who="bench", why="trip-to-hold latency: re-arm")
        await _until(lambda: engine.sm.state is RunState.RUNNING)
        return published - cross, self.seen.at - cross, write - cross

    async def series(
        self, runs: RunManager, recipe: Path, trips: int, scan: float | None
    ) -> dict[str, Any]:
        engine = await runs.start(recipe, {}, who="bench", why="trip-to-hold latency")
        if scan is not None:
            engine.scan_seconds = scan  # read by the scan loop on every turn
        # the feed pump is on (phase feed_on done) and the timer runs
        await _until(lambda: bool(engine.memory.completed) and engine.memory.current is not None)
        step, seen, total = zip(*[await self.trip(engine) for _ in range(trips)], strict=True)
        engine_part = [t - s for s, t in zip(seen, total, strict=True)]
        period = engine.scan_seconds
        await engine.command("stop", who="bench", why="benchmark done")
        await _until(lambda: engine.sm.state is RunState.STOPPED)
        await engine.command("reset", who="bench", why="benchmark done")
        await engine.finished.wait()
        return {"scan_s": period, "publish_step": _stats(step), "seen": _stats(seen),
                "engine": _stats(engine_part), "hold": _stats(total)}  # fmt: skip


def _stats(values: Sequence[float]) -> dict[str, float]:
    ms = sorted(1000 * v for v in values)
    return {"median": statistics.median(ms),
            "p99": statistics.quantiles(ms, n=100, method="inclusive")[98], "max": ms[-1],
            "n": len(ms)}  # fmt: skip


@contextmanager
def _sim_environment(run_dir: Path) -> Iterator[None]:
    """Free ports and a run folder for the shipped configuration; restored afterwards."""
    names = ("BEDSIDE_SIM_OPCUA_PORT", "BEDSIDE_SIM_CELLPROC_PORT", "BEDSIDE_SIM_MODBUS_PORT")
    values = {**{n: str(free_port()) for n in names}, "BEDSIDE_RUN_DIR": str(run_dir)}
    saved = {n: os.environ.get(n) for n in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def _trip_to_hold(trips: int, seed: int) -> dict[str, Any]:
    clock = SystemClock()
    with tempfile.TemporaryDirectory(prefix="bedside-bench-engine-") as tmp:
        work = Path(tmp)
        recipe = work / "trip-latency.yaml"
        recipe.write_text(RECIPE)
        with _sim_environment(work / "run"):
            config = load_config(default_config_path())
            endpoints = sim_endpoints(config, free_port())
        device, definition = config.tag(TAG)
        sampling = definition.sampling_interval  # type: ignore[attr-defined]
        async with (
            SimulatedUnit(clock, endpoints) as unit,
            Journal.open(
                work / "journal.db", unit=config.unit.id, signer=UnitKey.generate(), clock=clock
            ) as journal,
        ):
            requests = _StampedRequests(clock)
            unit.pumps.requests = requests
            rig = _Rig(clock, unit, requests, _Seen(clock), random.Random(seed))
            hub = DeviceHub(config, clock)
            await hub.connect()
            try:
                async with asyncio.TaskGroup() as tg:
                    watching = tg.create_task(rig.seen.watch(hub, list(config.all_tags())))
                    await clock.sleep(1.0)  # first readings of every tag
                    runs = RunManager(config, hub, journal, clock, tg.create_task)
                    shipped = await rig.series(runs, recipe, trips, None)
                    fast = await rig.series(runs, recipe, trips, FAST_SCAN)
                    watching.cancel()
            finally:
                await hub.close()
    return {"sampling_s": sampling, "publishing_s": _publishing_interval(hub, device),
            "shipped": shipped, "fast": fast}  # fmt: skip


def _publishing_interval(hub: DeviceHub, device: str) -> float | None:
    """The OPC UA driver's publishing interval (s): the hub does not configure it, so it is the
    driver's default, which only the driver knows."""
    interval = getattr(hub.drivers[device], "_interval", None)
    return interval / 1000 if isinstance(interval, int | float) else None


def trip_to_hold(trips: int = 30, seed: int = 0) -> dict[str, Any]:
    """``trips`` trips with the engine's scan period, then as many with a 20 ms scan."""
    return asyncio.run(_trip_to_hold(trips, seed))


def cart(
    speeds: Sequence[float] = CART_SPEEDS, timeout_wall: float = 150.0
) -> list[dict[str, Any]]:
    """The CAR-T recipe simulated at each speed in turn until one ends Complete."""
    out = []
    for speed in speeds:
        with tempfile.TemporaryDirectory(prefix="bedside-bench-cart-") as tmp:
            try:
                summary = asyncio.run(
                    simulate(
                        CART,
                        speed=speed,
                        params=CART_PARAMS,
                        keep_dir=Path(tmp),
                        timeout_wall=timeout_wall,
                    )
                )
            except Exception as exc:  # a run that cannot finish at this speed: say why, go on
                out.append(
                    {
                        "speed": speed,
                        "state": f"failed ({type(exc).__name__})",
                        "error": str(exc),
                        "days_per_min": 0.0,
                    }
                )
                continue
            samples = _samples(Path(summary.journal))
        days = summary.simulated_days
        out.append(
            {
                "speed": speed,
                "state": summary.state,
                "days": days,
                "wall_s": summary.wall_seconds,
                "days_per_min": days / (summary.wall_seconds / 60),
                "holds": len(summary.holds),
                "alarms": len(summary.alarms),
                "records": summary.records,
                "samples": samples,
            }
        )
        if summary.state == RunState.COMPLETE.value:
            break
    return out


def _samples(journal: Path) -> int:
    """How many tag samples the journal recorded."""
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT data FROM records WHERE kind = ?", (Kind.SAMPLES.value,))
        return sum(len(decode_samples(json.loads(data)["body"])) for (data,) in rows)


def report_latency(row: Callable[..., None], trips: int) -> dict[str, Any]:
    """The ``latency`` section of ``make bench``."""
    with capture_logs():  # each trip raises an alarm (a warning): keep the figures readable
        r = trip_to_hold(trips)
    goal_ms = 50 + 1000 * r["sampling_s"]
    step = r["shipped"]["publish_step"]["median"]
    print(f"  ({r['sampling_s']:g} s sampling, {r['publishing_s']:g} s publishing interval; "
          f"{r['shipped']['hold']['n']} trips per scan period; the simulator's publishing step, "
          f"counted in, takes {step:.1f} ms)")  # fmt: skip
    for key in ("shipped", "fast"):
        s = r[key]
        scan = f"scan {1000 * s['scan_s']:g} ms"
        if key == "shipped":
            print(f"  {scan} is the engine's own period at this speed; 20 ms for reference")
        row(f"{scan}: device -> hub, median", s["seen"]["median"], "ms")
        row(f"{scan}: device -> hub, p99", s["seen"]["p99"], "ms")
        row(f"{scan}: hub -> hold write, median", s["engine"]["median"], "ms")
        row(f"{scan}: hub -> hold write, p99", s["engine"]["p99"], "ms")
        row(f"{scan}: device -> hold write, median", s["hold"]["median"], "ms")
        row(f"{scan}: device -> hold write, p99", s["hold"]["p99"], "ms",
            goal=f"goal: < {goal_ms:g} (50 + sampling)")  # fmt: skip
    return r


def report_cart(
    row: Callable[..., None], speeds: Sequence[float] = CART_SPEEDS
) -> list[dict[str, Any]]:
    """The ``cart`` section of ``make bench``."""
    with capture_logs() as logs:
        attempts = cart(speeds)
    warnings = Counter(e["event"] for e in logs if e["log_level"] in ("warning", "error"))
    for a in attempts:
        row(f"speed {a['speed']:g}: {a['state']}", a["days_per_min"], "days/min",
            goal="goal: >= 8" if a["state"] == "Complete" else a.get("error", ""))  # fmt: skip
    done = next((a for a in attempts if a["state"] == "Complete"), None)
    if done is not None:
        row(f"  simulated days (wall {done['wall_s']:.0f} s)", done["days"], "days", decimals=2)
        row("  journal records", done["records"], "records", decimals=0)
        row("  tag samples recorded per simulated day", done["samples"] / done["days"],
            "samples/day", decimals=0)  # fmt: skip
        row("  holds / alarms", done["holds"], f"/ {done['alarms']}", decimals=0)
    for event, count in sorted(warnings.items()):
        row(f"  warning or error logged: {event}", count, "times", decimals=0)
    return attempts


if __name__ == "__main__":  # python -m tests.bench.engine [trips]
    import sys

    print(trip_to_hold(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
