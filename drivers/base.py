"""The driver contract: a ``Sample`` of a tag, its ``Quality``, and the ``Driver`` protocol.

A driver is built for one device from frozen point definitions (``drivers.points``) and is an
async context manager::

    async with driver:                       # connect() ... close()
        samples = await driver.read(["temperature"])
        await driver.write("temperature_sp", 37.0)
        async for sample in driver.observe(["temperature", "do"]):
            ...
        result = await driver.call("start_program", "wash", 3)

``observe`` yields samples as they arrive (OPC UA subscriptions; Modbus and serial polling). Its
stream is bounded: when the consumer falls behind, the oldest queued sample of the same tag is
dropped (the latest value of a tag always wins), and a change of quality is never dropped.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, NamedTuple, Protocol, Self, runtime_checkable


class Quality(enum.StrEnum):
    """OPC UA-style quality of a value: good, uncertain or bad."""

    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"


Value = bool | int | float | str | None


class Sample(NamedTuple):
    """One value of one tag; immutable.

    ``source_time`` is when the device says the value was taken (``None`` where the protocol has
    no timestamps); ``agent_time`` is when the agent received it, from the injected clock.
    A bad sample keeps the last known value (or ``None``) and says why in ``status``.

    A named tuple rather than a frozen dataclass: drivers build one per value on the hot path,
    and a tuple is built about three times faster. ``sample._replace(...)`` gives a changed copy.
    """

    tag: str
    value: Value
    quality: Quality
    agent_time: datetime
    source_time: datetime | None = None
    status: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (times in RFC 3339 with microseconds)."""
        return {
            "tag": self.tag,
            "value": self.value,
            "quality": self.quality.value,
            "source_time": self.source_time.isoformat(timespec="microseconds")
            if self.source_time
            else None,
            "agent_time": self.agent_time.isoformat(timespec="microseconds"),
            **({"status": self.status} if self.status else {}),
        }


@runtime_checkable
class Driver(Protocol):
    """What every device driver offers. Failures raise ``drivers.errors.DriverError``."""

    name: str

    async def connect(self) -> None:
        """Open the connection; raises ``DeviceUnavailable`` when the device cannot be reached."""
        ...

    async def close(self) -> None:
        """Close the connection and stop background tasks; safe to call twice."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def read(self, tags: Sequence[str]) -> dict[str, Sample]:
        """Read the named tags now. A tag the device reports as bad comes back with bad quality;
        a device that cannot be reached raises."""
        ...

    async def write(self, tag: str, value: Value) -> None:
        """Write one tag; raises ``WriteRefused`` when the device refuses it."""
        ...

    def observe(self, tags: Sequence[str]) -> AsyncIterator[Sample]:
        """Yield samples of the tags as they change (or at the poll interval), forever.

        While the device is unreachable the stream yields the tags once with bad quality and
        resumes with good values after reconnection; it ends only when the driver closes.
        """
        ...

    async def call(self, method: str, *args: Value) -> list[Value]:
        """Call a device method (where the protocol has methods) and return its outputs."""
        ...


class DriverBase:
    """Shared plumbing: the async context manager around ``connect``/``close``."""

    name: str

    async def connect(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

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
