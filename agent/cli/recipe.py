"""``bedside recipe``: check recipe files and print their JSON Schema.

``validate FILE [--config CONFIG]`` prints every problem on stderr, one per line
(``file:line: path: message (hint: ...)``), and exits 2; a valid recipe prints one JSON summary
line on stdout: ``{"id", "version", "operations", "phases", "parameters"}`` (counts of operations
and of phases at every depth, the parameter names). With ``--config`` the recipe is also checked
against the unit's devices: roles, tags, methods, writability and limits.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from agent.config import load_config
from agent.recipe.loader import load_recipe
from agent.recipe.schema import schema_text
from agent.text.yamlsource import DocumentError

app = typer.Typer(help="Check recipe files and print the recipe JSON Schema.", no_args_is_help=True)


@app.command()
def validate(
    file: Path = typer.Argument(..., help="the recipe YAML file"),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="unit configuration to check roles, tags and limits against"
    ),
) -> None:
    """Check a recipe; print every problem, or a JSON summary line when it is valid."""
    try:
        unit = load_config(config) if config is not None else None
        recipe = load_recipe(file, unit)
    except DocumentError as exc:
        for problem in exc.problems:
            typer.echo(f"bedside: error: {problem}", err=True)
        raise typer.Exit(2) from None
    summary = {
        "id": recipe.id,
        "version": recipe.version,
        "operations": len(recipe.procedure),
        "phases": len(recipe.all_phases()),
        "parameters": list(recipe.parameters),
    }
    typer.echo(json.dumps(summary, separators=(",", ":")))


@app.command()
def schema() -> None:
    """Print the JSON Schema of recipe files."""
    typer.echo(schema_text(), nl=False)
