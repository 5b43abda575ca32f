"""The OPC UA driver: batched reads, typed writes, method calls and subscriptions on one
server, reconnecting by itself (``drivers.opcua_connection``).

While disconnected, every ``observe()`` stream yields its tags once with bad quality (status
``disconnected``, last value kept) and resumes on the new connection, where its subscription is
made again on nodes resolved again (a restarted server may number them differently). Reads,
writes and calls wait up to ``timeout`` (wall-clock seconds) for the reconnection, then raise
``DeviceUnavailable``; a server that does not answer a request raises ``DeviceTimeout``.

Reads and writes interrupted by a connection loss are retried once on the new connection within
the same ``timeout``; method calls are not (a method such as StartProgram must not run twice).
Values are converted to the node's DataType (``drivers.opcua_values``): a Python ``int`` written
to a Double variable goes out as Double, as a spec-following server requires.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

import structlog
from asyncua import ua

from drivers.base import DriverBase, Sample, Value
from drivers.clock import Clock
from drivers.errors import ConfigurationError, MethodFailed, WriteRefused
from drivers.opcua_browse import browse
from drivers.opcua_connection import Connection, Connector, status_name
from drivers.opcua_nodes import ResolvedMethod, ResolvedPoint, check_method, check_point
from drivers.opcua_observe import Observation, SampleMaker
from drivers.opcua_security import check_security
from drivers.opcua_values import plain_value, to_variant
from drivers.points import OpcUaMethod, OpcUaPoint, RetryPolicy, SecurityConfig

__all__ = ["OpcUaDriver", "browse"]

log = structlog.get_logger(__name__)

T = TypeVar("T")
DISCONNECTED = "disconnected"
_VALUE = ua.AttributeIds.Value


class OpcUaDriver(DriverBase):
    """Driver for one OPC UA server (see the module docstring for connection handling)."""

    def __init__(
        self,
        name: str,
        endpoint: str,
        points: Sequence[OpcUaPoint],
        methods: Sequence[OpcUaMethod] = (),
        *,
        clock: Clock,
        security: SecurityConfig = SecurityConfig(),
        timeout: float = 4.0,
        retry: RetryPolicy = RetryPolicy(),
        publishing_interval_ms: float = 250,
        queue_size: int = 1000,
    ) -> None:
        self.name = name
        if not endpoint.startswith("opc.tcp://"):
            raise ConfigurationError(name, f"endpoint {endpoint!r} is not an opc.tcp:// URL")
        if timeout <= 0 or publishing_interval_ms <= 0 or queue_size < 1:
            raise ConfigurationError(
                name, "timeout, publishing interval and queue size must be positive"
            )
        self._points = _unique(name, "tag", {p.tag: p for p in points}, len(points))
        self._methods = _unique(name, "method", {m.name: m for m in methods}, len(methods))
        for point in points:
            check_point(name, point)
        for method in methods:
            check_method(name, method)
        check_security(name, security)
        self.endpoint = endpoint
        self._interval = publishing_interval_ms
        self._queue_size = queue_size
        self._log = log.bind(device=name)
        self._samples = SampleMaker(clock)
        self._observations: set[Observation] = set()
        self._connector = Connector(
            name,
            endpoint,
            points,
            methods,
            clock=clock,
            security=security,
            timeout=timeout,
            retry=retry,
            on_open=self._attach_all,
            on_lost=self._mark_lost,
        )

    @property
    def connected(self) -> bool:
        """Whether a session with the server is established right now."""
        return self._connector.connection is not None

    async def connect(self) -> None:
        """Connect and resolve every point and method; raises ``DeviceUnavailable``,
        ``DeviceTimeout`` or ``ConfigurationError`` (e.g. a node that does not exist)."""
        await self._connector.start()

    async def close(self) -> None:
        """Stop reconnecting, end every observe() stream and close the session."""
        self._connector.closing = True
        for obs in list(self._observations):
            obs.close()
        await self._connector.close()

    async def _attach_all(self, conn: Connection) -> None:
        for obs in list(self._observations):
            await obs.attach(conn.client, conn.points)

    def _mark_lost(self) -> None:
        for obs in list(self._observations):
            obs.lost(DISCONNECTED)

    def _known(self, tags: Sequence[str]) -> list[str]:
        unknown = [t for t in tags if t not in self._points]
        if unknown:
            raise ConfigurationError(self.name, f"unknown tag(s) {', '.join(map(repr, unknown))}")
        return list(dict.fromkeys(tags))

    async def read(self, tags: Sequence[str]) -> dict[str, Sample]:
        """Read the tags in one Read request; each server status becomes the sample's quality."""
        wanted = self._known(tags)
        if not wanted:
            return {}

        async def op(conn: Connection) -> list[ua.DataValue]:
            params = ua.ReadParameters(TimestampsToReturn=ua.TimestampsToReturn.Both)
            for tag in wanted:
                params.NodesToRead.append(
                    ua.ReadValueId(
                        NodeId=conn.points[tag].node_id, AttributeId=ua.AttributeIds.Value
                    )
                )
            return list(await conn.client.uaclient.read(params))

        values = await self._connector.request(f"read {', '.join(wanted)}", op, retry=True)
        return {
            tag: self._samples.from_datavalue(tag, dv)
            for tag, dv in zip(wanted, values, strict=True)
        }

    async def write(self, tag: str, value: Value) -> None:
        """Write ``value`` typed as the node's DataType; a refusal raises ``WriteRefused``."""
        self._known([tag])

        async def op(conn: Connection) -> tuple[ResolvedPoint, ua.StatusCode]:
            point = conn.points[tag]
            try:
                variant = to_variant(value, point.variant_type, point.value_rank)
            except ValueError as exc:
                raise WriteRefused(self.name, f"{_where(tag, point)} = {value!r}: {exc}") from exc
            params = ua.WriteParameters(
                NodesToWrite=[
                    ua.WriteValue(
                        NodeId=point.node_id,
                        AttributeId=ua.AttributeIds.Value,
                        Value=ua.DataValue(Value=variant, StatusCode=None),
                    )
                ]
            )
            return point, (await conn.client.uaclient.write(params))[0]

        point, status = await self._connector.request(f"write {tag}", op, retry=True)
        if not status.is_good():
            raise WriteRefused(
                self.name, f"{_where(tag, point)} = {value!r} refused by the server: {status.name}"
            )
        self._log.debug("opcua_write", tag=tag, value=value)

    async def call(self, method: str, *args: Value) -> list[Value]:
        """Call a configured method with arguments typed per its InputArguments; returns the
        output arguments. A bad status (or arguments that do not fit) raises ``MethodFailed``."""
        if method not in self._methods:
            raise ConfigurationError(self.name, f"unknown method {method!r}")

        async def op(conn: Connection) -> tuple[ResolvedMethod, ua.CallMethodResult]:
            resolved = conn.methods[method]
            request = ua.CallMethodRequest(
                ObjectId=resolved.object_id,
                MethodId=resolved.method_id,
                InputArguments=self._arguments(resolved, args),
            )
            return resolved, (await conn.client.uaclient.call([request]))[0]

        resolved, result = await self._connector.request(f"call {method}", op, retry=False)
        if result.StatusCode.is_bad():
            bad_args = [
                f"{arg.name}: {status.name}"
                for arg, status in zip(
                    resolved.inputs, result.InputArgumentResults or [], strict=False
                )
                if status.is_bad()
            ]
            detail = f" ({'; '.join(bad_args)})" if bad_args else ""
            raise MethodFailed(
                self.name,
                f"call {method}{_args_text(args)} on {resolved.address} failed: "
                f"{result.StatusCode.name}{detail}",
            )
        self._log.info("opcua_method_called", method=method, args=list(args))
        return [plain_value(v) for v in result.OutputArguments or []]

    def _arguments(self, resolved: ResolvedMethod, args: Sequence[Value]) -> list[ua.Variant]:
        if len(args) != len(resolved.inputs):
            signature = ", ".join(f"{a.name}: {a.variant_type.name}" for a in resolved.inputs)
            raise MethodFailed(
                self.name,
                f"call {resolved.name}{_args_text(args)}: takes {len(resolved.inputs)} "
                f"argument(s) ({signature}), got {len(args)}",
            )
        variants = []
        for arg, value in zip(resolved.inputs, args, strict=True):
            try:
                variants.append(to_variant(value, arg.variant_type, arg.value_rank))
            except ValueError as exc:
                raise MethodFailed(
                    self.name, f"call {resolved.name}: argument {arg.name} = {value!r}: {exc}"
                ) from exc
        return variants

    # ---------------------------------------------------------------- subscriptions

    def observe(self, tags: Sequence[str]) -> AsyncIterator[Sample]:
        """Stream samples of ``tags`` from a subscription of their own (see module docstring).

        End it early with ``aclose()`` (or ``contextlib.aclosing``): that deletes its
        subscription on the server.
        """
        wanted = self._known(tags)
        obs = Observation(
            self.name,
            wanted,
            self._points,
            self._samples,
            self._interval,
            max(self._queue_size, 2 * len(wanted)),
        )
        return self._stream(obs)

    async def _stream(self, obs: Observation) -> AsyncIterator[Sample]:
        connector = self._connector
        async with connector.lock:
            self._observations.add(obs)
            conn = connector.connection
            if connector.closing:
                obs.close()
            elif conn is None:
                obs.lost(DISCONNECTED)
            else:
                try:
                    await obs.attach(conn.client, conn.points)
                except (ConnectionError, OSError, TimeoutError) as exc:
                    connector.signal_lost(conn.client, exc)
                    obs.lost(DISCONNECTED)
                except ua.UaStatusCodeError as exc:
                    self._log.error("opcua_subscription_refused", status=status_name(exc))
                    obs.lost(status_name(exc))
        try:
            while (sample := await obs.queue.get()) is not None:
                yield sample
        finally:
            self._observations.discard(obs)
            await obs.detach()


def _unique(device: str, kind: str, items: dict[str, T], count: int) -> dict[str, T]:
    if len(items) != count:
        raise ConfigurationError(device, f"duplicate {kind} names")
    return items


def _where(tag: str, point: ResolvedPoint) -> str:
    return f"write {tag} ({point.address}, node {point.node_id.to_string()})"


def _args_text(args: Sequence[Value]) -> str:
    return "(" + ", ".join(repr(a) for a in args) + ")"
