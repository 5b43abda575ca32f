"""Pure Modbus encoding (no I/O): point and endpoint validation, register codec, read planning.

Register layout of a multi-word value (see ``drivers.points``): the value is packed big-endian
(``struct`` ``>``) and cut into 16-bit words, most significant word first. ``WordOrder.LITTLE``
reverses the words; ``ByteOrder.LITTLE`` swaps the two bytes inside each word. So float32 1.0 is
``[0x3F80, 0x0000]`` big/big, ``[0x0000, 0x3F80]`` with little word order, ``[0x803F, 0x0000]``
with little byte order.

Engineering value = raw · scale + offset. Reads of integer types without scaling stay ``int``;
writes invert the scaling, round integer types to the nearest raw step and refuse values whose
raw form does not fit the type (``WriteRefused``), before anything is sent.

``plan_reads`` merges points of the same unit id and table into as few requests as possible:
a gap of up to ``max_gap`` unused registers (or bits) between points is read along, and one
request never exceeds 125 registers or 2000 bits (the protocol's limits). Each ``ReadRequest``
builds the decoder of its answer once (``struct`` formats, offsets, scaling), so decoding an
answer is a few C calls: unscaled big-endian uint16 points take the answer's ints as they are.
"""

from __future__ import annotations

import math
import struct
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any
from urllib.parse import parse_qsl

from drivers.errors import ConfigurationError, ProtocolError, WriteRefused
from drivers.points import ByteOrder, ModbusPoint, ModbusTable, ModbusType, WordOrder

MAX_REGISTERS = 125  # per read request (function codes 3 and 4)
MAX_BITS = 2000  # per read request (function codes 1 and 2)
BIT_TABLES = frozenset({ModbusTable.COIL, ModbusTable.DISCRETE_INPUT})
WRITABLE_TABLES = frozenset({ModbusTable.COIL, ModbusTable.HOLDING_REGISTER})
FLOAT32_MAX = 3.4028234663852886e38

# struct format and integer range (None for floats) of each register type
_FORMATS: dict[ModbusType, tuple[str, tuple[int, int] | None]] = {
    ModbusType.INT16: ("h", (-(2**15), 2**15 - 1)),
    ModbusType.UINT16: ("H", (0, 2**16 - 1)),
    ModbusType.INT32: ("i", (-(2**31), 2**31 - 1)),
    ModbusType.UINT32: ("I", (0, 2**32 - 1)),
    ModbusType.FLOAT32: ("f", None),
    ModbusType.FLOAT64: ("d", None),
}

Raw = bool | int | float


def validate_point(device: str, point: ModbusPoint) -> None:
    """Raise ``ConfigurationError`` (naming the tag) for a point that cannot work."""
    where = f"tag {point.tag!r} ({point.table} {point.address}, unit {point.unit_id})"
    if not point.tag:
        raise ConfigurationError(device, f"a point at {point.table} {point.address} has no tag")
    if not 0 <= point.address <= 65535:
        raise ConfigurationError(device, f"{where}: address outside 0..65535")
    if not 1 <= point.unit_id <= 255:
        raise ConfigurationError(device, f"{where}: unit id outside 1..255")
    if point.table in BIT_TABLES and point.type is not ModbusType.BOOL:
        raise ConfigurationError(
            device,
            f"{where}: type {point.type} in a bit table (coils and discrete inputs hold bool)",
        )
    if point.address + point.type.words - 1 > 65535:
        raise ConfigurationError(
            device, f"{where}: {point.type} needs {point.type.words} registers, past address 65535"
        )
    if not (math.isfinite(point.scale) and point.scale != 0 and math.isfinite(point.offset)):
        raise ConfigurationError(
            device,
            f"{where}: scale {point.scale} / offset {point.offset} must be finite, scale ≠ 0",
        )


def _swap_bytes(word: int) -> int:
    return ((word & 0xFF) << 8) | (word >> 8)


