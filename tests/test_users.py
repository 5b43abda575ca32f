"""The user store (users.json), password rules, the audit outbox and `bedside users`."""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from argon2 import PasswordHasher
from typer.testing import CliRunner

from agent.auth.outbox import AuditOutbox
from agent.auth.users import (
    PasswordRejected,
    UserError,
    UserStore,
    UserStoreError,
    check_password_rules,
    new_user,
    normalise_name,
    password_problems,
)

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
GOOD = "Cell-Line-2026"


def _store(tmp_path: Path) -> UserStore:
    return UserStore.in_dir(tmp_path / "state", hasher=CHEAP)


def _add(store: UserStore, name: str, roles: tuple[str, ...] = ("operator",)) -> None:
    store.insert(new_user(name, f"{name.title()} Example", roles, store.hash_password(GOOD), NOW))


def test_hash_is_argon2id_and_verifies() -> None:
    """Passwords are stored as argon2id hashes that verify the right password only."""
    store = UserStore("unused.json", hasher=CHEAP)
    digest = store.hash_password(GOOD)
    assert digest.startswith("$argon2id$") and GOOD not in digest
    assert store.hash_matches(digest, GOOD)
    assert not store.hash_matches(digest, GOOD + "x")
    assert not store.hash_matches("not-a-hash", GOOD)


def test_cheap_hashes_need_rehash_under_default_parameters(tmp_path: Path) -> None:
    """A hash made with other argon2 parameters is flagged for upgrade."""
    store = _store(tmp_path)
    _add(store, "ann")
    user = store.get("ann")
    assert user is not None and not store.needs_rehash(user)
    assert UserStore(store.path).needs_rehash(user)


@pytest.mark.parametrize(
    ("password", "problem"),
    [
        ("Short1!", "at least 10"),
        ("alllowercaseletters", "one kind of character"),
        ("1234567890", "one kind of character"),
        ("aaaaaAAAAA", "fewer than 5 different"),
        ("xx-Ann-2026-yy", "contains the user name"),
        ("A1" * 200, "at most 256"),
    ],
)
def test_password_rules_refuse_weak_passwords(password: str, problem: str) -> None:
    """Each password rule refuses its weak password with a message saying why."""
    with pytest.raises(PasswordRejected) as info:
        check_password_rules(password, name="ann")
    assert any(problem in p for p in info.value.problems)


def test_password_rules_report_every_problem_and_accept_good_ones() -> None:
    """All broken rules are reported at once; a sensible password passes."""
    assert len(password_problems("aaaa", name="bob")) == 3
    assert password_problems(GOOD, name="ann") == []
    assert password_problems("correct horse battery staple", name="ann") == []


def test_names_are_lower_case_ids() -> None:
    """User names are normalised to lower case and must look like ids."""
    assert normalise_name("  Ann.Smith ") == "ann.smith"
    for bad in ("a", "1ann", "ann smith", "x" * 40, ""):
        with pytest.raises(UserError):
            normalise_name(bad)


def test_store_survives_reload_with_mode_0600(tmp_path: Path) -> None:
    """users.json is private (0600), keeps every field and reads back identically."""
    store = _store(tmp_path)
    _add(store, "ann")
    _add(store, "bob", ("qa", "supervisor"))
    mode = stat.S_IMODE(store.path.stat().st_mode)
    assert mode == 0o600
    again = UserStore(store.path, hasher=CHEAP)
    assert again.all() == store.all()
    bob = again.get("BOB")
    assert bob is not None and bob.roles == ("qa", "supervisor") and bob.created == NOW
    doc = json.loads(store.path.read_text())
    assert set(doc["users"]["ann"]) == {
        "full_name",
        "roles",
        "hash",
        "disabled",
        "failed_attempts",
        "locked_until",
        "created",
        "password_changed",
    }
    assert not list(store.path.parent.glob("*.tmp"))


def test_store_sees_changes_made_by_another_process(tmp_path: Path) -> None:
    """A store re-reads users.json when another writer has replaced it."""
    first, second = _store(tmp_path), _store(tmp_path)
    assert first.all() == []
    _add(second, "ann")
    second.update("ann", lambda u: replace(u, disabled=True))
    ann = first.get("ann")
    assert ann is not None and ann.disabled


