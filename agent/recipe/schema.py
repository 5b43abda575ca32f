"""The JSON Schema of recipe files, generated from the pydantic models.

``docs/recipe.schema.json`` is committed for editors and other tools (e.g. a YAML language
server: ``# yaml-language-server: $schema=../docs/recipe.schema.json``); a test keeps it equal
to what the models produce. Regenerate with ``python -m agent.recipe.schema``.

Public API: ``recipe_schema() -> dict``, ``schema_text() -> str``,
``write_schema(path=SCHEMA_PATH) -> Path``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent.recipe.model import Recipe

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "recipe.schema.json"
SCHEMA_ID = "https://bedside.invalid/schemas/recipe-format-1.json"


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a recipe file, keys as written in YAML."""
    schema = Recipe.model_json_schema(by_alias=True, mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
    }


def schema_text() -> str:
    """The schema as the committed file holds it: sorted keys, two-space indent, newline."""
    return json.dumps(recipe_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    """Write the schema file; returns its path."""
    path.write_text(schema_text(), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_schema())
