"""The Modbus driver's connection: one pymodbus client, opened on demand, and its fault log.

``ModbusLink`` owns the client of a TCP server or an RTU bus and the lock that serializes every
request on it (RTU is a shared bus; a TCP gateway often is one too). pymodbus's own reconnect is
disabled (``reconnect_delay=0``): the link reconnects when the next request finds it down, and
the driver paces those attempts with its backoff. ``io_error`` tells a silent unit (the link is
still up: ``DeviceTimeout``, kept per request) from a dropped link (``DeviceUnavailable``, raised).

``FaultLog`` is how the driver logs a repeating fault: once as an error, then at debug while it
lasts, then once at info when it recovers.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

from drivers.errors import DeviceTimeout, DeviceUnavailable
from drivers.modbus_codec import RtuEndpoint, TcpEndpoint

Client = AsyncModbusTcpClient | AsyncModbusSerialClient


class FaultLog:
    """Faults by key: error on the first occurrence, debug while active, info on recovery."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self._active: set[str] = set()

    def __bool__(self) -> bool:
        """Whether any fault is active (only then can something be recovering)."""
        return bool(self._active)

    def fault(self, key: str, event: str, **kw: Any) -> None:
        """Log ``event`` for the fault ``key``: as an error the first time, then at debug."""
        if key in self._active:
            self._log.debug(event, **kw)
        else:
            self._active.add(key)
            self._log.error(event, **kw)

    def recover(self, key: str, event: str, *, always: bool = False, **kw: Any) -> None:
        """Log ``event`` at info if ``key`` was a fault (or ``always``), and clear it."""
        if key in self._active:
            self._active.discard(key)
            self._log.info(event, recovered=True, **kw)
        elif always:
            self._log.info(event, **kw)


class ModbusLink:
    """The connection to one Modbus endpoint; hold ``lock`` around ``ensure`` and requests."""

    def __init__(
        self,
        name: str,
        endpoint: TcpEndpoint | RtuEndpoint,
        *,
        timeout: float,
        retries: int,
        faults: FaultLog,
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.lock = asyncio.Lock()
        self._timeout = timeout
        self._retries = retries
        self._faults = faults
        self._client: Client | None = None

    @property
    def connected(self) -> bool:
        """Whether the connection is up right now."""
        return self._client is not None and self._client.connected

    @property
    def where(self) -> str:
        """The endpoint as messages name it (``host:port`` or the serial device path)."""
        ep = self.endpoint
        return f"{ep.host}:{ep.port}" if isinstance(ep, TcpEndpoint) else ep.path

    async def ensure(self) -> Client:
        """The connected client, connecting first if needed (call with ``lock`` held);
        ``DeviceUnavailable`` when the device cannot be reached."""
        if self._client is not None and self._client.connected:
            return self._client
        if self._client is not None:  # it dropped since the last request: reconnect now
            self._faults.fault("link", "modbus_link_lost", error="connection closed by the peer")
        self.drop()
        client = self._new_client()
        if not await client.connect():
            client.close()
            self._faults.fault("link", "modbus_connect_failed", endpoint=self.where)
            raise DeviceUnavailable(self.name, f"cannot connect to {self.where}")
        self._client = client
        self._faults.recover("link", "modbus_connected", always=True, endpoint=self.where)
        return client

    def _new_client(self) -> Client:
        ep = self.endpoint
        if isinstance(ep, TcpEndpoint):
            return AsyncModbusTcpClient(
                ep.host,
                port=ep.port,
                timeout=self._timeout,
                retries=self._retries,
                reconnect_delay=0,  # no pymodbus reconnect task: the driver owns reconnection
                name=self.name,
            )
        return AsyncModbusSerialClient(
            ep.path,
            baudrate=ep.baudrate,
            parity=ep.parity,
            stopbits=ep.stopbits,
            bytesize=ep.bytesize,
            timeout=self._timeout,
            retries=self._retries,
            reconnect_delay=0,
            name=self.name,
        )

    def drop(self) -> None:
        """Close the client (if any); the next ``ensure`` connects again."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def io_error(self, doing: str, exc: Exception) -> DeviceTimeout:
        """The error for a request that failed with ``exc``: a silent unit gives
        ``DeviceTimeout`` (returned); a dropped link raises ``DeviceUnavailable``."""
        if not self.connected:
            self.drop()
            self._faults.fault("link", "modbus_link_lost", error=str(exc))
            raise DeviceUnavailable(self.name, f"connection lost {doing}") from exc
        attempts = 1 + self._retries
        error = DeviceTimeout(
            self.name, f"no answer {doing} within {self._timeout} s × {attempts} attempts"
        )
        error.__cause__ = exc
        return error
