"""The OPC UA driver against real servers on loopback: plain asyncua servers, an open62541
server (PyPI ``o6``, when installed), a silent TCP peer and a proxy that goes quiet."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from asyncua import ua
from structlog.testing import capture_logs

from drivers.base import Driver, Quality, Sample, Value
from drivers.clock import SystemClock
from drivers.errors import (
    ConfigurationError,
    DeviceTimeout,
    DeviceUnavailable,
    MethodFailed,
    WriteRefused,
)
from drivers.opcua import OpcUaDriver, browse
from drivers.opcua_observe import SampleQueue
from drivers.opcua_values import to_variant
from drivers.points import OpcUaMethod, OpcUaPoint, RetryPolicy, SecurityConfig
from tests.conftest import free_port
from tests.opcua_helpers import (
    CLIENT_URI,
    NAMESPACE,
    O6_URI,
    SERVER_URI,
    PlainServer,
    Proxy,
    ThreadedServer,
    bad,
    eventually,
    good,
    make_certificate,
    next_matching,
    silent_server,
)

FAST_RETRY = RetryPolicy(initial=0.05, factor=2.0, maximum=0.2)


def reactor(name: str, *, deadband: float = 0.0) -> OpcUaPoint:
    return OpcUaPoint(
        name.lower(),
        browse_path=("2:Reactor", f"2:{name}"),
        sampling_interval_ms=20,
        deadband=deadband,
    )


POINTS = [reactor(n) for n in ("Temperature", "Setpoint", "Stirrer", "Mode", "Locked")]
MULTIPLY = OpcUaMethod(
    "multiply", object_browse_path=("2:Reactor",), method_browse_path=("2:Reactor", "2:Multiply")
)


def make_driver(
    endpoint: str,
    points: list[OpcUaPoint] | None = None,
    *,
    timeout: float = 1.0,
    security: SecurityConfig = SecurityConfig(),
) -> OpcUaDriver:
    return OpcUaDriver(
        "reactor-1",
        endpoint,
        POINTS if points is None else points,
        [MULTIPLY],
        clock=SystemClock(),
        security=security,
        timeout=timeout,
        retry=FAST_RETRY,
        publishing_interval_ms=50,
    )


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ThreadedServer]:
    srv = ThreadedServer(free_port())
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
async def server(shared_server: ThreadedServer) -> ThreadedServer:
    """The module's shared server, its values reset to the initial ones."""
    await shared_server.reset()
    return shared_server


@pytest.fixture
async def driver(server: ThreadedServer) -> AsyncIterator[OpcUaDriver]:
    async with make_driver(server.endpoint) as drv:
        yield drv


# ------------------------------------------------------------------ configuration (no I/O)


def test_driver_satisfies_protocol() -> None:
    """OpcUaDriver implements the drivers.base.Driver protocol."""
    assert isinstance(make_driver("opc.tcp://127.0.0.1:4840"), Driver)


@pytest.mark.parametrize(
    ("points", "security", "fragment"),
    [
        ([OpcUaPoint("t")], SecurityConfig(), "exactly one of node_id and browse_path"),
        ([OpcUaPoint("t", node_id="ns=2;x=1")], SecurityConfig(), "cannot parse"),
        ([OpcUaPoint("t", node_id="i=1"), OpcUaPoint("t", node_id="i=2")], SecurityConfig(), "dup"),
        ([], SecurityConfig(policy="Basic256Sha256", mode="None"), "Sign or SignAndEncrypt"),
        ([], SecurityConfig(policy="Basic256Sha256", mode="Sign"), "certificate and a private"),
        ([], SecurityConfig(policy="None", mode="SignAndEncrypt"), "needs a policy"),
        ([], SecurityConfig(policy="Basic128Rsa15", mode="Sign"), "unknown security policy"),
    ],
)
def test_invalid_configuration_is_refused_at_construction(
    points: list[OpcUaPoint], security: SecurityConfig, fragment: str
) -> None:
    """Impossible points and security combinations raise ConfigurationError before any I/O."""
    with pytest.raises(ConfigurationError, match=fragment):
        make_driver("opc.tcp://127.0.0.1:4840", points, security=security)


