"""System tests of the bioreactor OPC UA server with a real asyncua client on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from asyncua import Client, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from cryptography.x509.oid import ExtendedKeyUsageOID

from drivers.clock import ManualClock, ScaledClock
from simulators.bioreactor import (
    APPLICATION_URI,
    CONTROLLER_FUNCTIONS,
    NAMESPACE_URI,
    SENSOR_FUNCTIONS,
    BioreactorServer,
    ServerSecurity,
    node_id,
)
from simulators.bioreactor_model import BioreactorModel
from simulators.faults import FaultState

FUNCTION_SET = ["2:DeviceSet", "2:Bioreactor", "2:FunctionalUnitSet", "2:Cultivation"]
FUNCTION_SET += ["2:FunctionSet"]


@pytest.fixture
async def served(port: int) -> AsyncIterator[tuple[BioreactorServer, ManualClock]]:
    """A bioreactor server on a free port, driven by a manual clock (updates every 5 s)."""
    clock = ManualClock()
    model = BioreactorModel(seed=1, faults=FaultState())
    async with BioreactorServer(model, clock, port=port, update_interval=5.0) as server:
        yield server, clock


async def read(client: Client, function: str, variable: str) -> ua.DataValue:
    """The DataValue of a function's variable, keeping bad or uncertain statuses."""
    node = client.get_node(node_id(function, variable))
    return await node.read_data_value(raise_on_bad_status=False)


async def test_address_space_has_the_lads_shape(
    served: tuple[BioreactorServer, ManualClock],
) -> None:
    """Browse paths DeviceSet/Bioreactor/FunctionalUnitSet/Cultivation/FunctionSet/<f> exist."""
    server, _ = served
    async with Client(server.endpoint) as client:
        assert await client.get_namespace_index(NAMESPACE_URI) == 2
        device = await client.nodes.objects.get_child(["2:DeviceSet", "2:Bioreactor"])
        serial = await device.get_child(["2:Identification", "2:SerialNumber"])
        assert await serial.read_value() == server.serial_number
        functions = await client.nodes.objects.get_child(FUNCTION_SET)
        names = {(await n.read_browse_name()).Name for n in await functions.get_children()}
        assert names == {f.name for f in SENSOR_FUNCTIONS} | {f.name for f in CONTROLLER_FUNCTIONS}
        for cf in CONTROLLER_FUNCTIONS:
            state = await functions.get_child([f"2:{cf.name}", "2:ControlFunctionState"])
            children = {(await n.read_browse_name()).Name for n in await state.get_children()}
            assert {"Start", "Stop", "CurrentState", "IsRunning"} <= children


async def test_sensor_values_are_analog_items_with_range_units_and_clock_time(
    served: tuple[BioreactorServer, ManualClock],
) -> None:
    """Each SensorValue is a Double AnalogUnitRangeType with EURange, EngineeringUnits and the
    injected clock's source timestamp."""
    server, clock = served
    await clock.advance(10.0)
    async with Client(server.endpoint) as client:
        for sf in SENSOR_FUNCTIONS:
            node = client.get_node(node_id(sf.name, "SensorValue"))
            assert await node.read_data_type() == ua.NodeId(ua.ObjectIds.Double)
            assert (await node.read_type_definition()) == ua.NodeId(
                ua.ObjectIds.AnalogUnitRangeType
            )
            eu_range = await (await node.get_child("0:EURange")).read_value()
            assert (eu_range.Low, eu_range.High) == (sf.low, sf.high)
            units = await (await node.get_child("0:EngineeringUnits")).read_value()
            assert units.DisplayName.Text == sf.unit.symbol
            dv = await node.read_data_value()
            assert dv.SourceTimestamp == clock.now()
            assert isinstance(dv.Value.Value, float)
        temperature = await client.get_node(node_id("Temperature", "CurrentValue")).get_child(
            "0:EngineeringUnits"
        )
        assert (await temperature.read_value()).UnitId == 4408652  # UNECE "CEL"


async def test_written_target_value_is_followed_by_current_value(
    served: tuple[BioreactorServer, ManualClock],
) -> None:
    """Writing Rocking TargetValue 30 rpm moves CurrentValue to 30 rpm as the clock advances."""
    server, clock = served
    async with Client(server.endpoint) as client:
        target = client.get_node(node_id("Rocking", "TargetValue"))
        await target.write_value(ua.Variant(30.0, ua.VariantType.Double))
        assert await target.read_value() == 30.0
        await clock.advance(60.0)
        current = (await read(client, "Rocking", "CurrentValue")).Value.Value
        assert current == pytest.approx(30.0, abs=0.01)
        assert server.model.controls.rocking_sp == 30.0