def raw_to_registers(
    raw: Raw, type_: ModbusType, word_order: WordOrder, byte_order: ByteOrder
) -> list[int]:
    """Encode a raw value into register words (no range checks: see ``to_raw``)."""
    if type_ is ModbusType.BOOL:
        return [1 if raw else 0]
    fmt, _ = _FORMATS[type_]
    data = struct.pack(f">{fmt}", raw)
    words = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if word_order is WordOrder.LITTLE:
        words.reverse()
    if byte_order is ByteOrder.LITTLE:
        words = [_swap_bytes(w) for w in words]
    return words


def _layout(word_order: WordOrder, byte_order: ByteOrder) -> tuple[str, str]:
    """The ``struct`` byte orders to pack the words in, then to unpack the value from them::

    words   bytes    pack  unpack
    big     big      >     >
    big     little   <     >       little-endian words undo the swapped bytes
    little  big      <     <       the value then reads back to front
    little  little   >     <
    """
    reversed_words = word_order is WordOrder.LITTLE
    pack = "<" if (byte_order is ByteOrder.LITTLE) != reversed_words else ">"
    return pack, "<" if reversed_words else ">"


def registers_to_raw(
    words: Sequence[int], type_: ModbusType, word_order: WordOrder, byte_order: ByteOrder
) -> Raw:
    """Decode register words into the raw value of ``type_`` (bool: any non-zero word)."""
    if len(words) != type_.words:
        raise ValueError(f"{type_} needs {type_.words} registers, got {len(words)}")
    if type_ is ModbusType.BOOL:
        return bool(words[0])
    pack, unpack = _layout(word_order, byte_order)
    fmt, _ = _FORMATS[type_]
    data = struct.pack(f"{pack}{len(words)}H", *words)
    value: int | float = struct.unpack(f"{unpack}{fmt}", data)[0]
    return value


def to_engineering(point: ModbusPoint, raw: Raw) -> bool | int | float:
    """Apply ``raw · scale + offset`` (bools and unscaled values pass unchanged)."""
    if point.type is ModbusType.BOOL or isinstance(raw, bool):
        return bool(raw)
    if point.scale == 1.0 and point.offset == 0.0:
        return raw
    return raw * point.scale + point.offset


def to_raw(device: str, point: ModbusPoint, value: object) -> Raw:
    """Invert the scaling of an engineering value; ``WriteRefused`` when it cannot be sent."""
    where = f"tag {point.tag!r} ({point.table} {point.address}, unit {point.unit_id})"
    if point.type is ModbusType.BOOL:
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise WriteRefused(device, f"{where}: value {value!r} is not a bool")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WriteRefused(device, f"{where}: value {value!r} is not a number")
    if not math.isfinite(value):
        raise WriteRefused(device, f"{where}: value {value!r} is not finite")
    raw: int | float = value
    if point.scale != 1.0 or point.offset != 0.0:
        raw = (value - point.offset) / point.scale
    _, limits = _FORMATS[point.type]
    if limits is not None:
        rounded = round(raw)
        lo, hi = limits
        if not lo <= rounded <= hi:
            raise WriteRefused(
                device, f"{where}: value {value!r} is raw {raw!r}, outside {point.type} {lo}..{hi}"
            )
        return rounded
    raw = float(raw)
    if point.type is ModbusType.FLOAT32 and abs(raw) > FLOAT32_MAX:
        raise WriteRefused(device, f"{where}: value {value!r} is raw {raw!r}, outside float32")
    return raw


def encode(device: str, point: ModbusPoint, value: object) -> list[int]:
    """The register words to write for an engineering value of a register point."""
    return raw_to_registers(
        to_raw(device, point, value), point.type, point.word_order, point.byte_order
    )


def decode(point: ModbusPoint, words: Sequence[int]) -> bool | int | float:
    """The engineering value of a register point from its words."""
    return to_engineering(
        point, registers_to_raw(words, point.type, point.word_order, point.byte_order)
    )


