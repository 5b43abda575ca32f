"""The recipe expression language: parsing with columns, unit and type checks, evaluation."""

from __future__ import annotations

import pytest

from agent.expr.expression import (
    ANY,
    BOOL,
    DURATION,
    STR,
    EvalError,
    ExprError,
    Quantity,
    Type,
    Value,
    as_value,
    literal,
    parse,
    value_expr,
)

ENV: dict[str, Value | int | float] = {
    "reactor.temperature": Quantity(38.9, "degC"),
    "reactor.viable_cell_density": Quantity(1.2e7, "cells/mL"),
    "cell_processor.cp_state": "complete",
    "param.target": Quantity(1.0e7, "cells/mL"),
    "run.elapsed": Quantity(13 * 86400, "s"),
    "run.iteration": 4,
}
TYPES = {
    "reactor.temperature": Type("num", "degC"),
    "reactor.viable_cell_density": Type("num", "cells/mL"),
    "cell_processor.cp_state": STR,
    "param.target": Type("num", "cells/mL"),
    "run.elapsed": DURATION,
}


def env(name: str) -> Value | int | float:
    return ENV[name]


def types(name: str) -> Type:
    return TYPES.get(name, ANY)


def test_comparison_with_units_evaluates() -> None:
    """A tag compared with a literal in the same unit gives a bool."""
    assert parse("reactor.temperature > 38.5 degC").test(env) is True
    assert parse("reactor.temperature <= 38.5 degC").test(env) is False


def test_durations_are_seconds() -> None:
    """12d, 6h, 30m and 10s are durations in seconds; arithmetic keeps them durations."""
    assert parse("12d").seconds(env) == 12 * 86400
    assert parse("1h + 30m + 10s").seconds(env) == 5410
    assert parse("max(1d - run.elapsed, 0s)").seconds(env) == 0
    assert parse("run.elapsed >= 12d").test(env) is True


def test_boolean_logic_short_circuits() -> None:
    """'or' does not evaluate its right side when the left is true."""
    e = parse("run.elapsed >= 12d or missing.tag > 1")
    assert e.test(env) is True
    assert e.names() == {"run.elapsed", "missing.tag"}


def test_precedence_and_functions() -> None:
    """Multiplication binds tighter than addition; abs/min/max work on quantities."""
    assert parse("1 + 2 * 3").number(env) == 7
    assert parse("(1 + 2) * 3").number(env) == 9
    assert parse("-2 * -3").number(env) == 6
    distance = parse("abs(reactor.temperature - 40 degC)").evaluate(env)
    assert isinstance(distance, Quantity) and distance.unit == "degC"
    assert distance.value == pytest.approx(1.1)
    assert parse("not (1 < 2) == false").test(env) is True


def test_string_equality() -> None:
    """Strings in double quotes compare with str tags; escapes are honoured."""
    assert parse('cell_processor.cp_state == "complete"').test(env) is True
    assert parse('cell_processor.cp_state != "error"').test(env) is True
    assert parse(r'"a\"b"').evaluate(env) == 'a"b'


def test_integers_stay_integers() -> None:
    """An integer literal stays an int (a method argument such as cycles needs one)."""
    assert isinstance(parse("3").number(env), int)
    assert isinstance(value_expr(3).number(env), int)
    assert isinstance(parse("1.5e6").number(env), float)


def test_plain_numbers_from_env_are_dimensionless() -> None:
    """An env returning a plain int works in arithmetic and comparisons."""
    assert parse("run.iteration + 1 >= 5").test(env) is True


def test_names_and_columns() -> None:
    """occurrences() gives every name with its 1-based column."""
    e = parse("reactor.viable_cell_density >= param.target or run.elapsed >= 12d")
    assert e.occurrences() == [
        ("reactor.viable_cell_density", 1),
        ("param.target", 32),
        ("run.elapsed", 48),
    ]


@pytest.mark.parametrize(
    ("text", "message", "column"),
    [
        ("reactor.temperature >", "ends too early", 22),
        ("(1 + 2", "expected ')'", 7),
        ("1 < 2 < 3", "do not chain", 7),
        ("x.y == 'a'", "double quotes", 8),
        ("temperature > 3", "unknown name 'temperature'", 1),
        ("1 2", "after a complete expression", 3),
        ('"open', "unterminated string", 1),
        ("min(1)", "takes 2 argument", 1),
        ("", "empty", 1),
        ("a.b # c", "unexpected character '#'", 5),
    ],
)
def test_syntax_errors_name_the_column(text: str, message: str, column: int) -> None:
    """Every syntax error says what is wrong and where."""
    with pytest.raises(ExprError) as info:
        parse(text)
    assert message in info.value.message
    assert info.value.column == column


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("reactor.temperature > 38 rpm", "units 'degC' and 'rpm' do not match"),
        ("reactor.temperature + 2 g > 1", "units 'degC' and 'g' do not match"),
        ("run.elapsed >= 12", "a duration cannot meet a bare number"),
        ("cell_processor.cp_state == 3", "compares str with a number"),
        ("reactor.temperature and true", "needs a condition"),
        ('cell_processor.cp_state > "a"', "needs a number"),
        ("min(run.elapsed, 5 degC)", "do not match"),
    ],
)
def test_static_check_refuses_mismatches(text: str, message: str) -> None:
    """Type and unit mismatches are found before anything runs."""
    with pytest.raises(ExprError) as info:
        parse(text).check(types)
    assert message in str(info.value)


