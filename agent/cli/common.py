"""What every ``bedside`` sub-command shares: one clear error line, and running a coroutine."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    from agent.config import UnitConfig

T = TypeVar("T")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear error line on stderr and exit."""
    typer.echo(f"bedside: error: {message}", err=True)
    raise typer.Exit(code)


def run_async(coro: Awaitable[T]) -> T:
    """Run a coroutine to completion, turning Ctrl-C into a quiet exit."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def fail_problems(problems: Iterable[object], code: int = 2) -> NoReturn:
    """Print every problem of a document (one per line) and exit."""
    for problem in problems:
        typer.echo(f"bedside: error: {problem}", err=True)
    raise typer.Exit(code)


def load_config_or_exit(path: str | Path | None) -> UnitConfig:
    """The unit configuration at ``path`` (default: the shipped simulated unit), or every
    problem printed with its line and an exit."""
    from agent.config import default_config_path, load_config
    from agent.text.yamlsource import DocumentError

    try:
        return load_config(path or default_config_path())
    except DocumentError as exc:
        fail_problems(exc.problems)
