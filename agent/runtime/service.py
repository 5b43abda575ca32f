"""The on-site agent service: devices -> recorder -> journal -> uplink, with a local status API.

::

    service = AgentService(config, clock, AgentSettings(state_dir=Path(".bedside")))
    await run_until_signalled(service)     # `bedside agent run`: SIGTERM/SIGINT stop it cleanly

One ``asyncio.TaskGroup`` owns every task: recording, the one-second tick (heartbeats, disk
check), pruning, the uplink and the local API. Cancelling the service (SIGTERM) journals
``agent_stopped``, closes the devices and closes the journal, which flushes the buffered samples
and signs a final checkpoint. Device faults are reported as bad samples and recorded; a device
that is down at start is retried, it does not stop the agent.

Disk: when free space on the journal's file system falls below ``low_disk_bytes`` the agent
journals a ``low_disk`` alarm and keeps recording; ``AgentService.low_disk`` tells the engine
to refuse new runs. Retention: acknowledged records older than ``retention_seconds`` are pruned
every ``prune_interval``; records the control site has not acknowledged are never deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from starlette.applications import Starlette

from agent.api.app import create_api
from agent.auth.authenticator import Authenticator, UserStore
from agent.auth.outbox import AuditOutbox
from agent.auth.users import UserStoreError
from agent.config import UnitConfig
from agent.devices.hub import DeviceHub
from agent.engine.runs import RunManager, RunRefused
from agent.journal.journal import Journal
from agent.journal.recorder import Recorder
from agent.recipe.store import RecipeStore
from agent.record.format import JournalError, Kind
from agent.record.keys import UnitKey, load_unit_key
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
    retention_seconds: float = 30 * 86400.0  # acknowledged records older than this are pruned
    prune_interval: float = 3600.0
    recipes_dir: Path | None = None  # the recipe store; default <state_dir>/recipes
    audit_drain_seconds: float = 2.0  # wall seconds between drains of the users' audit outbox


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
        self.runs: RunManager | None = None
        self.authenticator: Authenticator | None = None
        self.recipes = (
            RecipeStore(settings.recipes_dir)
            if settings.recipes_dir
            else RecipeStore.in_dir(settings.state_dir)
        )
        self._low_disk = False
        self._alarm_journaled = False  # the state of the low_disk alarm last journaled
        self.ready = asyncio.Event()

    @property
    def low_disk(self) -> bool:
        """Whether the journal's disk is below ``low_disk_bytes`` free (checked every second):
        the engine refuses to start runs while it is."""
        return self._low_disk

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
                        for t, s in self.hub.snapshot.items()
                        if self.config.all_tags().get(t) == name
                    }
                )
                or ["no data yet"]
                for name in self.hub.drivers
            }
        if self.runs and self.runs.engine:
            eng = self.runs.engine
            out["run"] = {"run": eng.run, "state": eng.sm.state.value, "phase": eng.memory.current}
        if self.recorder:
            out["recorder"] = {"offered": self.recorder.offered, "recorded": self.recorder.recorded}
        return out

    def _api(self) -> Starlette:
        return create_api(
            self.status,
            self.runs,
            self.authenticator,
            recipes=self.recipes,
            audit=self.journal.append if self.journal else None,
        )

    async def _drain_audit(self, journal: Journal) -> None:
        """Journal what the ``bedside users`` CLI left in the audit outbox while we run (a
        refused sign-in there is journaled within seconds, not at the next start). The CLI
        writes in wall time, so this polls in wall time whatever the process clock's speed."""
        outbox = AuditOutbox.in_dir(self.settings.state_dir)
        failing = False
        while True:
            await asyncio.sleep(self.settings.audit_drain_seconds)
            try:
                await outbox.drain(journal.append)
            except (UserStoreError, JournalError) as exc:  # kept for the next try
                (log.debug if failing else log.error)("audit_outbox_drain_failed", error=str(exc))
                failing = True
            else:
                failing = False

    async def _record(self, hub: DeviceHub, recorder: Recorder) -> None:
        async for sample in hub.observe(list(self.config.all_tags())):
            recorder.offer((sample,))

    async def _tick(self, recorder: Recorder, journal: Journal) -> None:
        while True:
            await self.clock.sleep(1.0)
            recorder.tick()
            await self._check_disk(journal)

    async def _check_disk(self, journal: Journal) -> None:
        """Journal a ``low_disk`` alarm when free space falls below the threshold, and its
        return when it recovers; keep recording either way (an alarm that cannot be journaled,
        the disk being full, is tried again at the next check)."""
        try:
            free = journal.disk_free()
        except OSError as exc:  # the folder vanished under us: the journal's writes will say
            log.debug("disk_check_failed", error=str(exc))
            return
        threshold = self.settings.low_disk_bytes
        low = free < threshold
        if low != self._low_disk:
            self._low_disk = low
            if low:
                log.warning("low_disk", free_bytes=free, threshold_bytes=threshold)
            else:
                log.info("disk_recovered", free_bytes=free)
        if low == self._alarm_journaled:
            return
        mib = free / 2**20
        message = (
            f"{mib:.0f} MiB free on the journal's disk, below {threshold / 2**20:.0f} MiB; "
            "recording continues, new runs are refused until space is freed"
            if low
            else f"disk space recovered: {mib:.0f} MiB free"
        )
        body = {
            "alarm": "low_disk",
            "state": "active" if low else "returned",
            "priority": "high",
            "free_bytes": free,
            "threshold_bytes": min(threshold, 2**53 - 1),
            "message": message,
        }
        try:
            await journal.append(Kind.ALARM, body)
        except JournalError as exc:
            log.error("low_disk_alarm_not_journaled", error=str(exc))
            return
        self._alarm_journaled = low

    async def _prune(self, journal: Journal) -> None:
        """Prune acknowledged records past the retention now and every ``prune_interval``."""
        failing = False
        while True:
            try:
                await journal.prune(self.settings.retention_seconds)
            except JournalError as exc:  # e.g. disk full: retried at the next interval
                (log.debug if failing else log.error)("journal_prune_failed", error=str(exc))
                failing = True
            else:
                if failing:
                    log.info("journal_prune_recovered")
                failing = False
            await self.clock.sleep(self.settings.prune_interval)

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
        server = uvicorn.Server(
            uvicorn.Config(
                self._api(), log_level="warning", lifespan="off", timeout_graceful_shutdown=2
            )
        )
        # the service owns SIGTERM/SIGINT (it flushes the journal); uvicorn must not take them
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="api-server")
        try:
            await asyncio.shield(serving)
        finally:
            # cancelled: let uvicorn close its listener and connections (about 0.2 s) rather
            # than abandon them half-open
            server.should_exit = True
            try:
                await serving
            finally:
                sock.close()

    async def run(self) -> None:
        """Run until cancelled."""
        s = self.settings
        key = load_unit_key(s.state_dir)
        sock = self._bind_api()
        try:
            await self._run(key, sock)
        finally:
            sock.close()  # already closed when the API ran; not leaked when it never did

    async def _run(self, key: UnitKey, sock: socket.socket) -> None:
        s = self.settings
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
            try:
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
                await self._check_disk(journal)
                self.authenticator = Authenticator(
                    UserStore.in_dir(s.state_dir),
                    self.clock,
                    lambda kind, body: journal.append(kind, body),
                )
                await AuditOutbox.in_dir(s.state_dir).drain(journal.append)
                try:
                    async with asyncio.TaskGroup() as tg:
                        self.runs = RunManager(
                            self.config,
                            hub,
                            journal,
                            self.clock,
                            tg.create_task,
                            authenticator=self.authenticator,
                            low_disk=lambda: self.low_disk,
                        )
                        try:
                            await self.runs.recover()
                        except RunRefused as exc:
                            log.error("run_recovery_failed", error=str(exc))
                        tg.create_task(self._record(hub, recorder), name="record")
                        tg.create_task(self._tick(recorder, journal), name="tick")
                        tg.create_task(self._prune(journal), name="prune")
                        tg.create_task(self._drain_audit(journal), name="audit-outbox")
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
                    with contextlib.suppress(JournalError):
                        await journal.append(Kind.EVENT, {"event": "agent_stopped"})
            finally:
                await hub.close()


async def run_until_signalled(service: AgentService) -> None:
    """Run ``service`` until SIGTERM or SIGINT, then stop it cleanly (the journal flushed,
    signed and closed) and return; an error of the service is raised."""
    loop = asyncio.get_running_loop()
    runner = asyncio.create_task(service.run(), name="agent")
    stopping: list[str] = []

    def stop(sig: signal.Signals) -> None:
        if not stopping:  # a second signal must not interrupt the journal's close
            stopping.append(sig.name)
            log.info("agent_stopping", signal=sig.name)
            runner.cancel()

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop, sig)
    try:
        await asyncio.wait([runner])
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    if not (runner.cancelled() and stopping):
        runner.result()