def sample(tag: str, value: float, quality: Quality = Quality.GOOD) -> Sample:
    return Sample(tag, value, quality, datetime(2026, 1, 1, tzinfo=UTC))


async def test_queue_overflow_drops_the_oldest_value_of_the_same_tag() -> None:
    """A full stream queue drops the oldest plain value of the tag being added."""
    queue = SampleQueue(3)
    for s in (sample("a", 1), sample("a", 2), sample("b", 1), sample("a", 3)):
        queue.put(s)
    queue.close()
    assert [(s.tag, s.value) async for s in _drain(queue)] == [("a", 1), ("b", 1), ("a", 3)]
    assert queue.dropped == 1


async def test_queue_overflow_never_drops_a_change_of_quality() -> None:
    """Quality changes stay queued even past the bound."""
    queue = SampleQueue(2)
    for quality in (Quality.GOOD, Quality.BAD, Quality.GOOD):
        queue.put(sample("a", 1, quality))
    queue.close()
    assert [s.quality async for s in _drain(queue)] == [Quality.GOOD, Quality.BAD, Quality.GOOD]


async def _drain(queue: SampleQueue) -> AsyncIterator[Sample]:
    while (item := await queue.get()) is not None:
        yield item


@pytest.mark.parametrize(
    ("value", "vtype", "expected"),
    [
        (38, ua.VariantType.Double, ua.Variant(38.0, ua.VariantType.Double)),
        (2.0, ua.VariantType.UInt32, ua.Variant(2, ua.VariantType.UInt32)),
        (True, ua.VariantType.Boolean, ua.Variant(True, ua.VariantType.Boolean)),
        ("x", ua.VariantType.String, ua.Variant("x", ua.VariantType.String)),
        (1.5, ua.VariantType.Variant, ua.Variant(1.5, ua.VariantType.Double)),
    ],
)
def test_values_are_converted_to_the_node_data_type(
    value: Value, vtype: ua.VariantType, expected: ua.Variant
) -> None:
    """Values become variants of the node's builtin type, including int to Double."""
    assert to_variant(value, vtype) == expected


@pytest.mark.parametrize(
    ("value", "vtype"),
    [
        (-1, ua.VariantType.Byte),
        (2.5, ua.VariantType.Int32),
        (True, ua.VariantType.Double),
        (1, ua.VariantType.Boolean),
        (5, ua.VariantType.String),
        (1e39, ua.VariantType.Float),
    ],
)
def test_values_that_do_not_fit_are_refused(value: Value, vtype: ua.VariantType) -> None:
    """Values of the wrong kind or out of the type's range raise ValueError naming the type."""
    with pytest.raises(ValueError, match=vtype.name):
        to_variant(value, vtype)


# ------------------------------------------------------------------ reads


async def test_read_maps_status_codes_to_quality(
    server: ThreadedServer, driver: OpcUaDriver
) -> None:
    """Good, Uncertain and Bad server statuses become good, uncertain and bad quality."""
    first = await driver.read(["temperature"])
    assert first["temperature"].quality is Quality.GOOD
    assert first["temperature"].value == 37.0
    assert first["temperature"].source_time is not None

    await server.set("Temperature", 36.5, ua.StatusCodes.UncertainLastUsableValue)
    uncertain = (await driver.read(["temperature"]))["temperature"]
    assert (uncertain.quality, uncertain.value) == (Quality.UNCERTAIN, 36.5)
    assert uncertain.status == "UncertainLastUsableValue"

    await server.set("Temperature", 0.0, ua.StatusCodes.BadSensorFailure)
    failed = (await driver.read(["temperature"]))["temperature"]
    assert failed.quality is Quality.BAD
    assert failed.status == "BadSensorFailure"
    assert failed.value == 36.5  # the server drops a bad value; the last one is kept


async def test_read_several_tags_at_once(driver: OpcUaDriver) -> None:
    """One read returns a sample for every tag asked, typed as the server sends it."""
    samples = await driver.read(["temperature", "stirrer", "mode"])
    assert {t: s.value for t, s in samples.items()} == {
        "temperature": 37.0,
        "stirrer": 60,
        "mode": "auto",
    }


