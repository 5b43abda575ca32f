"""Streams of samples for ``OpcUaDriver.observe``: the bounded sample queue and one OPC UA
subscription per stream.

Each ``observe()`` call gets its own ``Observation``: a subscription on the current connection
with one monitored item per tag (sampling interval and absolute deadband from the point, queue
size 1, discard oldest), delivering into a ``SampleQueue``. The driver attaches every live
observation to each new connection, so subscriptions survive a server restart even when the
server assigns new NodeIds, and marks them lost when the connection drops. With queue size 1 the
server keeps only the latest value of an item, so a stream carries at most one sample per tag per
publishing interval (by design: a value changing faster than that is coalesced at the server).

``SampleQueue`` implements the overflow policy of ``drivers.base``: when full, the oldest queued
sample of the same tag that is not a change of quality is dropped (the latest value of a tag
always wins); if that tag has none, the oldest such sample of any tag; a change of quality is
never dropped (the queue may then grow past its bound, by at most one entry per change).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from asyncua import Client, Node, ua
from asyncua.common.subscription import DataChangeNotif, Subscription

from drivers.base import Quality, Sample, Value
from drivers.clock import Clock
from drivers.opcua_nodes import ResolvedPoint
from drivers.opcua_values import plain_value, quality_of, source_time_of
from drivers.points import OpcUaPoint

log = structlog.get_logger(__name__)
_VALUE = ua.AttributeIds.Value


class SampleQueue:
    """A bounded FIFO of samples with the drivers' overflow policy (see module docstring)."""

    def __init__(self, maxsize: int) -> None:
        self._maxsize = max(1, maxsize)
        # (sample, is a change of quality); plain tuples: one is built per notification
        self._items: collections.deque[tuple[Sample, bool]] = collections.deque()
        self._quality: dict[str, Quality] = {}
        self._ready = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def last_quality(self, tag: str) -> Quality | None:
        """Quality of the last sample of ``tag`` put in (``None`` before the first)."""
        return self._quality.get(tag)

    def put(self, sample: Sample) -> None:
        """Queue ``sample``; never blocks (drops per the overflow policy when full)."""
        if self._closed:
            return
        tag, quality = sample.tag, sample.quality
        change = self._quality.get(tag) is not quality
        self._quality[tag] = quality
        if len(self._items) >= self._maxsize:
            self._drop_one(tag)
        self._items.append((sample, change))
        self._ready.set()

    def _drop_one(self, tag: str) -> None:
        # One pass: the first droppable sample of ``tag`` wins, else the first droppable one.
        victim = -1
        for index, (queued, quality_change) in enumerate(self._items):
            if quality_change:
                continue
            if queued.tag == tag:
                victim = index
                break
            if victim < 0:
                victim = index
        if victim >= 0:
            del self._items[victim]
            self.dropped += 1

    async def get(self) -> Sample | None:
        """The next sample; ``None`` once the queue is closed and drained."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()[0]

    def close(self) -> None:
        """End the stream: ``get`` returns what is queued, then ``None``."""
        self._closed = True
        self._ready.set()


class SampleMaker:
    """Builds samples for one driver, remembering each tag's last known value for bad samples."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._last: dict[str, Value] = {}

    def from_datavalue(self, tag: str, dv: ua.DataValue) -> Sample:
        """A sample of a DataValue: its status as quality, its source timestamp."""
        quality, status = quality_of(dv.StatusCode)
        value = plain_value(dv.Value)
        if quality is Quality.BAD and value is None:
            value = self._last.get(tag)
        elif value is not None:
            self._last[tag] = value
        return Sample(tag, value, quality, self._clock.now(), source_time_of(dv), status)

    def bad(self, tag: str, status: str) -> Sample:
        """A bad sample keeping the tag's last known value."""
        return Sample(tag, self._last.get(tag), Quality.BAD, self._clock.now(), None, status)


