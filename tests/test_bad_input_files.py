"""Hostile and corrupt files (recipes and unit configurations) get a located error, never a hang
or a traceback: each case is a real file fed to the real loader, some through the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import default_config_path, load_config
from agent.recipe.loader import ParameterError, check_parameters, load_recipe
from agent.text.patterns import PatternError, full_match
from agent.text.yamlsource import MAX_BYTES, DocumentError, Problem

REPO = Path(__file__).parent.parent
BROKEN = Path(__file__).parent / "recipes" / "broken"
# a valid recipe: the corpus's base without its broken line
RECIPE = (BROKEN / "zero-duration.yaml").read_text().split("\n", 1)[1].replace("0s", "30m")
CONFIG = default_config_path().read_text()

Loader = Callable[[Path], Any]
LOADERS: dict[str, Loader] = {"recipe": load_recipe, "config": load_config}

# An alias bomb: 9 ** 8 (43 million) values from 8 lines.
_BOMB = "".join(
    f"{c}: &{c} [" + ", ".join([f"*{p}" if p else '"lol"'] * 9) + "]\n"
    for p, c in zip(["", *"abcdefg"], "abcdefgh", strict=True)
)

# name -> (file content, expected message, line, column or None)
ATTACKS: dict[str, tuple[str | bytes, str, int, int | None]] = {
    "alias bomb": (_BOMB, "expands the document to more than 20000 values", 5, 12),
    "a dense list": ("a: [" + "1, " * 30_000 + "1]\n", "has more than 20000 values", 1, 59_996),
    "alias inside its own anchor": ("a: &a [1, *a]\n", "inside its own anchor", 1, 11),
    "10000 nested [": ("a: " + "[" * 10_000, "nested too deeply", 1, 67),
    "10000 nested {": ("a: " + "{b: " * 10_000, "nested too deeply", 1, 253),
    "deep block nesting": (
        "".join("  " * i + "k:\n" for i in range(100)),
        "nested too deeply",
        64,
        127,
    ),
    "key is a mapping": ("ok: 1\n? {a: 1}\n: x\n", "a key must be a single value", 2, 3),
    "key is a list": ("ok: 1\n[1]: x\n", "a key must be a single value", 2, 1),
    "key is a date": ("2026-01-01: x\n", "a key must be text or a number", 1, 1),
    "duplicate key": ("a: 1\nb: 2\na: 3\n", "duplicate key 'a'", 3, 1),
    "NUL byte": ("a: 1\nb: x\x00y\n", "not a text file", 2, 5),
    "escape character": ("a: 1\nb: \x1b[2J\n", "U+001B", 2, 4),
    "not UTF-8": (b"a: 1\nb: caf\xe9\n", "not UTF-8 text: byte 0xe9", 2, 7),
    "binary file": (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8 text", 1, 1),
    "python tag": ("a: !!python/object/apply:os.system [id]\n", "'!!python/object/apply", 1, 4),
    "binary tag": ("a: !!binary aGVsbG8=\n", "'!!binary' is not allowed", 1, 4),
    "merge key": ("a: &a {x: 1}\nb: {<<: *a}\n", "merge keys (<<)", 2, 5),
    "integer of 5000 digits": ("a: " + "9" * 5000 + "\n", "Exceeds the limit", 1, 4),
    "two documents": ("a: 1\n---\nb: 2\n", "but found another document", 2, 1),
}


def _write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def _refusal(load: Loader, path: Path) -> list[Problem]:
    with pytest.raises(DocumentError) as info:
        load(path)
    assert all(p.file == str(path) for p in info.value.problems)
    return info.value.problems


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("case", ATTACKS)
def test_hostile_yaml_is_refused_at_its_line_and_column(
    case: str, kind: str, tmp_path: Path
) -> None:
    """Each hostile YAML file is a DocumentError naming the problem, its line and column."""
    content, message, line, column = ATTACKS[case]
    found = _refusal(LOADERS[kind], _write(tmp_path, content))
    assert [(p.line, p.column) for p in found if message in p.message] == [(line, column)], found


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", LOADERS)
def test_a_huge_file_is_refused_without_reading_it_all(kind: str, tmp_path: Path) -> None:
    """A 10 GiB file is refused at once, naming the line where the size limit is crossed."""
    path = tmp_path / "huge.yaml"
    with path.open("w") as f:
        for i in range(20_000):
            f.write(f"k{i:07}: 012345678\n")  # 20 characters a line
        f.truncate(10 * 2**30)  # sparse: costs no disk, but reading it all would take minutes
    [problem] = _refusal(LOADERS[kind], path)
    assert "larger than 256 KiB" in problem.message
    assert problem.line == MAX_BYTES // 20 + 1


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", LOADERS)
def test_a_fifo_is_refused_without_waiting_for_a_writer(kind: str, tmp_path: Path) -> None:
    """A named pipe given as a file is refused at once (opening it does not block)."""
    path = tmp_path / "pipe.yaml"
    os.mkfifo(path)
    [problem] = _refusal(LOADERS[kind], path)
    assert problem.message == "not a regular file"


def test_the_shipped_recipe_alias_is_within_the_budget() -> None:
    """cart-expansion.yaml's one alias (shared monitors) still expands as before."""
    recipe = load_recipe(REPO / "recipes" / "cart-expansion.yaml")
    scoped = [op.monitors for op in recipe.procedure if op.monitors]
    assert len(scoped) >= 2 and scoped[0] == scoped[1]


