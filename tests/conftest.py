"""Shared fixtures: free loopback ports, and a guard that fails a test leaving tasks running."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> Iterator[int]:
    """A free loopback TCP port."""
    yield free_port()


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks of its own running when it ends."""
    before = set(asyncio.all_tasks())
    yield
    await asyncio.sleep(0)
    leaked = [
        t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()
    ]
    if leaked:
        # give cancellations in flight a moment to finish before judging
        await asyncio.sleep(0.2)
        leaked = [t for t in leaked if not t.done()]
    for t in leaked:
        t.cancel()
    if leaked:
        names = ", ".join(sorted({t.get_coro().__qualname__ for t in leaked}))  # type: ignore[union-attr]
        pytest.fail(f"test left {len(leaked)} task(s) running: {names}")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL server URL for the session (see tests/pg.py); skips when there is none."""
    from tests import pg

    try:
        with pg.server(free_port()) as url:
            yield url
    except LookupError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A PostgreSQL URL whose search path is a fresh schema, dropped after the test."""
    from tests import pg

    with pg.fresh_schema(pg_server) as url:
        yield url