Decoded = Sequence[bool | int | float]
# a point's value from the answer's words and the words packed big- and little-endian
_Reader = Callable[[Sequence[int], bytes, bytes], bool | int | float]


def _unscaled(point: ModbusPoint) -> bool:
    return point.scale == 1.0 and point.offset == 0.0


def _plain(point: ModbusPoint) -> bool:
    """An unscaled uint16 in standard byte order: its value is the answer's word itself."""
    return (
        point.type is ModbusType.UINT16 and point.byte_order is ByteOrder.BIG and _unscaled(point)
    )


def _reader(point: ModbusPoint, offset: int) -> _Reader:
    """The decoder of one register point ``offset`` words into the answer, built once."""
    if point.type is ModbusType.BOOL:
        return lambda words, big, little: bool(words[offset])
    if _plain(point):
        return lambda words, big, little: words[offset]
    pack, unpack = _layout(point.word_order, point.byte_order)
    unpack_from = struct.Struct(unpack + _FORMATS[point.type][0]).unpack_from
    at, from_little = 2 * offset, pack == "<"
    if _unscaled(point):
        return lambda words, big, little: unpack_from(little if from_little else big, at)[0]
    scale, shift = point.scale, point.offset
    return lambda words, big, little: (
        unpack_from(little if from_little else big, at)[0] * scale + shift
    )


def _pick(offsets: Sequence[int]) -> Callable[[Sequence[Any]], Sequence[Any]]:
    """The items at ``offsets``, in C (``itemgetter`` returns a bare item for one offset)."""
    if len(offsets) == 1:
        (only,) = offsets
        return lambda values: (values[only],)
    return itemgetter(*offsets)


def _compile(
    table: ModbusTable, address: int, count: int, points: Sequence[ModbusPoint]
) -> Callable[[Sequence[Any]], Decoded]:
    """The decoder of a whole answer of ``count`` words or bits into the points' values."""
    offsets = [p.address - address for p in points]
    pick = _pick(offsets)
    if table in BIT_TABLES:
        return lambda bits: [bool(b) for b in pick(bits)]
    if all(_plain(p) for p in points):  # the common case: the answer's own ints
        return (lambda words: words) if offsets == list(range(count)) else pick
    readers = [_reader(p, offset) for p, offset in zip(points, offsets, strict=True)]
    packs = {_layout(p.word_order, p.byte_order)[0] for p in points if not _plain(p)}
    pack_big = struct.Struct(f">{count}H").pack if ">" in packs else None
    pack_little = struct.Struct(f"<{count}H").pack if "<" in packs else None

    def decode_words(words: Sequence[Any]) -> Decoded:
        big = pack_big(*words) if pack_big else b""
        little = pack_little(*words) if pack_little else b""
        return [read(words, big, little) for read in readers]

    return decode_words


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read request: ``count`` registers/bits of ``table`` from ``address`` on ``unit_id``.

    ``tags`` and the decoder of the answer are derived once, when the request is planned.
    """

    unit_id: int
    table: ModbusTable
    address: int
    count: int
    points: tuple[ModbusPoint, ...]
    tags: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _decode: Callable[[Sequence[Any]], Decoded] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", tuple(p.tag for p in self.points))
        decoder = _compile(self.table, self.address, self.count, self.points)
        object.__setattr__(self, "_decode", decoder)

    def describe(self) -> str:
        """e.g. ``unit 2 holding_register 0..3 (tags speed_sp, calibration)``."""
        end = self.address + self.count - 1
        return (
            f"unit {self.unit_id} {self.table} {self.address}..{end} (tags {', '.join(self.tags)})"
        )

    def values(self, device: str, answer: Sequence[int] | Sequence[bool]) -> Decoded:
        """Engineering values of the points, in ``tags`` order; ``ProtocolError`` on a short
        answer (bit answers are padded to whole bytes, so only a shorter one is wrong)."""
        received = len(answer)
        if received != self.count and (received < self.count or self.table not in BIT_TABLES):
            raise ProtocolError(
                device, f"{self.describe()}: asked {self.count}, answered {received}"
            )
        return self._decode(answer)


def plan_reads(points: Iterable[ModbusPoint], *, max_gap: int = 4) -> list[ReadRequest]:
    """Merge the points into the fewest requests (same unit and table, gaps ≤ ``max_gap``)."""
    groups: dict[tuple[int, ModbusTable], list[ModbusPoint]] = defaultdict(list)
    for point in points:
        groups[(point.unit_id, point.table)].append(point)
    requests: list[ReadRequest] = []
    for (unit_id, table), members in sorted(groups.items()):
        cap = MAX_BITS if table in BIT_TABLES else MAX_REGISTERS
        members.sort(key=lambda p: (p.address, p.type.words))
        start, end = members[0].address, 0  # end: one past the last address
        batch: list[ModbusPoint] = []
        for point in members:
            p_end = point.address + point.type.words
            if batch and (point.address - end > max_gap or max(end, p_end) - start > cap):
                requests.append(ReadRequest(unit_id, table, start, end - start, tuple(batch)))
                batch = []
            if not batch:
                start, end = point.address, p_end
            batch.append(point)
            end = max(end, p_end)
        requests.append(ReadRequest(unit_id, table, start, end - start, tuple(batch)))
    return requests


def decode_response(
    device: str, request: ReadRequest, values: Sequence[int] | Sequence[bool]
) -> dict[str, bool | int | float]:
    """Engineering values of the request's points by tag; ``ProtocolError`` on a short answer."""
    return dict(zip(request.tags, request.values(device, values), strict=True))


