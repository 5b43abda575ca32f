"""Every broken recipe in tests/recipes/broken is refused with a located, named problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import UnitConfig, default_config_path, load_config
from agent.recipe.loader import load_recipe
from agent.text.yamlsource import DocumentError

BROKEN = sorted((Path(__file__).parent / "recipes" / "broken").glob("*.yaml"))


@pytest.fixture(scope="module")
def unit() -> UnitConfig:
    return load_config(default_config_path())


def expectation(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
    assert first.startswith("# expect: "), f"{path.name} lacks its '# expect: ' line"
    return first.removeprefix("# expect: ").strip()


def test_corpus_is_large_enough() -> None:
    """The corpus holds at least 30 broken recipes."""
    assert len(BROKEN) >= 30


@pytest.mark.parametrize("path", BROKEN, ids=lambda p: p.stem)
def test_broken_recipe_is_refused_with_a_located_problem(path: Path, unit: UnitConfig) -> None:
    """The loader raises DocumentError (nothing else) naming the expected problem with a line."""
    expect = expectation(path)
    with pytest.raises(DocumentError) as info:
        load_recipe(path, unit)
    found = [str(p) for p in info.value.problems]
    assert any(expect in str(p) and p.line for p in info.value.problems), found
    assert all(p.file == str(path) for p in info.value.problems)
