"""The unit's user accounts: one JSON file (``users.json``) in the state folder.

Each account is a unique, lower-case name with the printed (full) name its signatures show, its
roles, an argon2id password hash, and the counters the lockout needs. The file is written
atomically (temporary file, fsync, rename) with mode 0600 under an advisory lock, and every
read checks whether another process (the ``bedside users`` CLI next to a running agent)
replaced it, so a disabled account is refused at once everywhere.

Password rules (``password_problems``; every problem is reported at once):

- at least 10 characters (and at most 256);
- at least two kinds of character among lower-case, upper-case, digits and others;
- at least 5 different characters (no ``aaaaaaaaaa`` or ``abababab12``);
- not containing the user name.

Errors of users, authentication and signatures form one tree::

    AuthError                    any refusal by the user store, authentication or signatures
    ├── UserStoreError           users.json cannot be read or written; names the file and why
    ├── UserError                bad or duplicate name, unknown account for an admin action,
    │                            a role change that breaks separation of duties
    ├── PasswordRejected         the password breaks the rules (``problems`` lists them all)
    ├── AuthenticationFailed     unknown user or wrong password, disabled or locked account
    ├── NotAuthorized            (agent.auth.permissions) the user's roles do not allow the action
    └── SignatureInvalid         (agent.auth.signatures) a signature does not match its record,
                                 or two signatures break the two-person rule
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from agent.record.format import RecordFormatError, format_time, parse_time
from agent.text.safe import escaped, plain_text_problem

log = structlog.get_logger(__name__)

USERS_FILE = "users.json"
FORMAT = 1
MIN_PASSWORD = 10
MAX_PASSWORD = 256
_NAME_RE = re.compile(r"^[a-z][a-z0-9._-]{1,31}$")
_FIELDS = frozenset(
    {
        "full_name",
        "roles",
        "hash",
        "disabled",
        "failed_attempts",
        "locked_until",
        "created",
        "password_changed",
    }
)


class AuthError(Exception):
    """Any refusal by the user store, authentication or signatures."""


class UserStoreError(AuthError):
    """``users.json`` cannot be read or written."""


class UserError(AuthError):
    """A bad or duplicate name, an unknown account, or a forbidden account change."""


class PasswordRejected(AuthError):
    """The password breaks the password rules; ``problems`` lists every broken rule."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("password rejected: " + "; ".join(problems))
        self.problems = list(problems)


class AuthenticationFailed(AuthError):
    """Unknown user or wrong password, or a disabled or locked account."""


@dataclass(frozen=True)
class User:
    """One account. ``name`` is the unique login id; ``full_name`` is printed on signatures."""

    name: str
    full_name: str
    roles: tuple[str, ...]
    hash: str
    disabled: bool
    failed_attempts: int
    locked_until: datetime | None
    created: datetime
    password_changed: datetime

    def locked_at(self, now: datetime) -> bool:
        """Whether the account is locked out at ``now``."""
        return self.locked_until is not None and now < self.locked_until

    def public(self) -> dict[str, Any]:
        """The account without its hash (for listings and audit records)."""
        return {
            "name": self.name,
            "full_name": self.full_name,
            "roles": list(self.roles),
            "disabled": self.disabled,
            "failed_attempts": self.failed_attempts,
            "locked_until": format_time(self.locked_until) if self.locked_until else None,
            "created": format_time(self.created),
            "password_changed": format_time(self.password_changed),
        }


def normalise_name(name: str) -> str:
    """The login id for ``name`` (trimmed, lower-case); refuses names that are not ids."""
    clean = name.strip().lower()
    if not _NAME_RE.match(clean):
        raise UserError(
            f"user name {name!r} is not valid: 2-32 characters, a letter first, then letters, "
            "digits, '.', '_' or '-'"
        )
    return clean


def is_name(name: str) -> bool:
    """Whether ``name`` (trimmed, any case) could be a login id at all."""
    return len(name) <= 64 and bool(_NAME_RE.match(name.strip().lower()))


def escaped_name(name: str, limit: int = 32) -> str:
    """An attacker-chosen name as safe to journal and print (``agent.text.safe.escaped``)."""
    return escaped(name, limit)