@dataclass(frozen=True, slots=True)
class TcpEndpoint:
    """A Modbus TCP server (or gateway) address."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class RtuEndpoint:
    """A serial port with its line settings, for Modbus RTU."""

    path: str
    baudrate: int
    parity: str
    stopbits: int
    bytesize: int


def parse_endpoint(
    device: str, endpoint: str, *, baudrate: int, parity: str, stopbits: int, bytesize: int
) -> TcpEndpoint | RtuEndpoint:
    """Parse ``tcp://HOST:PORT`` or ``rtu://PATH?baudrate=..``; ``ConfigurationError`` if bad."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "rtu") or not rest:
        raise ConfigurationError(
            device, f"endpoint {endpoint!r}: use tcp://HOST:PORT or rtu://PATH"
        )
    if scheme == "tcp":
        host, _, port_text = rest.rstrip("/").rpartition(":") if ":" in rest else (rest, "", "502")
        host = host.strip("[]")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigurationError(device, f"endpoint {endpoint!r}: bad host or port")
        return TcpEndpoint(host, int(port_text))
    path, _, query = rest.partition("?")
    options: dict[str, Any] = {
        "baudrate": baudrate,
        "parity": parity,
        "stopbits": stopbits,
        "bytesize": bytesize,
    }
    for key, text in parse_qsl(query, keep_blank_values=True):
        if key not in options:
            raise ConfigurationError(device, f"endpoint {endpoint!r}: unknown option {key!r}")
        options[key] = text if key == "parity" else (int(text) if text.isdigit() else -1)
    if not path:
        raise ConfigurationError(device, f"endpoint {endpoint!r}: no serial device path")
    if options["parity"] not in ("N", "E", "O") or options["baudrate"] <= 0:
        raise ConfigurationError(device, f"endpoint {endpoint!r}: bad parity or baudrate")
    if options["stopbits"] not in (1, 2) or options["bytesize"] not in (7, 8):
        raise ConfigurationError(device, f"endpoint {endpoint!r}: bad stopbits or bytesize")
    return RtuEndpoint(path, **options)
