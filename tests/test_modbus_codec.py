"""Unit tests (no I/O) of the Modbus codec: encoding, scaling, validation and read planning."""

from __future__ import annotations

import itertools
import math

import pytest

from drivers.errors import ConfigurationError, ProtocolError, WriteRefused
from drivers.modbus_codec import (
    RtuEndpoint,
    TcpEndpoint,
    decode,
    decode_response,
    encode,
    parse_endpoint,
    plan_reads,
    raw_to_registers,
    registers_to_raw,
    validate_point,
)
from drivers.points import ByteOrder, ModbusPoint, ModbusTable, ModbusType, WordOrder

HR, IR, CO, DI = (
    ModbusTable.HOLDING_REGISTER,
    ModbusTable.INPUT_REGISTER,
    ModbusTable.COIL,
    ModbusTable.DISCRETE_INPUT,
)
B, L = WordOrder.BIG, WordOrder.LITTLE
BB, BL = ByteOrder.BIG, ByteOrder.LITTLE

SAMPLES: dict[ModbusType, list[int | float]] = {
    ModbusType.INT16: [-32768, -2, 0, 1, 32767],
    ModbusType.UINT16: [0, 1, 0x1234, 65535],
    ModbusType.INT32: [-(2**31), -70000, 0, 0x12345678, 2**31 - 1],
    ModbusType.UINT32: [0, 70000, 0x89ABCDEF, 2**32 - 1],
    ModbusType.FLOAT32: [0.0, 1.0, -2.5, 37.125, 1e-3, 3.0e38],
    ModbusType.FLOAT64: [0.0, 1.0, -2.5, math.pi, 1e300, -1e-300],
}


def point(type_: ModbusType = ModbusType.UINT16, **kw: object) -> ModbusPoint:
    defaults: dict[str, object] = {"tag": "t", "table": HR, "address": 0, "type": type_}
    defaults.update(kw)
    return ModbusPoint(**defaults)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("type_", "words_order", "bytes_order", "raw", "words"),
    [
        (ModbusType.FLOAT32, B, BB, 1.0, [0x3F80, 0x0000]),
        (ModbusType.FLOAT32, L, BB, 1.0, [0x0000, 0x3F80]),
        (ModbusType.FLOAT32, B, BL, 1.0, [0x803F, 0x0000]),
        (ModbusType.FLOAT32, L, BL, 1.0, [0x0000, 0x803F]),
        (ModbusType.FLOAT32, B, BB, 100.0, [0x42C8, 0x0000]),
        (ModbusType.INT32, B, BB, 0x12345678, [0x1234, 0x5678]),
        (ModbusType.INT32, L, BB, 0x12345678, [0x5678, 0x1234]),
        (ModbusType.INT32, B, BL, 0x12345678, [0x3412, 0x7856]),
        (ModbusType.INT32, B, BB, -2, [0xFFFF, 0xFFFE]),
        (ModbusType.UINT32, L, BL, 0x01020304, [0x0403, 0x0201]),
        (ModbusType.INT16, B, BB, -2, [0xFFFE]),
        (ModbusType.UINT16, L, BL, 0x1234, [0x3412]),
        (ModbusType.FLOAT64, B, BB, 1.0, [0x3FF0, 0, 0, 0]),
        (ModbusType.FLOAT64, L, BB, 1.0, [0, 0, 0, 0x3FF0]),
        (ModbusType.BOOL, B, BB, True, [1]),
    ],
)
def test_known_vectors(
    type_: ModbusType, words_order: WordOrder, bytes_order: ByteOrder, raw: float, words: list[int]
) -> None:
    """Known register layouts encode and decode exactly as documented."""
    assert raw_to_registers(raw, type_, words_order, bytes_order) == words
    assert registers_to_raw(words, type_, words_order, bytes_order) == raw


@pytest.mark.parametrize(
    ("type_", "words_order", "bytes_order"),
    list(itertools.product(SAMPLES, WordOrder, ByteOrder)),
)
def test_round_trip_every_type_and_order(
    type_: ModbusType, words_order: WordOrder, bytes_order: ByteOrder
) -> None:
    """Every type survives encode then decode in every byte and word order."""
    p = point(type_, word_order=words_order, byte_order=bytes_order)
    for value in SAMPLES[type_]:
        words = encode("dev", p, value)
        assert len(words) == type_.words and all(0 <= w <= 0xFFFF for w in words)
        back = decode(p, words)
        if type_ is ModbusType.FLOAT32:
            assert back == pytest.approx(value, rel=1e-7)
        else:
            assert back == value


def test_register_bool_is_any_non_zero_word() -> None:
    """A bool kept in a register reads True for any non-zero word."""
    assert decode(point(ModbusType.BOOL), [0x8000]) is True
    assert decode(point(ModbusType.BOOL), [0]) is False


