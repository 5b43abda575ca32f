"""The simulated unit: every simulator in one process, sharing one physical world.

The feed pump (Modbus unit 1) pumps fresh medium into the bioreactor; the harvest pump (unit 2)
pumps culture out of it into the harvest bag that stands on the balance. The bioreactor and cell
processor are OPC UA servers, the pumps are served on Modbus TCP and on Modbus RTU over a pty,
the balance speaks MT-SICS on a pty, and the control endpoint injects faults over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog
import uvicorn

from drivers.clock import Clock
from simulators.balance import BalanceFaults, BalanceSimulator
from simulators.bioreactor import BioreactorServer
from simulators.bioreactor_model import BioreactorModel
from simulators.cell_processor import CellProcessorFaults, CellProcessorServer
from simulators.control import control_app
from simulators.faults import FaultState
from simulators.pumps import PumpFaults, PumpServer

log = structlog.get_logger(__name__)

FEED_PUMP, HARVEST_PUMP = 1, 2
MEDIUM_DENSITY_G_PER_ML = 1.007
BAG_TARE_G = 48.0


@dataclass(frozen=True, slots=True)
class SimEndpoints:
    """Where the simulated unit listens (all on loopback unless said)."""

    host: str = "127.0.0.1"
    bioreactor_port: int = 4840
    cell_processor_port: int = 4841
    modbus_port: int = 5020
    rtu_link: str | None = None
    balance_link: str | None = None
    control_port: int = 8790
    run_dir: str = "/tmp/bedside-sim"


class SimulatedUnit:
    """All simulators of one unit; an async context manager."""

    def __init__(self, clock: Clock, endpoints: SimEndpoints, *, seed: int = 0) -> None:
        self.clock = clock
        self.endpoints = endpoints
        self.run_dir = Path(endpoints.run_dir)
        self.model = BioreactorModel(seed=seed)
        self.faults = FaultState()
        self.pump_faults = PumpFaults()
        self.balance_faults = BalanceFaults()
        self.cell_processor_faults = CellProcessorFaults()
        self.harvest_bag_ml = 0.0
        self._limited: set[int] = set()
        self.token = secrets.token_urlsafe(24)
        e = endpoints
        self.bioreactor = BioreactorServer(
            self.model, clock, host=e.host, port=e.bioreactor_port, faults=self.faults
        )
        self.cell_processor = CellProcessorServer(
            clock, host=e.host, port=e.cell_processor_port, faults=self.cell_processor_faults
        )
        self.pumps = PumpServer(
            clock,
            pumps=2,
            tcp=(e.host, e.modbus_port),
            rtu_link=e.rtu_link,
            rtu_baudrate=115200,
            on_dispense=self._dispensed,
            faults=self.pump_faults,
        )
        self.balance = (
            BalanceSimulator(
                clock,
                link_path=e.balance_link,
                weight_source=self._bag_weight,
                faults=self.balance_faults,
                seed=seed,
            )
            if e.balance_link
            else None
        )
        self._control: uvicorn.Server | None = None
        self._control_task: asyncio.Task[None] | None = None

    # -------------------------------------------------------------- physical couplings
    def _dispensed(self, pump: int, ml: float, direction: int) -> None:
        """Pumping moves liquid between the medium, the bioreactor and the harvest bag.

        What does not fit is lost: a full bioreactor bag overflows, an empty bag or bioreactor
        lets the pump run dry. That is logged once as ``sim_pumping_limited`` (then quietly)
        and once as ``sim_pumping_normal`` when a whole dispense moves again.
        """
        into_bioreactor = (pump == FEED_PUMP) == (direction == 0)
        volume = self.model.true_values()["volume"]
        if into_bioreactor:
            room = max(0.0, self.model.params.max_volume - volume - 1e-9)
            supply = ml if pump == FEED_PUMP else self.harvest_bag_ml  # medium never runs out
            moved = min(ml, room, supply)
            if moved > 0:
                self.model.add_volume(moved, medium=pump == FEED_PUMP)
            if pump == HARVEST_PUMP:
                self.harvest_bag_ml -= moved
            why = "the bioreactor bag is full" if room < ml else "the harvest bag is empty"
        else:
            moved = min(ml, volume)
            if moved > 0:
                self.model.remove_volume(moved)
            if pump == HARVEST_PUMP:
                self.harvest_bag_ml += moved
            why = "the bioreactor is empty"
        if moved < ml:
            if pump not in self._limited:  # a repeating condition logs once
                self._limited.add(pump)
                log.warning("sim_pumping_limited", pump=pump, reason=why, lost_ml=ml - moved)
        elif pump in self._limited:
            self._limited.discard(pump)
            log.info("sim_pumping_normal", pump=pump)

    def _bag_weight(self) -> float:
        return BAG_TARE_G + self.harvest_bag_ml * MEDIUM_DENSITY_G_PER_ML

    # -------------------------------------------------------------- life cycle
    def fault_targets(self) -> dict[str, Any]:
        """The fault dataclasses the control endpoint may change, by name."""
        return {
            "bioreactor": self.faults,
            "pumps": self.pump_faults,
            "balance": self.balance_faults,
            "cell_processor": self.cell_processor_faults,
        }

    def actions(self) -> dict[str, Any]:
        """Named actions of the control endpoint (device restart, link loss...)."""

        async def restart_bioreactor() -> str:
            await self.bioreactor.restart(delay_s=5.0)
            return "restarted"

        async def drop_bioreactor() -> int:
            return self.bioreactor.drop_connections()

        async def drop_pumps() -> str:
            self.pumps.drop_connections()
            return "dropped"

        async def balance_disconnect() -> str:
            if self.balance:
                self.balance.disconnect()
            return "disconnected"

        async def balance_reconnect() -> str:
            if self.balance:
                await self.balance.reconnect()
            return "reconnected"

        async def clear_all() -> str:
            self.faults.clear()
            for obj in (self.pump_faults, self.balance_faults, self.cell_processor_faults):
                for name, value in type(obj)().__dict__.items():
                    setattr(obj, name, value)
            return "cleared"

        return {
            "bioreactor.restart": restart_bioreactor,
            "bioreactor.drop_connections": drop_bioreactor,
            "pumps.drop_connections": drop_pumps,
            "balance.disconnect": balance_disconnect,
            "balance.reconnect": balance_reconnect,
            "clear": clear_all,
        }

    def state(self) -> dict[str, Any]:
        """The true state of the simulated world, for the control endpoint."""
        return {
            "time": self.clock.now().isoformat(timespec="seconds"),
            "bioreactor": self.model.true_values(),
            "harvest_bag_ml": self.harvest_bag_ml,
            "pumps": {
                u: {"speed": p.speed, "dispensed": p.dispensed} for u, p in self.pumps.pumps.items()
            },
        }

    async def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        token_file = self.run_dir / "control.token"
        token_file.touch(mode=0o600)
        token_file.chmod(0o600)
        token_file.write_text(self.token)
        (self.run_dir / "control.url").write_text(
            f"http://{self.endpoints.host}:{self.endpoints.control_port}"
        )
        await self.bioreactor.start()
        await self.cell_processor.start()
        await self.pumps.start()
        if self.balance:
            await self.balance.start()
        app = control_app(self.token, self.fault_targets(), self.actions(), self.state)
        self._control = uvicorn.Server(
            uvicorn.Config(
                app,
                host=self.endpoints.host,
                port=self.endpoints.control_port,
                log_level="warning",
                lifespan="off",
            )
        )
        # `bedside sim` owns SIGTERM/SIGINT; uvicorn must not take them
        self._control.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._control_task = asyncio.create_task(self._control.serve(), name="sim-control")
        while not self._control.started:
            if self._control_task.done():
                await self._control_task  # raises why it could not start
                raise RuntimeError("the control endpoint stopped at start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._control and self._control_task:
            self._control.should_exit = True
            with contextlib.suppress(Exception):
                await self._control_task
        if self.balance:
            await self.balance.stop()
        await self.pumps.stop()
        await self.cell_processor.stop()
        await self.bioreactor.stop()
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / "control.token").unlink()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def describe(self) -> dict[str, str]:
        """The endpoints, as printed at start."""
        out = {
            "bioreactor": self.bioreactor.endpoint,
            "cell_processor": self.cell_processor.endpoint,
            **{f"pumps_{k}": v for k, v in self.pumps.endpoints.items()},
            "control": f"http://{self.endpoints.host}:{self.endpoints.control_port}",
        }
        if self.balance:
            out["balance"] = self.balance.link_path
        return out
