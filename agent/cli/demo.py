"""``bedside demo``: the whole system end to end, on embedded defaults, at accelerated time.

A control site (in-process, SQLite in a temporary folder) enrols the unit; the simulated unit
(bioreactor, cell processor, pumps, balance on real OPC UA, Modbus and serial links) runs at
10,000x; the agent's drivers, recorder, journal, engine and uplink run the CAR-T recipe from
apheresis receipt to fill, 12 simulated days in about two minutes. A heater failure on day 3
holds the run; the simulated operator acknowledges the alarm and restarts once it clears.
At the end the journal is verified offline and compared with what the control site stored.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from agent.cli.common import fail, run_async

RECIPE = Path("recipes/cart-expansion.yaml")
PARAMS = {
    "coi_id": "COI-240117",
    "donation_id": "W123425000117",
    "patient_weight": "72",
    "target_dose": "2e8",
}
SHOWN = [
    "temperature",
    "dissolved_oxygen",
    "ph",
    "viable_cell_density",
    "viability",
    "glucose",
    "lactate",
    "volume",
    "perfusion_sp",
    "rocking_sp",
    "cp_state",
    "bag_weight",
]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _table(engine: Any, uplink: dict[str, Any]) -> Table:
    day = engine.elapsed() / 86400
    alarms = [a.id for a in engine.alarms.active() if a.active]
    t = Table(
        title=f"Bedside demo | {engine.recipe.title} | day {day:5.2f} | {engine.sm.state.value}",
        expand=False,
    )
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("phase", str(engine.memory.current or "-"))
    t.add_row("completed phases", str(len(engine.memory.completed)))
    t.add_row("active alarms", ", ".join(alarms) or "none")
    for tag in SHOWN:
        s = engine.hub.snapshot.get(tag)
        v = (
            ""
            if s is None
            else (
                f"{s.value:,.3g}"
                if isinstance(s.value, float) and abs(s.value) >= 1e4
                else f"{s.value:.2f}"
                if isinstance(s.value, float)
                else str(s.value)
            )
        )
        t.add_row(tag, v)
    if uplink:
        t.add_row(
            "uplink",
            f"{uplink.get('link')} | acked {uplink.get('acked_seq')} | "
            f"backlog {uplink.get('backlog')}",
        )
    return t


def _enrol(store: Any, unit: str, key: str) -> None:
    from controlsite.enroll import enroll_unit

    enroll_unit(store, unit, key)


def demo(
    speed: float = typer.Option(10000, help="simulated seconds per wall second"),
    recipe: Path = typer.Option(RECIPE, help="the recipe to run"),
    heater_fault: bool = typer.Option(True, help="fail the heater on day 3 for 8 hours"),
) -> None:
    """Run simulators, agent and control site: a CAR-T recipe end to end at accelerated time."""
    from agent.journal.files import verify_path
    from agent.simulation.run import FaultPlan, simulate
    from controlsite.service import ControlSiteServer
    from controlsite.store.base import open_store

    if not recipe.exists():
        fail(f"{recipe} not found: run `make demo` from the project folder")
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="bedside-demo-"))
    faults = [FaultPlan.parse("bioreactor.heater_failed=true@3d+8h")] if heater_fault else []

    async def go() -> None:
        store = open_store(str(work / "control-site.db"))
        try:
            async with ControlSiteServer(store, port=_free_port()) as cs:
                console.print(
                    f"[bold]Bedside demo[/]: control site at {cs.url}, simulated unit at "
                    f"{speed:g}x, recipe {recipe}"
                )
                live = Live(console=console, refresh_per_second=4, transient=False)

                def show(engine: Any, uplink: dict[str, Any]) -> None:
                    live.update(_table(engine, uplink))

                with live:
                    summary = await simulate(
                        recipe,
                        speed=speed,
                        params=PARAMS,
                        faults=faults,
                        keep_dir=work / "unit",
                        uplink_url=cs.url,
                        progress=show,
                        enrol=lambda unit, key: _enrol(store, unit, key),
                    )
                report = verify_path(summary.journal, summary.public_key)
                unit = store.unit("unit-sim-01")
                stored = unit.head_seq if unit else 0
        finally:
            store.close()
        console.print(
            f"\nrun {summary.run}: [bold]{summary.state}[/] after "
            f"{summary.simulated_days:.1f} simulated days in {summary.wall_seconds:.0f} s"
        )
        for hold in summary.holds:
            console.print(f"  held at hour {hold['at_h']}: {hold['why']}")
        console.print(f"  alarms raised: {', '.join(a['alarm'] for a in summary.alarms) or 'none'}")
        console.print(
            f"  journal: {report.count} records, chain and signatures "
            f"{'verified' if report.ok else 'BROKEN: ' + report.reason}"
        )
        console.print(
            f"  control site: {stored} records stored and verified "
            f"({'all' if stored == report.head_seq else 'NOT all'} of the journal's "
            f"{report.head_seq})"
        )
        console.print(f"  files kept in {work}; check them as an auditor would:")
        unit_dir = work / "unit"
        console.print(
            f"    bedside export {summary.run} --journal {unit_dir / 'journal.db'} "
            f"--out {work / 'run.jsonl'}\n"
            f"    bedside verify {work / 'run.jsonl'} --key-file {unit_dir / 'unit.pub'}",
            soft_wrap=True,
        )
        if summary.state != "Complete" or not report.ok or stored != report.head_seq:
            raise typer.Exit(1)
        console.print("[bold green]demo complete[/]")

    run_async(go())
