"""What the local API's system tests share: a unit's state folder and the agent's command line.

``prepare_state`` makes a unit key, four users (admin, alice the operator, bob the
supervisor, erin the engineer) and installs the T-cell recipe in the unit's recipe store, as
an engineer would; ``agent_argv`` is ``bedside agent run`` on that folder; ``Agent.records``
reads the journal the running agent holds open.
"""

from __future__ import annotations

import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from agent.auth.authenticator import Authenticator, UserStore
from agent.recipe.store import RecipeStore
from agent.record.format import Kind, Record
from agent.record.keys import init_unit_key
from drivers.clock import SystemClock

RECIPE = Path(__file__).parent.parent / "recipes" / "tcell-selection-wash.yaml"
RECIPE_NAME = "tcell-selection-wash"
PARAMS = {"coi_id": "COI-123456", "donation_id": "A123456789012"}
PASSWORDS = {
    "admin": "Adm1n-pass-word",
    "alice": "Al1ce-pass-word",
    "bob": "B0b-pass-words",
    "erin": "Er1n-pass-words",
}


async def prepare_state(state: Path) -> None:
    """A unit key, four users and the T-cell recipe installed, in ``state``."""
    init_unit_key(state)
    store = UserStore.in_dir(
        state, hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    )

    async def sink(kind: str, body: dict[str, Any]) -> None:
        return None

    auth = Authenticator(store, SystemClock(), sink)
    admin = await auth.add_user(None, "admin", "Unit Admin", ["admin"], PASSWORDS["admin"])
    await auth.add_user(admin, "alice", "Alice Operator", ["operator"], PASSWORDS["alice"])
    await auth.add_user(admin, "bob", "Bob Supervisor", ["supervisor"], PASSWORDS["bob"])
    await auth.add_user(admin, "erin", "Erin Engineer", ["engineer"], PASSWORDS["erin"])
    RecipeStore.in_dir(state).install(RECIPE_NAME, RECIPE.read_bytes())


def agent_argv(state: Path, port: int, speed: float = 100) -> list[str]:
    """``bedside agent run`` on ``state`` with its API on ``port``."""
    return [
        sys.executable,
        "-m",
        "agent",
        "--log-format",
        "json",
        "--log-level",
        "warning",
        "agent",
        "run",
        "--state-dir",
        str(state),
        "--api-port",
        str(port),
        "--speed",
        str(speed),
    ]


@dataclass
class Agent:
    """A running ``bedside agent run`` process and where it keeps its journal."""

    port: int
    state: Path

    @property
    def url(self) -> str:
        """The base URL of its local API."""
        return f"http://127.0.0.1:{self.port}"

    def records(self) -> list[Record]:
        """Every committed record (the agent holds the journal open; WAL lets us read)."""
        conn = sqlite3.connect(f"file:{self.state / 'journal.db'}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT data FROM records ORDER BY seq").fetchall()
        finally:
            conn.close()
        return [Record.parse(data, strict=False) for (data,) in rows]

    def audits(self, action: str) -> list[dict[str, Any]]:
        """The bodies of the journal's audit records of ``action``."""
        return [
            r.body for r in self.records() if r.kind == Kind.AUDIT and r.body["action"] == action
        ]
