"""The simulated bioreactor's OPC UA address space, shaped after LADS (OPC 30500).

Namespace ``urn:bedside:simulator:bioreactor`` (index 2 on a fresh server); every browse name
below is ``2:Name`` except the standard ``0:EURange``/``0:EngineeringUnits``::

    Objects/DeviceSet/Bioreactor
        Identification {Manufacturer, Model, SerialNumber, SoftwareRevision}
        FunctionalUnitSet/Cultivation/FunctionSet
            <sensor function>/SensorValue                Double, read-only
            <controller function>/CurrentValue           Double, read-only
            <controller function>/TargetValue            Double, read/write, range-checked
            <controller function>/ControlFunctionState   {CurrentState: String "Running" or
                                                          "Stopped", IsRunning: Boolean,
                                                          Start(), Stop()}

Sensor functions: DissolvedOxygen, pH, ViableCellDensity, Viability, Glucose, Lactate, Volume,
HeaterPower. Controller functions: Temperature, Rocking, Perfusion, CO2. Every value variable is
an ``AnalogUnitRangeType`` with ``EURange`` and ``EngineeringUnits`` properties; NodeIds are
strings, e.g. ``ns=2;s=Bioreactor.Cultivation.Temperature.TargetValue`` (see ``node_id``).

This module says what the functions are, how they map onto the model, and builds the nodes;
``simulators.bioreactor.BioreactorServer`` serves them and supplies the TargetValue setters and
the Start/Stop method handlers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asyncua import Node, Server, ua

from simulators.bioreactor_model import BioreactorModel

NAMESPACE_URI = "urn:bedside:simulator:bioreactor"
_PREFIX = "Bioreactor.Cultivation"
_UNECE = "http://www.opcfoundation.org/UA/units/un/cefact"


@dataclass(frozen=True, slots=True)
class Unit:
    """An engineering unit: UNECE common code ("" when it has none), symbol, description."""

    code: str
    symbol: str
    description: str

    def information(self) -> ua.EUInformation:
        unit_id = -1
        if self.code:
            unit_id = 0
            for char in self.code:
                unit_id = (unit_id << 8) | ord(char)
        return ua.EUInformation(
            NamespaceUri=_UNECE,
            UnitId=unit_id,
            DisplayName=ua.LocalizedText(self.symbol),
            Description=ua.LocalizedText(self.description),
        )


@dataclass(frozen=True, slots=True)
class SensorFunction:
    """A LADS sensor function publishing one model sensor."""

    name: str
    sensor: str  # key of BioreactorModel.measured
    unit: Unit
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class ControllerFunction:
    """A LADS control function over ``Controls.<key>_sp`` / ``Controls.<key>_on``."""

    name: str
    key: str
    unit: Unit
    low: float  # TargetValue limits (EURange of TargetValue)
    high: float


PERCENT = Unit("P1", "%", "percent")
SENSOR_FUNCTIONS = (
    SensorFunction("DissolvedOxygen", "do", PERCENT, 0.0, 200.0),
    SensorFunction("pH", "ph", Unit("", "pH", "pH"), 0.0, 14.0),
    SensorFunction("ViableCellDensity", "vcd", Unit("", "cells/mL", "cells per mL"), 0.0, 1e8),
    SensorFunction("Viability", "viability", PERCENT, 0.0, 100.0),
    SensorFunction("Glucose", "glucose", Unit("", "mM", "millimole per litre"), 0.0, 100.0),
    SensorFunction("Lactate", "lactate", Unit("", "mM", "millimole per litre"), 0.0, 100.0),
    SensorFunction("Volume", "volume", Unit("MLT", "mL", "millilitre"), 0.0, 2000.0),
    SensorFunction("HeaterPower", "heater_power", Unit("WTT", "W", "watt"), 0.0, 100.0),
)
CONTROLLER_FUNCTIONS = (
    ControllerFunction("Temperature", "temperature", Unit("CEL", "°C", "degree Celsius"), 20, 40),
    ControllerFunction("Rocking", "rocking", Unit("", "rpm", "revolutions per minute"), 0, 40),
    ControllerFunction("Perfusion", "perfusion", Unit("", "mL/d", "millilitre per day"), 0, 2000),
    ControllerFunction("CO2", "co2", PERCENT, 0, 10),
)

# what the server hands the builder: a TargetValue setter and a Start/Stop handler per function
SetterFactory = Callable[[ControllerFunction], Any]
MethodFactory = Callable[[ControllerFunction, bool], Any]


def node_id(function: str, variable: str) -> str:
    """The NodeId string of a function's variable, e.g. ``node_id("pH", "SensorValue")``."""
    return f"ns=2;s={_PREFIX}.{function}.{variable}"


def variable_id(ident: str, ns: int) -> ua.NodeId:
    """The NodeId of ``<function>.<variable>`` (e.g. ``"pH.SensorValue"``) in namespace ``ns``."""
    return ua.NodeId(f"{_PREFIX}.{ident}", ns)


def state_text(running: bool) -> str:
    """The CurrentState of a control function."""
    return "Running" if running else "Stopped"


def target(model: BioreactorModel, cf: ControllerFunction) -> float:
    """A controller's set-point in the model."""
    return float(getattr(model.controls, f"{cf.key}_sp"))