def test_recipes_do_not_take_values_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """${VAR} in a recipe stays text (a recipe means the same on every unit); configs expand."""
    monkeypatch.setenv("BEDSIDE_TEST_TITLE", "from the environment")
    path = _write(tmp_path, RECIPE.replace("Broken example", "${BEDSIDE_TEST_TITLE}"))
    assert load_recipe(path).title == "${BEDSIDE_TEST_TITLE}"
    config = _write(tmp_path, CONFIG.replace("site: ", "site: ${BEDSIDE_TEST_TITLE} #", 1))
    assert load_config(config).unit.site == "from the environment"


# ------------------------------------------------------------------- unit configurations

CONFIG_CASES = {
    "bool as timeout": ("timeout: 4", "timeout: true", "true is true/false, not a number"),
    "NaN timeout": ("timeout: 4", "timeout: .nan", "finite number"),
    "timeout beyond a day": ("timeout: 4", "timeout: 1e9", "less than or equal to 86400"),
    "infinite deadband": ("deadband: 0.05", "deadband: .inf", "finite number"),
    "NaN limit": ("limits: [20, 40]", "limits: [.nan, 40]", "finite number"),
    "bool as a limit": ("limits: [20, 40]", "limits: [true, 40]", "not a number"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_numbers_in_a_unit_configuration_are_located(case: str, tmp_path: Path) -> None:
    """Booleans, NaN, infinity and absurd seconds in a unit configuration are located errors."""
    old, new, message = CONFIG_CASES[case]
    assert old in CONFIG
    lines = CONFIG[: CONFIG.index(old)].count("\n") + 1
    found = _refusal(load_config, _write(tmp_path, CONFIG.replace(old, new, 1)))
    assert [p.line for p in found if message in p.message] == [lines], found


def test_a_number_from_the_environment_is_still_a_number(tmp_path: Path) -> None:
    """Text that is a number stays accepted in a configuration: ${VAR} always gives text."""
    config = _write(tmp_path, CONFIG.replace("timeout: 4", "timeout: ${BEDSIDE_TEST_UNSET:-4}"))
    assert load_config(config).devices["bioreactor"].timeout == 4.0


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e400"])
def test_run_parameters_that_are_not_finite_are_refused(text: str, tmp_path: Path) -> None:
    """A run parameter given as NaN or infinity is refused, naming the parameter."""
    recipe = load_recipe(_write(tmp_path, RECIPE))
    with pytest.raises(ParameterError, match=r"'temperature': .* is not a finite number"):
        check_parameters(recipe, {"coi_id": "COI-123456", "temperature": text})


# ------------------------------------------------------------------------------ patterns


def test_a_nested_quantifier_pattern_answers_quickly(tmp_path: Path) -> None:
    """(a+)+$ against 'aaaa...!' is an ordinary mismatch, not a hang."""
    path = _write(tmp_path, RECIPE.replace("^COI-[0-9]{6}$", "(a+)+$"))
    recipe = load_recipe(path)
    with pytest.raises(ParameterError, match="does not match"):
        check_parameters(recipe, {"coi_id": "a" * 5000 + "!"})


@pytest.mark.timeout(20)
def test_a_catastrophic_pattern_is_stopped_with_a_clear_error(tmp_path: Path) -> None:
    """A pattern that backtracks catastrophically is refused after its time limit."""
    path = _write(tmp_path, RECIPE.replace("^COI-[0-9]{6}$", "^(a|aa)+$"))
    recipe = load_recipe(path)
    with pytest.raises(ParameterError, match="took too long to check") as info:
        check_parameters(recipe, {"coi_id": "a" * 60 + "!"})
    assert "coi_id" in str(info.value)


def test_an_invalid_pattern_names_its_position(tmp_path: Path) -> None:
    """An invalid regular expression is a located error with the position in the pattern."""
    path = _write(tmp_path, RECIPE.replace("^COI-[0-9]{6}$", "^COI-[0-9"))
    [problem] = _refusal(load_recipe, path)
    assert problem.line == 11 and problem.path == "parameters.coi_id.pattern"
    assert "not a valid regular expression: unterminated character set at position 9" in (
        problem.message
    )


def test_full_match_refuses_a_pattern_longer_than_the_limit() -> None:
    """Patterns are bounded in length too."""
    with pytest.raises(PatternError, match="at most 500"):
        full_match("a" * 501, "a")


# ----------------------------------------------------------------------------- the CLI

CLI_CASES: dict[str, tuple[str | bytes, str]] = {
    "alias bomb": (_BOMB, ":5:12: <document>: the alias *d expands the document"),
    "deep nesting": ("a: " + "[" * 10_000, ":1:67: <document>: the document is nested"),
    "NUL byte": ("a: x\x00\n", ":1:5: <document>: not a text file"),
    "key is a mapping": ("? {a: 1}\n: x\n", ":1:3: <document>: a key must be a single value"),
    "not UTF-8": (b"format: 1\n\xff\n", ":2:1: <document>: not UTF-8 text"),
    "version true": (RECIPE.replace("version: 1", "version: true"), ":3: version: Input"),
    "division by zero": (
        RECIPE.replace("> 36.5 degC", "> 36.5 degC / (1 - 1)"),
        ":31: procedure.0.phases.2.until: division by zero at column",
    ),
}


def bedside(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real `bedside` command."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", CLI_CASES)
def test_recipe_validate_reports_hostile_files_without_a_traceback(
    case: str, tmp_path: Path
) -> None:
    """`bedside recipe validate` exits 2 with file:line[:column] and the problem, no traceback."""
    content, expected = CLI_CASES[case]
    path = _write(tmp_path, content)
    result = bedside("recipe", "validate", str(path))
    assert result.returncode == 2, result.stderr
    assert f"bedside: error: {path}{expected}" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.timeout(90)
def test_a_hostile_unit_configuration_is_refused_by_the_cli(tmp_path: Path) -> None:
    """A config alias bomb given to `recipe validate --config` exits 2, located, no traceback."""
    config = _write(tmp_path, _BOMB)
    recipe = tmp_path / "ok.yaml"
    recipe.write_text(RECIPE)
    result = bedside("recipe", "validate", "--config", str(config), str(recipe))
    assert result.returncode == 2, result.stderr
    assert f"bedside: error: {config}:5:12: <document>: the alias *d expands" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