async def test_out_of_range_and_mistyped_writes_are_refused(
    served: tuple[BioreactorServer, ManualClock],
) -> None:
    """TargetValue refuses 50 degC (BadOutOfRange) and an Int64 (BadTypeMismatch); SensorValue
    refuses any write; the set-point stays as it was."""
    server, _ = served
    async with Client(server.endpoint) as client:
        target = client.get_node(node_id("Temperature", "TargetValue"))
        with pytest.raises(ua.uaerrors.BadOutOfRange):
            await target.write_value(ua.Variant(50.0, ua.VariantType.Double))
        with pytest.raises(ua.uaerrors.BadTypeMismatch):
            await target.write_value(ua.Variant(36, ua.VariantType.Int64))
        sensor = client.get_node(node_id("pH", "SensorValue"))
        with pytest.raises(ua.uaerrors.BadUserAccessDenied):
            await sensor.write_value(ua.Variant(7.0, ua.VariantType.Double))
        assert await target.read_value() == 37.0
        assert server.model.controls.temperature_sp == 37.0


async def test_stop_and_start_methods_switch_a_controller(
    served: tuple[BioreactorServer, ManualClock],
) -> None:
    """Stop() halts the rocker (IsRunning false, speed 0); Start() resumes it."""
    server, clock = served
    async with Client(server.endpoint) as client:
        state = client.get_node("ns=2;s=Bioreactor.Cultivation.Rocking.ControlFunctionState")
        assert await state.call_method("2:Stop") is None
        assert (await read(client, "Rocking", "IsRunning")).Value.Value is False
        assert (await read(client, "Rocking", "CurrentState")).Value.Value == "Stopped"
        await clock.advance(60.0)
        assert (await read(client, "Rocking", "CurrentValue")).Value.Value < 0.01
        await state.call_method("2:Start")
        await clock.advance(60.0)
        assert (await read(client, "Rocking", "IsRunning")).Value.Value is True
        assert (await read(client, "Rocking", "CurrentValue")).Value.Value == pytest.approx(15.0)


async def test_stuck_sensor_is_uncertain_and_failed_sensor_is_bad(
    served: tuple[BioreactorServer, ManualClock],
) -> None:
    """A stuck pH probe reads UncertainLastUsableValue, a failed DO probe BadSensorFailure."""
    server, clock = served
    server.faults.stuck_sensors.add("ph")
    server.faults.failed_sensors.add("do")
    await clock.advance(10.0)
    async with Client(server.endpoint) as client:
        ph = await read(client, "pH", "SensorValue")
        assert ph.StatusCode.value == ua.StatusCodes.UncertainLastUsableValue
        assert 7.0 < ph.Value.Value < 7.6
        do = await read(client, "DissolvedOxygen", "SensorValue")
        assert do.StatusCode.value == ua.StatusCodes.BadSensorFailure
        assert (await read(client, "Glucose", "SensorValue")).StatusCode.is_good()


async def test_heater_failure_reads_zero_power_and_falling_temperature(
    served: tuple[BioreactorServer, ManualClock],
) -> None:
    """With the heater failed, HeaterPower reads 0 W and Temperature CurrentValue drifts down."""
    server, clock = served
    server.faults.heater_failed = True
    await clock.advance(1800.0)
    async with Client(server.endpoint) as client:
        assert (await read(client, "HeaterPower", "SensorValue")).Value.Value == 0.0
        assert (await read(client, "Temperature", "CurrentValue")).Value.Value < 36.0


async def test_slow_reply_fault_delays_reads_by_clock_time(
    served: tuple[BioreactorServer, ManualClock],
) -> None:
    """With slow_reply_s = 30 a read answers only once the clock has moved 30 s."""
    server, clock = served
    async with Client(server.endpoint) as client:
        server.faults.slow_reply_s = 30.0
        pending = asyncio.create_task(read(client, "pH", "SensorValue"))
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert not pending.done()
        await clock.advance(30.0)
        assert (await pending).StatusCode.is_good()


async def test_restart_stops_listening_then_serves_again_on_the_same_port(
    served: tuple[BioreactorServer, ManualClock],
) -> None:
    """restart(5) refuses connections until 5 clock seconds pass, then accepts them again."""
    server, clock = served
    restarting = asyncio.create_task(server.restart(5.0))
    await asyncio.sleep(0.05)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), 1):
        pass
    await clock.advance(5.0)
    await restarting
    async with Client(server.endpoint) as client:
        assert (await read(client, "Volume", "SensorValue")).StatusCode.is_good()


async def test_drop_connections_cuts_connected_clients(
    served: tuple[BioreactorServer, ManualClock],
) -> None:
    """drop_connections() aborts the client's connection; its next read fails."""
    server, _ = served
    client = Client(server.endpoint)
    await client.connect()
    try:
        assert server.drop_connections() == 1
        await asyncio.sleep(0.05)
        with pytest.raises((ConnectionError, ua.UaError, asyncio.TimeoutError)):
            await read(client, "pH", "SensorValue")
    finally:
        await client.disconnect()  # only cleans up: the connection is already gone


