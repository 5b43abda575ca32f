"""Electronic signatures bound to their records (21 CFR 11.50, 11.70; Annex 11 §14).

A ``Signature`` shows the signer's id and printed name, the meaning and the UTC time, and holds
the SHA-256 of the RFC 8785 canonical JSON of the signed record. ``verify_binding`` fails once
the record has changed, so a signature cannot be copied to another record or survive an edit.
``check_distinct`` enforces the two-person rule. Signatures are made by
``agent.auth.authenticator.Authenticator.sign``, which asks for the password every time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from agent.auth.permissions import Meaning
from agent.auth.users import AuthError
from agent.record.format import canonical


class SignatureInvalid(AuthError):
    """A signature does not match its record, or signatures break the two-person rule."""


# --- signatures -------------------------------------------------------------------------------


def record_sha256(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the RFC 8785 canonical JSON of ``record``."""
    return hashlib.sha256(canonical(dict(record), what="signed record")).hexdigest()


@dataclass(frozen=True)
class Signature:
    """An electronic signature: who (id and printed name), what it means, when, on what."""

    user: str
    full_name: str
    meaning: str
    time: str  # RFC 3339 UTC with microseconds
    record_hash: str  # SHA-256 of the canonical JSON of the signed record

    def as_dict(self) -> dict[str, str]:
        """The body to journal."""
        return asdict(self)

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> Signature:
        """A signature read back from a journal body; refuses missing fields."""
        try:
            return cls(**{f.name: str(body[f.name]) for f in fields(cls)})
        except KeyError as exc:
            raise SignatureInvalid(f"signature lacks the field {exc.args[0]!r}") from exc


def _sig(signature: Signature | Mapping[str, Any]) -> Signature:
    return signature if isinstance(signature, Signature) else Signature.from_dict(signature)


def verify_binding(signature: Signature | Mapping[str, Any], record: Mapping[str, Any]) -> None:
    """Raise ``SignatureInvalid`` unless ``signature`` was made on exactly this ``record``."""
    sig = _sig(signature)
    now = record_sha256(record)
    if now != sig.record_hash:
        raise SignatureInvalid(
            f"the {sig.meaning} signature of {sig.user} ({sig.time}) is void: the record "
            f"changed since it was signed (signed {sig.record_hash[:12]}…, now {now[:12]}…)"
        )


def check_distinct(signatures: Iterable[Signature | Mapping[str, Any]]) -> None:
    """Two-person rule: refuse a ``verified`` signature by someone who signed ``performed``."""
    sigs = [_sig(s) for s in signatures]
    performers = {s.user for s in sigs if s.meaning == Meaning.PERFORMED}
    for s in sigs:
        if s.meaning == Meaning.VERIFIED and s.user in performers:
            raise SignatureInvalid(
                f"two-person rule: {s.user} cannot verify a step they performed; "
                "another person must verify"
            )
