"""Tokens of the control site's query API: one per user, stored hashed, expiring, revocable.

A token is ``bst_`` followed by 32 random bytes in URL-safe base64. The store keeps its id,
user, creation, expiry and revocation times and the SHA-256 of the secret, never the secret:
``bedside control-site token create`` prints the secret once, and nothing shows it again.

Why a plain SHA-256 and not a password hash (bcrypt, scrypt, argon2): those are slow to make
guessing a *low-entropy* password expensive. A token has 256 random bits; nobody can guess it
at any speed, so a slow hash would only slow every request. A fast hash of a secret that cannot
be guessed is as safe, and it lets the check be an index lookup of the presented token's hash:
no stored secret is ever compared byte by byte, so response timing reveals nothing about it
(an attacker chooses the lookup key only through SHA-256).

``bedside control-site init`` makes an ``admin`` token and writes it to
``<state dir>/api-token`` (mode 0600, folder 0700) instead of printing it.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from agent.record.format import format_time, parse_time
from controlsite.store.base import ControlSiteError, Store, Token

PREFIX = "bst_"
MAX_PRESENTED = 256  # longer bearer values are refused before hashing
MAX_EXPIRES_DAYS = 3650
TOKEN_FILE = "api-token"
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class TokenError(ControlSiteError):
    """A bad user name or expiry, an unknown token id, or an unreadable token file."""


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token just created: ``secret`` exists only here and in what the caller does with it."""

    token: Token
    secret: str


def digest(secret: str) -> str:
    """The SHA-256 hex of a token's secret: what the store keeps and looks up."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def issue(
    store: Store, user: str, *, now: datetime, expires_days: float | None = None
) -> IssuedToken:
    """Create a token for ``user``, valid until ``expires_days`` from ``now`` (or forever)."""
    if not isinstance(user, str) or not USER_RE.match(user):
        raise TokenError(
            f"user {user!r} is not valid: 1-64 letters, digits or ._@- starting with a letter "
            "or digit"
        )
    expires = None
    if expires_days is not None:
        if not 0 < expires_days <= MAX_EXPIRES_DAYS:
            raise TokenError(f"--expires-days {expires_days} is not in 1..{MAX_EXPIRES_DAYS} days")
        expires = format_time(now + timedelta(days=expires_days))
    secret = PREFIX + secrets.token_urlsafe(32)
    token = Token(
        id=secrets.token_hex(6), user=user, created=format_time(now), expires=expires, revoked=None
    )
    store.add_token(token, digest(secret))
    return IssuedToken(token, secret)


def authenticate(store: Store, presented: str, now: datetime) -> Token | None:
    """The live token whose secret is ``presented``; None if unknown, expired or revoked."""
    if not presented.startswith(PREFIX) or len(presented) > MAX_PRESENTED:
        return None
    token = store.token_by_digest(digest(presented))
    if token is None or token.revoked is not None:
        return None
    if token.expires is not None and parse_time(token.expires) <= now:
        return None
    return token


def revoke(store: Store, token_id: str, now: datetime) -> Token:
    """Revoke the token ``token_id`` (kept revoked at its first time if already revoked)."""
    token = store.revoke_token(token_id, format_time(now))
    if token is None:
        raise TokenError(f"no token with id {token_id!r}; `bedside control-site token list`")
    return token


def init_state(state_dir: str | Path, store: Store, *, now: datetime, force: bool = False) -> Token:
    """Create ``state_dir`` (0700) and an ``admin`` token written to its ``api-token`` file
    (0600). An existing token file is kept unless ``force``; with it, the token the file held
    is revoked once the new one is written."""
    path = Path(state_dir) / TOKEN_FILE
    old: str | None = None
    if path.exists():
        if not force:
            raise TokenError(f"{path} already exists; replacing the admin token needs --force")
        try:  # whatever its mode (a file others could read is why one replaces it)
            old = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            old = None
    issued = issue(store, "admin", now=now)
    try:
        _write_private(path, issued.secret)
    except OSError as exc:
        store.revoke_token(issued.token.id, format_time(now))  # nobody holds it: retire it
        raise TokenError(f"cannot write the admin token into {path.parent}: {exc}") from exc
    if old is not None:
        previous = store.token_by_digest(digest(old))
        if previous is not None:
            store.revoke_token(previous.id, format_time(now))
    return issued.token


def _write_private(path: Path, secret: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secret + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_api_token(state_dir: str | Path) -> str:
    """The token ``init_state`` wrote (for a client on the control-site machine); refuses a
    token file others can read."""
    path = Path(state_dir) / TOKEN_FILE
    try:
        if path.stat().st_mode & 0o077:
            raise TokenError(f"{path} is readable by others; chmod 600 it")
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError as exc:
        raise TokenError(f"no API token at {path}; run `bedside control-site init`") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenError(f"cannot read the API token {path}: {exc}") from exc
    if not token:
        raise TokenError(f"the API token file {path} is empty")
    return token