class _Changes:
    """A subscription handler that ignores what it is told."""

    def datachange_notification(self, node: object, val: object, data: object) -> None:
        pass


async def _subscribed_and_cut(server: BioreactorServer) -> Client:
    """A client subscribed to a sensor, whose connection the server then aborts."""
    client = Client(server.endpoint)
    await client.connect()
    subscription = await client.create_subscription(100, _Changes())
    await subscription.subscribe_data_change(client.get_node(node_id("pH", "SensorValue")))
    assert server.drop_connections() == 1
    await asyncio.sleep(0.05)
    return client


async def test_stop_closes_sessions_cut_while_subscribed(port: int) -> None:
    """stop() ends the sessions asyncua keeps for clients cut while subscribed, so none of
    their tasks outlive the server (the autouse fixture checks for leaked tasks)."""
    server = BioreactorServer(BioreactorModel(seed=1), ManualClock(), port=port)
    await server.start()
    ua_server = server._require()
    client = await _subscribed_and_cut(server)
    try:
        assert ua_server.iserver._external_sessions  # kept for the client to reactivate
        await server.stop()
        assert not ua_server.iserver._external_sessions
    finally:
        await server.stop()
        with contextlib.suppress(ConnectionError, ua.UaError, asyncio.TimeoutError):
            await client.disconnect()


async def test_restart_closes_sessions_cut_while_subscribed(
    served: tuple[BioreactorServer, ManualClock],
) -> None:
    """A restarted server has forgotten the sessions of clients it cut, as a real device would."""
    server, clock = served
    client = await _subscribed_and_cut(server)
    try:
        restarting = asyncio.create_task(server.restart(5.0))
        await asyncio.sleep(0.05)
        await clock.advance(5.0)
        await restarting
        assert not server._require().iserver._external_sessions
    finally:
        with contextlib.suppress(ConnectionError, ua.UaError, asyncio.TimeoutError):
            await client.disconnect()


async def test_scaled_clock_runs_the_culture_ten_thousand_times_faster(port: int) -> None:
    """At speed 10000 the served culture ages hours within a second of wall time."""
    clock = ScaledClock(10_000.0)
    start = clock.now()
    async with BioreactorServer(BioreactorModel(), clock, port=port) as server:
        while server.model.elapsed_s < 2 * 3600.0:  # noqa: ASYNC110 - polls another task's work
            await asyncio.sleep(0.05)
        async with Client(server.endpoint) as client:
            dv = await read(client, "ViableCellDensity", "SensorValue")
            assert dv.StatusCode.is_good()
            assert (dv.SourceTimestamp - start).total_seconds() >= 2 * 3600.0


async def test_sign_and_encrypt_endpoint_serves_a_trusted_client(port: int, tmp_path: Path) -> None:
    """With certificates configured a pinned Basic256Sha256 SignAndEncrypt client reads values
    and a client with another certificate is refused."""
    server_cert, server_key = tmp_path / "server.der", tmp_path / "server.pem"
    client_cert, client_key = tmp_path / "client.der", tmp_path / "client.pem"
    await setup_self_signed_certificate(
        server_key,
        server_cert,
        APPLICATION_URI,
        "localhost",
        [ExtendedKeyUsageOID.SERVER_AUTH],
        {"commonName": "bioreactor"},
    )
    client_uri = "urn:bedside:test:client"
    await setup_self_signed_certificate(
        client_key,
        client_cert,
        client_uri,
        "localhost",
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        {"commonName": "client"},
    )
    other_cert, other_key = tmp_path / "other.der", tmp_path / "other.pem"
    await setup_self_signed_certificate(
        other_key,
        other_cert,
        "urn:bedside:test:stranger",
        "localhost",
        [ExtendedKeyUsageOID.CLIENT_AUTH],
        {"commonName": "stranger"},
    )
    security = ServerSecurity(
        server_cert, server_key, ("Basic256Sha256_SignAndEncrypt",), (client_cert,)
    )
    model = BioreactorModel()
    async with BioreactorServer(model, ManualClock(), port=port, security=security) as server:
        client = Client(server.endpoint)
        client.application_uri = client_uri
        await client.set_security_string(
            f"Basic256Sha256,SignAndEncrypt,{client_cert},{client_key},{server_cert}"
        )
        async with client:
            assert (await read(client, "pH", "SensorValue")).StatusCode.is_good()
        stranger = Client(server.endpoint)
        stranger.application_uri = "urn:bedside:test:stranger"
        await stranger.set_security_string(
            f"Basic256Sha256,SignAndEncrypt,{other_cert},{other_key},{server_cert}"
        )
        with pytest.raises(ua.uaerrors.BadCertificateUntrusted):
            await stranger.connect()
        await stranger.disconnect()
