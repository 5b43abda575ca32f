"""``bedside recipe install`` and ``bedside recipe installed``: the unit's recipe store.

An engineer installs a recipe file into the store of a unit (``STATE_DIR/recipes``, or
``--recipes DIR`` as given to ``bedside agent run``); operators then start it by name with
``bedside run start NAME``. ``install`` checks the file against the unit first (every problem
of the recipe and of its binding printed with file and line, exit 2, nothing installed), names
it after the recipe's ``id`` unless ``--name`` says otherwise, refuses to replace a different
recipe of the same name without ``--replace``, and leaves an audit record for the agent to
journal (``recipe_installed``: name, id, version, SHA-256, the system account that did it).
"""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from agent.cli.common import fail, fail_problems, load_config_or_exit, run_async

if TYPE_CHECKING:
    from agent.recipe.store import RecipeStore

STATE_DIR = typer.Option(
    Path(os.environ.get("BEDSIDE_STATE_DIR", ".bedside")),
    "--state-dir",
    help="the unit's state folder (its recipe store is STATE_DIR/recipes)",
)
RECIPES = typer.Option(None, "--recipes", help="the recipe store, if not STATE_DIR/recipes")


def _store(state_dir: Path, recipes: Path | None) -> RecipeStore:
    from agent.recipe.store import RecipeStore

    return RecipeStore(recipes) if recipes else RecipeStore.in_dir(state_dir)


def install(
    file: Path = typer.Argument(..., help="the recipe YAML file"),
    config: Path = typer.Option(None, "--config", help="unit configuration (default: simulated)"),
    name: str = typer.Option(None, "--name", help="the name operators start it by (default: id)"),
    replace: bool = typer.Option(False, "--replace", help="replace a different recipe of NAME"),
    state_dir: Path = STATE_DIR,
    recipes: Path = RECIPES,
) -> None:
    """Check a recipe file against the unit and install it in the unit's recipe store."""
    from agent.auth.outbox import AuditOutbox
    from agent.recipe.loader import BindError, bind, parse_recipe
    from agent.recipe.store import RecipeStoreError
    from agent.record.format import Kind, format_time
    from agent.text.yamlsource import DocumentError
    from drivers.clock import SystemClock

    unit = load_config_or_exit(config)
    try:
        data = file.read_bytes()
        text = data.decode("utf-8")
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
    except UnicodeDecodeError as exc:
        fail(f"{file} is not UTF-8 text (byte {exc.start + 1})")
    try:
        recipe = parse_recipe(text, str(file), unit)
        bind(recipe, unit)
    except DocumentError as exc:
        fail_problems(exc.problems)
    except BindError as exc:
        fail_problems(getattr(exc, "problems", [str(exc)]))
    try:
        stored = _store(state_dir, recipes).install(name or recipe.id, data, replace=replace)
    except RecipeStoreError as exc:
        fail(str(exc))
    summary = {
        "name": stored.name,
        "id": recipe.id,
        "version": recipe.version,
        "sha256": stored.sha256,
        "path": str(stored.path),
    }
    audit = {
        "action": "recipe_installed",
        "time": format_time(SystemClock().now()),
        "who": f"system:{getpass.getuser()}",
        "source": str(file),
        **summary,
    }
    run_async(AuditOutbox.in_dir(state_dir)(Kind.AUDIT, audit))
    typer.echo(json.dumps(summary))


def installed(state_dir: Path = STATE_DIR, recipes: Path = RECIPES) -> None:
    """List the recipes in the unit's recipe store: name and SHA-256."""
    from agent.recipe.store import RecipeStoreError

    store = _store(state_dir, recipes)
    try:
        rows = [{"name": n, "sha256": store.read(n).sha256} for n in store.names()]
    except RecipeStoreError as exc:
        fail(str(exc))
    typer.echo(json.dumps(rows))