def subscription_parameters(publishing_interval_ms: float) -> ua.CreateSubscriptionParameters:
    """Subscription parameters: keep-alive about every 5 s, lifetime six keep-alives."""
    keepalive = max(1, round(5000 / publishing_interval_ms))
    return ua.CreateSubscriptionParameters(
        RequestedPublishingInterval=publishing_interval_ms,
        RequestedLifetimeCount=keepalive * 6,
        RequestedMaxKeepAliveCount=keepalive,
        MaxNotificationsPerPublish=0,
        PublishingEnabled=True,
        Priority=0,
    )


class Observation:
    """One ``observe()`` stream: its tags, queue and subscription on the current connection.

    It is the asyncua subscription handler: notifications arrive through
    ``datachange_notification`` and ``status_change_notification``.
    """

    def __init__(
        self,
        device: str,
        tags: Sequence[str],
        points: Mapping[str, OpcUaPoint],
        samples: SampleMaker,
        publishing_interval_ms: float,
        queue_size: int,
    ) -> None:
        self.device = device
        self.tags = tuple(dict.fromkeys(tags))
        self.queue = SampleQueue(queue_size)
        self._points = points
        self._samples = samples
        self._interval = publishing_interval_ms
        self._sub: Subscription | None = None
        self._handles: dict[int, str] = {}

    @property
    def attached(self) -> bool:
        """Whether a subscription for this stream exists on the current connection."""
        return self._sub is not None

    async def attach(self, client: Client, resolved: Mapping[str, ResolvedPoint]) -> None:
        """Create the subscription and its monitored items on a new connection."""
        sub = await client.create_subscription(subscription_parameters(self._interval), self)
        self._sub = sub
        self._handles = {handle: tag for handle, tag in enumerate(self.tags, start=1)}
        requests = [
            self._item_request(handle, self._points[tag], resolved[tag])
            for handle, tag in self._handles.items()
        ]
        results = await sub.create_monitored_items(requests)
        for tag, result in zip(self.tags, results, strict=True):
            if isinstance(result, ua.StatusCode):
                log.error(
                    "opcua_monitored_item_refused",
                    device=self.device,
                    tag=tag,
                    node=resolved[tag].node_id.to_string(),
                    status=result.name,
                )
                self.queue.put(self._samples.bad(tag, result.name))

    @staticmethod
    def _item_request(
        handle: int, point: OpcUaPoint, resolved: ResolvedPoint
    ) -> ua.MonitoredItemCreateRequest:
        params = ua.MonitoringParameters(
            ClientHandle=handle,
            SamplingInterval=point.sampling_interval_ms,
            QueueSize=1,
            DiscardOldest=True,
        )
        if point.deadband > 0:
            params.Filter = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValue,
                DeadbandType=ua.DeadbandType.Absolute,
                DeadbandValue=point.deadband,
            )
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(
                NodeId=resolved.node_id, AttributeId=ua.AttributeIds.Value
            ),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=params,
        )

    async def detach(self) -> None:
        """Delete the subscription on the server (best effort: the connection may be gone)."""
        sub, self._sub = self._sub, None
        if sub is None:
            return
        try:
            await sub.delete()
        except (ConnectionError, OSError, TimeoutError, ua.UaError) as exc:
            log.debug("opcua_subscription_delete_failed", device=self.device, error=repr(exc))

    def lost(self, status: str) -> None:
        """The connection is gone: forget the subscription, mark every tag bad once."""
        self._sub = None
        for tag in self.tags:
            if self.queue.last_quality(tag) is not Quality.BAD:
                self.queue.put(self._samples.bad(tag, status))

    def close(self) -> None:
        """End the stream (the driver is closing)."""
        self._sub = None
        self.queue.close()

    # asyncua subscription handler interface
    def datachange_notification(self, node: Node, val: Any, data: DataChangeNotif) -> None:
        tag = self._handles.get(data.monitored_item.ClientHandle)
        if tag is None or self._sub is None:
            return
        self.queue.put(self._samples.from_datavalue(tag, data.monitored_item.Value))

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        # BadShutdown comes from asyncua itself when the connection drops; the driver
        # handles that. Anything else (BadTimeout: the server dropped the subscription)
        # is logged; the stale-subscription watchdog or the next reconnect re-creates it.
        code = status.Status
        if code.name != "BadShutdown":
            log.warning("opcua_subscription_status", device=self.device, status=code.name)
