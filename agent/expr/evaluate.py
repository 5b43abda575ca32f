"""Static checking and evaluation of expression ASTs (public API:
``agent.expr.expression``).

``check(node, types)`` walks the tree with static ``Type``s and raises ``ExprError`` at the
column of the first operator whose operands do not fit; it also evaluates every part that
reads no names, so ``x / (2 - 2)`` or an overflow is refused at load, at the
column of its operator. ``evaluate(node, env)`` walks it with values and raises
``EvalError`` for the same mistakes found only at run time, including a result that is not a
finite number. ``and``/``or`` short-circuit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from agent.expr.syntax import (
    COMPARE,
    Binary,
    Bool,
    Call,
    ExprError,
    Name,
    Node,
    Num,
    Str,
    Unary,
)
from agent.expr.units import Quantity, Type, Value, as_value, compose, explain_mismatch, sum_unit


class EvalError(ExprError):
    """A problem found while evaluating (a value of the wrong kind, division by zero)."""


ANY = Type("any")
BOOL = Type("bool")

# ---------------------------------------------------------------------------- check


def check(node: Node, types: Callable[[str], Type]) -> Type:
    """The static type of ``node``; ``ExprError`` on a type or unit mismatch, or when a part
    that reads no names cannot be evaluated (division by zero, overflow)."""
    return _check(node, types)[0]


def _check(node: Node, types: Callable[[str], Type]) -> tuple[Type, bool]:
    """The type and whether the node is constant (reads no names); a constant operator node
    is evaluated here so that its error is found at load."""
    if isinstance(node, Name):
        return types(node.name), False
    kids: tuple[Node, ...] = ()
    if isinstance(node, Unary):
        kids = (node.operand,)
    elif isinstance(node, Binary):
        kids = (node.left, node.right)
    elif isinstance(node, Call):
        kids = node.args
    checked = [_check(k, types) for k in kids]
    t = _type(node, [c[0] for c in checked], types)
    constant = all(c[1] for c in checked)
    try:
        if constant and kids:
            evaluate(node, _no_names)
        elif isinstance(node, Binary) and node.op == "/" and checked[1][1]:
            divisor = evaluate(node.right, _no_names)  # x / (2 - 2) reads x but fails anyway
            if isinstance(divisor, Quantity) and divisor.value == 0:
                raise EvalError("division by zero", node.col)
    except EvalError as exc:
        raise ExprError(exc.message, exc.column) from None
    return t, constant


def _no_names(name: str) -> Value:
    raise KeyError(name)  # never called: only nodes that read no names are evaluated


def _type(node: Node, kids: list[Type], types: Callable[[str], Type]) -> Type:
    if isinstance(node, Num):
        return Type("num", node.unit)
    if isinstance(node, Str):
        return Type("str")
    if isinstance(node, Bool):
        return BOOL
    if isinstance(node, Name):
        return types(node.name)
    if isinstance(node, Unary):
        inner = kids[0]
        want = "bool" if node.op == "not" else "num"
        _need(inner, want, f"'{node.op}'", node.col)
        return inner if inner.kind != "any" else Type(want, None)  # type: ignore[arg-type]
    if isinstance(node, Call):
        args = kids
        for arg in args:
            _need(arg, "num", f"{node.func}()", node.col)
        if len(args) == 2:
            _units(args[0], args[1], f"{node.func}()", node.col)
            return Type("num", sum_unit(args[0].unit, args[1].unit))
        return args[0] if args[0].kind == "num" else Type("num", None)
    return _binary_type(node, kids[0], kids[1])


def _binary_type(node: Binary, left: Type, right: Type) -> Type:
    op, col = node.op, node.col
    if op in ("and", "or"):
        _need(left, "bool", f"'{op}'", col)
        _need(right, "bool", f"'{op}'", col)
        return BOOL
    if op in ("==", "!="):
        if "any" not in (left.kind, right.kind) and left.kind != right.kind:
            raise ExprError(f"'{op}' compares {left} with {right}", col)
        if left.kind == "num":
            _units(left, right, f"'{op}'", col)
        return BOOL
    _need(left, "num", f"'{op}'", col)
    _need(right, "num", f"'{op}'", col)
    lu = left.unit if left.kind == "num" else None
    ru = right.unit if right.kind == "num" else None
    if op in COMPARE:
        _units(left, right, f"'{op}'", col)
        return BOOL
    if op in ("+", "-"):
        _units(left, right, f"'{op}'", col)
        return Type("num", sum_unit(lu, ru))
    return Type("num", compose(op, lu, ru))


def _need(t: Type, kind: str, what: str, col: int) -> None:
    if t.kind not in (kind, "any"):
        wanted = {"num": "a number", "bool": "a condition (true/false)", "str": "a string"}[kind]
        raise ExprError(f"{what} needs {wanted}, not {t}", col)


def _units(a: Type, b: Type, what: str, col: int) -> None:
    if a.kind != "num" or b.kind != "num":
        return
    why = explain_mismatch(a.unit, b.unit)
    if why:
        raise ExprError(f"{what}: {why}", col)


# ------------------------------------------------------------------------- evaluate


def evaluate(node: Node, env: Callable[[str], Value | int | float]) -> Value:
    """The value of ``node`` with names resolved by ``env``."""
    if isinstance(node, Num):
        return Quantity(node.value, node.unit)
    if isinstance(node, Str | Bool):
        return node.value
    if isinstance(node, Name):
        return as_value(env(node.name))
    if isinstance(node, Unary):
        inner = evaluate(node.operand, env)
        if node.op == "not":
            return not _bool(inner, "'not'", node.col)
        q = _num(inner, "'-'", node.col)
        return Quantity(-q.value, q.unit)
    if isinstance(node, Call):
        args = [_num(evaluate(a, env), f"{node.func}()", node.col) for a in node.args]
        if node.func == "abs":
            return Quantity(abs(args[0].value), args[0].unit)
        _same(args[0], args[1], f"{node.func}()", node.col)
        pick = min if node.func == "min" else max
        value = pick(args[0].value, args[1].value)
        return Quantity(value, args[0].unit or args[1].unit)
    return _binary(node, env)


def _binary(node: Binary, env: Callable[[str], Value | int | float]) -> Value:
    op, col = node.op, node.col
    left = evaluate(node.left, env)
    if op == "and":
        return _bool(left, "'and'", col) and _bool(evaluate(node.right, env), "'and'", col)
    if op == "or":
        return _bool(left, "'or'", col) or _bool(evaluate(node.right, env), "'or'", col)
    right = evaluate(node.right, env)
    if op in ("==", "!="):
        if isinstance(left, Quantity) and isinstance(right, Quantity):
            _same(left, right, f"'{op}'", col)
            equal = left.value == right.value
        elif type(left) is type(right):
            equal = left == right
        else:
            raise EvalError(f"'{op}' compares {left!r} with {right!r}", col)
        return equal if op == "==" else not equal
    a, b = _num(left, f"'{op}'", col), _num(right, f"'{op}'", col)
    if op in COMPARE:
        _same(a, b, f"'{op}'", col)
        return {
            "<": a.value < b.value,
            "<=": a.value <= b.value,
            ">": a.value > b.value,
            ">=": a.value >= b.value,
        }[op]
    if op in ("+", "-"):
        _same(a, b, f"'{op}'", col)
        unit = a.unit or b.unit
    else:
        unit = compose(op, a.unit, b.unit) or ""
    if op == "/" and b.value == 0:
        raise EvalError("division by zero", col)
    try:
        value = _ARITHMETIC[op](a.value, b.value)
    except OverflowError:  # a huge int meeting a float
        raise EvalError(f"the result of '{op}' is too large", col) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise EvalError(f"the result of '{op}' is not a finite number ({value})", col)
    return Quantity(value, unit)


_ARITHMETIC: dict[str, Callable[[int | float, int | float], int | float]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
}


def _bool(v: Value, what: str, col: int) -> bool:
    if not isinstance(v, bool):
        raise EvalError(f"{what} needs a condition, not {v!r}", col)
    return v


def _num(v: Value, what: str, col: int) -> Quantity:
    if not isinstance(v, Quantity):
        raise EvalError(f"{what} needs a number, not {v!r}", col)
    return v


def _same(a: Quantity, b: Quantity, what: str, col: int) -> None:
    why = explain_mismatch(a.unit, b.unit)
    if why:
        raise EvalError(f"{what}: {why}", col)