async def test_addresses_by_node_id_and_namespace_uri(server: ThreadedServer) -> None:
    """NodeIds, nsu= NodeIds and nsu= browse path elements all resolve to the same node."""
    points = [
        OpcUaPoint("by_id", node_id=server.node_id("Temperature")),
        OpcUaPoint("by_nsu_id", node_id=f"nsu={NAMESPACE};i={server.id_base + 1}"),
        OpcUaPoint("by_nsu_path", browse_path=(f"nsu={NAMESPACE};Reactor", "2:Temperature")),
    ]
    async with make_driver(server.endpoint, points) as drv:
        samples = await drv.read(["by_id", "by_nsu_id", "by_nsu_path"])
    assert {s.value for s in samples.values()} == {37.0}


async def test_missing_browse_path_element_is_named(server: ThreadedServer) -> None:
    """A browse path that does not exist raises ConfigurationError naming tag and element."""
    points = [OpcUaPoint("ph", browse_path=("2:Reactor", "2:Probe", "2:pH"))]
    with pytest.raises(ConfigurationError, match=r"tag 'ph'.*fails at '2:Probe'"):
        await make_driver(server.endpoint, points).connect()


async def test_missing_node_id_is_named(server: ThreadedServer) -> None:
    """A NodeId the server does not have raises ConfigurationError naming tag and node."""
    points = [OpcUaPoint("ph", node_id="ns=2;i=999999")]
    with pytest.raises(ConfigurationError, match=r"tag 'ph'.*ns=2;i=999999.*BadNodeIdUnknown"):
        await make_driver(server.endpoint, points).connect()


async def test_unknown_namespace_uri_is_named(server: ThreadedServer) -> None:
    """An nsu= address whose namespace the server lacks raises ConfigurationError naming it."""
    points = [OpcUaPoint("ph", node_id="nsu=urn:nowhere;i=1")]
    with pytest.raises(ConfigurationError, match="no namespace 'urn:nowhere'"):
        await make_driver(server.endpoint, points).connect()


# ------------------------------------------------------------------ writes


async def test_int_written_to_double_node(driver: OpcUaDriver) -> None:
    """A Python int written to a Double variable is sent as Double and accepted."""
    await driver.write("setpoint", 38)
    sample = (await driver.read(["setpoint"]))["setpoint"]
    assert sample.value == 38.0
    assert isinstance(sample.value, float)


async def test_write_to_read_only_node_is_refused(driver: OpcUaDriver) -> None:
    """A server refusal (read-only variable) raises WriteRefused naming tag, node, value, status."""
    with pytest.raises(WriteRefused) as info:
        await driver.write("locked", 2.0)
    message = str(info.value)
    for part in ("reactor-1", "locked", "2:Reactor/2:Locked", "ns=2;i=1005", "2.0"):
        assert part in message
    assert "BadUserAccessDenied" in message


@pytest.mark.parametrize(("value", "reason"), [(70000, "outside the range"), (1.5, "integer")])
async def test_value_that_does_not_fit_the_data_type_is_refused(
    driver: OpcUaDriver, value: float, reason: str
) -> None:
    """A value that does not fit the node's DataType (UInt16) is refused before it is sent."""
    with pytest.raises(WriteRefused, match=reason):
        await driver.write("stirrer", value)
    assert (await driver.read(["stirrer"]))["stirrer"].value == 60


# ------------------------------------------------------------------ methods


async def test_method_call_types_arguments_per_input_arguments(driver: OpcUaDriver) -> None:
    """Python ints passed to Double arguments are sent as Double; outputs come back as a list."""
    assert await driver.call("multiply", 3, 4) == [12.0]


async def test_method_bad_status_raises_method_failed(driver: OpcUaDriver) -> None:
    """A bad status from the method raises MethodFailed with the status name."""
    with pytest.raises(MethodFailed, match=r"multiply\(-3, 4\).*BadInvalidArgument"):
        await driver.call("multiply", -3, 4)


async def test_method_wrong_argument_count_raises_method_failed(driver: OpcUaDriver) -> None:
    """Calling with the wrong number of arguments raises MethodFailed naming the signature."""
    with pytest.raises(MethodFailed, match=r"a: Double, b: Double"):
        await driver.call("multiply", 3)


