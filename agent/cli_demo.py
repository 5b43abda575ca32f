"""``bedside demo``: the most complete path that exists, on embedded defaults.

Today: the simulated unit at accelerated time (a subprocess, as in production the devices are
other machines), watched live through the real drivers for a minute, with set-point changes the
process visibly follows and a write refused for being outside its limits.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from agent.cli import fail, run_async
from agent.config import default_config_path, load_config
from agent.devices import DeviceHub
from drivers.base import Sample
from drivers.clock import SystemClock
from drivers.errors import DriverError, WriteRefused

SHOWN = [
    "temperature",
    "temperature_sp",
    "dissolved_oxygen",
    "ph",
    "viable_cell_density",
    "viability",
    "glucose",
    "lactate",
    "volume",
    "rocking",
    "feed_speed",
    "feed_dispensed",
    "bag_weight",
]


def _table(latest: dict[str, Sample], units: dict[str, str], elapsed: float, note: str) -> Table:
    table = Table(title=f"Bedside simulated unit, {elapsed:4.0f} s  |  {note}", expand=False)
    for col in ("tag", "value", "unit", "quality"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for tag in SHOWN:
        s = latest.get(tag)
        value = (
            ""
            if s is None or s.value is None
            else (
                f"{s.value:,.3g}"
                if isinstance(s.value, float) and abs(s.value) >= 1e4
                else f"{s.value:.2f}"
                if isinstance(s.value, float)
                else str(s.value)
            )
        )
        table.add_row(tag, value, units.get(tag, ""), s.quality.value if s else "")
    return table


async def _start_sim(speed: float, run_dir: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "--log-format",
        "json",
        "--log-level",
        "warning",
        "sim",
        "--speed",
        str(speed),
        "--control-port",
        env["BEDSIDE_SIM_CONTROL_PORT"],
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            while True:
                line = await proc.stdout.readline()
                if not line:
                    fail("the simulator stopped before it was ready (see its log above)")
                event = json.loads(line)
                if event.get("event") == "sim_ready":
                    return proc
    except TimeoutError:
        proc.terminate()
        fail("the simulator did not become ready within 60 s")


def demo(
    minutes: float = typer.Option(1.0, help="how long to watch (wall-clock minutes)"),
    speed: float = typer.Option(600.0, help="simulated seconds per wall second"),
) -> None:
    """Run the simulated unit and watch it live through the real drivers."""
    console = Console()
    run_dir = tempfile.mkdtemp(prefix="bedside-demo-")
    env = {**os.environ, "BEDSIDE_RUN_DIR": run_dir, "BEDSIDE_SIM_CONTROL_PORT": "8790"}
    os.environ["BEDSIDE_RUN_DIR"] = run_dir
    cfg = load_config(default_config_path())
    units = {t: cfg.tag(t)[1].unit for t in SHOWN}
    duration = minutes * 60

    async def go() -> None:
        console.print(
            f"[bold]Bedside demo[/]: starting the simulated unit at {speed:g}x "
            f"(run folder {run_dir})"
        )
        sim = await _start_sim(speed, run_dir, env)
        notes = ["watching"]
        try:
            async with DeviceHub(cfg, SystemClock()) as hub:
                script = [
                    (10, "temperature_sp", 33.0, "cooling: temperature set-point 37 -> 33 degC"),
                    (20, "feed_speed_sp", 2.0, "feed pump speed 2 mL/min"),
                    (21, "feed_run", True, "feed pump on: medium flows into the bag"),
                    (30, "temperature_sp", 55.0, "a set-point outside [20, 40] degC"),
                    (35, "feed_run", False, "feed pump off"),
                    (40, "temperature_sp", 37.0, "back to 37 degC"),
                ]
                t0 = time.monotonic()
                stream = hub.observe(SHOWN)
                live = Live(
                    _table(hub.latest, units, 0, notes[-1]),
                    console=console,
                    refresh_per_second=4,
                    transient=not console.is_terminal,
                )
                with live:

                    async def drive() -> None:
                        for at, tag, value, note in script:
                            await asyncio.sleep(
                                max(0.0, at * duration / 60 - (time.monotonic() - t0))
                            )
                            try:
                                await hub.write(tag, value)
                                notes.append(note)
                            except WriteRefused as exc:
                                notes.append(f"refused: {exc.detail}")
                            console.log(notes[-1])

                    driver_task = asyncio.create_task(drive())
                    try:
                        async with asyncio.timeout(duration):
                            async for _ in stream:
                                live.update(
                                    _table(hub.latest, units, time.monotonic() - t0, notes[-1])
                                )
                    except TimeoutError:
                        pass
                    finally:
                        driver_task.cancel()
                        await asyncio.gather(driver_task, return_exceptions=True)
                        await stream.aclose()  # type: ignore[attr-defined]
                if not console.is_terminal:
                    console.print(_table(hub.latest, units, time.monotonic() - t0, "final values"))
        finally:
            sim.terminate()
            await sim.wait()
        console.print(
            "[bold green]demo complete[/]: the simulated unit ran, the drivers watched "
            "it, set-points were followed and an out-of-limits write was refused."
        )

    try:
        run_async(go())
    except DriverError as exc:
        fail(str(exc))
    finally:
        for leftover in Path(run_dir).glob("*"):
            leftover.unlink(missing_ok=True)