def test_scale_and_offset_apply_on_read_and_invert_on_write() -> None:
    """Engineering value = raw·scale + offset; writes round to the nearest raw step."""
    p = point(ModbusType.INT16, scale=0.1, offset=-50.0)
    assert decode(p, [871]) == pytest.approx(37.1)
    assert encode("dev", p, 37.1) == [871]
    assert encode("dev", p, 37.14) == [871]
    assert decode(point(ModbusType.UINT16), [5]) == 5 and isinstance(decode(point(), [5]), int)


@pytest.mark.parametrize(
    ("p", "value"),
    [
        (point(ModbusType.UINT16, scale=0.001), 70.0),  # raw 70000 > 65535
        (point(ModbusType.UINT16), -1),
        (point(ModbusType.INT16), 40000),
        (point(ModbusType.UINT32), 2**32),
        (point(ModbusType.FLOAT32), 1e39),
        (point(ModbusType.FLOAT32), math.nan),
        (point(ModbusType.FLOAT64), math.inf),
        (point(ModbusType.UINT16), True),
        (point(ModbusType.UINT16), "12"),
        (point(ModbusType.UINT16), None),
        (point(ModbusType.BOOL, table=CO), 2),
        (point(ModbusType.BOOL, table=CO), "on"),
    ],
)
def test_values_that_do_not_fit_are_refused(p: ModbusPoint, value: object) -> None:
    """Values outside the raw type (after scaling) or of the wrong kind raise WriteRefused."""
    with pytest.raises(WriteRefused, match="tag 't'"):
        encode("dev", p, value)


@pytest.mark.parametrize(
    ("p", "match"),
    [
        (point(ModbusType.FLOAT32, table=CO), "bit table"),
        (point(ModbusType.UINT16, table=DI), "bit table"),
        (point(address=70000), "address"),
        (point(address=-1), "address"),
        (point(ModbusType.FLOAT64, address=65533), "past address 65535"),
        (point(unit_id=0), "unit id"),
        (point(scale=0.0), "scale"),
        (point(offset=math.nan), "scale"),
    ],
)
def test_points_that_cannot_work_are_rejected(p: ModbusPoint, match: str) -> None:
    """Impossible point definitions raise ConfigurationError naming the tag."""
    with pytest.raises(ConfigurationError, match=match) as err:
        validate_point("dev", p)
    assert "'t'" in str(err.value)


def test_plan_merges_neighbours_and_splits_on_gap_unit_and_table() -> None:
    """Adjacent and nearby points share a request; a wide gap, unit or table does not."""
    points = [
        point(ModbusType.FLOAT32, tag="a", address=0),
        point(ModbusType.UINT16, tag="b", address=2),
        point(ModbusType.UINT16, tag="c", address=6),  # gap of 3: merged
        point(ModbusType.UINT16, tag="d", address=20),  # gap of 13: new request
        point(ModbusType.UINT16, tag="e", address=0, unit_id=2),
        point(ModbusType.UINT16, tag="f", address=0, table=IR),
        point(ModbusType.BOOL, tag="g", address=0, table=CO),
        point(ModbusType.BOOL, tag="h", address=1, table=CO),
    ]
    plan = plan_reads(points, max_gap=4)
    shapes = {(r.unit_id, r.table, r.address, r.count, tuple(r.tags)) for r in plan}
    assert shapes == {
        (1, CO, 0, 2, ("g", "h")),
        (1, HR, 0, 7, ("a", "b", "c")),
        (1, HR, 20, 1, ("d",)),
        (1, IR, 0, 1, ("f",)),
        (2, HR, 0, 1, ("e",)),
    }


def test_plan_respects_protocol_limits() -> None:
    """No request exceeds 125 registers or 2000 bits."""
    regs = [point(ModbusType.FLOAT32, tag=f"r{i}", address=2 * i) for i in range(100)]
    bits = [point(ModbusType.BOOL, tag=f"b{i}", address=i, table=CO) for i in range(4500)]
    plan = plan_reads(regs + bits)
    assert all(r.count <= 125 for r in plan if r.table is HR)
    assert all(r.count <= 2000 for r in plan if r.table is CO)
    assert sum(len(r.points) for r in plan) == 4600
    assert len(plan) == 2 + 3


def test_short_response_is_a_protocol_error() -> None:
    """An answer with fewer registers than asked raises ProtocolError naming the request."""
    (request,) = plan_reads([point(ModbusType.FLOAT32, tag="sp")])
    with pytest.raises(ProtocolError, match="asked 2, answered 1"):
        decode_response("dev", request, [0x3F80])
    assert decode_response("dev", request, [0x3F80, 0]) == {"sp": 1.0}


