"""The OPC UA driver's connection: opening a session, resolving nodes, noticing the loss of the
session, reconnecting with backoff, and running requests against whatever session is current.

Connection life::

    start() ──open──> connected ──loss (socket closed, watchdog, failed request)──> lost
                         ^                                                          │
                         └──── reopened: nodes re-resolved, subscriptions re-made ──┘
                               (backoff from RetryPolicy on the injected clock)

asyncua's own auto-reconnect is not used: it re-creates subscriptions on the old NodeIds, while a
restarted server may number its nodes differently. Each (re)connection is a fresh asyncua
``Client``; ``on_open`` (the driver's streams subscribing again) runs under ``lock`` before the
connection becomes current, and ``on_lost`` runs when it is found gone. Requests made while
disconnected wait for the reconnection until their deadline. ``timeout`` is wall-clock seconds,
like the protocol stack's own request timeouts; backoff delays are seconds of the clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog
from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState

from drivers.clock import Clock
from drivers.errors import (
    ConfigurationError,
    DeviceTimeout,
    DeviceUnavailable,
    DriverError,
    ProtocolError,
)
from drivers.opcua_nodes import ResolvedMethod, ResolvedPoint, Resolver
from drivers.opcua_security import apply_security
from drivers.points import OpcUaMethod, OpcUaPoint, RetryPolicy, SecurityConfig

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Service results meaning the session or channel is gone: handled like a dropped socket.
_SESSION_LOST = {
    ua.StatusCodes.BadSessionIdInvalid,
    ua.StatusCodes.BadSessionClosed,
    ua.StatusCodes.BadSessionNotActivated,
    ua.StatusCodes.BadSecureChannelIdInvalid,
    ua.StatusCodes.BadSecureChannelClosed,
    ua.StatusCodes.BadConnectionClosed,
    ua.StatusCodes.BadServerNotConnected,
    ua.StatusCodes.BadNotConnected,
    ua.StatusCodes.BadShutdown,
    ua.StatusCodes.BadServerHalted,
}


@dataclass(slots=True)
class Connection:
    """One session with the server and the nodes resolved on it."""

    client: Client
    points: dict[str, ResolvedPoint]
    methods: dict[str, ResolvedMethod]


class Connector:
    """Keeps a driver connected (see the module docstring)."""

    def __init__(
        self,
        device: str,
        endpoint: str,
        points: Sequence[OpcUaPoint],
        methods: Sequence[OpcUaMethod],
        *,
        clock: Clock,
        security: SecurityConfig,
        timeout: float,
        retry: RetryPolicy,
        on_open: Callable[[Connection], Awaitable[None]],
        on_lost: Callable[[], None],
    ) -> None:
        self.device = device
        self.endpoint = endpoint
        self.timeout = timeout
        self.lock = asyncio.Lock()  # held while streams attach to a connection
        self._points = list(points)
        self._methods = list(methods)
        self._clock = clock
        self._security = security
        self._retry = retry
        self._on_open = on_open
        self._on_lost = on_lost
        self._log = log.bind(device=device)
        self._conn: Connection | None = None
        self._changed = asyncio.Event()  # replaced after each set: wakes waiters once
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._supervisor: asyncio.Task[None] | None = None
        self.closing = False

    @property
    def connection(self) -> Connection | None:
        """The current connection (``None`` while disconnected)."""
        return self._conn

    async def start(self) -> None:
        """Connect once (raising on failure), then keep the connection up in the background."""
        if self._supervisor is not None:
            return
        self.closing = False
        await self._establish()
        self._log.info("opcua_connected", endpoint=self.endpoint)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"opcua:{self.device}")

    async def close(self) -> None:
        """Stop reconnecting and close the session; waiting requests fail at once."""
        self.closing = True
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            await asyncio.gather(supervisor, return_exceptions=True)
        conn, self._conn = self._conn, None
        self._notify()
        if conn is not None:
            await self._discard(conn.client)
            self._log.info("opcua_closed", endpoint=self.endpoint)

    def signal_lost(self, client: Client, exc: BaseException) -> None:
        """Report that ``client``'s session failed; ignored for a client no longer current."""
        conn = self._conn
        if self.closing or conn is None or conn.client is not client:
            return
        self._lost_reason = repr(exc)
        self._lost.set()

    async def _establish(self) -> None:
        conn = await self._open()
        try:
            async with self.lock:
                await self._on_open(conn)
                self._conn = conn
                self._lost.clear()
                if conn.client.uaclient.state is not UaClientState.CONNECTED:
                    # lost before it became current, so its loss callback was ignored
                    self._lost_reason = "connection lost while subscribing"
                    self._lost.set()
        except (ConnectionError, OSError, TimeoutError, ua.UaError) as exc:
            await self._discard(conn.client)
            raise DeviceUnavailable(
                self.device, f"connection to {self.endpoint} lost while subscribing: {exc!r}"
            ) from exc
        self._notify()

    async def _open(self) -> Connection:
        client = Client(
            self.endpoint, timeout=self.timeout, watchdog_intervall=min(1.0, self.timeout)
        )
        client.name = client.description = f"Bedside agent ({self.device})"

        async def lost(exc: Exception) -> None:
            self.signal_lost(client, exc)

        try:
            await apply_security(self.device, client, self._security)
            await client.connect()
            client.connection_lost_callback = lost
            resolver = Resolver(self.device, client)
            await resolver.load_namespaces()
            points = await resolver.points(self._points)
            methods = await resolver.methods(self._methods)
        except Exception as exc:
            await self._discard(client)
            raise self._connect_error(exc) from exc
        return Connection(client, points, methods)

    def _connect_error(self, exc: Exception) -> DriverError:
        where = self.endpoint
        if isinstance(exc, DriverError):
            return exc
        if isinstance(exc, TimeoutError):
            return DeviceTimeout(self.device, f"{where} did not answer within {self.timeout} s")
        if isinstance(exc, ua.UaStatusCodeError):
            return DeviceUnavailable(
                self.device, f"{where} refused the connection: {status_name(exc)}"
            )
        if isinstance(exc, ua.UaError):
            return ConfigurationError(self.device, f"cannot connect to {where}: {exc}")
        return DeviceUnavailable(self.device, f"cannot connect to {where}: {exc!r}")

    async def _discard(self, client: Client) -> None:
        client.connection_lost_callback = None
        try:
            async with asyncio.timeout(min(1.0, self.timeout)):
                await client.disconnect()
        except Exception as exc:  # a dead or hung peer: closing is best effort
            self._log.debug("opcua_disconnect_failed", error=repr(exc))
        finally:
            client.disconnect_socket()

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def _supervise(self) -> None:
        while True:
            await self._lost.wait()
            conn, self._conn = self._conn, None
            self._lost.clear()
            self._notify()
            self._on_lost()
            self._log.error(
                "opcua_connection_lost", endpoint=self.endpoint, error=self._lost_reason
            )
            if conn is not None:
                await self._discard(conn.client)
            await self._reconnect()

    async def _reconnect(self) -> None:
        delay = self._retry.initial
        attempts = 0
        while True:
            attempts += 1
            try:
                await self._establish()
            except ConfigurationError as exc:
                # the server is back but its address space no longer fits the configuration
                if exc.detail != self._lost_reason:
                    self._log.error("opcua_reconnect_refused", error=exc.detail)
                else:
                    self._log.debug("opcua_reconnect_refused", error=exc.detail)
                self._lost_reason = exc.detail
            except DriverError as exc:
                self._log.debug("opcua_reconnect_failed", attempt=attempts, error=exc.detail)
                self._lost_reason = exc.detail
            else:
                self._log.info("opcua_reconnected", endpoint=self.endpoint, attempts=attempts)
                return
            await self._clock.sleep(delay)
            delay = min(delay * self._retry.factor, self._retry.maximum)

    async def _current(self, what: str, deadline: float) -> Connection:
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    if self.closing:
                        raise DeviceUnavailable(self.device, f"{what}: the driver is closed")
                    if self._conn is not None:
                        return self._conn
                    if self._supervisor is None:
                        raise DeviceUnavailable(self.device, f"{what}: not connected")
                    await self._changed.wait()
        except TimeoutError:
            raise DeviceUnavailable(
                self.device,
                f"{what}: not connected to {self.endpoint} ({self._lost_reason}); "
                f"waited {self.timeout} s for the reconnection",
            ) from None

    async def request(
        self, what: str, op: Callable[[Connection], Awaitable[T]], *, retry: bool
    ) -> T:
        """Run ``op`` on the current connection, waiting up to ``timeout`` for one.

        A lost connection is reported to the supervisor; with ``retry`` the operation runs once
        more on the next connection (within the same deadline). Raises ``DeviceTimeout``,
        ``DeviceUnavailable`` or ``ProtocolError`` (another bad service result).
        """
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:
            conn = await self._current(what, deadline)
            try:
                return await op(conn)
            except TimeoutError as exc:
                raise DeviceTimeout(
                    self.device, f"{what}: no answer from {self.endpoint} within {self.timeout} s"
                ) from exc
            except (ConnectionError, OSError) as exc:
                self.signal_lost(conn.client, exc)
                if not retry:
                    raise DeviceUnavailable(
                        self.device, f"{what}: connection to {self.endpoint} lost ({exc!r})"
                    ) from exc
            except ua.UaStatusCodeError as exc:
                if exc.code not in _SESSION_LOST:
                    raise ProtocolError(
                        self.device, f"{what}: {self.endpoint} answered {status_name(exc)}"
                    ) from exc
                self.signal_lost(conn.client, exc)
                if not retry:
                    raise DeviceUnavailable(
                        self.device,
                        f"{what}: session with {self.endpoint} lost ({status_name(exc)})",
                    ) from exc
            retry = False


def status_name(exc: ua.UaStatusCodeError) -> str:
    """The OPC UA name of the status code an asyncua error carries."""
    return ua.StatusCode(exc.code).name
