"""The simulated bioreactor as an OPC UA server (asyncua), shaped after LADS (OPC 30500).

The address space (``simulators.bioreactor_space``) has a sensor function per measured value
(``<function>/SensorValue``) and four control functions (Temperature, Rocking, Perfusion, CO2)
with ``CurrentValue``, a writable ``TargetValue`` and ``ControlFunctionState`` Start/Stop.

A TargetValue write outside the EURange is refused with BadOutOfRange (asyncua answers a
refusing attribute setter with a service fault, so a batched write stops at that item); a value
of another type than Double is refused with BadTypeMismatch. A stuck sensor's SensorValue carries
UncertainLastUsableValue, a failed one BadSensorFailure (asyncua then serves a null value).
Source timestamps come from the injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog
from asyncua import Server, ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from asyncua.common.utils import ServiceError
from asyncua.crypto.uacrypto import load_certificate
from asyncua.crypto.validator import CertificateValidator
from asyncua.server.address_space import NodeData
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from drivers.clock import Clock
from simulators.bioreactor_model import BioreactorModel
from simulators.bioreactor_space import (
    CONTROLLER_FUNCTIONS,
    NAMESPACE_URI,
    SENSOR_FUNCTIONS,
    ControllerFunction,
    build_address_space,
    current,
    node_id,
    running,
    state_text,
    target,
    variable_id,
)
from simulators.faults import FaultState
from simulators.opcua_sessions import close_lingering_sessions, stop_server

APPLICATION_URI = "urn:bedside:simulator:bioreactor:server"  # must differ from NAMESPACE_URI
ENDPOINT_PATH = "/bedside/bioreactor"
_POLICIES = {
    "None": ua.SecurityPolicyType.NoSecurity,
    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}
__all__ = [
    "APPLICATION_URI",
    "CONTROLLER_FUNCTIONS",
    "ENDPOINT_PATH",
    "NAMESPACE_URI",
    "SENSOR_FUNCTIONS",
    "BioreactorServer",
    "ServerSecurity",
    "node_id",
]


@dataclass(frozen=True, slots=True)
class ServerSecurity:
    """Certificate, key and allowed policies (``None``, ``Basic256Sha256_Sign``,
    ``Basic256Sha256_SignAndEncrypt``). With ``trusted_clients`` (certificate files, DER or PEM)
    only those client certificates are accepted; without, asyncua accepts any."""

    certificate: Path
    private_key: Path
    policies: tuple[str, ...] = tuple(_POLICIES)
    trusted_clients: tuple[Path, ...] = ()
    application_uri: str = APPLICATION_URI  # the certificate's URI SubjectAltName


class _PinnedClients:
    """Certificate validator: asyncua's basic checks (validity, application URI), then the
    client certificate must be one of the pinned ones (self-signed certificates included)."""

    def __init__(self, fingerprints: set[bytes]) -> None:
        self._fingerprints = fingerprints
        self._basic = CertificateValidator()

    async def __call__(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        await self._basic(cert, app)
        if cert.fingerprint(hashes.SHA256()) not in self._fingerprints:
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)


class BioreactorServer:
    """Serves a ``BioreactorModel`` over OPC UA; an async context manager.

    While running, a task advances the model by the clock's elapsed time every
    ``update_interval`` wall seconds (``update_interval * clock.speed`` clock seconds) and
    publishes every value. ``tick()`` does one such step on demand. ``faults`` is shared with
    the model (default: the model's own ``FaultState``).
    """

    def __init__(
        self,
        model: BioreactorModel,
        clock: Clock,
        *,
        host: str = "127.0.0.1",
        port: int = 4840,
        faults: FaultState | None = None,
        security: ServerSecurity | None = None,
        update_interval: float = 0.2,
        serial_number: str = "SIM-BR-0001",
    ) -> None:
        self.model = model
        self.clock = clock
        self.faults = faults if faults is not None else model.faults
        model.faults = self.faults
        self.host, self.port = host, port
        self.security = security
        self.update_interval = update_interval
        self.serial_number = serial_number
        self._server: Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._last = clock.monotonic()
        self._ns = 2
        self._published: dict[str, Any] = {}
        self._log = structlog.get_logger(__name__).bind(device="bioreactor", port=port)

    @property
    def endpoint(self) -> str:
        """The endpoint URL clients connect to."""
        return f"opc.tcp://{self.host}:{self.port}{ENDPOINT_PATH}"

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Build the address space, listen, and start the update task."""
        server = Server()
        await server.init()
        server.iserver.disabled_clock = True  # CurrentTime comes from the injected clock
        server.set_endpoint(self.endpoint)
        server.set_server_name("Bedside simulated bioreactor")
        await self._configure_security(server)
        self._ns = await server.register_namespace(NAMESPACE_URI)
        self._published = {}
        self._server = server
        await build_address_space(
            server,
            self._ns,
            self.model,
            serial_number=self.serial_number,
            setter=self._target_setter,
            method=self._method,
        )
        for cf in CONTROLLER_FUNCTIONS:
            self._published[f"{cf.name}.TargetValue"] = target(self.model, cf)
            self._published[f"{cf.name}.IsRunning"] = running(self.model, cf)
        server.subscribe_server_callback(CallbackType.PreRead, self._slow_reply)
        server.subscribe_server_callback(CallbackType.PreWrite, self._slow_reply)
        try:
            await server.start()
        except OSError:
            self._server = None  # e.g. the port is taken: leave the object restartable
            raise
        self._last = self.clock.monotonic()
        await self.tick()
        self._task = asyncio.create_task(self.run(), name="bioreactor-updates")
        self._log.info("bioreactor_server_started", endpoint=self.endpoint)

    async def stop(self) -> None:
        """Stop the update task and the server; safe to call twice."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            await stop_server(self._server)
            self._server = None
            self._log.info("bioreactor_server_stopped")

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

    async def run(self) -> None:
        """Advance and publish forever, every ``update_interval`` wall seconds."""
        while True:
            await self.clock.sleep(self.update_interval * self.clock.speed)
            await self.tick()

    async def restart(self, delay_s: float = 5.0) -> None:
        """Fault: the network side goes away for ``delay_s`` clock seconds (connections drop,
        the port stops listening) and comes back on the same port; the culture keeps going."""
        bserver = self._require().bserver
        if bserver is None:
            return
        self._log.warning("bioreactor_server_restarting", delay_s=delay_s)
        await bserver.stop()
        # a restarted device has lost its sessions: clients must open new ones
        await close_lingering_sessions(self._require())
        await self.clock.sleep(delay_s)
        await bserver.start()
        self._log.info("bioreactor_server_restarted")

    def drop_connections(self) -> int:
        """Fault: abort every client connection (the server keeps listening). Returns how many."""
        transports = list(self._require().iserver.asyncio_transports)
        for transport in transports:
            transport.abort()
        self._log.warning("bioreactor_connections_dropped", count=len(transports))
        return len(transports)

    def _require(self) -> Server:
        if self._server is None:
            raise RuntimeError("bioreactor server is not running")
        return self._server

    async def _configure_security(self, server: Server) -> None:
        sec = self.security
        await server.set_application_uri(sec.application_uri if sec else APPLICATION_URI)
        if sec is None:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            return
        unknown = [p for p in sec.policies if p not in _POLICIES]
        if unknown:
            raise ValueError(f"bioreactor: unknown security policies {unknown}; use {_POLICIES}")
        server.set_security_policy([_POLICIES[p] for p in sec.policies])
        await server.load_certificate(str(sec.certificate))
        await server.load_private_key(str(sec.private_key))
        if sec.trusted_clients:
            pinned = {
                (await load_certificate(path)).fingerprint(hashes.SHA256())
                for path in sec.trusted_clients
            }
            server.set_certificate_validator(_PinnedClients(pinned))

    # ----------------------------------------------------------------- controllers
    def _target_setter(self, cf: ControllerFunction) -> Any:
        def setter(node: NodeData, attr: ua.AttributeIds, dv: ua.DataValue) -> None:
            value = dv.Value.Value if dv.Value is not None else None
            if not isinstance(value, float) or not (cf.low <= value <= cf.high):
                self._log.warning(
                    "target_value_refused", function=cf.name, value=value, low=cf.low, high=cf.high
                )
                raise ua.uaerrors.BadOutOfRange()
            node.attributes[attr].value = dv
            if value != target(self.model, cf):
                setattr(self.model.controls, f"{cf.key}_sp", value)
                self._log.info("target_value_written", function=cf.name, value=value)
            self._published[f"{cf.name}.TargetValue"] = value

        return setter

    def _method(self, cf: ControllerFunction, run: bool) -> Any:
        async def call(parent: ua.NodeId, *args: Any) -> list[ua.Variant] | ua.StatusCode:
            if args:
                return ua.StatusCode(ua.StatusCodes.BadTooManyArguments)
            setattr(self.model.controls, f"{cf.key}_on", run)
            self._log.info("controller_started" if run else "controller_stopped", function=cf.name)
            await self._publish_controllers(self.clock.now())
            return []

        return call

    async def _slow_reply(self, event: ServerItemCallback, _dispatcher: Any) -> None:
        if event.is_external and self.faults.slow_reply_s > 0:
            await self.clock.sleep(self.faults.slow_reply_s)

    # ----------------------------------------------------------------- publishing
    async def tick(self) -> None:
        """Advance the model to the clock's now and publish every value."""
        server = self._require()
        now_m = self.clock.monotonic()
        dt, self._last = now_m - self._last, now_m
        if dt > 0:
            self.model.advance(dt)
        now = self.clock.now()
        await server.write_attribute_value(
            ua.NodeId(ua.ObjectIds.Server_ServerStatus_CurrentTime),
            ua.DataValue(ua.Variant(now, ua.VariantType.DateTime)),
        )
        f = self.faults
        for sf in SENSOR_FUNCTIONS:
            status = ua.StatusCodes.Good
            if sf.sensor in f.failed_sensors:
                status = ua.StatusCodes.BadSensorFailure
            elif sf.sensor in f.stuck_sensors:
                status = ua.StatusCodes.UncertainLastUsableValue
            await self._write(f"{sf.name}.SensorValue", self.model.measured[sf.sensor], now, status)
        await self._publish_controllers(now)

    async def _publish_controllers(self, now: datetime) -> None:
        for cf in CONTROLLER_FUNCTIONS:
            await self._write(f"{cf.name}.CurrentValue", current(self.model, cf), now)
            sp = target(self.model, cf)
            if self._published.get(f"{cf.name}.TargetValue") != sp:
                self._published[f"{cf.name}.TargetValue"] = sp
                # set out of range through the model (not OPC UA): keep publishing the last one
                with contextlib.suppress(ua.uaerrors.BadOutOfRange):
                    await self._write(f"{cf.name}.TargetValue", sp, now)
            is_running = running(self.model, cf)
            if self._published.get(f"{cf.name}.IsRunning") != is_running:
                self._published[f"{cf.name}.IsRunning"] = is_running
                await self._write(f"{cf.name}.IsRunning", is_running, now)
                await self._write(f"{cf.name}.CurrentState", state_text(is_running), now)

    async def _write(
        self, ident: str, value: float | bool | str, now: datetime, status: int = 0
    ) -> None:
        """Write a value of this device with the clock's timestamps (status 0 = Good)."""
        if isinstance(value, float):
            variant = ua.Variant(value if math.isfinite(value) else 0.0, ua.VariantType.Double)
        else:
            variant = ua.Variant(value)
        dv = ua.DataValue(variant, ua.StatusCode(status), SourceTimestamp=now, ServerTimestamp=now)
        await self._require().write_attribute_value(variable_id(ident, self._ns), dv)