def running(model: BioreactorModel, cf: ControllerFunction) -> bool:
    """Whether a controller runs in the model."""
    return bool(getattr(model.controls, f"{cf.key}_on"))


def current(model: BioreactorModel, cf: ControllerFunction) -> float:
    """What a controller achieves now (its CurrentValue)."""
    values = {
        "temperature": lambda: model.measured["temperature"],
        "rocking": lambda: model.rocking_rpm,
        "perfusion": lambda: model.perfusion_ml_day,
        "co2": lambda: model.gas_co2_pct,
    }
    return float(values[cf.key]())


async def build_address_space(
    server: Server,
    ns: int,
    model: BioreactorModel,
    *,
    serial_number: str,
    setter: SetterFactory,
    method: MethodFactory,
) -> None:
    """Add the device's nodes to ``server`` in namespace ``ns``, with the model's values."""

    def nid(name: str) -> ua.NodeId:
        return ua.NodeId(name, ns)

    def qn(name: str) -> ua.QualifiedName:
        return ua.QualifiedName(name, ns)

    device_set = await server.nodes.objects.add_folder(nid("DeviceSet"), qn("DeviceSet"))
    device = await device_set.add_object(nid("Bioreactor"), qn("Bioreactor"))
    ident = await device.add_object(nid("Bioreactor.Identification"), qn("Identification"))
    for name, value in (
        ("Manufacturer", "Bedside Simulators"),
        ("Model", "Rocking bioreactor RB-2 (simulated)"),
        ("SerialNumber", serial_number),
        ("SoftwareRevision", "1.0.0"),
    ):
        await ident.add_property(nid(f"Bioreactor.Identification.{name}"), qn(name), value)
    unit_set = nid("Bioreactor.FunctionalUnitSet")
    units = await device.add_object(unit_set, qn("FunctionalUnitSet"))
    unit = await units.add_object(nid(_PREFIX), qn("Cultivation"))
    functions = await unit.add_object(nid(f"{_PREFIX}.FunctionSet"), qn("FunctionSet"))
    for sf in SENSOR_FUNCTIONS:
        fn = await functions.add_object(nid(f"{_PREFIX}.{sf.name}"), qn(sf.name))
        await _add_analog(server, ns, fn, "SensorValue", sf, model.measured[sf.sensor], False)
    for cf in CONTROLLER_FUNCTIONS:
        base = f"{_PREFIX}.{cf.name}"
        fn = await functions.add_object(nid(base), qn(cf.name))
        await _add_analog(server, ns, fn, "CurrentValue", cf, current(model, cf), False)
        node = await _add_analog(server, ns, fn, "TargetValue", cf, target(model, cf), True)
        server.set_attribute_value_setter(node.nodeid, setter(cf))
        state = await fn.add_object(nid(f"{base}.ControlFunctionState"), qn("ControlFunctionState"))
        is_running = running(model, cf)
        for name, initial in (("CurrentState", state_text(is_running)), ("IsRunning", is_running)):
            await state.add_variable(nid(f"{base}.{name}"), qn(name), initial)
        for name, run in (("Start", True), ("Stop", False)):
            await state.add_method(nid(f"{base}.{name}"), qn(name), method(cf, run), [], [])


async def _add_analog(
    server: Server,
    ns: int,
    parent: Node,
    name: str,
    spec: SensorFunction | ControllerFunction,
    value: float,
    writable: bool,
) -> Node:
    """A Double variable of AnalogUnitRangeType with its EURange and EngineeringUnits."""
    ident = f"{_PREFIX}.{spec.name}.{name}"
    attrs = ua.VariableAttributes(
        DisplayName=ua.LocalizedText(name),
        Description=ua.LocalizedText(f"{spec.name} {name} ({spec.unit.symbol})"),
        DataType=ua.NodeId(ua.ObjectIds.Double),
        Value=ua.Variant(float(value), ua.VariantType.Double),
        ValueRank=ua.ValueRank.Scalar,
    )
    access = ua.AccessLevel.CurrentRead.mask
    if writable:
        access |= ua.AccessLevel.CurrentWrite.mask
    attrs.AccessLevel = attrs.UserAccessLevel = access
    item = ua.AddNodesItem(
        RequestedNewNodeId=ua.NodeId(ident, ns),
        BrowseName=ua.QualifiedName(name, ns),
        NodeClass=ua.NodeClass.Variable,
        ParentNodeId=parent.nodeid,
        ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasComponent),
        TypeDefinition=ua.NodeId(ua.ObjectIds.AnalogUnitRangeType),
        NodeAttributes=attrs,
    )
    (result,) = await parent.session.add_nodes([item])
    result.StatusCode.check()
    node = server.get_node(result.AddedNodeId)
    await node.add_property(
        ua.NodeId(f"{ident}.EURange", ns),
        ua.QualifiedName("EURange", 0),
        ua.Range(Low=float(spec.low), High=float(spec.high)),
        datatype=ua.ObjectIds.Range,
    )
    await node.add_property(
        ua.NodeId(f"{ident}.EngineeringUnits", ns),
        ua.QualifiedName("EngineeringUnits", 0),
        spec.unit.information(),
        datatype=ua.ObjectIds.EUInformation,
    )
    return node
