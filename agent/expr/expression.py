"""The recipe expression language: the public API (never ``eval``).

Text is tokenized and parsed into frozen AST dataclasses (``agent.expr.syntax``), checked for
types and units at load time and evaluated at run time (``agent.expr.evaluate``) with the value
and unit rules of ``agent.expr.units``. The engine codes against this module only::

    e = parse('reactor.temperature > 38.5 degC')   # ExprError(message, column) on bad syntax
    e.source          # 'reactor.temperature > 38.5 degC'
    e.node            # AST: Num | Str | Bool | Name | Unary | Binary | Call
    e.names()         # frozenset({'reactor.temperature'}): every name it reads
    e.occurrences()   # [('reactor.temperature', 1)]: names with their 1-based columns
    e.evaluate(env)   # Value = bool | str | Quantity
    e.test(env)       # bool, or EvalError when the result is not a bool
    e.number(env)     # magnitude of a numeric result (an int literal stays int)
    e.seconds(env)    # a duration in seconds, or EvalError
    e.check(types)    # static Type, or ExprError naming the column; types(name) -> Type
    e.constant()      # the value when it reads no names, else None
    literal(37)       # Expr for a YAML number, bool or string
    value_expr("select")   # set value / call argument: a bare word is a string literal

``env(name)`` resolves a dotted name (``reactor.temperature``, ``param.coi_id``,
``phase.scan_bag.bag_id``, ``phase.start_select.out0``, ``run.elapsed``, ``run.iteration``) to a
``Value``; a plain ``int``/``float`` counts as dimensionless. Give tags and parameters their
units (``Quantity(37.0, "degC")``, or ``as_value(raw, unit)``) and durations as
``Quantity(seconds, "s")``. Exceptions raised by ``env`` (e.g. ``KeyError``) propagate.

Example::

    >>> env = {"reactor.temperature": Quantity(38.9, "degC")}.__getitem__
    >>> parse("reactor.temperature > 38.5 degC").test(env)
    True
    >>> parse("run.elapsed >= 12d").check(lambda name: DURATION)
    Type(kind='bool', unit='')
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from agent.expr.evaluate import EvalError, check, evaluate
from agent.expr.syntax import (
    KEYWORDS,
    Binary,
    Bool,
    Call,
    ExprError,
    Name,
    Node,
    Num,
    Str,
    Unary,
    check_number,
    parse_node,
)
from agent.expr.units import Quantity, Type, Value, as_value, normalize_unit, type_of

__all__ = [
    "ANY",
    "BOOL",
    "DURATION",
    "STR",
    "Binary",
    "Bool",
    "Call",
    "Env",
    "EvalError",
    "Expr",
    "ExprError",
    "Name",
    "Node",
    "Num",
    "Quantity",
    "Str",
    "Type",
    "Unary",
    "Value",
    "as_value",
    "literal",
    "normalize_unit",
    "parse",
    "type_of",
    "value_expr",
]

Env = Callable[[str], Value | int | float]
ANY = Type("any")
BOOL = Type("bool")
STR = Type("str")
DURATION = Type("num", "s")


@dataclass(frozen=True, slots=True)
class Expr:
    """A parsed expression: its source text and AST. Build with ``parse`` or ``literal``."""

    source: str
    node: Node

    def __str__(self) -> str:
        return self.source

    def names(self) -> frozenset[str]:
        """Every name the expression reads."""
        return frozenset(name for name, _ in self.occurrences())

    def occurrences(self) -> list[tuple[str, int]]:
        """Every name with its 1-based column, in order of appearance."""
        return [(n.name, n.col) for n in _walk(self.node) if isinstance(n, Name)]

    def evaluate(self, env: Env) -> Value:
        """The value of the expression with names resolved by ``env``."""
        return evaluate(self.node, env)

    def test(self, env: Env) -> bool:
        """Evaluate a condition; ``EvalError`` if the result is not a bool."""
        value = self.evaluate(env)
        if not isinstance(value, bool):
            raise EvalError(f"{self.source!r} is not a condition (it gave {value!r})")
        return value

    def number(self, env: Env) -> int | float:
        """Evaluate to a number and return its magnitude, whatever its unit."""
        value = self.evaluate(env)
        if not isinstance(value, Quantity):
            raise EvalError(f"{self.source!r} is not a number (it gave {value!r})")
        return value.value

    def seconds(self, env: Env) -> float:
        """Evaluate a duration, in seconds."""
        value = self.evaluate(env)
        if not isinstance(value, Quantity) or value.unit != "s":
            raise EvalError(f"{self.source!r} is not a duration (it gave {value!r})")
        return float(value.value)

    def check(self, types: Callable[[str], Type]) -> Type:
        """The static type; ``ExprError`` (with column) on a type or unit mismatch.
        ``types(name)`` gives each name's type (``ANY`` when it cannot be known)."""
        return check(self.node, types)

    def constant(self) -> Value | None:
        """The value when the expression reads no names and evaluates, else ``None``."""
        if self.names():
            return None
        try:
            return self.evaluate(_no_names)
        except ExprError:
            return None


def _no_names(name: str) -> Value:
    raise KeyError(name)


def _walk(node: Node) -> Iterator[Node]:
    yield node
    if isinstance(node, Unary):
        yield from _walk(node.operand)
    elif isinstance(node, Binary):
        yield from _walk(node.left)
        yield from _walk(node.right)
    elif isinstance(node, Call):
        for arg in node.args:
            yield from _walk(arg)


def parse(text: str) -> Expr:
    """Parse expression text; ``ExprError`` with the column on a syntax error."""
    return Expr(text, parse_node(text))


def literal(value: bool | int | float | str) -> Expr:
    """An expression for a plain YAML value (number, bool or string)."""
    if isinstance(value, bool):
        return Expr("true" if value else "false", Bool(value, 1))
    if isinstance(value, int | float):
        check_number(value)  # a YAML .nan, .inf or 1e400 is not a value
        return Expr(repr(value), Num(value, "", 1))
    quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return Expr(quoted, Str(value, 1))


_BARE_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def value_expr(value: bool | int | float | str) -> Expr:
    """A set value or call argument: numbers and bools are literals, a bare word (no dot, not a
    keyword) is a string literal (``select``), anything else is parsed as an expression."""
    if isinstance(value, str) and _BARE_WORD.match(value) and value not in KEYWORDS:
        return literal(value)
    return parse(value) if isinstance(value, str) else literal(value)
