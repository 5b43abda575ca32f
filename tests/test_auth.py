"""Authentication, lockout, permissions, account changes and electronic signatures."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from agent.auth.authenticator import (
    WRONG,
    Action,
    AuthenticationFailed,
    Authenticator,
    Meaning,
    NotAuthorized,
    PasswordRejected,
    Role,
    Signature,
    SignatureInvalid,
    User,
    UserError,
    UserStore,
    action_for_command,
    authorize,
    check_distinct,
    record_sha256,
    roles_allowing,
    verify_binding,
)
from agent.record.format import canonical
from drivers.clock import ManualClock

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PW = {
    "root": "Admin-Pass-2026",
    "ann": "Cell-Secret-77",
    "sam": "Bag-Secret-88",
    "quinn": "Qa-Pass-9x!",
}
RECORD = {"run": "R-7", "step": "seed bag", "value": 12.5, "unit": "mL"}


class Sink:
    """Collects what the authenticator audits."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, kind: str, body: dict[str, Any]) -> None:
        canonical(body)  # everything audited must be journalable
        self.records.append((str(kind), body))

    def actions(self) -> list[str]:
        return [b.get("action") or b["alarm"] for _, b in self.records]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
async def auth(tmp_path: Path, clock: ManualClock, sink: Sink) -> Authenticator:
    """An authenticator with root (admin), ann (operator), sam (supervisor), quinn (qa)."""
    a = Authenticator(UserStore.in_dir(tmp_path, hasher=CHEAP), clock, sink)
    root = await a.add_user(None, "root", "Rita Root", ["admin"], PW["root"])
    await a.add_user(root, "ann", "Ann Smith", ["operator"], PW["ann"])
    await a.add_user(root, "sam", "Sam Jones", ["supervisor"], PW["sam"])
    await a.add_user(root, "quinn", "Quinn Lee", ["qa"], PW["quinn"])
    sink.records.clear()
    return a


def _user(*roles: str) -> User:
    from datetime import UTC, datetime

    from agent.auth.users import new_user

    return new_user("x" + "".join(r[0] for r in roles), "X", roles, "", datetime.now(UTC))


# --- authentication and lockout -------------------------------------------------------------


async def test_right_password_authenticates_and_is_audited(auth: Authenticator, sink: Sink) -> None:
    """The right name and password (any case of the name) give the account; the login is audited."""
    user = await auth.authenticate("ANN", PW["ann"])
    assert user.name == "ann" and user.full_name == "Ann Smith"
    assert sink.records[-1][1]["action"] == "login" and sink.records[-1][1]["who"] == "ann"


async def test_wrong_password_and_unknown_user_get_the_same_answer(auth: Authenticator) -> None:
    """A wrong password and an unknown name are refused with one indistinguishable message."""
    with pytest.raises(AuthenticationFailed) as wrong:
        await auth.authenticate("ann", "Not-Her-Pass-1")
    with pytest.raises(AuthenticationFailed) as unknown:
        await auth.authenticate("nobody", "Not-Her-Pass-1")
    assert str(wrong.value) == str(unknown.value) == WRONG


async def test_five_failures_lock_for_15_minutes_then_unlock(
    auth: Authenticator, clock: ManualClock, sink: Sink
) -> None:
    """Five consecutive failures lock the account (even for the right password), raise an
    alarm, and the lock lifts after 15 minutes on the clock."""
    for _ in range(4):
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate("ann", "Wrong-Pass-123")
    assert "account_locked" not in sink.actions()
    with pytest.raises(AuthenticationFailed):
        await auth.authenticate("ann", "Wrong-Pass-123")
    assert sink.actions().count("login_failed") == 5
    kinds = {k for k, b in sink.records if b.get("action", b.get("alarm")) == "account_locked"}
    assert kinds == {"audit", "alarm"}
    with pytest.raises(AuthenticationFailed, match="locked until"):
        await auth.authenticate("ann", PW["ann"])
    await clock.advance(14 * 60)
    with pytest.raises(AuthenticationFailed, match="locked until"):
        await auth.authenticate("ann", PW["ann"])
    await clock.advance(61)
    user = await auth.authenticate("ann", PW["ann"])
    assert user.failed_attempts == 0 and user.locked_until is None


