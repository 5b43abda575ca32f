"""``bedside sim`` and ``bedside sim-fault``: run the simulated unit, inject faults into it.

This module is part of the composition root: it is the one place outside the tests that
imports ``simulators`` (the import-linter contract names it as the exception).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import typer

from agent.cli.common import fail, load_config_or_exit, run_async
from agent.config import ModbusDevice, OpcUaDevice, SerialDevice, UnitConfig, default_config_path
from drivers.clock import ScaledClock

fault_app = typer.Typer(
    help="Inject and clear faults in a running `bedside sim`.", no_args_is_help=True
)

DEFAULT_RUN_DIR = "/tmp/bedside-sim"


def sim_endpoints(cfg: UnitConfig, control_port: int) -> Any:
    """Where each simulator must listen so that the configuration's endpoints reach it."""
    from simulators.unit import SimEndpoints

    kw: dict[str, Any] = {"control_port": control_port}
    for name, dev in cfg.devices.items():
        if isinstance(dev, OpcUaDevice):
            url = urlparse(dev.endpoint)
            key = "cell_processor_port" if "cellprocessor" in url.path else "bioreactor_port"
            kw[key] = url.port or 4840
            kw["host"] = url.hostname or "127.0.0.1"
        elif isinstance(dev, ModbusDevice):
            if dev.endpoint.startswith("tcp://"):
                kw["modbus_port"] = int(dev.endpoint.rsplit(":", 1)[1])
            else:
                kw["rtu_link"] = dev.endpoint.removeprefix("rtu://")
        elif isinstance(dev, SerialDevice):
            kw["balance_link"] = str(cfg.resolve(dev.endpoint))
        else:  # pragma: no cover - the config model admits no other driver
            fail(f"device {name}: no simulator for driver {dev.driver}")
    links = [kw.get("balance_link"), kw.get("rtu_link")]
    run_dir = next(
        (str(Path(p).parent) for p in links if p),
        os.environ.get("BEDSIDE_RUN_DIR", DEFAULT_RUN_DIR),
    )
    return SimEndpoints(**kw, run_dir=run_dir)


def serve(
    config: Path = typer.Option(
        None, "--config", help="unit configuration (default: the shipped simulated unit)"
    ),
    speed: float = typer.Option(1.0, "--speed", help="simulated seconds per wall second"),
    seed: int = typer.Option(0, "--seed", help="seed of the sensor noise and donor variability"),
    control_port: int = typer.Option(
        8790, "--control-port", help="port of the fault control endpoint"
    ),
) -> None:
    """Run the simulated unit (bioreactor, cell processor, pumps, balance) until SIGTERM."""
    from simulators.unit import SimulatedUnit

    if not speed > 0:
        fail(f"--speed must be positive, not {speed}")
    cfg = load_config_or_exit(config)
    endpoints = sim_endpoints(cfg, control_port)
    clock = ScaledClock(speed)

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            async with SimulatedUnit(clock, endpoints, seed=seed) as unit:
                typer.echo(
                    json.dumps(
                        {
                            "event": "sim_ready",
                            "speed": speed,
                            "config": str(config or default_config_path()),
                            "endpoints": unit.describe(),
                        }
                    ),
                    nl=True,
                )
                await stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    try:
        run_async(go())
    except OSError as exc:
        fail(f"the simulator could not start: {exc}")


def _client(run_dir: str) -> tuple[str, dict[str, str]]:
    folder = Path(run_dir)
    try:
        url = (folder / "control.url").read_text().strip()
        token = (folder / "control.token").read_text().strip()
    except OSError:
        fail(f"no running simulator found in {folder} (start `bedside sim` first)")
    return url, {"Authorization": f"Bearer {token}"}


def _request(run_dir: str, method: str, path: str, body: dict[str, Any] | None = None) -> None:
    url, headers = _client(run_dir)
    try:
        r = httpx.request(method, url + path, headers=headers, json=body, timeout=10)
    except httpx.HTTPError as exc:
        fail(f"the simulator's control endpoint {url} did not answer: {exc}")
    if r.status_code >= 400:
        fail(r.json().get("error", r.text))
    typer.echo(json.dumps(r.json()))


RUN_DIR = typer.Option(
    os.environ.get("BEDSIDE_RUN_DIR", DEFAULT_RUN_DIR),
    "--run-dir",
    help="the simulator's run folder (holds control.url and control.token)",
)


@fault_app.command("show")
def show(run_dir: str = RUN_DIR) -> None:
    """Print every fault flag of every simulator."""
    _request(run_dir, "GET", "/faults")


@fault_app.command("set")
def set_(target: str, field: str, value: str, run_dir: str = RUN_DIR) -> None:
    """Set a fault: `bedside sim-fault set bioreactor heater_failed true`. VALUE is JSON."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    _request(run_dir, "POST", "/faults", {"target": target, "field": field, "value": parsed})


@fault_app.command("action")
def action(name: str, run_dir: str = RUN_DIR) -> None:
    """Run a fault action: bioreactor.restart, pumps.drop_connections, balance.disconnect..."""
    _request(run_dir, "POST", "/actions", {"action": name})


@fault_app.command("state")
def state(run_dir: str = RUN_DIR) -> None:
    """Print the simulated world's true state."""
    _request(run_dir, "GET", "/state")