# ------------------------------------------------------------------ subscriptions


async def test_observe_yields_initial_value_then_changes(
    server: ThreadedServer, driver: OpcUaDriver
) -> None:
    """A stream starts with the current value and follows server-side changes."""
    async with contextlib.aclosing(driver.observe(["temperature"])) as stream:
        assert (await next_matching(stream, good("temperature"))).value == 37.0
        await server.set("Temperature", 36.0)
        sample = await next_matching(stream, good("temperature", 36.0))
        assert sample.source_time is not None


async def test_observe_applies_absolute_deadband(server: ThreadedServer) -> None:
    """Changes within the point's absolute deadband are not reported."""
    points = [reactor("Temperature", deadband=1.0)]
    async with (
        make_driver(server.endpoint, points) as drv,
        contextlib.aclosing(drv.observe(["temperature"])) as stream,
    ):
        await next_matching(stream, good("temperature", 37.0))
        for value in (37.3, 37.6, 39.0):
            await server.set("Temperature", value)
        assert (await next_matching(stream, good("temperature"))).value == 39.0


async def test_concurrent_streams_and_cleanup(server: ThreadedServer, driver: OpcUaDriver) -> None:
    """Two streams get the same changes; closing one deletes its subscription on the server."""
    first = driver.observe(["temperature"])
    second = driver.observe(["temperature", "setpoint"])
    await next_matching(first, good("temperature", 37.0))
    await next_matching(second, good("temperature", 37.0))
    assert server.subscription_count() == 2
    await server.set("Temperature", 35.5)
    await next_matching(first, good("temperature", 35.5))
    await next_matching(second, good("temperature", 35.5))

    await first.aclose()

    async def one_left() -> bool:
        return server.subscription_count() == 1

    await eventually(one_left)
    await server.set("Temperature", 34.0)
    await next_matching(second, good("temperature", 34.0))
    await second.aclose()


async def test_streams_end_when_the_driver_closes(server: ThreadedServer) -> None:
    """Closing the driver ends its streams."""
    drv = make_driver(server.endpoint)
    await drv.connect()
    stream = drv.observe(["temperature"])
    await next_matching(stream, good("temperature"))
    await drv.close()
    assert [s async for s in stream] == []


# ------------------------------------------------------------------ connection loss


async def test_restart_with_new_node_ids_resumes_stream(port: int) -> None:
    """A server restart gives bad samples, then good ones on the new server's renumbered nodes."""
    first = PlainServer(port, id_base=1000)
    await first.start()
    drv = make_driver(first.endpoint)
    try:
        with capture_logs() as logs:
            await drv.connect()
            async with contextlib.aclosing(drv.observe(["temperature", "setpoint"])) as stream:
                await next_matching(stream, good("temperature", 37.0))
                await first.stop()
                lost = await next_matching(stream, bad("temperature"))
                assert lost.status == "disconnected"
                assert lost.value == 37.0

                second = PlainServer(port, id_base=5000)
                await second.start()
                try:
                    await second.set("Temperature", 40.0)
                    await next_matching(stream, good("temperature", 40.0))
                    await drv.write("setpoint", 39)
                    await next_matching(stream, good("setpoint", 39.0))
                finally:
                    await drv.close()
                    await second.stop()
    finally:
        await drv.close()
    events = [e["event"] for e in logs if e.get("device") == "reactor-1"]
    assert events.count("opcua_connection_lost") == 1
    assert events.count("opcua_reconnected") == 1
    assert [e["log_level"] for e in logs if e["event"] == "opcua_connection_lost"] == ["error"]


async def test_read_while_server_down_raises_device_unavailable(port: int) -> None:
    """A read while the server is gone waits for the timeout, then raises DeviceUnavailable."""
    srv = PlainServer(port)
    await srv.start()
    async with make_driver(srv.endpoint, timeout=0.3) as drv:
        await srv.stop()

        async def disconnected() -> bool:
            return not drv.connected

        await eventually(disconnected)
        with pytest.raises(DeviceUnavailable, match=r"waited 0\.3 s for the reconnection"):
            await drv.read(["temperature"])