def test_bit_responses_padded_to_bytes_are_accepted() -> None:
    """Coil answers padded to a whole byte decode the asked bits."""
    (request,) = plan_reads([point(ModbusType.BOOL, tag="run", table=CO, address=1)])
    assert decode_response("dev", request, [True] + [False] * 7) == {"run": True}


@pytest.mark.parametrize(
    ("words_order", "bytes_order"), list(itertools.product(WordOrder, ByteOrder))
)
def test_request_decoder_matches_decoding_each_point(
    words_order: WordOrder, bytes_order: ByteOrder
) -> None:
    """A planned request decodes every type, scaled or not, gaps and overlaps as decode() does."""
    points: list[ModbusPoint] = []
    image = [0] * 200
    address = 0
    for i, (type_, scale) in enumerate(itertools.product(SAMPLES, [1.0, 0.5])):
        p = point(
            type_,
            tag=f"t{i}",
            address=address,
            word_order=words_order,
            byte_order=bytes_order,
            scale=scale,
            offset=0.0 if scale == 1.0 else 3.0,
        )
        image[address : address + type_.words] = encode("dev", p, SAMPLES[type_][-1] * scale)
        points.append(p)
        address += type_.words + i % 3  # gaps of 0, 1 and 2 registers
    points.append(point(ModbusType.INT16, tag="overlap", address=points[0].address))
    points.append(point(ModbusType.BOOL, tag="flag", address=address))
    image[address] = 0x0100
    plan = plan_reads(points, max_gap=1)
    assert len(plan) > 1  # the gaps of 2 split it
    decoded: dict[str, object] = {}
    for request in plan:
        answer = image[request.address : request.address + request.count]
        decoded.update(decode_response("dev", request, answer))
    assert decoded == {
        p.tag: decode(p, image[p.address : p.address + p.type.words]) for p in points
    }
    assert decoded["flag"] is True


def test_plain_words_are_the_answers_own() -> None:
    """Unscaled big-endian uint16 points decode to the answer's ints, adjacent or with gaps."""
    (adjacent,) = plan_reads([point(tag=f"r{i}", address=i) for i in range(5)])
    assert decode_response("dev", adjacent, [9, 8, 7, 6, 5]) == {
        "r0": 9,
        "r1": 8,
        "r2": 7,
        "r3": 6,
        "r4": 5,
    }
    (gapped,) = plan_reads([point(tag="a", address=10), point(tag="b", address=13)])
    assert decode_response("dev", gapped, [1, 2, 3, 4]) == {"a": 1, "b": 4}
    (single,) = plan_reads([point(tag="only", address=7)])
    assert decode_response("dev", single, [65535]) == {"only": 65535}


def test_bits_decode_at_their_offsets() -> None:
    """Coils with gaps between them decode from their own bit of the answer, as bools."""
    (request,) = plan_reads(
        [point(ModbusType.BOOL, tag=f"c{a}", table=CO, address=a) for a in (2, 5, 9)]
    )
    bits = [True, False, False, True, False, False, False, True] + [False] * 8
    assert decode_response("dev", request, bits) == {"c2": True, "c5": True, "c9": True}
    assert decode_response("dev", request, [0] * 8) == {"c2": False, "c5": False, "c9": False}


def test_endpoints_parse() -> None:
    """tcp:// and rtu:// endpoints parse, the query overriding the serial keywords."""
    serial = {"baudrate": 19200, "parity": "N", "stopbits": 1, "bytesize": 8}
    assert parse_endpoint("d", "tcp://10.0.0.5:1502", **serial) == TcpEndpoint("10.0.0.5", 1502)
    assert parse_endpoint("d", "tcp://pumps.local", **serial) == TcpEndpoint("pumps.local", 502)
    assert parse_endpoint("d", "tcp://[::1]:5020", **serial) == TcpEndpoint("::1", 5020)
    assert parse_endpoint("d", "rtu:///dev/ttyUSB0?baudrate=9600&parity=E", **serial) == (
        RtuEndpoint("/dev/ttyUSB0", 9600, "E", 1, 8)
    )


@pytest.mark.parametrize(
    "endpoint",
    [
        "modbus://x:1",
        "tcp://host:0",
        "tcp://host:port",
        "rtu://",
        "rtu:///dev/x?speed=9600",
        "rtu:///dev/x?parity=X",
        "rtu:///dev/x?stopbits=3",
        "/dev/ttyUSB0",
    ],
)
def test_bad_endpoints_are_rejected(endpoint: str) -> None:
    """Malformed endpoints raise ConfigurationError naming the endpoint."""
    serial = {"baudrate": 19200, "parity": "N", "stopbits": 1, "bytesize": 8}
    with pytest.raises(ConfigurationError, match="endpoint"):
        parse_endpoint("d", endpoint, **serial)