def test_duplicate_and_unknown_names_are_refused(tmp_path: Path) -> None:
    """Adding a taken name or changing an unknown one fails without touching the file."""
    store = _store(tmp_path)
    _add(store, "ann")
    before = store.path.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        _add(store, "ann")
    with pytest.raises(UserError, match="no user 'zed'"):
        store.update("zed", lambda u: u)
    assert store.path.read_bytes() == before


def test_corrupt_store_is_refused_with_the_file_named(tmp_path: Path) -> None:
    """A damaged users.json raises UserStoreError naming the file and the field."""
    store = _store(tmp_path)
    _add(store, "ann")
    doc = json.loads(store.path.read_text())
    del doc["users"]["ann"]["roles"]
    store.path.write_text(json.dumps(doc))
    with pytest.raises(UserStoreError, match=r"users\.ann"):
        UserStore(store.path).all()
    store.path.write_text("{not json")
    with pytest.raises(UserStoreError, match=r"users\.json"):
        UserStore(store.path).all()


async def test_outbox_keeps_records_until_drained_in_order(tmp_path: Path) -> None:
    """Audit records wait in the outbox (0600) and drain to a sink once, in order."""
    outbox = AuditOutbox.in_dir(tmp_path)
    await outbox("audit", {"action": "user_added", "n": 1})
    await outbox("audit", {"action": "user_disabled", "n": 2})
    assert stat.S_IMODE(outbox.path.stat().st_mode) == 0o600
    got: list[tuple[str, dict[str, Any]]] = []

    async def sink(kind: str, body: dict[str, Any]) -> None:
        got.append((kind, body))

    assert await outbox.drain(sink) == 2
    assert [b["n"] for _, b in got] == [1, 2]
    assert outbox.pending() == [] and await outbox.drain(sink) == 0


async def test_outbox_keeps_what_a_failing_sink_did_not_take(tmp_path: Path) -> None:
    """If the sink fails part-way, the records not yet taken stay for the next drain."""
    outbox = AuditOutbox.in_dir(tmp_path)
    for n in range(3):
        await outbox("audit", {"n": n})

    async def flaky(kind: str, body: dict[str, Any]) -> None:
        if body["n"] == 1:
            raise OSError("disk full")

    with pytest.raises(OSError):
        await outbox.drain(flaky)
    assert [b["n"] for _, b in outbox.pending()] == [1, 2]


async def test_a_corrupt_outbox_line_is_journaled_as_unreadable_and_blocks_nothing(
    tmp_path: Path,
) -> None:
    """A line that is not a record (a torn write, an edit) becomes an ``audit_outbox_unreadable``
    record naming its line, never its content; the records around it still drain."""
    outbox = AuditOutbox.in_dir(tmp_path)
    await outbox("audit", {"n": 1})
    with outbox.path.open("a") as f:
        f.write('{"kind": "audit", "body": SECRET-TEXT\n')
    await outbox("audit", {"n": 3})
    got: list[dict[str, Any]] = []

    async def sink(kind: str, body: dict[str, Any]) -> None:
        got.append(body)

    assert await outbox.drain(sink) == 3
    assert got[0] == {"n": 1} and got[2] == {"n": 3}
    assert got[1]["action"] == "audit_outbox_unreadable" and got[1]["line"] == 2
    assert "SECRET" not in str(got) and outbox.pending() == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("why", "w" * 501),
        ("why", "forged\nline"),
        ("full_name", "Eve\u202e"),
        ("full_name", "E" * 101),
    ],
)
def test_free_text_of_account_changes_is_limited_before_the_journal(
    tmp_path: Path, field: str, value: str
) -> None:
    """A reason or full name that is too long or holds control characters is refused (exit 2,
    naming it) and nothing is changed or audited."""
    env = {"BEDSIDE_NEW_PASSWORD": "Adm1n-pass-word"}
    args = ["add", "root", "--role", "admin", "--full-name"]
    args += [value, "--why", "ok"] if field == "full_name" else ["Root Admin", "--why", value]
    result = _cli(tmp_path, *args, env=env)
    assert result.exit_code == 2 and ("characters" in result.stderr or "U+" in result.stderr)
    assert UserStore.in_dir(tmp_path).all() == [] and AuditOutbox.in_dir(tmp_path).pending() == []


# --- the CLI --------------------------------------------------------------------------------


