"""The unit configuration: which devices a unit has and the tags on each.

A YAML file (see ``agent/data/unit-sim.yaml``) validated into frozen pydantic models; unknown
keys are errors and every problem is reported at once with file, line and path. The models are
translated into the drivers' frozen point definitions at the composition root
(``agent.devices.hub.build_driver``).

Shape::

    unit: {id, site, control_site, state_dir}
    devices:
      NAME:
        driver: opcua | modbus | serial
        endpoint: opc.tcp://... | tcp://HOST:PORT | rtu://PATH | serial port path
        ... driver options (security, timeout, poll_interval, baudrate ...)
        tags:
          TAG: {address fields for the driver, type, unit, limits: [lo, hi], writable, record}
        methods: {NAME: {object: PATH, method: PATH}}        # OPC UA only
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.text.yamlsource import DocumentError, Located, load_yaml, parse_yaml
from drivers.points import ByteOrder, ModbusTable, ModbusType, WordOrder

_NAME = r"^[a-z][a-z0-9_]*$"
_ELEMENT = re.compile(r"^\d+:[^/]+$")
_DAY = 86400.0  # no timeout or interval of a unit is longer than a day


def _not_bool(value: Any) -> Any:
    # pydantic reads true as 1; in a configuration it is a mistake. Text stays accepted:
    # a number may come from ${VAR}, which is always text.
    if isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is true/false, not a number")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]
Seconds = Annotated[float, BeforeValidator(_not_bool), Field(gt=0, le=_DAY)]


def _check_path(text: str) -> None:
    for part in text.split("/"):
        if not _ELEMENT.match(part):
            raise ValueError(
                f"browse path element {part!r} is not idx:Name (e.g. 2:DeviceSet/2:Bioreactor)"
            )


class Strict(BaseModel):
    """Frozen, unknown keys forbidden."""

    # NaN and infinity are never a limit, interval, scale or timeout
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Recording(Strict):
    """How a tag is recorded into the journal: every ``interval`` seconds (periodic), or on a
    change beyond ``deadband`` (on_change, with ``interval`` as a heartbeat); a change of
    quality is always recorded."""

    mode: Literal["periodic", "on_change", "never"] = "on_change"
    interval: Seconds = Field(default=60.0, description="seconds between periodic records")
    deadband: Float = Field(
        default=0.0, ge=0, description="absolute change that counts as a change"
    )


class TagBase(Strict):
    """What every tag has, whatever its driver."""

    type: Literal["float", "int", "bool", "str"] = "float"
    unit: str = Field("", description="engineering unit, e.g. degC, pH, %DO, rpm, mL/min, g")
    description: str = ""
    limits: tuple[Float, Float] | None = Field(
        None, description="[low, high]: writes outside are refused before anything is sent"
    )
    writable: bool = False
    record: Recording = Recording()

    @field_validator("limits")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] <= v[1]:
            raise ValueError(f"limits low {v[0]} is above high {v[1]}")
        return v

    @model_validator(mode="after")
    def _writable_needs_limits(self) -> TagBase:
        if self.writable and self.type in ("float", "int") and self.limits is None:
            raise ValueError("a writable numeric tag needs limits: [low, high]")
        return self


class OpcUaTag(TagBase):
    """A tag on an OPC UA server, by ``node_id`` or by ``browse_path`` from Objects
    (``2:DeviceSet/2:Bioreactor/...``)."""

    node_id: str | None = None
    browse_path: str | None = None
    sampling_interval: Seconds = Field(0.5, description="seconds")
    deadband: Float = Field(0.0, ge=0, description="subscription absolute deadband")

    @field_validator("browse_path")
    @classmethod
    def _path_elements(cls, v: str | None) -> str | None:
        if v is not None:
            _check_path(v)
        return v

    @model_validator(mode="after")
    def _one_address(self) -> OpcUaTag:
        if (self.node_id is None) == (self.browse_path is None):
            raise ValueError("give exactly one of node_id and browse_path")
        return self


class ModbusTag(TagBase):
    """A tag in a Modbus device's tables."""

    table: ModbusTable
    address: Int = Field(ge=0, le=65535)
    data_type: ModbusType = ModbusType.UINT16
    unit_id: Int = Field(1, ge=0, le=247)
    word_order: WordOrder = WordOrder.BIG
    byte_order: ByteOrder = ByteOrder.BIG
    scale: Float = 1.0
    offset: Float = 0.0


class SerialTag(TagBase):
    """A tag read by a line command (MT-SICS ``S`` or ``SI``)."""

    command: Literal["S", "SI"] = "SI"


class OpcUaMethodRef(Strict):
    """An OPC UA method: its object and itself, each a browse path or a NodeId."""

    object: str
    method: str

    @field_validator("object", "method")
    @classmethod
    def _path_or_node_id(cls, v: str) -> str:
        if not v.startswith(("ns=", "i=", "s=", "nsu=")):
            _check_path(v)
        return v