MAX_FULL_NAME = 100
MAX_WHY = 500


def check_text(value: str, what: str, limit: int) -> str:
    """``value`` if it is at most ``limit`` characters of plain text (no control, format or
    surrogate characters): it is printed on signatures and kept in the journal."""
    if len(value) > limit:
        raise UserError(f"{what} has {len(value)} characters; at most {limit}")
    problem = plain_text_problem(value)
    if problem:
        raise UserError(f"{what}: {problem}")
    return value


def password_problems(password: str, *, name: str) -> list[str]:
    """Every password rule ``password`` breaks (see the module docstring); empty when fine."""
    problems = []
    if len(password) < MIN_PASSWORD:
        problems.append(f"it has {len(password)} characters; at least {MIN_PASSWORD} are needed")
    if len(password) > MAX_PASSWORD:
        problems.append(f"it has {len(password)} characters; at most {MAX_PASSWORD} are allowed")
    kinds = [
        any(c.islower() for c in password),
        any(c.isupper() for c in password),
        any(c.isdigit() for c in password),
        any(not c.isalnum() for c in password),
    ]
    if sum(kinds) < 2:
        problems.append("it uses one kind of character; mix letters with digits, capitals or signs")
    if len(set(password)) < 5:
        problems.append("it has fewer than 5 different characters")
    if name and name.lower() in password.lower():
        problems.append("it contains the user name")
    return problems


def check_password_rules(password: str, *, name: str) -> None:
    """Raise ``PasswordRejected`` naming every rule ``password`` breaks."""
    problems = password_problems(password, name=name)
    if problems:
        raise PasswordRejected(problems)


