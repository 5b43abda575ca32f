"""Values, static types and unit rules of the recipe expression language.

A unit is an opaque string (``degC``, ``mL/day``, ``%DO``, ``cells/mL``); ``""`` is
dimensionless and a duration is a number in seconds with unit ``s``. Rules, shared by the
static check and by evaluation:

- ``+ - < <= > >= == !=`` need equal units, or one side dimensionless; but a duration never
  meets a bare number (write ``12d``, not ``12``);
- ``*`` and ``/`` compose units (``g`` / ``mL`` is ``g/mL``; ``mL`` / ``mL`` is ``""``).

Statically a unit may also be unknown (``None``, e.g. a tag checked without a configuration),
which is compatible with anything. Used through ``agent.expr.expression``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DURATION_UNITS: dict[str, int] = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_ALIASES = {"°C": "degC", "ml": "mL", "l": "L", "sec": "s"}


@dataclass(frozen=True, slots=True)
class Quantity:
    """A number with a unit; durations are seconds with unit ``s``. Integers stay ``int``."""

    value: int | float
    unit: str = ""

    def __str__(self) -> str:
        return f"{self.value:g} {self.unit}".rstrip()


Value = bool | str | Quantity


@dataclass(frozen=True, slots=True)
class Type:
    """A static type: ``num`` with a unit (``None`` when unknown), ``bool``, ``str`` or ``any``."""

    kind: Literal["num", "bool", "str", "any"]
    unit: str | None = ""

    def __str__(self) -> str:
        if self.kind != "num":
            return self.kind
        if self.unit == "s":
            return "a duration"
        return f"a number in {self.unit}" if self.unit else "a number"


def normalize_unit(unit: str) -> str:
    """The canonical spelling of a unit (``°C`` -> ``degC``, ``ml`` -> ``mL``)."""
    return _ALIASES.get(unit, unit)


def type_of(kind: str, unit: str = "") -> Type:
    """The type of a configured tag, parameter or input of type float/int/bool/str."""
    if kind in ("float", "int"):
        return Type("num", normalize_unit(unit))
    if kind in ("bool", "str"):
        return Type(kind)  # type: ignore[arg-type]
    return Type("any")


def as_value(raw: bool | int | float | str | Quantity, unit: str = "") -> Value:
    """A ``Value`` from a plain Python value (numbers get ``unit``)."""
    if isinstance(raw, bool | str | Quantity):
        return raw
    return Quantity(raw, normalize_unit(unit))


def explain_mismatch(a: str | None, b: str | None) -> str | None:
    """Why two units cannot be added or compared, or ``None`` when they can."""
    if a is None or b is None or a == b:
        return None
    if "s" in (a, b) and "" in (a, b):
        return "a duration cannot meet a bare number (write 12d, 6h, 30m or 10s)"
    if "" in (a, b):
        return None
    return f"units {_show(a)} and {_show(b)} do not match"


def _show(unit: str) -> str:
    return "duration" if unit == "s" else repr(unit)


def sum_unit(a: str | None, b: str | None) -> str | None:
    """The unit of ``a + b`` for compatible units."""
    if a is None or b is None:
        return None
    return a or b


def compose(op: str, a: str | None, b: str | None) -> str | None:
    """The unit of ``a * b`` or ``a / b``."""
    if a is None or b is None:
        return None
    if op == "*":
        if not a or not b:
            return a or b
        return f"{_group(a)}*{_group(b)}"
    if a == b:
        return ""
    if not b:
        return a
    return f"{_group(a) if a else '1'}/{_group(b)}"


def _group(unit: str) -> str:
    return f"({unit})" if "/" in unit or "*" in unit else unit
