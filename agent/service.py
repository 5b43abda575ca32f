"""The on-site agent service: devices -> recorder -> journal -> uplink, with a local status API.

One ``asyncio.TaskGroup`` owns every task; cancelling the service (SIGTERM) flushes the journal
and closes the devices. Device faults are reported as bad samples and recorded; a device that
is down at start is retried, it does not stop the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent.config import UnitConfig
from agent.devices import DeviceHub
from agent.journal import Journal
from agent.keys import load_unit_key
from agent.recorder import Recorder
from agent.records import Kind
from agent.uplink import Uplink
from drivers.clock import Clock

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """How the agent runs (from the command line; the unit configuration says what it drives)."""

    state_dir: Path
    control_site_url: str | None = None
    control_site_ca: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 8780
    low_disk_bytes: int = 256 * 2**20
    checkpoint_every: int = 1000
    checkpoint_seconds: float = 60.0


class AgentService:
    """The running agent of one unit."""

    def __init__(self, config: UnitConfig, clock: Clock, settings: AgentSettings) -> None:
        self.config = config
        self.clock = clock
        self.settings = settings
        self.journal: Journal | None = None
        self.uplink: Uplink | None = None
        self.hub: DeviceHub | None = None
        self.recorder: Recorder | None = None
        self.low_disk = False
        self.ready = asyncio.Event()

    def status(self) -> dict[str, Any]:
        """What ``bedside status`` shows: journal, uplink, devices, disk."""
        out: dict[str, Any] = {"unit": self.config.unit.id, "time": self.clock.now().isoformat()}
        if self.journal:
            seq, head = self.journal.head()
            acked = self.journal.acknowledged_seq
            out["journal"] = {
                "path": str(self.journal.path),
                "head_seq": seq,
                "head_hash": head,
                "durable_seq": self.journal.durable_seq,
                "acked_seq": acked,
                "backlog": seq - acked,
                "disk_free_bytes": self.journal.disk_free(),
                "low_disk": self.low_disk,
            }
        out["uplink"] = self.uplink.status() if self.uplink else {"link": "not configured"}
        if self.hub:
            out["devices"] = {
                name: sorted(
                    {
                        s.quality.value
                        for t, s in self.hub.latest.items()
                        if self.config.all_tags().get(t) == name
                    }
                )
                or ["no data yet"]
                for name in self.hub.drivers
            }
        if self.recorder:
            out["recorder"] = {"offered": self.recorder.offered, "recorded": self.recorder.recorded}
        return out

    def _api(self) -> Starlette:
        async def status(_: Request) -> JSONResponse:
            return JSONResponse(self.status())

        return Starlette(routes=[Route("/api/v1/status", status, methods=["GET"])])

    async def _record(self, hub: DeviceHub, recorder: Recorder) -> None:
        async for sample in hub.observe(list(self.config.all_tags())):
            recorder.offer((sample,))

    async def _tick(self, recorder: Recorder, journal: Journal) -> None:
        while True:
            await self.clock.sleep(1.0)
            recorder.tick()
            low = journal.low_disk
            if low != self.low_disk:
                self.low_disk = low
                free = journal.disk_free()
                await journal.append(
                    Kind.ALARM,
                    {
                        "alarm": "low_disk",
                        "state": "active" if low else "returned",
                        "priority": "high",
                        "free_bytes": free,
                        "message": f"{free / 2**20:.0f} MiB free on the journal's disk; "
                        "runs are refused until space is freed"
                        if low
                        else "disk space recovered",
                    },
                )
                log.warning("low_disk", free_bytes=free) if low else log.info("disk_recovered")

    def _bind_api(self) -> socket.socket:
        """Bind the local API's socket first, so a busy port is a clear error, not an exit."""
        host, port = self.settings.api_host, self.settings.api_port
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(
                f"the agent's local API cannot listen on {host}:{port}: {exc.strerror}"
            ) from exc
        return sock

    async def _serve_api(self, sock: socket.socket) -> None:
        server = uvicorn.Server(uvicorn.Config(self._api(), log_level="warning", lifespan="off"))
        # the service owns SIGTERM/SIGINT (it flushes the journal); uvicorn must not take them
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        try:
            await server.serve(sockets=[sock])
        finally:
            sock.close()

    async def run(self) -> None:
        """Run until cancelled."""
        s = self.settings
        key = load_unit_key(s.state_dir)
        sock = self._bind_api()
        structlog.contextvars.bind_contextvars(unit=self.config.unit.id)
        async with Journal.open(
            s.state_dir / "journal.db",
            unit=self.config.unit.id,
            signer=key,
            clock=self.clock,
            checkpoint_every=s.checkpoint_every,
            checkpoint_seconds=s.checkpoint_seconds,
            low_disk_bytes=s.low_disk_bytes,
        ) as journal:
            self.journal = journal
            hub = DeviceHub(self.config, self.clock)
            await hub.connect(required=False)
            self.hub = hub
            recorder = Recorder(
                {t: self.config.tag(t)[1].record for t in self.config.all_tags()},
                journal.record_samples,
                self.clock,
            )
            self.recorder = recorder
            await journal.append(
                Kind.EVENT, {"event": "agent_started", "devices": sorted(self.config.devices)}
            )
            try:
                async with asyncio.TaskGroup() as tg:
                    tg.create_task(self._record(hub, recorder), name="record")
                    tg.create_task(self._tick(recorder, journal), name="tick")
                    tg.create_task(self._serve_api(sock), name="api")
                    if s.control_site_url:
                        self.uplink = Uplink(
                            journal,
                            s.control_site_url,
                            unit_key=key,
                            clock=self.clock,
                            verify=s.control_site_ca or True,
                        )
                        tg.create_task(self.uplink.run(), name="uplink")
                    self.ready.set()
            finally:
                with contextlib.suppress(Exception):
                    await journal.append(Kind.EVENT, {"event": "agent_stopped"})
                await hub.close()
