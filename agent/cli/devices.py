"""``bedside devices``: the engineer's commissioning tool. Prints JSON lines on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from agent.cli.common import fail, load_config_or_exit, run_async
from agent.config import UnitConfig
from agent.devices.hub import DeviceHub, check_write
from drivers.base import Value
from drivers.clock import SystemClock
from drivers.errors import DriverError

app = typer.Typer(
    help="Read, write, watch and browse devices of a unit configuration.", no_args_is_help=True
)


def emit(obj: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed (watchers pipe it)."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


def _load(config: Path) -> UnitConfig:
    return load_config_or_exit(config)


def _select(cfg: UnitConfig, tags: list[str]) -> tuple[list[str], list[str]]:
    known = cfg.all_tags()
    unknown = [t for t in tags if t not in known]
    if unknown:
        fail(
            f"unknown tag(s) {', '.join(unknown)} in {cfg.source}; "
            f"known: {', '.join(sorted(known))}"
        )
    chosen = tags or list(known)
    return chosen, sorted({known[t] for t in chosen})


def parse_value(text: str) -> Value:
    """A command-line value: true/false, a number, or else text."""
    lowered = text.strip().lower()
    if lowered in ("true", "on"):
        return True
    if lowered in ("false", "off"):
        return False
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


@app.command()
def read(
    config: Path, tags: list[str] = typer.Argument(None, help="tags; all when omitted")
) -> None:
    """Read tags once and print a JSON line per tag."""
    cfg = _load(config)
    chosen, devices = _select(cfg, tags or [])

    async def go() -> None:
        async with DeviceHub(cfg, SystemClock(), devices) as hub:
            samples = await hub.read(chosen)
        for tag in chosen:
            dev, definition = cfg.tag(tag)
            emit({"device": dev, **samples[tag].as_dict(), "unit": definition.unit})

    try:
        run_async(go())
    except DriverError as exc:
        fail(str(exc))


@app.command()
def write(config: Path, tag: str, value: str) -> None:
    """Write one tag (checked against its limits first) and print the value read back."""
    cfg = _load(config)
    _select(cfg, [tag])
    dev, definition = cfg.tag(tag)
    try:  # refuse a bad value before connecting: nothing reaches the device, up or down
        checked = check_write(dev, tag, definition, parse_value(value))
    except DriverError as exc:
        fail(str(exc))

    async def go() -> None:
        async with DeviceHub(cfg, SystemClock(), [dev]) as hub:
            sent = await hub.write(tag, checked)
            back = (await hub.read([tag]))[tag]
        emit(
            {
                "device": dev,
                "tag": tag,
                "written": sent,
                "unit": definition.unit,
                "read_back": back.value,
                "quality": back.quality.value,
            }
        )

    try:
        run_async(go())
    except DriverError as exc:
        fail(str(exc))


@app.command()
def watch(
    config: Path,
    tags: list[str] = typer.Argument(None, help="tags; all when omitted"),
    duration: float = typer.Option(0, help="stop after this many seconds (0: until Ctrl-C)"),
) -> None:
    """Print a JSON line for every change of the tags, as devices report them."""
    cfg = _load(config)
    chosen, devices = _select(cfg, tags or [])
    clock = SystemClock()

    async def go() -> None:
        import asyncio

        async with DeviceHub(cfg, clock, devices) as hub:
            # give slow devices the whole watch; unreachable ones are reported as bad samples
            stream = hub.observe(chosen)
            try:
                async with asyncio.timeout(duration or None):
                    async for sample in stream:
                        emit({"device": cfg.all_tags()[sample.tag], **sample.as_dict()})
            except TimeoutError:
                pass
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

    try:
        run_async(go())
    except DriverError as exc:
        fail(str(exc))


@app.command()
def browse(
    endpoint: str,
    depth: int = typer.Option(8, help="how deep to walk from the Objects folder"),
    timeout: float = typer.Option(4.0, help="seconds to wait for the server"),
) -> None:
    """Walk an OPC UA server's address space from Objects and print a JSON line per node."""
    if not endpoint.startswith("opc.tcp://"):
        fail(f"browse needs an opc.tcp:// endpoint, not {endpoint!r}")
    from drivers.opcua import browse as browse_server

    async def go() -> None:
        async for node in browse_server(endpoint, depth=depth, timeout=timeout):
            emit(node)

    try:
        run_async(go())
    except DriverError as exc:
        fail(str(exc))