class Security(Strict):
    """OPC UA security; certificate paths are relative to the configuration file."""

    policy: Literal["None", "Basic256Sha256"] = "None"
    mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    certificate: str | None = None
    private_key: str | None = None
    server_certificate: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Security:
        if (self.policy == "None") != (self.mode == "None"):
            raise ValueError(
                "policy None goes with mode None, Basic256Sha256 with Sign or SignAndEncrypt"
            )
        if self.policy != "None" and not (self.certificate and self.private_key):
            raise ValueError("a secure policy needs certificate and private_key files")
        return self


class DeviceBase(Strict):
    timeout: Seconds = Field(2.0, description="seconds for one request")
    description: str = ""


class OpcUaDevice(DeviceBase):
    driver: Literal["opcua"]
    endpoint: Annotated[str, Field(pattern=r"^opc\.tcp://")]
    security: Security = Security()
    tags: dict[Annotated[str, Field(pattern=_NAME)], OpcUaTag]
    methods: dict[Annotated[str, Field(pattern=_NAME)], OpcUaMethodRef] = {}


class ModbusDevice(DeviceBase):
    driver: Literal["modbus"]
    endpoint: Annotated[str, Field(pattern=r"^(tcp://[^:/]+:\d+|rtu://.+)$")]
    poll_interval: Seconds = 1.0
    baudrate: Int = Field(19200, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    retries: Int = Field(1, ge=0, le=5)
    tags: dict[Annotated[str, Field(pattern=_NAME)], ModbusTag]


class SerialDevice(DeviceBase):
    driver: Literal["serial"]
    protocol: Literal["mt-sics"] = "mt-sics"
    endpoint: str = Field(description="serial port path")
    baudrate: Int = Field(9600, gt=0)
    poll_interval: Seconds = 1.0
    tags: dict[Annotated[str, Field(pattern=_NAME)], SerialTag]


Device = Annotated[OpcUaDevice | ModbusDevice | SerialDevice, Field(discriminator="driver")]


class UnitInfo(Strict):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    site: str = ""
    control_site: str = ""
    state_dir: str = ".bedside"


class UnitConfig(Strict):
    """A whole unit: identity and devices. Tag names are unique across the unit."""

    unit: UnitInfo
    devices: dict[Annotated[str, Field(pattern=_NAME)], Device]
    source: str = Field("", exclude=True, description="the file this came from")

    @model_validator(mode="after")
    def _unique_tags(self) -> UnitConfig:
        seen: dict[str, str] = {}
        for dev_name, dev in self.devices.items():
            for tag in dev.tags:
                if tag in seen:
                    raise ValueError(
                        f"tag {tag!r} is declared by devices {seen[tag]!r} and {dev_name!r}; "
                        "tag names must be unique in a unit"
                    )
                seen[tag] = dev_name
        return self

    def tag(self, name: str) -> tuple[str, TagBase]:
        """The device name and definition of a tag; ``KeyError`` naming it if unknown."""
        for dev_name, dev in self.devices.items():
            if name in dev.tags:
                return dev_name, dev.tags[name]
        raise KeyError(f"unknown tag {name!r}; known tags: {', '.join(sorted(self.all_tags()))}")

    def all_tags(self) -> dict[str, str]:
        """Every tag name with its device name."""
        return {t: d for d, dev in self.devices.items() for t in dev.tags}

    def resolve(self, path: str) -> Path:
        """A path from the configuration, relative to the configuration file's folder."""
        p = Path(path)
        return p if p.is_absolute() or not self.source else Path(self.source).parent / p


_HINTS = {
    "union_tag_invalid": "driver must be one of opcua, modbus, serial",
    "string_pattern_mismatch": (
        "names are lower_snake_case; endpoints as opc.tcp://, tcp://HOST:PORT or rtu://PATH"
    ),
    "enum": "see docs/configuration.md for the allowed values",
    "finite_number": "NaN and infinity (.nan, .inf, 1e400) are not numbers here",
}


def _validate(located: Located) -> UnitConfig:
    try:
        data: Any = located.data
        if isinstance(data, dict):
            data = {**data, "source": located.file}
        return UnitConfig.model_validate(data)
    except ValidationError as exc:
        raise DocumentError(located.problems_from(exc, _HINTS)) from exc


def load_config(path: str | Path) -> UnitConfig:
    """Load and validate a unit configuration file; raises ``DocumentError`` listing every
    problem with its line and path."""
    return _validate(load_yaml(path))


def parse_config(text: str, file: str = "<string>") -> UnitConfig:
    """Validate a unit configuration given as YAML text."""
    return _validate(parse_yaml(text, file))


def default_config_path() -> Path:
    """The example configuration of the simulated unit, shipped with the package."""
    return Path(__file__).parent / "data" / "unit-sim.yaml"


def browse_path(text: str) -> tuple[str, ...]:
    """Split a validated ``2:DeviceSet/2:Bioreactor`` into its elements."""
    _check_path(text)
    return tuple(text.split("/"))
