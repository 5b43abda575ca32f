"""``bedside users``: the unit's accounts (add, list, disable, enable, passwd, set-roles, roles).

Account changes need an administrator (``--as ADMIN``, or ``BEDSIDE_USER``) who signs in with
their password (asked, or ``BEDSIDE_PASSWORD`` for scripts); the one exception is the first
account of a unit, which must be an admin. New passwords are asked twice, or read from
``BEDSIDE_NEW_PASSWORD``. Every change is audited with who made it: the records wait in the
state folder's ``users-audit.jsonl`` until the agent journals them.
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import typer

from agent.auth.authenticator import ROLE_DESCRIPTIONS, ROLE_PERMISSIONS, Authenticator
from agent.auth.outbox import AuditOutbox
from agent.auth.users import AuthError, User, UserStore
from agent.record.format import format_time

T = TypeVar("T")

app = typer.Typer(help="The unit's user accounts.", no_args_is_help=True)

STATE_DIR = typer.Option(
    Path(os.environ.get("BEDSIDE_STATE_DIR", ".bedside")),
    "--state-dir",
    help="the unit's state folder (users.json)",
)
ACTOR = typer.Option(
    None, "--as", envvar="BEDSIDE_USER", help="the administrator making the change"
)
WHY = typer.Option(None, "--why", help="the reason, kept in the audit trail")
ROLES = typer.Option(..., "--role", help="a role (repeat for several); see `bedside users roles`")


def _fail(message: str) -> NoReturn:
    from agent.cli.common import fail

    fail(message)


def _run(work: Callable[[Authenticator], Awaitable[T]], state_dir: Path) -> T:
    from agent.cli.common import run_async
    from drivers.clock import SystemClock

    auth = Authenticator(UserStore.in_dir(state_dir), SystemClock(), AuditOutbox.in_dir(state_dir))
    try:
        return run_async(work(auth))
    except AuthError as exc:
        _fail(str(exc))


def _password(prompt: str) -> str:
    return os.environ.get("BEDSIDE_PASSWORD") or getpass.getpass(prompt)


def _new_password(name: str) -> str:
    given = os.environ.get("BEDSIDE_NEW_PASSWORD")
    if given:
        return given
    first = getpass.getpass(f"New password for {name}: ")
    if getpass.getpass("Repeat it: ") != first:
        _fail("the two passwords differ")
    return first


async def _sign_in(auth: Authenticator, actor: str | None) -> User:
    if not actor:
        _fail("name the administrator making the change with --as ADMIN (or BEDSIDE_USER)")
    return await auth.authenticate(actor, _password(f"Password for {actor}: "))


def _echo(user: User) -> None:
    typer.echo(json.dumps(user.public()))


@app.command("add")
def add(
    name: str,
    full_name: str = typer.Option(..., "--full-name", help="the name printed on signatures"),
    role: list[str] = ROLES,
    actor: str = ACTOR,
    why: str = WHY,
    state_dir: Path = STATE_DIR,
) -> None:
    """Add an account (the first account of a unit must be an admin)."""

    async def work(auth: Authenticator) -> User:
        by = await _sign_in(auth, actor) if actor or auth.store.all() else None
        return await auth.add_user(by, name, full_name, role, _new_password(name), why=why)

    _echo(_run(work, state_dir))


@app.command("list")
def list_users(
    as_json: bool = typer.Option(False, "--json", help="one JSON object per account"),
    state_dir: Path = STATE_DIR,
) -> None:
    """List the accounts (never their password hashes)."""
    try:
        users = UserStore.in_dir(state_dir).all()
    except AuthError as exc:
        _fail(str(exc))
    if as_json:
        for user in users:
            _echo(user)
        return
    from drivers.clock import SystemClock

    now = SystemClock().now()
    typer.echo(f"{'NAME':16} {'FULL NAME':28} {'ROLES':22} {'STATE':10} PASSWORD SET")
    for u in users:
        state = "disabled" if u.disabled else "locked" if u.locked_at(now) else "active"
        roles = ",".join(u.roles)
        changed = format_time(u.password_changed)[:19] + "Z"
        typer.echo(f"{u.name:16} {u.full_name:28} {roles:22} {state:10} {changed}")


@app.command("disable")
def disable(name: str, actor: str = ACTOR, why: str = WHY, state_dir: Path = STATE_DIR) -> None:
    """Disable an account: it can no longer sign in or sign."""

    async def work(auth: Authenticator) -> User:
        return await auth.disable_user(await _sign_in(auth, actor), name, why=why)

    _echo(_run(work, state_dir))


@app.command("enable")
def enable(name: str, actor: str = ACTOR, why: str = WHY, state_dir: Path = STATE_DIR) -> None:
    """Enable an account again and clear its lockout."""

    async def work(auth: Authenticator) -> User:
        return await auth.enable_user(await _sign_in(auth, actor), name, why=why)

    _echo(_run(work, state_dir))


@app.command("set-roles")
def set_roles(
    name: str,
    role: list[str] = ROLES,
    actor: str = ACTOR,
    why: str = WHY,
    state_dir: Path = STATE_DIR,
) -> None:
    """Replace an account's roles."""

    async def work(auth: Authenticator) -> User:
        return await auth.set_roles(await _sign_in(auth, actor), name, role, why=why)

    _echo(_run(work, state_dir))


@app.command("passwd")
def passwd(name: str, actor: str = ACTOR, why: str = WHY, state_dir: Path = STATE_DIR) -> None:
    """Change a password: your own (asks the current one) or, with --as ADMIN, anyone's."""

    async def work(auth: Authenticator) -> User:
        by = await _sign_in(auth, actor or name)
        return await auth.change_password(by, name, _new_password(name), why=why)

    _echo(_run(work, state_dir))


@app.command("roles")
def roles() -> None:
    """Show the roles and what each may do."""
    for role, allowed in ROLE_PERMISSIONS.items():
        typer.echo(f"{role}: {ROLE_DESCRIPTIONS[role]}")
        typer.echo(f"    {', '.join(sorted(allowed))}")
