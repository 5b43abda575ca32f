"""Journal storage of a CAR-T run: how many bytes a unit's journal grows by per day.

``measure(days)`` feeds the real ``Recorder`` and ``Journal`` (hash chain, signed checkpoints
every 60 s, one samples record per one-second flush) with every tag of the shipped unit
configuration (``agent/data/unit-sim.yaml``), sampled as the drivers would sample them:

* bioreactor tags: a ``BioreactorModel`` advanced in steps of the tags' OPC UA sampling
  interval (0.5 s), its noisy sensor readings passed through the subscription's absolute
  deadband as the server would, with the reference perfusion schedule (0 / 500 / 750 / 1000
  mL/day once the culture reaches 2 / 10 / 15 million cells/mL);
* pumps (Modbus, polled every second: changes plus a heartbeat every 10 polls): both pumps run
  at the perfusion rate, the feed pump into the bag and the harvest pump out of it;
* balance (MT-SICS ``SI``, polled every second): the harvest bag's weight, dynamic (uncertain,
  with noise) while it fills;
* cell processor: a one-hour program at the start (wash) and at the end (formulate).

Time is a ``ManualClock``; the journal's own timer flushes and checkpoints as in the service.
It returns the journal file's size after ``days`` and the size per day, so a 12-day run can be
extrapolated from fewer days (the culture is densest, and its data busiest, at the end: the
extrapolation from the first days is an underestimate, the figures of the last days are not).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from agent.config import ModbusDevice, OpcUaDevice, SerialDevice, UnitConfig, load_config
from agent.journal.files import verify_path
from agent.journal.journal import Journal
from agent.journal.recorder import Recorder
from agent.record.keys import UnitKey
from drivers.base import Quality, Sample, Value
from drivers.clock import ManualClock
from simulators.bioreactor_model import BioreactorModel

STEP = 0.5  # s: the OPC UA tags' sampling interval, the fastest of the unit
T0 = datetime(2026, 11, 25, 8, tzinfo=UTC)
PERFUSION = ((15e6, 1000.0), (10e6, 750.0), (2e6, 500.0))  # cells/mL -> mL/day
BAG_TARE_G, DENSITY = 48.0, 1.007
BUDGET_BYTES = 200 * 10**6  # a 12-day run's journal must fit
RUN_DAYS = 12


def _f32(x: float) -> float:
    """A value as a Modbus float32 register pair holds it."""
    return float(struct.unpack(">f", struct.pack(">f", x))[0])


@dataclass
class _World:
    """The model plus the simple profiles of the pumps, the balance and the cell processor."""

    model: BioreactorModel
    rng: random.Random
    days: float
    dispensed: float = 0.0
    harvested: float = 0.0

    def advance(self, dt: float) -> None:
        m = self.model
        vcd = m.measured["vcd"]
        scheduled = next((rate for at, rate in PERFUSION if vcd >= at), 0.0)
        m.controls.perfusion_sp = max(m.controls.perfusion_sp, scheduled)  # steps up, never back
        m.advance(dt)
        ml = m.perfusion_ml_day * dt / 86400.0
        self.dispensed += ml
        self.harvested += ml

    def opcua(self) -> dict[str, Value]:
        m, c = self.model, self.model.controls
        r = m.measured
        age_h = m.elapsed_s / 3600.0
        program = age_h < 1 or age_h > self.days * 24 - 1
        return {
            "temperature": r["temperature"],
            "temperature_sp": c.temperature_sp,
            "rocking": m.rocking_rpm,
            "rocking_sp": c.rocking_sp,
            "perfusion": m.perfusion_ml_day,
            "perfusion_sp": c.perfusion_sp,
            "co2": m.gas_co2_pct,
            "co2_sp": c.co2_sp,
            "dissolved_oxygen": r["do"],
            "ph": r["ph"],
            "viable_cell_density": r["vcd"],
            "viability": r["viability"],
            "glucose": r["glucose"],
            "lactate": r["lactate"],
            "volume": r["volume"],
            "heater_power": r["heater_power"],
            "cp_state": "Running" if program else "Idle",
            "cp_program": ("wash" if age_h < 1 else "formulate") if program else "",
            "cp_progress": round(100 * (age_h % 1), 0) if program else 0.0,
            "cp_result": "",
        }

    def polled(self) -> dict[str, tuple[Value, Quality, str]]:
        speed = _f32(self.model.perfusion_ml_day / 1440.0)
        running = speed > 0
        weight = BAG_TARE_G + self.harvested * DENSITY
        if running:  # a bag being filled never settles: SI answers dynamic, with noise
            weight += self.rng.gauss(0.0, 0.02)
        good = (Quality.GOOD, "")
        return {
            "feed_speed_sp": (speed, *good),
            "feed_run": (running, *good),
            "feed_speed": (speed, *good),
            "feed_dispensed": (_f32(self.dispensed), *good),
            "feed_alarm": (0, *good),
            "harvest_speed_sp": (speed, *good),
            "harvest_run": (running, *good),
            "harvest_dispensed": (_f32(self.harvested), *good),
            "harvest_alarm": (0, *good),
            "bag_weight": (
                round(weight, 2),
                Quality.UNCERTAIN if running else Quality.GOOD,
                "dynamic: weight not stable (S D)" if running else "",
            ),
        }


class _Subscription:
    """An OPC UA monitored item: sampled every interval, reported beyond its absolute deadband."""

    def __init__(self, interval: float, deadband: float) -> None:
        self.every = max(1, round(interval / STEP))
        self.deadband = deadband
        self.last: Value = None

    def report(self, value: Value) -> bool:
        last = self.last
        if last is None or (
            value != last
            and (
                not isinstance(value, float)
                or not isinstance(last, float)
                or abs(value - last) > self.deadband
            )
        ):
            self.last = value
            return True
        return False


class _Poll:
    """A polled tag (Modbus, MT-SICS): changes, and every tag every ``heartbeat`` polls."""

    def __init__(self, interval: float, heartbeat: int = 10) -> None:
        self.every = max(1, round(interval / STEP))
        self.heartbeat = heartbeat
        self.polls = 0
        self.last: tuple[Value, Quality, str] | None = None

    def report(self, reading: tuple[Value, Quality, str]) -> bool:
        beat = self.polls % self.heartbeat == 0
        self.polls += 1
        changed = reading != self.last
        self.last = reading
        return changed or beat


def _sources(config: UnitConfig) -> dict[str, _Subscription | _Poll]:
    out: dict[str, _Subscription | _Poll] = {}
    for dev in config.devices.values():
        for name, tag in dev.tags.items():
            if isinstance(dev, OpcUaDevice):
                out[name] = _Subscription(tag.sampling_interval, tag.deadband)  # type: ignore[attr-defined]
            elif isinstance(dev, ModbusDevice | SerialDevice):
                out[name] = _Poll(dev.poll_interval)
    return out


async def _feed(recorder: Recorder, clock: ManualClock, world: _World, config: UnitConfig) -> None:
    """Sample the world every ``STEP`` and offer what the drivers would report; the clock
    moves one second at a time (the recorder's tick and the journal's flush period)."""
    sources = _sources(config)
    per_second = round(1 / STEP)
    for second in range(round(world.days * 86400)):
        start = clock.now()
        for half in range(per_second):
            k = second * per_second + half
            world.advance(STEP)
            now = start + timedelta(seconds=half * STEP)
            source_time = now - timedelta(milliseconds=3)
            batch: list[Sample] = []
            values = world.opcua()
            polled = world.polled() if half == 0 else {}
            for name, src in sources.items():
                if k % src.every:
                    continue
                if isinstance(src, _Subscription):
                    value = values[name]
                    if src.report(value):
                        batch.append(Sample(name, value, Quality.GOOD, now, source_time))
                elif name in polled:
                    reading = polled[name]
                    if src.report(reading):
                        value, quality, status = reading
                        batch.append(Sample(name, value, quality, now, None, status))
            if batch:
                recorder.offer(batch)
        recorder.tick()
        await clock.advance(1.0)


async def _run(
    path: Path, days: float, config: UnitConfig, seed: int, key: UnitKey
) -> dict[str, Any]:
    clock = ManualClock(T0)
    world = _World(BioreactorModel(seed=seed), random.Random(seed), days)
    policies = {t: config.tag(t)[1].record for t in config.all_tags()}
    per_tag: Counter[str] = Counter()
    async with Journal.open(path, unit=config.unit.id, signer=key, clock=clock) as journal:

        def sink(batch: Sequence[Sample]) -> None:
            per_tag.update(s.tag for s in batch)
            journal.record_samples(batch)

        recorder = Recorder(policies, sink, clock)
        await journal.append("event", {"event": "agent_started"})
        await _feed(recorder, clock, world, config)
        await journal.flush()
        head = journal.durable_seq
    return {
        "offered": recorder.offered,
        "recorded": recorder.recorded,
        "records": head,
        "final_vcd": world.model.measured["vcd"],
        "per_tag": dict(per_tag),
    }


def measure(
    days: float = 1.0, *, config_path: str | Path | None = None, seed: int = 0
) -> dict[str, Any]:
    """Journal ``days`` of the simulated unit (see the module docstring); returns the figures:
    journal bytes, bytes per day, the 12-day extrapolation, samples and records per day."""
    from agent.config import default_config_path

    config = load_config(config_path or default_config_path())
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bedside-storage-") as tmp, capture_logs():
        path = Path(tmp) / "journal.db"
        key = UnitKey.generate()
        figures = asyncio.run(_run(path, days, config, seed, key))
        size = sum(p.stat().st_size for p in Path(tmp).glob("journal.db*"))
        # what the whole-history verification costs: at the agent's start, and offline
        t = time.perf_counter()
        with Journal.open(path, unit=config.unit.id, signer=key, clock=ManualClock(T0)):
            figures["reopen_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        assert verify_path(path, key.public_key).ok
        figures["verify_seconds"] = time.perf_counter() - t
        with contextlib.closing(sqlite3.connect(path)) as conn:
            (checkpoints,) = conn.execute(
                "SELECT count(*) FROM records WHERE kind = 'checkpoint'"
            ).fetchone()
    per_day = size / days
    return {
        **figures,
        "checkpoints": checkpoints,
        "days": days,
        "journal_bytes": size,
        "bytes_per_day": per_day,
        "samples_per_day": figures["recorded"] / days,
        "records_per_day": figures["records"] / days,
        "bytes_per_sample": size / max(1, figures["recorded"]),
        "run_bytes": per_day * RUN_DAYS,
        "wall_seconds": time.perf_counter() - started,
    }


def report(row: Callable[..., None], days: float) -> dict[str, Any]:
    """The ``storage`` section of ``make bench``."""
    r = measure(days)
    row(f"simulated days journaled (wall {r['wall_seconds']:.0f} s)", r["days"], "days")
    row("samples recorded per day", r["samples_per_day"], "samples/day")
    row("journal records per day", r["records_per_day"], "records/day")
    row("journal bytes per sample (file / samples)", r["bytes_per_sample"], "bytes")
    row("journal growth per day", r["bytes_per_day"] / 1e6, "MB/day")
    row("agent start-up: whole journal verified", r["reopen_seconds"], "s", decimals=2)
    row("bedside verify of the journal", r["verify_seconds"], "s", decimals=2)
    row(
        f"{RUN_DAYS}-day run (per day x {RUN_DAYS})",
        r["run_bytes"] / 1e6,
        "MB",
        goal=f"goal: < {BUDGET_BYTES / 1e6:.0f} MB",
    )
    return r


if __name__ == "__main__":  # python -m tests.bench.storage [days]
    import sys

    print(measure(float(sys.argv[1]) if len(sys.argv) > 1 else 1.0))