async def test_read_waits_for_the_reconnection(port: int) -> None:
    """A read issued during an outage completes once the server is back within the timeout."""
    srv = PlainServer(port)
    await srv.start()
    async with make_driver(srv.endpoint, timeout=8.0) as drv:
        await srv.stop()

        async def disconnected() -> bool:
            return not drv.connected

        await eventually(disconnected)
        pending = asyncio.create_task(drv.read(["temperature"]))
        async with PlainServer(port, id_base=3000):
            samples = await pending
    assert samples["temperature"].quality is Quality.GOOD


async def test_connect_refused_raises_device_unavailable(port: int) -> None:
    """Nothing listening on the endpoint: connect raises DeviceUnavailable."""
    with pytest.raises(DeviceUnavailable, match=f"127.0.0.1:{port}"):
        await make_driver(f"opc.tcp://127.0.0.1:{port}").connect()


async def test_silent_server_raises_device_timeout(port: int) -> None:
    """A peer that accepts TCP but never answers makes connect raise DeviceTimeout."""
    async with silent_server(port):
        with pytest.raises(DeviceTimeout, match=r"did not answer within 0\.3 s"):
            await make_driver(f"opc.tcp://127.0.0.1:{port}", timeout=0.3).connect()


async def test_server_hanging_mid_session(server: ThreadedServer) -> None:
    """A server that stops answering: reads time out, streams go bad, and recover after."""
    async with (
        Proxy(free_port(), server.port) as proxy,
        make_driver(proxy.endpoint, timeout=0.5) as drv,
        contextlib.aclosing(drv.observe(["temperature"])) as stream,
    ):
        await next_matching(stream, good("temperature", 37.0))
        proxy.silent = True
        with pytest.raises(DeviceTimeout, match="no answer"):
            await drv.read(["temperature"])
        await next_matching(stream, bad("temperature"))
        proxy.silent = False
        await server.set("Temperature", 41.0)
        await next_matching(stream, good("temperature", 41.0))


# ------------------------------------------------------------------ security


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, object]:
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    client = make_certificate(tmp_path / "client", "client", CLIENT_URI)
    (trusted / client.cert.name).write_bytes(client.cert.read_bytes())
    return {
        "server": make_certificate(tmp_path / "server", "server", SERVER_URI),
        "client": client,
        "stranger": make_certificate(tmp_path / "stranger", "stranger", CLIENT_URI),
        "trusted": trusted,
    }


def secure(certificates: dict[str, object], who: str) -> SecurityConfig:
    client, server = certificates[who], certificates["server"]
    return SecurityConfig(
        policy="Basic256Sha256",
        mode="SignAndEncrypt",
        certificate=str(client.cert),  # type: ignore[attr-defined]
        private_key=str(client.key),  # type: ignore[attr-defined]
        server_certificate=str(server.cert),  # type: ignore[attr-defined]
    )


async def test_sign_and_encrypt_with_trusted_certificate(
    port: int, certificates: dict[str, object]
) -> None:
    """Basic256Sha256 SignAndEncrypt works with a client certificate the server trusts."""
    async with (
        PlainServer(
            port,
            certificate=certificates["server"],  # type: ignore[arg-type]
            trusted=certificates["trusted"],  # type: ignore[arg-type]
        ) as srv,
        make_driver(srv.endpoint, security=secure(certificates, "client")) as drv,
    ):
        assert (await drv.read(["temperature"]))["temperature"].value == 37.0
        assert await drv.call("multiply", 2, 3) == [6.0]


async def test_untrusted_certificate_is_refused(port: int, certificates: dict[str, object]) -> None:
    """A client certificate missing from the server's trust list cannot connect."""
    async with PlainServer(
        port,
        certificate=certificates["server"],  # type: ignore[arg-type]
        trusted=certificates["trusted"],  # type: ignore[arg-type]
    ) as srv:
        drv = make_driver(srv.endpoint, security=secure(certificates, "stranger"))
        with pytest.raises(DeviceUnavailable, match="BadCertificateUntrusted"):
            await drv.connect()


