"""Driver throughput beside the raw protocol library doing the same work, in the same run."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from asyncua import Client, Server, ua
from pymodbus.client import AsyncModbusTcpClient

from drivers.clock import SystemClock
from drivers.modbus import ModbusDriver
from drivers.opcua import OpcUaDriver
from drivers.points import ModbusPoint, ModbusTable, ModbusType, OpcUaPoint
from tests.conftest import free_port

N_NODES = 100


async def _rate(fn: Any, seconds: float) -> float:
    """Calls of ``fn`` per second, flat out for ``seconds`` after one warm-up call."""
    await fn()
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        await fn()
        n += 1
    return n / elapsed


async def _opcua_server(port: int) -> tuple[Server, list[Any]]:
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/bench")
    idx = await server.register_namespace("urn:bedside:bench")
    folder = await server.nodes.objects.add_object(idx, "Bench")
    nodes = [await folder.add_variable(idx, f"V{i}", 0.0) for i in range(N_NODES)]
    await server.start()
    return server, nodes


async def opcua(seconds: float) -> dict[str, float]:
    """Values/s read and notifications/s observed: raw asyncua vs the driver."""
    port = free_port()
    server, nodes = await _opcua_server(port)
    url = f"opc.tcp://127.0.0.1:{port}/bench"
    out: dict[str, float] = {}
    stop = asyncio.Event()

    async def churn() -> None:  # the server changes every value as fast as it can
        v = 0.0
        while not stop.is_set():
            v += 1.0
            for node in nodes:
                await server.write_attribute_value(
                    node.nodeid, ua.DataValue(ua.Variant(v, ua.VariantType.Double))
                )
            await asyncio.sleep(0)

    try:
        async with Client(url) as client:
            cnodes = [client.get_node(n.nodeid) for n in nodes]
            out["opcua_raw_values_per_s"] = N_NODES * await _rate(
                lambda: client.read_values(cnodes), seconds
            )
        points = [
            OpcUaPoint(f"v{i}", node_id=n.nodeid.to_string(), sampling_interval_ms=0)
            for i, n in enumerate(nodes)
        ]
        tags = [p.tag for p in points]
        async with OpcUaDriver(
            "bench", url, points, clock=SystemClock(), publishing_interval_ms=20
        ) as drv:
            out["opcua_driver_values_per_s"] = N_NODES * await _rate(
                lambda: drv.read(tags), seconds
            )

        churner = asyncio.create_task(churn())
        try:
            # raw subscription
            count = 0

            class Handler:
                def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
                    nonlocal count
                    count += 1

            async with Client(url) as client:
                sub = await client.create_subscription(20, Handler())
                # queue size 1, as the driver asks: the newest value of each tag per publish
                await sub.subscribe_data_change(
                    [client.get_node(n.nodeid) for n in nodes], sampling_interval=0, queuesize=1
                )
                await asyncio.sleep(0.5)
                count, t0 = 0, time.perf_counter()
                await asyncio.sleep(seconds)
                out["opcua_raw_notifications_per_s"] = count / (time.perf_counter() - t0)
                await sub.delete()
            async with OpcUaDriver(
                "bench", url, points, clock=SystemClock(), publishing_interval_ms=20
            ) as drv:
                stream = drv.observe(tags)
                got, t0, warm = 0, 0.0, True
                start = time.perf_counter()
                async for _ in stream:
                    now = time.perf_counter()
                    if warm and now - start > 0.5:
                        warm, got, t0 = False, 0, now
                    got += 1
                    if not warm and now - t0 >= seconds:
                        break
                await stream.aclose()  # type: ignore[attr-defined]
                out["opcua_driver_notifications_per_s"] = got / (time.perf_counter() - t0)
        finally:
            stop.set()
            await churner
    finally:
        await server.stop()
    return out


async def modbus(seconds: float) -> dict[str, float]:
    """Registers/s read: raw pymodbus vs the driver (100 uint16 tags merged into one request)."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    port = free_port()
    bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
    holding = [SimData(0, values=list(range(N_NODES)), datatype=DataType.UINT16)]
    device = SimDevice(1, simdata=(bits, bits, holding, holding))
    server = ModbusTcpServer(device, address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    out: dict[str, float] = {}
    try:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
        await client.connect()
        out["modbus_raw_registers_per_s"] = N_NODES * await _rate(
            lambda: client.read_holding_registers(0, count=N_NODES, device_id=1), seconds
        )
        client.close()
        points = [
            ModbusPoint(f"r{i}", ModbusTable.HOLDING_REGISTER, i, ModbusType.UINT16)
            for i in range(N_NODES)
        ]
        tags = [p.tag for p in points]
        async with ModbusDriver(
            "bench", f"tcp://127.0.0.1:{port}", points, clock=SystemClock()
        ) as drv:
            out["modbus_driver_registers_per_s"] = N_NODES * await _rate(
                lambda: drv.read(tags), seconds
            )
    finally:
        await server.shutdown()
    return out
