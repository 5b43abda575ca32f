"""Frozen point definitions: where a tag lives on a device and how its value is encoded.

The agent's configuration (YAML, validated with pydantic) is translated into these plain
dataclasses at the composition root, so the drivers depend on nothing but the standard library
and their protocol library.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ModbusTable(enum.StrEnum):
    """The four Modbus data tables."""

    COIL = "coil"
    DISCRETE_INPUT = "discrete_input"
    HOLDING_REGISTER = "holding_register"
    INPUT_REGISTER = "input_register"


class ModbusType(enum.StrEnum):
    """How register words encode a value."""

    BOOL = "bool"
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    FLOAT32 = "float32"
    FLOAT64 = "float64"

    @property
    def words(self) -> int:
        """Registers (16-bit words) the type occupies."""
        return {"bool": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2}.get(
            self.value, 2 if self is ModbusType.FLOAT32 else 4
        )


class WordOrder(enum.StrEnum):
    """Order of 16-bit words in a multi-register value. ``big``: most significant word first
    (address N holds the high word), as the Modbus spec's big-endian convention."""

    BIG = "big"
    LITTLE = "little"


class ByteOrder(enum.StrEnum):
    """Order of the two bytes inside each register. ``big`` is the Modbus standard."""

    BIG = "big"
    LITTLE = "little"


@dataclass(frozen=True, slots=True)
class OpcUaPoint:
    """A tag on an OPC UA server: by NodeId (``ns=2;i=5``, ``ns=2;s=Temp``) or by browse path
    from the Objects folder (``["2:Bioreactor", "2:Temperature", "2:CurrentValue"]``; each
    element ``ns:Name`` where the namespace index may also be a namespace URI's index resolved at
    connect). Exactly one of ``node_id`` and ``browse_path`` is set."""

    tag: str
    node_id: str | None = None
    browse_path: tuple[str, ...] | None = None
    sampling_interval_ms: float = 500.0
    deadband: float = 0.0  # absolute deadband for subscriptions; 0 = every change


@dataclass(frozen=True, slots=True)
class OpcUaMethod:
    """A method on an OPC UA server: the object that owns it and the method itself, each by
    NodeId or browse path."""

    name: str
    object_node_id: str | None = None
    object_browse_path: tuple[str, ...] | None = None
    method_node_id: str | None = None
    method_browse_path: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ModbusPoint:
    """A tag in a Modbus device's tables."""

    tag: str
    table: ModbusTable
    address: int  # 0-based protocol address
    type: ModbusType = ModbusType.UINT16
    unit_id: int = 1
    word_order: WordOrder = WordOrder.BIG
    byte_order: ByteOrder = ByteOrder.BIG
    scale: float = 1.0  # engineering value = raw * scale + offset
    offset: float = 0.0


@dataclass(frozen=True, slots=True)
class SerialPoint:
    """A tag read through a line command (e.g. MT-SICS ``SI`` for the weight)."""

    tag: str
    command: str  # e.g. "S" (stable weight) or "SI" (immediate weight)


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """OPC UA security: policy ``None`` or ``Basic256Sha256`` with mode ``Sign`` or
    ``SignAndEncrypt``; certificate files for the client and, optionally, the server's
    certificate to trust."""

    policy: str = "None"
    mode: str = "None"
    certificate: str | None = None
    private_key: str | None = None
    server_certificate: str | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Reconnect backoff: first delay, factor, ceiling (seconds of the injected clock)."""

    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 10.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Request timeout and poll interval (seconds)."""

    request: float = 2.0
    poll_interval: float = 1.0
    extra: dict[str, float] = field(default_factory=dict)
