"""The device hub: builds one driver per configured device and is the one door to them.

Every write passes here, where it is checked against the tag's definition (known, writable,
of the right type, inside its limits) *before* anything is sent; a refused write raises
``WriteRefused`` naming the tag, the value and the limits. Reads and observations are routed
to the drivers that own the tags, and the latest sample of every tag is kept; readers see it
through the read-only ``snapshot``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Self

import structlog

from agent.config import (
    ModbusDevice,
    OpcUaDevice,
    SerialDevice,
    TagBase,
    UnitConfig,
    browse_path,
)
from drivers.base import Driver, Quality, Sample, Value
from drivers.clock import Clock
from drivers.errors import ConfigurationError, DeviceUnavailable, DriverError, WriteRefused
from drivers.points import ModbusPoint, OpcUaMethod, OpcUaPoint, SecurityConfig, SerialPoint

log = structlog.get_logger(__name__)


def _path_or_id(text: str) -> tuple[str | None, tuple[str, ...] | None]:
    """A NodeId (``ns=2;i=5``, ``i=85``) or a browse path (``2:A/2:B``)."""
    if text.startswith(("ns=", "i=", "s=", "g=", "b=", "nsu=")):
        return text, None
    return None, browse_path(text)


def build_driver(name: str, config: UnitConfig, clock: Clock) -> Driver:
    """The driver for one configured device (the composition root calls this)."""
    dev = config.devices[name]
    if isinstance(dev, OpcUaDevice):
        from drivers.opcua import OpcUaDriver

        points = []
        for tag, t in dev.tags.items():
            node_id, path = (t.node_id, None) if t.node_id else _path_or_id(t.browse_path or "")
            points.append(
                OpcUaPoint(
                    tag,
                    node_id=node_id,
                    browse_path=path,
                    sampling_interval_ms=t.sampling_interval * 1000,
                    deadband=t.deadband,
                )
            )
        methods = []
        for mname, m in dev.methods.items():
            obj_id, obj_path = _path_or_id(m.object)
            met_id, met_path = _path_or_id(m.method)
            methods.append(
                OpcUaMethod(
                    mname,
                    object_node_id=obj_id,
                    object_browse_path=obj_path,
                    method_node_id=met_id,
                    method_browse_path=met_path,
                )
            )
        sec = dev.security
        security = SecurityConfig(
            policy=sec.policy,
            mode=sec.mode,
            certificate=str(config.resolve(sec.certificate)) if sec.certificate else None,
            private_key=str(config.resolve(sec.private_key)) if sec.private_key else None,
            server_certificate=str(config.resolve(sec.server_certificate))
            if sec.server_certificate
            else None,
        )
        return OpcUaDriver(
            name, dev.endpoint, points, methods, clock=clock, security=security, timeout=dev.timeout
        )
    if isinstance(dev, ModbusDevice):
        from drivers.modbus import ModbusDriver

        mpoints = [
            ModbusPoint(
                tag,
                t.table,
                t.address,
                t.data_type,
                t.unit_id,
                t.word_order,
                t.byte_order,
                t.scale,
                t.offset,
            )
            for tag, t in dev.tags.items()
        ]
        return ModbusDriver(
            name,
            dev.endpoint,
            mpoints,
            clock=clock,
            timeout=dev.timeout,
            retries=dev.retries,
            poll_interval=dev.poll_interval,
            baudrate=dev.baudrate,
            parity=dev.parity,
        )
    if isinstance(dev, SerialDevice):
        from drivers.mtsics import MtSicsBalance

        spoints = [SerialPoint(tag, t.command) for tag, t in dev.tags.items()]
        return MtSicsBalance(
            name,
            str(config.resolve(dev.endpoint)),
            spoints,
            clock=clock,
            baudrate=dev.baudrate,
            timeout=dev.timeout,
            poll_interval=dev.poll_interval,
        )
    raise ConfigurationError(name, f"unsupported driver {dev.driver!r}")  # pragma: no cover


def check_write(device: str, tag: str, definition: TagBase, value: Value) -> Value:
    """The value to send for a write to ``tag``, or ``WriteRefused`` saying why not.

    Refuses read-only tags, values of the wrong type, NaN and infinities, and values outside the
    tag's limits. Ints are accepted for float tags (and sent as floats).
    """
    if not definition.writable:
        raise WriteRefused(device, f"tag {tag!r} is read-only; refused to write {value!r}")
    kind = definition.type
    if kind == "bool":
        if not isinstance(value, bool):
            raise WriteRefused(device, f"tag {tag!r} takes true or false, not {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise WriteRefused(device, f"tag {tag!r} takes text, not {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WriteRefused(device, f"tag {tag!r} takes a number, not {value!r}")
    if kind == "int" and not float(value).is_integer():
        raise WriteRefused(device, f"tag {tag!r} takes a whole number, not {value!r}")
    if not math.isfinite(value):
        raise WriteRefused(device, f"tag {tag!r}: {value!r} is not a finite number")
    if definition.limits is not None:
        lo, hi = definition.limits
        if not lo <= value <= hi:
            raise WriteRefused(
                device,
                f"tag {tag!r}: {value} {definition.unit} is outside its limits "
                f"[{lo}, {hi}] {definition.unit}; nothing was sent".replace("  ", " "),
            )
    return int(value) if kind == "int" else float(value)


class DeviceHub:
    """All of a unit's drivers behind one interface, with limit-checked writes.

    ``devices`` limits the hub to some devices (the commissioning CLI connects only the
    devices whose tags it was asked for).
    """

    def __init__(
        self,
        config: UnitConfig,
        clock: Clock,
        devices: Iterable[str] | None = None,
        *,
        drivers: Mapping[str, Driver] | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        if drivers is not None:  # given (a test's FakeDriver): one per configured device
            unknown = set(drivers) - set(config.devices)
            if unknown:
                raise ConfigurationError(
                    ", ".join(sorted(unknown)), "driver given for a device the unit does not have"
                )
            self.drivers: dict[str, Driver] = dict(drivers)
        else:
            names = list(devices) if devices is not None else list(config.devices)
            self.drivers = {n: build_driver(n, config, clock) for n in names}
        self._latest: dict[str, Sample] = {}
        self._snapshot: Mapping[str, Sample] = MappingProxyType(self._latest)

    @property
    def snapshot(self) -> Mapping[str, Sample]:
        """The latest sample of every tag seen, read-only and live: each ``Sample`` carries its
        value, quality, agent and source timestamps. Only the hub writes it."""
        return self._snapshot

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self, *, required: bool = True) -> None:
        """Connect every driver; with ``required`` a device that cannot be reached raises."""
        for name, drv in self.drivers.items():
            try:
                await drv.connect()
            except DriverError:
                if required:
                    await self.close()
                    raise
                log.warning("device_unavailable_at_start", device=name)

    async def close(self) -> None:
        for drv in self.drivers.values():
            try:
                await drv.close()
            except DriverError:  # pragma: no cover - close is best effort
                log.exception("device_close_failed", device=drv.name)

    def _by_device(self, tags: Sequence[str]) -> dict[str, list[str]]:
        owned: dict[str, list[str]] = {}
        for tag in tags:
            dev, _ = self.config.tag(tag)
            if dev not in self.drivers:
                raise ConfigurationError(
                    dev, f"tag {tag!r} belongs to a device this hub does not drive"
                )
            owned.setdefault(dev, []).append(tag)
        return owned

    async def read(self, tags: Sequence[str]) -> dict[str, Sample]:
        """Read tags from their devices (one request per device where the protocol allows)."""
        out: dict[str, Sample] = {}
        for dev, dev_tags in self._by_device(tags).items():
            out.update(await self.drivers[dev].read(dev_tags))
        self._latest.update(out)
        return {t: out[t] for t in tags if t in out}

    async def write(self, tag: str, value: Value) -> Value:
        """Write a tag after checking it against its definition; returns the value sent."""
        dev, definition = self.config.tag(tag)
        sent = check_write(dev, tag, definition, value)
        if dev not in self.drivers:
            raise ConfigurationError(
                dev, f"tag {tag!r} belongs to a device this hub does not drive"
            )
        log.info("tag_write", device=dev, tag=tag, value=sent, unit=definition.unit)
        await self.drivers[dev].write(tag, sent)
        return sent

    async def call(self, device: str, method: str, *args: Value) -> list[Value]:
        """Call a device method."""
        if device not in self.drivers:
            raise ConfigurationError(device, f"no such device; devices: {', '.join(self.drivers)}")
        return await self.drivers[device].call(method, *args)

    async def observe(self, tags: Sequence[str], maxsize: int = 10_000) -> AsyncIterator[Sample]:
        """Samples of the tags from all their devices, merged in arrival order.

        Each device is observed by its own task; a device that fails is reported with BAD
        samples for its tags and observed again after a pause. The merged queue is bounded:
        when full, the producer waits (devices are polled or subscribed, so waiting drops
        nothing but intermediate values the driver itself coalesces).
        """
        queue: asyncio.Queue[Sample] = asyncio.Queue(maxsize)

        async def pump(dev: str, dev_tags: list[str]) -> None:
            drv = self.drivers[dev]
            delay = 0.5
            while True:
                try:
                    async for sample in drv.observe(dev_tags):
                        delay = 0.5
                        await queue.put(sample)
                    # the stream ended (the driver closed): look again after a pause, never in
                    # a tight loop
                    await self.clock.sleep(delay)
                except DeviceUnavailable as exc:
                    log.warning("observe_failed", device=dev, error=str(exc))
                    now = self.clock.now()
                    for t in dev_tags:
                        last = self._latest.get(t)
                        await queue.put(
                            Sample(
                                t,
                                last.value if last else None,
                                Quality.BAD,
                                now,
                                status=f"unavailable: {exc.detail}",
                            )
                        )
                    await self.clock.sleep(delay)
                    delay = min(delay * 2, 10.0)

        tasks = [
            asyncio.create_task(pump(d, ts), name=f"observe-{d}")
            for d, ts in self._by_device(tags).items()
        ]
        try:
            while True:
                sample = await queue.get()
                self._latest[sample.tag] = sample
                yield sample
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