async def test_a_success_resets_the_failure_count(auth: Authenticator) -> None:
    """Failures must be consecutive: a good login in between starts the count again."""
    for _ in range(4):
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate("ann", "Wrong-Pass-123")
    await auth.authenticate("ann", PW["ann"])
    for _ in range(4):
        with pytest.raises(AuthenticationFailed, match=WRONG):
            await auth.authenticate("ann", "Wrong-Pass-123")
    assert (await auth.authenticate("ann", PW["ann"])).name == "ann"


async def test_unknown_names_lock_like_real_ones(auth: Authenticator, sink: Sink) -> None:
    """Probing an unknown name five times locks it too, so lockout reveals nothing."""
    for _ in range(5):
        with pytest.raises(AuthenticationFailed, match=WRONG):
            await auth.authenticate("ghost", "Wrong-Pass-123")
    with pytest.raises(AuthenticationFailed, match="'ghost' is locked until"):
        await auth.authenticate("ghost", "Wrong-Pass-123")
    assert sink.records[0][1]["known_user"] is False


@pytest.mark.parametrize(
    "name", ["\u202eevil\x00\x1b[2J" + "n" * 10_000, "a", "x" * 65, "bad name", "\ud800"]
)
async def test_a_name_no_account_can_have_is_audited_short_and_escaped(
    auth: Authenticator, sink: Sink, name: str
) -> None:
    """An attacker-chosen name that is not a login id fails like a wrong password; the audit
    record holds at most a few dozen escaped ASCII characters of it, and nothing is kept."""
    with pytest.raises(AuthenticationFailed, match=WRONG):
        await auth.authenticate(name, "Wrong-Pass-123")
    (kind, body), *_ = sink.records
    assert kind == "audit" and body["action"] == "login_failed" and body["known_user"] is False
    assert len(body["who"]) < 80 and body["who"].isascii() and body["who"].isprintable()
    assert auth._ghosts == {}  # no lockout state grows for names that cannot exist


async def test_disabled_user_is_refused(auth: Authenticator, sink: Sink) -> None:
    """A disabled account cannot sign in or sign; enabling it restores access."""
    root = await auth.authenticate("root", PW["root"])
    await auth.disable_user(root, "ann", why="left the site")
    with pytest.raises(AuthenticationFailed, match="disabled"):
        await auth.authenticate("ann", PW["ann"])
    with pytest.raises(AuthenticationFailed, match="disabled"):
        await auth.sign("ann", PW["ann"], "performed", RECORD)
    with pytest.raises(AuthenticationFailed, match=WRONG):  # no hint without the password
        await auth.authenticate("ann", "Wrong-Pass-123")
    await auth.enable_user(root, "ann")
    assert (await auth.authenticate("ann", PW["ann"])).name == "ann"


# --- permissions --------------------------------------------------------------------------------

ALLOWED = {
    Role.OPERATOR: {"run.start", "prompt.answer", "sign.performed", "run.hold", "run.pause",
                    "run.resume", "alarm.acknowledge", "run.view"},
    Role.SUPERVISOR: {"run.start", "prompt.answer", "sign.performed", "run.hold", "run.pause",
                      "run.resume", "alarm.acknowledge", "run.view", "run.restart", "run.stop",
                      "run.abort", "run.reset", "sign.verified", "alarm.shelve", "records.read"},
    Role.QA: {"sign.approved", "sign.reviewed", "records.read", "run.view"},
    Role.ENGINEER: {"devices.write", "recipe.validate", "recipe.simulate", "run.view"},
    Role.ADMIN: {"users.manage"},
}  # fmt: skip


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("action", list(Action))
def test_permission_table(role: Role, action: Action) -> None:
    """Each role may do exactly its listed actions; anything else raises NotAuthorized."""
    user = _user(role)
    if action in ALLOWED[role]:
        authorize(user, action)
    else:
        with pytest.raises(NotAuthorized) as info:
            authorize(user, action)
        assert info.value.action == action and role not in info.value.roles_needed


