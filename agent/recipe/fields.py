"""Value types of recipe models: names, references, expressions, durations, typed values.

Expressions validate into ``agent.expr.expression.Expr`` (parsed at load; a syntax error names the
column)
and serialize back to their text. ``ExprField`` takes text (or a YAML bool/number);
``ValueField`` (set values, call arguments) also reads a bare word such as ``select`` as a
string. Durations (``30s``, ``5m``, ``2h``, ``1d``, ``1h30m``) validate into float seconds:
``Duration`` > 0, ``Delay`` >= 0. ``Typed`` is what parameters and entered values share.
Re-exported by ``agent.recipe.model``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from agent.expr.expression import Expr, ExprError, parse, value_expr
from agent.expr.expression import literal as expr_literal
from agent.text.patterns import compile_pattern, full_match

_NAME = r"^[a-z][a-z0-9_]*$"
_REF = r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$"
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*(s|min|m|h|d)\s*)+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(s|min|m|h|d)")
_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}

MAX_DURATION = 366 * 86400
"""The longest duration a recipe may give (seconds): a year and a day; longer is a typo."""

# YAML gives numbers and booleans their own types: a version, count or limit must be written
# as one (``version: true`` or ``version: "3"`` is a mistake, not 1 or 3); floats take ints.
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True)]
Flag = Annotated[bool, Field(strict=True)]

Name = Annotated[str, Field(pattern=_NAME)]
TagRef = Annotated[str, Field(pattern=_REF, description="role.tag")]
MethodRef = Annotated[str, Field(pattern=_REF, description="role.method")]
Meaning = Literal["performed", "verified", "approved", "reviewed"]
OnTimeout = Literal["hold", "abort", "continue", "alarm"]


def _expr(value: Any) -> Expr:
    return _coerce(value, lambda v: parse(v) if isinstance(v, str) else expr_literal(v))


def _value(value: Any) -> Expr:
    return _coerce(value, value_expr)


def _coerce(value: Any, build: Callable[[Any], Expr]) -> Expr:
    if isinstance(value, Expr):
        return value
    if not isinstance(value, str | int | float | bool):
        raise ValueError(f"an expression is text, a number or true/false, not {_kind(value)}")
    try:
        return build(value)
    except ExprError as exc:
        where = f" at column {exc.column}" if exc.column else ""
        raise ValueError(f"bad expression {value!r}: {exc.message}{where}") from None


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", type(None): "empty"}.get(
        type(value), type(value).__name__
    )


_SOURCE = PlainSerializer(lambda e: e.source, return_type=str)
ExprField = Annotated[
    Expr,
    PlainValidator(_expr),
    _SOURCE,
    WithJsonSchema(
        {"anyOf": [{"type": "string"}, {"type": "boolean"}], "description": "expression"}
    ),
]
ValueField = Annotated[
    Expr,
    PlainValidator(_value),
    _SOURCE,
    WithJsonSchema(
        {
            "anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}],
            "description": "value: a number, true/false, a bare word (a string) or an expression",
        }
    ),
]


def _duration(value: Any, *, zero: bool) -> float:
    if isinstance(value, str) and _DURATION.match(value):
        seconds = sum(float(n) * _SECONDS[u] for n, u in _DURATION_PART.findall(value))
        if seconds > MAX_DURATION:
            raise ValueError(f"the duration {value!r:.40} is longer than a year (at most 366d)")
        if seconds > 0 or (zero and seconds == 0):
            return seconds
        raise ValueError(f"a duration must be positive, not {value!r}")
    raise ValueError(f"a duration is a number with a unit (30s, 5m, 2h, 1d, 1h30m), not {value!r}")


_DURATION_SCHEMA = {"type": "string", "pattern": _DURATION.pattern}
Duration = Annotated[
    float,
    PlainValidator(lambda v: _duration(v, zero=False)),
    PlainSerializer(lambda s: f"{s:g}s", return_type=str),
    WithJsonSchema({**_DURATION_SCHEMA, "description": "duration > 0 (30s, 5m, 2h, 1d)"}),
]
Delay = Annotated[
    float,
    PlainValidator(lambda v: _duration(v, zero=True)),
    PlainSerializer(lambda s: f"{s:g}s", return_type=str),
    WithJsonSchema({**_DURATION_SCHEMA, "description": "duration >= 0 (0s, 2m)"}),
]


class Strict(BaseModel):
    """Frozen, unknown keys forbidden."""

    # NaN and infinity are never a limit, default, volume or tolerance
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_limits(v: tuple[float, float] | None) -> tuple[float, float] | None:
    if v is not None and not v[0] <= v[1]:
        raise ValueError(f"limits low {v[0]:g} is above high {v[1]:g}")
    return v


def _check_pattern(v: str | None) -> str | None:
    if v is not None:
        compile_pattern(v)  # PatternError is a ValueError: a located validation error
    return v


class Typed(Strict):
    """What parameters and entered values share: type, unit, limits, pattern."""

    type: Literal["str", "float", "int", "bool"] = "str"
    unit: str = ""
    limits: tuple[Float, Float] | None = Field(None, description="[low, high], inclusive")
    pattern: str | None = Field(None, description="regular expression the whole text matches")

    _limits = field_validator("limits")(_check_limits)
    _pattern = field_validator("pattern")(_check_pattern)

    @model_validator(mode="after")
    def _fits_type(self) -> Typed:
        numeric = self.type in ("float", "int")
        if self.limits is not None and not numeric:
            raise ValueError(f"limits apply to float and int values, not {self.type}")
        if self.unit and not numeric:
            raise ValueError(f"a unit applies to float and int values, not {self.type}")
        if self.pattern is not None and self.type != "str":
            raise ValueError(f"a pattern applies to str values, not {self.type}")
        return self


class Parameter(Typed):
    """A recipe parameter given when a run starts (or its default)."""

    required: Flag = False
    default: bool | int | float | str | None = None
    description: str = ""

    @field_validator("default", mode="before")
    @classmethod
    def _finite_default(cls, v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"default {v} is not a finite number")
        return v

    @model_validator(mode="after")
    def _default_fits(self) -> Parameter:
        if self.required == (self.default is not None):
            raise ValueError("a parameter is either required: true or has a default")
        d = self.default
        if d is None:
            return self
        ok = {
            "str": isinstance(d, str),
            "bool": isinstance(d, bool),
            "int": isinstance(d, int) and not isinstance(d, bool),
            "float": isinstance(d, int | float) and not isinstance(d, bool),
        }[self.type]
        if not ok:
            raise ValueError(f"default {d!r} is not of type {self.type}")
        if self.limits and isinstance(d, int | float) and not self.limits[0] <= d <= self.limits[1]:
            raise ValueError(
                f"default {d:g} is outside the limits [{self.limits[0]:g}, {self.limits[1]:g}]"
            )
        if self.pattern and isinstance(d, str) and not full_match(self.pattern, d):
            raise ValueError(f"default {d!r} does not match the pattern {self.pattern!r}")
        return self


class Input(Typed):
    """A value entered by an operator: a prompt input or a sample result."""

    label: str = ""
    equals: ExprField | None = Field(None, description="the value must equal this expression")
    required: Flag = True