def _cli(state: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    from agent.cli.users import app

    runner = CliRunner()
    with structlog.testing.capture_logs():
        return runner.invoke(app, [*args, "--state-dir", str(state)], env=env)


def test_cli_add_list_disable(tmp_path: Path) -> None:
    """`users add/list/disable` work from scripts and audit every change with who made it."""
    state = tmp_path / "state"
    admin_env = {"BEDSIDE_NEW_PASSWORD": "Admin-Pass-2026"}
    r = _cli(state, "add", "root", "--full-name", "Rita Root", "--role", "admin", env=admin_env)
    assert r.exit_code == 0, r.output
    env = {"BEDSIDE_NEW_PASSWORD": GOOD, "BEDSIDE_PASSWORD": "Admin-Pass-2026"}
    r = _cli(state, "add", "Ann", "--full-name", "Ann Smith", "--role", "operator", "--as",
             "root", env=env)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["name"] == "ann"

    r = _cli(state, "list", "--json")
    listed = [json.loads(line) for line in r.stdout.splitlines()]
    assert [u["name"] for u in listed] == ["ann", "root"]
    assert all("hash" not in u for u in listed)
    r = _cli(state, "list")
    assert "Ann Smith" in r.stdout and "active" in r.stdout

    r = _cli(state, "disable", "ann", "--as", "root", "--why", "left the site", env=env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["disabled"] is True

    audit = AuditOutbox.in_dir(state).pending()
    actions = [(b["action"], b.get("who"), b.get("user")) for k, b in audit if k == "audit"]
    assert ("user_added", "bootstrap", "root") in actions
    assert ("user_added", "root", "ann") in actions
    assert ("user_disabled", "root", "ann") in actions


def test_cli_refuses_weak_passwords_and_unsigned_changes(tmp_path: Path) -> None:
    """The CLI refuses a weak password, a first account that is not an admin, and a change
    without an administrator, each with one clear error line."""
    state = tmp_path / "state"
    weak = {"BEDSIDE_NEW_PASSWORD": "password"}
    r = _cli(state, "add", "root", "--full-name", "Rita Root", "--role", "admin", env=weak)
    assert r.exit_code == 2 and "at least 10" in r.stderr
    env = {"BEDSIDE_NEW_PASSWORD": GOOD}
    r = _cli(state, "add", "ann", "--full-name", "Ann Smith", "--role", "operator", env=env)
    assert r.exit_code == 2 and "must be an admin" in r.stderr
    r = _cli(state, "add", "root", "--full-name", "Rita Root", "--role", "admin", env=env)
    assert r.exit_code == 0, r.output
    r = _cli(state, "add", "ann", "--full-name", "Ann Smith", "--role", "operator", env=env)
    assert r.exit_code == 2 and "--as ADMIN" in r.stderr
    bad = {**env, "BEDSIDE_PASSWORD": "wrong-password-1"}
    r = _cli(state, "add", "ann", "--full-name", "A S", "--role", "operator", "--as", "root",
             env=bad)  # fmt: skip
    assert r.exit_code == 2 and "unknown user or wrong password" in r.stderr


def test_cli_passwd_changes_ones_own_password(tmp_path: Path) -> None:
    """`users passwd NAME` asks the current password and sets the new one (audited)."""
    state = tmp_path / "state"
    env = {"BEDSIDE_NEW_PASSWORD": "Admin-Pass-2026"}
    assert (
        _cli(state, "add", "root", "--full-name", "R R", "--role", "admin", env=env).exit_code == 0
    )
    wrong = {"BEDSIDE_PASSWORD": "Not-The-Pass-1", "BEDSIDE_NEW_PASSWORD": GOOD}
    assert _cli(state, "passwd", "root", env=wrong).exit_code == 2
    right = {"BEDSIDE_PASSWORD": "Admin-Pass-2026", "BEDSIDE_NEW_PASSWORD": GOOD}
    r = _cli(state, "passwd", "root", env=right)
    assert r.exit_code == 0, r.output
    user = UserStore.in_dir(state).get("root")
    assert user is not None and UserStore.in_dir(state).password_matches(user, GOOD)
    actions = [b["action"] for _, b in AuditOutbox.in_dir(state).pending()]
    assert actions[-2:] == ["login", "password_changed"]


def test_cli_roles_lists_every_role() -> None:
    """`users roles` shows each role with its permissions."""
    from agent.cli.users import app

    r = CliRunner().invoke(app, ["roles"])
    assert r.exit_code == 0
    for role in ("operator", "supervisor", "qa", "engineer", "admin", "users.manage"):
        assert role in r.stdout