def test_not_authorized_names_the_role_needed() -> None:
    """The refusal says which roles would allow the action."""
    with pytest.raises(NotAuthorized, match="needs supervisor") as info:
        authorize(_user("operator"), action_for_command("Stop"))
    assert info.value.user == "xo" and info.value.roles_needed == ["supervisor"]
    assert roles_allowing("run.view") == ["operator", "supervisor", "qa", "engineer"]


async def test_roles_keep_admin_apart_and_unknown_roles_out(auth: Authenticator) -> None:
    """Admin cannot be combined with run roles, roles must exist, nobody changes their own."""
    root = await auth.authenticate("root", PW["root"])
    with pytest.raises(UserError, match="separation of duties"):
        await auth.add_user(root, "bob", "Bob B", ["admin", "operator"], "Bob-Secret-11")
    with pytest.raises(UserError, match="not valid"):
        await auth.add_user(root, "bob", "Bob B", ["wizard"], "Bob-Secret-11")
    with pytest.raises(UserError, match="own roles"):
        await auth.set_roles(root, "root", ["operator"])
    with pytest.raises(UserError, match="last enabled admin"):
        await auth.disable_user(root, "root")


async def test_only_admins_change_accounts(auth: Authenticator) -> None:
    """A supervisor cannot add users; a second bootstrap is refused."""
    sam = await auth.authenticate("sam", PW["sam"])
    with pytest.raises(NotAuthorized, match=r"users\.manage"):
        await auth.add_user(sam, "bob", "Bob B", ["operator"], "Bob-Secret-11")
    with pytest.raises(UserError, match="administrator must sign in"):
        await auth.add_user(None, "eve", "Eve E", ["admin"], "Eve-Secret-11")


async def test_account_changes_are_audited_with_who(auth: Authenticator, sink: Sink) -> None:
    """Role changes and password changes are audited with actor, old and new values, reason."""
    root = await auth.authenticate("root", PW["root"])
    await auth.set_roles(root, "ann", ["operator", "engineer"], why="trained on pumps")
    body = sink.records[-1][1]
    assert body["action"] == "roles_changed" and body["who"] == "root" and body["user"] == "ann"
    assert body["old"] == {"roles": ["operator"]}
    assert body["new"] == {"roles": ["engineer", "operator"]}
    assert body["why"] == "trained on pumps"
    ann = await auth.authenticate("ann", PW["ann"])
    with pytest.raises(PasswordRejected):
        await auth.change_password(ann, "ann", "short")
    with pytest.raises(UserError, match="differ"):
        await auth.change_password(ann, "ann", PW["ann"])
    await auth.change_password(ann, "ann", "Brand-New-Pass-5")
    assert sink.records[-1][1] | {"time": 0} == {
        "action": "password_changed", "who": "ann", "user": "ann", "why": None, "time": 0
    }  # fmt: skip
    assert (await auth.authenticate("ann", "Brand-New-Pass-5")).name == "ann"
    with pytest.raises(NotAuthorized):
        await auth.change_password(ann, "sam", "Brand-New-Pass-6")


# --- signatures ---------------------------------------------------------------------------------