async def test_unsecured_client_refused_by_secure_only_server(
    port: int, certificates: dict[str, object]
) -> None:
    """A client without security finds no endpoint on a SignAndEncrypt-only server."""
    async with PlainServer(
        port,
        certificate=certificates["server"],  # type: ignore[arg-type]
        trusted=certificates["trusted"],  # type: ignore[arg-type]
    ) as srv:
        with pytest.raises(ConfigurationError, match="No matching endpoints"):
            await make_driver(srv.endpoint).connect()


# ------------------------------------------------------------------ browse


async def test_browse_lists_nodes_with_paths_types_and_access(server: ThreadedServer) -> None:
    """browse() yields paths usable as browse_path, with DataType, value, quality and access."""
    rows = {row["path"]: row async for row in browse(server.endpoint, depth=2)}
    temperature = rows["2:Reactor/2:Temperature"]
    assert temperature["node_class"] == "Variable"
    assert temperature["data_type"] == "Double"
    assert (temperature["value"], temperature["quality"], temperature["access"]) == (
        37.0,
        "good",
        "rw",
    )
    assert rows["2:Reactor/2:Locked"]["access"] == "r"
    assert rows["2:Reactor"]["node_class"] == "Object"
    assert rows["2:Reactor/2:Multiply"]["node_class"] == "Method"
    assert not any(path.startswith("0:Server") for path in rows)


# ------------------------------------------------------------------ another stack: open62541

needs_o6 = pytest.mark.skipif(
    importlib.util.find_spec("o6") is None,
    reason="open62541 interop needs the PyPI package o6 (pip install 'o6==2.2.0')",
)
O6 = f"nsu={O6_URI};"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def o6_endpoint() -> AsyncIterator[str]:
    """An open62541 server (o6) in a subprocess; o6 must never be imported in this process
    (its unlicensed build ends the importing process after ten minutes)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.opcua_helpers",
        "o6",
        str(port),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=PROJECT_ROOT,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        async with asyncio.timeout(20):
            while b"ready" not in await proc.stdout.readline():
                if proc.returncode is not None:
                    pytest.fail("the o6 server did not start")
        yield f"opc.tcp://127.0.0.1:{port}"
    finally:
        proc.stdin.close()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


def o6_driver(endpoint: str) -> OpcUaDriver:
    points = [
        OpcUaPoint(
            name.lower(), browse_path=(f"{O6}Reactor", f"{O6}{name}"), sampling_interval_ms=20
        )
        for name in ("Temperature", "Stirrer", "Locked")
    ]
    multiply = OpcUaMethod(
        "multiply",
        object_browse_path=(f"{O6}Reactor",),
        method_browse_path=(f"{O6}Reactor", f"{O6}Multiply"),
    )
    return OpcUaDriver(
        "o6-reactor",
        endpoint,
        points,
        [multiply],
        clock=SystemClock(),
        timeout=2.0,
        retry=FAST_RETRY,
        publishing_interval_ms=50,
    )


@needs_o6
async def test_open62541_reads_writes_and_calls(o6_endpoint: str) -> None:
    """Against open62541: typed writes (int to Double, UInt16), refusals, method calls."""
    async with o6_driver(o6_endpoint) as drv:
        await drv.write("temperature", 38)
        await drv.write("stirrer", 61)
        samples = await drv.read(["temperature", "stirrer"])
        assert (samples["temperature"].value, samples["stirrer"].value) == (38.0, 61)
        with pytest.raises(WriteRefused, match="Bad"):
            await drv.write("locked", 2.0)
        assert await drv.call("multiply", 3, 4) == [12.0]
        with pytest.raises(MethodFailed, match="BadInvalidArgument"):
            await drv.call("multiply", -1, 4)


@needs_o6
async def test_open62541_subscription(o6_endpoint: str) -> None:
    """Against open62541: a stream yields the current value and then a written change."""
    async with (
        o6_driver(o6_endpoint) as drv,
        contextlib.aclosing(drv.observe(["temperature"])) as stream,
    ):
        await next_matching(stream, good("temperature", 37.0))
        await drv.write("temperature", 35.5)
        await next_matching(stream, good("temperature", 35.5))