def test_static_types() -> None:
    """Comparisons are conditions; products and quotients compose units."""
    assert parse("reactor.temperature > 37 degC").check(types) == BOOL
    assert parse("param.target * 2").check(types) == Type("num", "cells/mL")
    assert parse("2 g / 4 mL").check(types) == Type("num", "g/mL")
    assert parse("2 mL / 4 mL").check(types) == Type("num", "")
    assert parse("unknown.tag > 3 degC").check(types) == BOOL
    assert parse("37 °C").check(types) == Type("num", "degC")


def test_evaluation_errors_are_named() -> None:
    """Mismatches found only at run time raise EvalError with the column."""
    with pytest.raises(EvalError, match="division by zero"):
        parse("1 / (2 - 2)").evaluate(env)
    bad = {"a.b": Quantity(1, "rpm")}.__getitem__
    with pytest.raises(EvalError, match="do not match"):
        parse("a.b > 3 degC").evaluate(bad)
    with pytest.raises(EvalError, match="not a condition"):
        parse("1 + 1").test(env)


def test_literals_and_value_expressions() -> None:
    """YAML scalars become literal expressions; a bare word is a string argument."""
    assert literal(True).evaluate(env) is True
    assert literal(2.5).evaluate(env) == Quantity(2.5)
    assert value_expr("select").evaluate(env) == "select"
    assert value_expr("param.target").names() == {"param.target"}
    assert as_value(3.0, "ml") == Quantity(3.0, "mL")
    assert parse("2 + 3").constant() == Quantity(5)
    assert parse("param.target").constant() is None


# ------------------------------------------------------------------- hostile expressions

HOSTILE = {
    "100k brackets": "(" * 100_000 + "1" + ")" * 100_000,
    "100k unclosed brackets": "(" * 100_000,
    "30 brackets": "(" * 30 + "1" + ")" * 30,
    "30 nots": "not " * 30 + "true",
    "30 minuses": "- " * 30 + "1",
    "30 nested calls": "abs(" * 30 + "1" + ")" * 30,
    "100k nots": "not " * 100_000 + "true",
    "100k minuses": "- " * 100_000 + "1",
    "a chain of 400 plus": " + ".join(["1"] * 400),
    "a chain of 100 and": " and ".join(["true"] * 100),
    "a chain of 100 times": "*".join(["1"] * 100),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_expressions_are_expression_errors_not_recursion(name: str) -> None:
    """Deep nesting and long chains are refused with an ExprError (never a RecursionError)."""
    with pytest.raises(ExprError, match=r"nested too deeply|at most 1000|operators deep"):
        parse(HOSTILE[name])


def test_expressions_within_the_limits_still_work() -> None:
    """24 levels of brackets and a chain 60 operators long parse, check and evaluate."""
    deep = parse("(" * 24 + "reactor.temperature" + ")" * 24 + " > 38.5 degC")
    assert deep.check(TYPES.__getitem__) == BOOL and deep.test(env)
    chain = parse(" + ".join(["run.iteration"] * 60))
    assert chain.evaluate(env) == Quantity(4 * 60, "")


@pytest.mark.parametrize(
    ("text", "column"),
    [("1 / 0", 3), ("reactor.temperature / (2 - 2)", 21), ("(1 / 0) > 1", 4)],
)
def test_division_by_a_constant_zero_is_found_when_checking(text: str, column: int) -> None:
    """Dividing by a constant zero is a load-time ExprError at the column of the '/'."""
    with pytest.raises(ExprError, match="division by zero") as info:
        parse(text).check(TYPES.__getitem__)
    assert info.value.column == column


def test_a_constant_overflow_is_found_when_checking() -> None:
    """A constant part that overflows to infinity is a load-time ExprError."""
    with pytest.raises(ExprError, match="not a finite number"):
        parse("*".join(["1e15"] * 25)).check(TYPES.__getitem__)


@pytest.mark.parametrize("text", ["1e999", "1e16", "9" * 400, "200000000000d"])
def test_number_literals_are_finite_and_bounded(text: str) -> None:
    """Infinite, NaN-making or absurdly large literals are syntax errors with a column."""
    with pytest.raises(ExprError, match=r"finite|too large") as info:
        parse(text)
    assert info.value.column == 1


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 10**20])
def test_yaml_numbers_that_are_not_finite_are_not_literals(value: float) -> None:
    """A YAML .nan, .inf or a huge number is not a value expression."""
    with pytest.raises(ExprError):
        literal(value)


def test_runtime_overflow_is_an_eval_error() -> None:
    """A product of huge tag values, or a huge int meeting a float, is an EvalError."""
    big = {"reactor.a": 1e200, "reactor.b": 10**400}.__getitem__
    with pytest.raises(EvalError, match="not a finite number"):
        parse("reactor.a * reactor.a").evaluate(big)
    with pytest.raises(EvalError, match="too large"):
        parse("reactor.b + 0.5").evaluate(big)
    with pytest.raises(EvalError, match="too large"):
        parse("reactor.b / 3").evaluate(big)
