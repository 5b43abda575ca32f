"""OPC UA values at the driver boundary: status codes to quality, variants to plain values, and
plain values to variants typed as the node's DataType.

A spec-following server refuses a value whose variant type differs from the variable's DataType
(``BadTypeMismatch``): a Python ``int`` would go out as Int64 and a Double variable refuses it.
So every value written or passed to a method is converted here to the builtin type the node (or
the method argument) declares, and a value that cannot be converted without loss is refused
before anything is sent.
"""

from __future__ import annotations

import enum
import math
from datetime import UTC, datetime

from asyncua import ua

from drivers.base import Quality, Value

_INT_RANGES: dict[ua.VariantType, tuple[int, int]] = {
    ua.VariantType.SByte: (-(2**7), 2**7 - 1),
    ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-(2**15), 2**15 - 1),
    ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-(2**31), 2**31 - 1),
    ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-(2**63), 2**63 - 1),
    ua.VariantType.UInt64: (0, 2**64 - 1),
}
_FLOAT_MAX = 3.4028234663852886e38  # largest finite IEEE-754 single


def quality_of(status: ua.StatusCode | None) -> tuple[Quality, str]:
    """Quality and status name of an OPC UA status code (``Good`` gives an empty name)."""
    if status is None or status.value == 0:
        return Quality.GOOD, ""
    if status.is_good():
        return Quality.GOOD, status.name
    if status.is_uncertain():
        return Quality.UNCERTAIN, status.name
    return Quality.BAD, status.name


def source_time_of(dv: ua.DataValue) -> datetime | None:
    """The DataValue's source timestamp as an aware UTC datetime (``None`` when absent)."""
    ts = dv.SourceTimestamp
    if ts is None:
        return None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def plain_value(variant: ua.Variant | None) -> Value:
    """A variant's value as a ``drivers.base.Value``.

    Numbers, booleans and strings pass as they are; localized text gives its text, enumerations
    their integer, date-times their RFC 3339 text; anything else (arrays, structures, byte
    strings) its ``str``.
    """
    if variant is None:
        return None
    raw = variant.Value
    if type(raw) is float:  # the common case first: process values are mostly Double
        return raw
    if raw is None or isinstance(raw, bool | str):
        return raw
    if isinstance(raw, enum.Enum):
        return int(raw.value) if isinstance(raw.value, int) else str(raw.value)
    if isinstance(raw, int | float):
        return raw
    if isinstance(raw, ua.LocalizedText):
        return raw.Text
    if isinstance(raw, datetime):
        aware = raw if raw.tzinfo is not None else raw.replace(tzinfo=UTC)
        return aware.isoformat(timespec="microseconds")
    return str(raw)


def type_name(vtype: ua.VariantType) -> str:
    """The OPC UA name of a builtin type (``Variant`` for an abstract DataType)."""
    return vtype.name


def to_variant(value: Value, vtype: ua.VariantType, value_rank: int = -1) -> ua.Variant:
    """``value`` as a variant of the builtin type ``vtype``.

    Raises ``ValueError`` naming the type when the value does not fit it (wrong kind, out of
    range, array expected); the caller wraps it in the error of its operation.
    """
    if value_rank >= 1:
        raise ValueError(f"the node expects an array (ValueRank {value_rank})")
    if vtype in _INT_RANGES:
        return ua.Variant(_as_int(value, vtype), vtype)
    if vtype in (ua.VariantType.Double, ua.VariantType.Float):
        return ua.Variant(_as_float(value, vtype), vtype)
    if vtype is ua.VariantType.Boolean:
        if not isinstance(value, bool):
            raise ValueError(f"Boolean expects true or false, not {value!r}")
        return ua.Variant(value, vtype)
    if vtype is ua.VariantType.String:
        if not isinstance(value, str):
            raise ValueError(f"String expects text, not {value!r}")
        return ua.Variant(value, vtype)
    if vtype is ua.VariantType.LocalizedText:
        if not isinstance(value, str):
            raise ValueError(f"LocalizedText expects text, not {value!r}")
        return ua.Variant(ua.LocalizedText(value), vtype)
    if vtype is ua.VariantType.DateTime:
        return ua.Variant(_as_datetime(value), vtype)
    if vtype is ua.VariantType.Variant:
        # An abstract DataType (BaseDataType, Number): any builtin type is allowed.
        if value is None:
            return ua.Variant(None, ua.VariantType.Null)
        if isinstance(value, float):
            return ua.Variant(value, ua.VariantType.Double)
        return ua.Variant(value)
    raise ValueError(f"values of DataType {vtype.name} are not supported by this driver")


def _as_int(value: Value, vtype: ua.VariantType) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{vtype.name} expects an integer, not {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{vtype.name} expects an integer, not {value!r}")
        value = int(value)
    low, high = _INT_RANGES[vtype]
    if not low <= value <= high:
        raise ValueError(f"{value} is outside the range of {vtype.name} ({low}..{high})")
    return value


def _as_float(value: Value, vtype: ua.VariantType) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{vtype.name} expects a number, not {value!r}")
    result = float(value)
    if vtype is ua.VariantType.Float and math.isfinite(result) and abs(result) > _FLOAT_MAX:
        raise ValueError(f"{value} is outside the range of Float")
    return result


def _as_datetime(value: Value) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"DateTime expects RFC 3339 text, not {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"DateTime expects RFC 3339 text, not {value!r}") from exc
    if parsed.tzinfo is None:
        raise ValueError(f"DateTime needs a time zone: {value!r}")
    return parsed.astimezone(UTC)