async def test_signature_shows_name_time_meaning_and_binds_the_record(
    auth: Authenticator, clock: ManualClock
) -> None:
    """A signature carries id, printed name, meaning, UTC time and the record's hash."""
    await clock.advance(1.25)
    sig = await auth.sign("ann", PW["ann"], "performed", RECORD)
    assert sig.as_dict() == {
        "user": "ann",
        "full_name": "Ann Smith",
        "meaning": "performed",
        "time": "2026-01-01T00:00:01.250000Z",
        "record_hash": record_sha256(RECORD),
    }
    verify_binding(sig, dict(RECORD))
    verify_binding(sig.as_dict(), {k: RECORD[k] for k in reversed(RECORD)})  # key order is moot


async def test_changing_the_record_voids_the_signature(auth: Authenticator) -> None:
    """Any change to the signed record makes verify_binding fail."""
    sig = await auth.sign("ann", PW["ann"], Meaning.PERFORMED, RECORD)
    for changed in ({**RECORD, "value": 12.6}, {**RECORD, "extra": 1}, {"run": "R-7"}):
        with pytest.raises(SignatureInvalid, match="void"):
            verify_binding(sig, changed)
    forged = Signature.from_dict({**sig.as_dict(), "record_hash": record_sha256({"run": "R-8"})})
    with pytest.raises(SignatureInvalid):
        verify_binding(forged, RECORD)


async def test_signing_needs_the_password_and_the_role(auth: Authenticator, sink: Sink) -> None:
    """A wrong password or a meaning the roles do not allow refuses the signature (audited)."""
    with pytest.raises(AuthenticationFailed, match=WRONG):
        await auth.sign("ann", "Wrong-Pass-123", "performed", RECORD)
    assert sink.records[-1][1]["purpose"] == "signature:performed"
    with pytest.raises(NotAuthorized, match=r"sign\.verified"):
        await auth.sign("ann", PW["ann"], "verified", RECORD)
    assert sink.records[-1][1]["action"] == "signature_refused"
    with pytest.raises(SignatureInvalid, match="unknown signature meaning"):
        await auth.sign("ann", PW["ann"], "blessed", RECORD)
    with pytest.raises(NotAuthorized):
        await auth.sign("root", PW["root"], "approved", RECORD)  # admins never sign records
    assert (await auth.sign("quinn", PW["quinn"], "approved", RECORD)).full_name == "Quinn Lee"


async def test_signature_failures_count_toward_lockout(auth: Authenticator) -> None:
    """Wrong passwords at signing lock the account like wrong passwords at login."""
    for _ in range(5):
        with pytest.raises(AuthenticationFailed):
            await auth.sign("sam", "Wrong-Pass-123", "verified", RECORD)
    with pytest.raises(AuthenticationFailed, match="locked"):
        await auth.authenticate("sam", PW["sam"])


async def test_two_person_rule(auth: Authenticator) -> None:
    """Verified by the performer is refused; by another supervisor it passes."""
    root = await auth.authenticate("root", PW["root"])
    await auth.add_user(root, "vic", "Vic Grey", ["supervisor"], "Tube-Secret-42")
    performed = await auth.sign("sam", PW["sam"], "performed", RECORD)
    self_check = await auth.sign("sam", PW["sam"], "verified", RECORD)
    with pytest.raises(SignatureInvalid, match="two-person rule"):
        check_distinct([performed, self_check])
    other = await auth.sign("vic", "Tube-Secret-42", "verified", RECORD)
    check_distinct([performed.as_dict(), other.as_dict()])


async def test_lockout_persists_across_restarts(
    auth: Authenticator, clock: ManualClock, sink: Sink
) -> None:
    """A lock is stored with the account, so a new authenticator (a restart) keeps it."""
    for _ in range(5):
        with pytest.raises(AuthenticationFailed):
            await auth.authenticate("ann", "Wrong-Pass-123")
    fresh = Authenticator(UserStore(auth.store.path, hasher=CHEAP), clock, sink)
    with pytest.raises(AuthenticationFailed, match="locked"):
        await fresh.authenticate("ann", PW["ann"])
    await clock.advance(timedelta(minutes=15).total_seconds())
    assert (await fresh.authenticate("ann", PW["ann"])).name == "ann"
