"""Authentication with lockout, signing, and audited account changes: the API of ``auth``.

``Authenticator`` checks name + password (21 CFR 11.200): five consecutive failures lock the
account for 15 minutes and raise an alarm (11.300). Unknown names are treated like real ones
(the same message, the same hashing cost, the same lockout) so answers never reveal which names
exist. Every login, failure, refusal, lockout and account change reaches the audit ``sink``
(``journal.append`` in the agent) naming who did it. The sink's bodies::

    audit: {"action", "time", "who", "user"?, "purpose"?, "reason"?, "old"?, "new"?, "why"?, ...}
    alarm: {"alarm": "account_locked", "state", "old", "active", "priority", "message", "cause",
            "detail", "who", "time"}

``who`` is the person acting (the one signing in, or the admin changing an account); ``user``
is the account changed. ``purpose`` is ``login`` or ``signature:<meaning>``.

``sign`` asks for the password again every time and returns a ``Signature`` (printed name,
UTC time, meaning: 11.50) bound to the SHA-256 of the canonical JSON of the signed record;
``verify_binding`` fails once the record has changed (11.70). ``sign`` does not journal the
signature: the caller journals ``signature.as_dict()`` as a ``signature`` record of its run.
Roles and permissions (``agent.auth.permissions``) and signatures (``agent.auth.signatures``) are
re-exported here, so callers import everything from ``agent.auth.authenticator``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from agent.auth.permissions import (
    ROLE_DESCRIPTIONS,
    ROLE_PERMISSIONS,
    Action,
    Meaning,
    NotAuthorized,
    Role,
    action_for_command,
    authorize,
    can,
    check_roles,
    permissions_of,
    roles_allowing,
    sign_action,
)
from agent.auth.signatures import (
    Signature,
    SignatureInvalid,
    check_distinct,
    record_sha256,
    verify_binding,
)
from agent.auth.users import (
    MAX_FULL_NAME,
    MAX_WHY,
    AuthenticationFailed,
    AuthError,
    PasswordRejected,
    User,
    UserError,
    UserStore,
    check_password_rules,
    check_text,
    escaped_name,
    is_name,
    new_user,
    normalise_name,
    with_password,
)
from agent.record.format import Kind, format_time

if TYPE_CHECKING:
    from drivers.clock import Clock

__all__ = [
    "LOCKOUT",
    "MAX_FAILURES",
    "ROLE_DESCRIPTIONS",
    "ROLE_PERMISSIONS",
    "WRONG",
    "Action",
    "AuditSink",
    "AuthError",
    "AuthenticationFailed",
    "Authenticator",
    "Meaning",
    "NotAuthorized",
    "PasswordRejected",
    "Role",
    "Signature",
    "SignatureInvalid",
    "User",
    "UserError",
    "UserStore",
    "action_for_command",
    "authorize",
    "can",
    "check_distinct",
    "permissions_of",
    "record_sha256",
    "roles_allowing",
    "verify_binding",
]

log = structlog.get_logger(__name__)

AuditSink = Callable[[str, dict[str, Any]], Awaitable[object]]
"""Where audit and alarm records go: ``(kind, body)``; ``journal.append`` fits."""

WRONG = "unknown user or wrong password"
MAX_FAILURES = 5
LOCKOUT = timedelta(minutes=15)
_MAX_GHOSTS = 1000


# --- authentication ---------------------------------------------------------------------------


class Authenticator:
    """Authentication, signatures and audited account changes over one ``UserStore``."""

    def __init__(
        self,
        store: UserStore,
        clock: Clock,
        sink: AuditSink,
        *,
        max_failures: int = MAX_FAILURES,
        lockout: timedelta = LOCKOUT,
    ) -> None:
        self.store = store
        self._clock = clock
        self._sink = sink
        self._max_failures = max_failures
        self._lockout = lockout
        # unknown names fail and lock like real ones (in memory; oldest forgotten first)
        self._ghosts: dict[str, tuple[int, datetime | None]] = {}
        self._dummy_hash: str | None = None

    async def authenticate(self, name: str, password: str) -> User:
        """The account, if ``password`` is its password and it is enabled and not locked.

        Raises ``AuthenticationFailed``; each failure, refusal and lockout is audited.
        """
        user = await self._check(name, password, purpose="login")
        await self._audit("login", who=user.name)
        return user

    async def sign(
        self, name: str, password: str, meaning: Meaning | str, record: Mapping[str, Any]
    ) -> Signature:
        """Re-authenticate ``name`` and sign ``record`` with ``meaning`` if their roles allow.

        Raises ``AuthenticationFailed``, ``NotAuthorized`` (audited) or ``SignatureInvalid``
        for an unknown meaning.
        """
        try:
            what = Meaning(meaning)
        except ValueError:
            raise SignatureInvalid(
                f"unknown signature meaning {meaning!r}; one of {', '.join(Meaning)}"
            ) from None
        digest = record_sha256(record)
        user = await self._check(name, password, purpose=f"signature:{what}")
        try:
            authorize(user, sign_action(what))
        except NotAuthorized as exc:
            await self._audit("signature_refused", who=user.name, meaning=what, reason=str(exc))
            raise
        sig = Signature(user.name, user.full_name, str(what), self._now(), digest)
        log.info("signed", user=user.name, meaning=str(what), record_hash=digest)
        return sig

    async def _check(self, name: str, password: str, *, purpose: str) -> User:
        if not is_name(name):
            # no account can have this name: fail like a wrong password (same cost), audit it
            # shortened and escaped (it is attacker-chosen), and remember nothing of it
            await self._dummy_check(password)
            shown = escaped_name(name)
            log.warning("login_failed", user=shown, purpose=purpose, reason="malformed name")
            await self._audit(
                "login_failed", who=shown, purpose=purpose, known_user=False, reason="not a name"
            )
            raise AuthenticationFailed(WRONG)
        key = name.strip().lower()
        now = self._clock.now()
        user = self.store.get(key)
        if user is None:
            return await self._ghost(key, password, purpose)
        if user.locked_at(now):
            await self._audit("login_refused", who=key, purpose=purpose, reason="locked")
            raise AuthenticationFailed(_locked_message(key, user.locked_until))
        if not await asyncio.to_thread(self.store.password_matches, user, password):
            await self._failed(user, purpose)
            raise AuthenticationFailed(WRONG)
        if user.disabled:
            await self._audit("login_refused", who=key, purpose=purpose, reason="disabled")
            raise AuthenticationFailed(f"account {key!r} is disabled; ask an administrator")
        rehash = self.store.needs_rehash(user)
        if user.failed_attempts or user.locked_until or rehash:
            fresh = await asyncio.to_thread(self.store.hash_password, password) if rehash else None
            user = self.store.update(
                key,
                lambda u: replace(u, failed_attempts=0, locked_until=None, hash=fresh or u.hash),
            )
        return user

    async def _failed(self, user: User, purpose: str) -> None:
        now = self._clock.now()

        def bump(u: User) -> User:
            expired = u.locked_until is not None and now >= u.locked_until
            count = (0 if expired else u.failed_attempts) + 1
            until = now + self._lockout if count >= self._max_failures else None
            return replace(u, failed_attempts=count, locked_until=until)

        user = self.store.update(user.name, bump)
        await self._after_failure(user.name, user.failed_attempts, user.locked_until, purpose)

    async def _ghost(self, key: str, password: str, purpose: str) -> User:
        now = self._clock.now()
        count, until = self._ghosts.get(key, (0, None))
        if until is not None and now < until:
            await self._audit("login_refused", who=key, purpose=purpose, reason="locked")
            raise AuthenticationFailed(_locked_message(key, until))
        await self._dummy_check(password)
        count = (0 if until is not None else count) + 1
        until = now + self._lockout if count >= self._max_failures else None
        self._ghosts.pop(key, None)
        self._ghosts[key] = (count, until)
        while len(self._ghosts) > _MAX_GHOSTS:
            del self._ghosts[next(iter(self._ghosts))]
        await self._after_failure(key, count, until, purpose, known=False)
        raise AuthenticationFailed(WRONG)

    async def _dummy_check(self, password: str) -> None:
        """Spend what checking a real password costs, so failures all take as long."""
        if self._dummy_hash is None:
            self._dummy_hash = await asyncio.to_thread(self.store.hash_password, "no such user 0")
        await asyncio.to_thread(self.store.hash_matches, self._dummy_hash, password)

    async def _after_failure(
        self, name: str, count: int, until: datetime | None, purpose: str, *, known: bool = True
    ) -> None:
        log.warning("login_failed", user=name, failures=count, purpose=purpose)
        await self._audit(
            "login_failed", who=name, purpose=purpose, failed_attempts=count, known_user=known
        )
        if until is None:
            return
        locked = format_time(until)
        log.error("account_locked", user=name, failures=count, until=locked)
        await self._audit("account_locked", who=name, failed_attempts=count, locked_until=locked)
        message = f"{count} failed sign-ins for {name!r}; account locked until {locked}"
        await self._sink(
            Kind.ALARM,
            {
                "alarm": "account_locked",
                "state": "unack",
                "old": "normal",
                "active": True,
                "priority": "high",
                "message": message,
                "cause": "authentication",
                "detail": f"purpose {purpose}",
                "who": name,
                "time": self._now(),
            },
        )

    # --- account changes (each audited with who made it) ---------------------------------------

    async def add_user(
        self,
        by: User | None,
        name: str,
        full_name: str,
        roles: Sequence[str],
        password: str,
        *,
        why: str | None = None,
    ) -> User:
        """Create an account. ``by`` must be an admin; ``None`` is allowed only to create the
        first admin of a store without an enabled admin (bootstrap, audited as such)."""
        key = normalise_name(name)
        wanted = check_roles(roles)
        _check_why(why)
        check_text(full_name, "the full name", MAX_FULL_NAME)
        if by is None:
            if _admins(self.store.all()):
                raise UserError("an administrator must sign in to add users (--as ADMIN)")
            if wanted != (Role.ADMIN,):
                raise UserError("the first account must be an admin: add one with --role admin")
        else:
            by = self._acting(by, Action.USERS_MANAGE)
        check_password_rules(password, name=key)
        digest = await asyncio.to_thread(self.store.hash_password, password)
        user = self.store.insert(new_user(key, full_name, wanted, digest, self._clock.now()))
        who = by.name if by else "bootstrap"
        await self._audit("user_added", who=who, user=key, old=None, new=user.public(), why=why)
        return user

    async def disable_user(self, by: User, name: str, *, why: str | None = None) -> User:
        """Disable an account: it can no longer sign in or sign (never the last admin)."""
        return await self._change(by, name, "user_disabled", why, disabled=True)

    async def enable_user(self, by: User, name: str, *, why: str | None = None) -> User:
        """Enable an account and clear its lockout."""
        return await self._change(by, name, "user_enabled", why, disabled=False)

    async def set_roles(
        self, by: User, name: str, roles: Sequence[str], *, why: str | None = None
    ) -> User:
        """Replace an account's roles (never one's own)."""
        wanted = check_roles(roles)
        if normalise_name(name) == by.name:
            raise UserError("nobody can change their own roles")
        return await self._change(by, name, "roles_changed", why, roles=wanted)

    async def change_password(
        self, by: User, name: str, password: str, *, why: str | None = None
    ) -> User:
        """Set a new password: one's own (``by`` just authenticated) or anyone's by an admin."""
        key = normalise_name(name)
        _check_why(why)
        by = self._acting(by, None if key == by.name else Action.USERS_MANAGE)
        check_password_rules(password, name=key)
        current = self.store.get(key)
        if current is None:
            raise UserError(f"no user {key!r}")
        if await asyncio.to_thread(self.store.password_matches, current, password):
            raise UserError("the new password must differ from the current one")
        digest = await asyncio.to_thread(self.store.hash_password, password)
        now = self._clock.now()
        user = self.store.update(key, lambda u: with_password(u, digest, now))
        await self._audit("password_changed", who=by.name, user=key, why=why)
        return user

    async def _change(self, by: User, name: str, action: str, why: str | None, **new: Any) -> User:
        key = normalise_name(name)
        _check_why(why)
        by = self._acting(by, Action.USERS_MANAGE)
        old: dict[str, Any] = {}

        def apply(users: dict[str, User]) -> User:
            current = users.get(key)
            if current is None:
                raise UserError(f"no user {key!r}")
            old.update({f: _plain(getattr(current, f)) for f in new})
            changed = replace(current, **new)
            if new.get("disabled") is False:
                changed = replace(changed, failed_attempts=0, locked_until=None)
            users[key] = changed
            if not _admins(users.values()):
                raise UserError(f"{key!r} is the last enabled admin; add another admin first")
            return changed

        user = self.store.update_many(apply)
        after = {f: _plain(v) for f, v in new.items()}
        await self._audit(action, who=by.name, user=key, old=old, new=after, why=why)
        return user

    def _acting(self, by: User, action: Action | None) -> User:
        """The acting account as stored now: it must still be enabled and allowed."""
        fresh = self.store.get(by.name)
        if fresh is None or fresh.disabled:
            raise AuthenticationFailed(f"account {by.name!r} is disabled or gone")
        if action is not None:
            authorize(fresh, action)
        return fresh

    def _now(self) -> str:
        return format_time(self._clock.now())

    async def _audit(self, action: str, **body: Any) -> None:
        await self._sink(Kind.AUDIT, {"action": action, "time": self._now(), **body})


def _check_why(why: str | None) -> None:
    if why is not None:
        check_text(why, "the reason (--why)", MAX_WHY)


def _locked_message(name: str, until: datetime | None) -> str:
    when = format_time(until) if until else "later"
    return (
        f"account {name!r} is locked until {when} after too many failed attempts; "
        "wait or ask an administrator"
    )


def _admins(users: Iterable[User]) -> list[User]:
    return [u for u in users if Role.ADMIN in u.roles and not u.disabled]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