class UserStore:
    """The accounts in ``users.json``. Reads follow changes made by other processes; every
    change is a locked read-modify-write of the whole file. ``hasher`` sets the argon2
    parameters (tests pass cheap ones); hashes made with other parameters are upgraded at the
    next successful login."""

    def __init__(self, path: str | Path, *, hasher: PasswordHasher | None = None) -> None:
        self.path = Path(path)
        self.hasher = hasher or PasswordHasher()
        self._users: dict[str, User] = {}
        self._seen: tuple[int, int, int] | None = None

    @classmethod
    def in_dir(cls, state_dir: str | Path, *, hasher: PasswordHasher | None = None) -> UserStore:
        """The store of the unit whose state folder is ``state_dir``."""
        return cls(Path(state_dir) / USERS_FILE, hasher=hasher)

    # --- reading ------------------------------------------------------------------------------

    def get(self, name: str) -> User | None:
        """The account called ``name`` (any case), or None."""
        self._refresh()
        return self._users.get(name.strip().lower())

    def all(self) -> list[User]:
        """Every account, by name."""
        self._refresh()
        return [self._users[n] for n in sorted(self._users)]

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._users, self._seen = {}, None
            return
        except OSError as exc:
            raise UserStoreError(f"cannot read {self.path}: {exc}") from exc
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return
        if st.st_mode & 0o077:
            log.warning("users_file_exposed", path=str(self.path), mode=f"{st.st_mode & 0o777:o}")
        try:
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            raise UserStoreError(f"cannot read {self.path}: {exc}") from exc
        self._users = _parse(doc, self.path)
        self._seen = seen

    # --- passwords ----------------------------------------------------------------------------

    def hash_password(self, password: str) -> str:
        """An argon2id hash of ``password`` with this store's parameters (CPU-heavy)."""
        return self.hasher.hash(password)

    def password_matches(self, user: User, password: str) -> bool:
        """Whether ``password`` is ``user``'s (CPU-heavy; run it off the event loop)."""
        return self.hash_matches(user.hash, password, user=user.name)

    def hash_matches(self, digest: str, password: str, *, user: str = "") -> bool:
        """Whether ``password`` matches the argon2 hash ``digest`` (CPU-heavy)."""
        try:
            return self.hasher.verify(digest, password)
        except VerifyMismatchError:
            return False
        except (InvalidHashError, VerificationError) as exc:
            log.error("password_hash_unusable", user=user, error=str(exc))
            return False

    def needs_rehash(self, user: User) -> bool:
        """Whether ``user``'s hash was made with other parameters than this store's."""
        try:
            return self.hasher.check_needs_rehash(user.hash)
        except InvalidHashError:
            return True

    # --- changing -----------------------------------------------------------------------------

    def insert(self, user: User) -> User:
        """Add a new account; refuses a name already taken."""

        def add(users: dict[str, User]) -> User:
            if user.name in users:
                raise UserError(f"user {user.name!r} already exists")
            users[user.name] = user
            return user

        return self._mutate(add)

    def update(self, name: str, change: Callable[[User], User]) -> User:
        """Replace account ``name`` with ``change(current)``; refuses an unknown name."""

        def apply(users: dict[str, User]) -> User:
            current = users.get(name)
            if current is None:
                raise UserError(f"no user {name!r}")
            users[name] = new = change(current)
            return new

        return self._mutate(apply)

    def update_many(self, change: Callable[[dict[str, User]], User]) -> User:
        """Apply ``change`` to all accounts at once (for checks spanning accounts)."""
        return self._mutate(change)

    def _mutate(self, change: Callable[[dict[str, User]], User]) -> User:
        with self._locked():
            self._seen = None  # re-read under the lock whatever the stat says
            self._refresh()
            users = dict(self._users)
            result = change(users)
            self._write(users)
            self._users = users
        return result

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise UserStoreError(f"cannot lock {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _write(self, users: dict[str, User]) -> None:
        doc = {"format": FORMAT, "users": {n: _dump(users[n]) for n in sorted(users)}}
        data = (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.fchmod(fd, 0o600)  # the umask may have narrowed it; never widened
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself reaches the disk
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise UserStoreError(f"cannot write {self.path}: {exc}") from exc
        st = self.path.stat()
        self._seen = (st.st_ino, st.st_mtime_ns, st.st_size)


def _dump(user: User) -> dict[str, Any]:
    body = user.public()
    del body["name"]
    body["hash"] = user.hash
    return body


def _parse(doc: Any, path: Path) -> dict[str, User]:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UserStoreError(f"{path} is not a Bedside user file (format {FORMAT})")
    users: dict[str, User] = {}
    for name, raw in (doc.get("users") or {}).items():
        where = f"{path}: users.{name}"
        if not isinstance(raw, dict) or set(raw) != _FIELDS:
            have = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise UserStoreError(f"{where} has fields {have}, expected {sorted(_FIELDS)}")
        try:
            if normalise_name(name) != name:
                raise UserError(f"name {name!r} is not lower-case")
            locked = raw["locked_until"]
            users[name] = User(
                name=name,
                full_name=str(raw["full_name"]),
                roles=tuple(str(r) for r in raw["roles"]),
                hash=str(raw["hash"]),
                disabled=bool(raw["disabled"]),
                failed_attempts=int(raw["failed_attempts"]),
                locked_until=parse_time(locked) if locked else None,
                created=parse_time(raw["created"]),
                password_changed=parse_time(raw["password_changed"]),
            )
        except (UserError, RecordFormatError, TypeError, ValueError) as exc:
            raise UserStoreError(f"{where}: {exc}") from exc
    return users


def new_user(
    name: str, full_name: str, roles: Sequence[str], password_hash: str, now: datetime
) -> User:
    """A fresh, enabled account (the caller has checked the name, roles and password)."""
    if not full_name.strip():
        raise UserError(f"user {name!r} needs a full name: it is printed on signatures")
    check_text(full_name, "the full name", MAX_FULL_NAME)
    return User(
        name=name,
        full_name=full_name.strip(),
        roles=tuple(sorted(set(roles))),
        hash=password_hash,
        disabled=False,
        failed_attempts=0,
        locked_until=None,
        created=now,
        password_changed=now,
    )


def with_password(user: User, password_hash: str, now: datetime) -> User:
    """``user`` with a new password hash (and a clean failure count)."""
    return replace(
        user, hash=password_hash, password_changed=now, failed_attempts=0, locked_until=None
    )
