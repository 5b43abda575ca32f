"""What every ``bedside`` sub-command shares: one clear error line, and running a coroutine."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import NoReturn, TypeVar

import typer

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
